"""The width controller on hand-made tables: budget, preferences, Spearman, controllability, CLI."""
import itertools
import json
import math
import re

import pytest

from mtl.models.slimmable.control import (budgets_between, check_preference, control_report, controllability, min_flops,
                                          ordered_assignments, sample_preferences, search, spearman)
from mtl.models.slimmable.search_cli import main as search_main
from mtl.models.slimmable.table import WidthTable, wkey


def table(width_set=(0.5, 1.0)):
    """Two tasks: A (accuracy, higher better), B (rmse, lower better). FLOPs: encoder 10/40, heads below."""
    return WidthTable(
        width_set=list(width_set), tasks=["A", "B"], primary={"A": "acc", "B": "rmse"},
        higher_is_better={"A": True, "B": False},
        encoder_flops={"0.5": 10, "1": 40},
        head_flops={t: {"0.5": {"0.5": 1, "1": 3}, "1": {"0.5": 2, "1": 6}} for t in ("A", "B")},
        metrics={"A": {"0.5": {"0.5": {"acc": 0.5}, "1": {"acc": 0.6}}, "1": {"0.5": {"acc": 0.7}, "1": {"acc": 0.9}}},
                 "B": {"0.5": {"0.5": {"rmse": 3.0}, "1": {"rmse": 2.5}}, "1": {"0.5": {"rmse": 2.0}, "1": {"rmse": 1.0}}}},
        input_size=[8, 8])


def all_configs(t):
    for we, wa, wb in itertools.product(t.width_set, repeat=3):
        yield {"encoder": we, "decoders": {"A": wa, "B": wb}}


def test_flops_add_up_over_parts():
    t = table()
    assert t.flops({"encoder": 1.0, "decoders": {"A": 0.5, "B": 1.0}}) == 40 + 2 + 6
    assert min_flops(t) == 12


@pytest.mark.parametrize("method", ["measured", "rule"])
def test_search_never_exceeds_a_budget_that_some_config_meets(method):
    t = table()
    prefs = [{"A": a, "B": 1 - a} for a in (0.0, 0.2, 0.5, 0.7, 1.0)]
    for budget in range(12, 60):
        for p in prefs:
            feasible = [c for c in all_configs(t) if t.flops(c) <= budget]
            choice = search(t, budget, p, method)
            assert feasible and choice.flops <= budget, (budget, p, choice)
            assert choice.flops == t.flops(choice.config)


def test_rule_gives_the_preferred_task_the_wider_decoder_and_the_encoder_fills_the_budget():
    t = table()
    c = search(t, 100, {"A": 0.8, "B": 0.2}, "rule")
    assert c.config == {"encoder": 1.0, "decoders": {"A": 1.0, "B": 0.5}}
    assert c.expected == {"A": {"acc": 0.9}, "B": {"rmse": 2.0}}
    # 40 + 6 + 2 = 48 does not fit 47: encoder steps down to 0.5 (10 + 3 + 1 = 14)
    assert search(t, 47, {"A": 0.8, "B": 0.2}, "rule").config == {"encoder": 0.5, "decoders": {"A": 1.0, "B": 0.5}}
    # 13 FLOPs: only the least preferred can give: B is already at 0.5, so A narrows
    assert search(t, 13, {"A": 0.8, "B": 0.2}, "rule").config == {"encoder": 0.5, "decoders": {"A": 0.5, "B": 0.5}}


def test_measured_search_maximises_the_preference_weighted_scaled_metrics():
    t = table()
    # scaled utilities: A acc (0.5..0.9): u = (acc - 0.5) / 0.4; B -rmse (-3..-1): u = (3 - rmse) / 2
    u = {"A": lambda e, d: (t.metrics["A"][e][d]["acc"] - 0.5) / 0.4,
         "B": lambda e, d: (3 - t.metrics["B"][e][d]["rmse"]) / 2}
    p = {"A": 0.8, "B": 0.2}
    # budget 47: encoder 1 needs 40 + heads <= 7: (A, B) = (0.5, 0.5) -> 44 or (1, 0.5) -> 48 (no).
    #   enc 1, (0.5, 0.5): 0.8 * 0.5 + 0.2 * 0.5 = 0.5 ; enc 0.5, (1, 1): 0.8 * 0.25 + 0.2 * 0.25 = 0.25
    #   enc 0.5, (1, 0.5): 0.8 * 0.25 + 0 = 0.2 -> the measured choice keeps the wide encoder
    assert u["A"]("1", "0.5") == pytest.approx(0.5) and u["B"]("1", "0.5") == pytest.approx(0.5)
    c = search(t, 47, p)
    assert c.config == {"encoder": 1.0, "decoders": {"A": 0.5, "B": 0.5}} and c.flops == 44
    # the rule spends the budget on A's decoder instead and gets a worse A (0.6 < 0.7)
    assert search(t, 47, p, "rule").expected["A"]["acc"] == 0.6 < c.expected["A"]["acc"] == 0.7
    # unlimited: everything at full width
    assert search(t, 100, p).config == {"encoder": 1.0, "decoders": {"A": 1.0, "B": 1.0}}


def test_measured_search_never_gives_a_more_preferred_task_a_narrower_decoder():
    import random

    rng = random.Random(0)
    ws = [0.25, 0.5, 0.75, 1.0]
    tasks = ["a", "b", "c"]
    for trial in range(30):
        metrics = {x: {wkey(e): {wkey(d): {"m": rng.random()} for d in ws} for e in ws} for x in tasks}
        heads = {x: {wkey(e): {wkey(d): int(100 * e * d) for d in ws} for e in ws} for x in tasks}
        t = WidthTable(ws, tasks, {x: "m" for x in tasks}, {x: True for x in tasks}, {wkey(e): int(1000 * e) for e in ws},
                       heads, metrics, [8, 8])
        for p in sample_preferences(tasks, 10, seed=trial):
            budget = rng.uniform(min_flops(t), t.flops(t.uniform(1.0)))
            c = search(t, budget, p)
            for x, y in itertools.permutations(tasks, 2):
                if p[x] > p[y]:
                    assert c.config["decoders"][x] >= c.config["decoders"][y], (p, c.config)
            # the encoder fills: the next wider encoder width would not fit
            wider = [e for e in ws if e > c.config["encoder"]]
            if wider:
                assert t.flops({"encoder": wider[0], "decoders": c.config["decoders"]}) > budget


def test_ordered_assignments_enumerates_exactly_the_monotone_ones():
    tasks = ["a", "b", "c"]
    pref = {"a": 0.5, "b": 0.25, "c": 0.25}  # a > b = c
    got = {tuple(lv[x] for x in tasks) for lv in ordered_assignments(tasks, pref, 3)}
    want = {lv for lv in itertools.product(range(3), repeat=3) if lv[0] >= lv[1] and lv[0] >= lv[2]}
    assert got == want and len(got) == 1 + 4 + 9


def test_held_out_controllability_reads_the_achieved_table():
    t = table()
    other = WidthTable.from_json(t.to_json())
    # on the held-out table A's accuracy falls with its decoder width: a perfect anti-correlation
    other.metrics["A"] = {e: {"0.5": {"acc": 0.9}, "1": {"acc": 0.5}} for e in ("0.5", "1")}
    prefs = [{"A": 0.8, "B": 0.2}, {"A": 0.2, "B": 0.8}]
    # budget 100: both choices are all-full-width under "measured"; under "rule" A gets 1 / 0.5
    r = controllability(t, 100, prefs, "rule", achieved=other)
    assert r["spearman"]["A"] == pytest.approx(-1.0)
    assert controllability(t, 100, prefs, "rule")["spearman"]["A"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="does not match the search's table"):
        controllability(t, 100, prefs, achieved=table(width_set=(0.25, 1.0)))


def test_spearman_matches_hand_computed_values():
    # no ties: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # ties share their average rank: ranks x = 1, 2.5, 2.5, 4 -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [5, 5, 5]) == 0.0


def test_controllability_of_a_hand_made_table():
    t = table()
    prefs = [{"A": 0.8, "B": 0.2}, {"A": 0.5, "B": 0.5}, {"A": 0.2, "B": 0.8}]
    # budget 100: encoder 1.0; A's decoder 1, 1, 0.5 -> acc 0.9, 0.9, 0.7; B's 0.5, 1, 1 -> rmse 2, 1, 1
    # A: prefs ranks 3,2,1 vs scores ranks 2.5,2.5,1 -> 1.5 / sqrt(2 * 1.5); B the same by symmetry
    r = controllability(t, 100, prefs, "rule")
    hand = 1.5 / math.sqrt(3.0)
    assert r["spearman"] == {"A": pytest.approx(hand), "B": pytest.approx(hand)}
    assert r["controllability"] == pytest.approx(hand)
    assert r["adherence"] == 1.0


def test_control_report_over_budgets_is_positive_and_within_budget():
    t = table()
    report = control_report(t, budgets_between(t, 5), n_preferences=20, method="rule")
    assert report["adherence"] == 1.0 and report["controllability"] > 0
    # here the wide encoder beats any decoder width for both tasks: the measured search picks the same
    # configuration whatever the preferences, so nothing follows them (0, not negative)
    report = control_report(t, budgets_between(t, 5), n_preferences=20)
    assert report["adherence"] == 1.0 and report["controllability"] == 0.0
    for p in sample_preferences(t.tasks, 50, seed=3):
        assert min(p.values()) >= 0 and sum(p.values()) == pytest.approx(1, abs=1e-12)
        check_preference(t, p)


def test_budget_strings_read_as_in_the_cli():
    assert search(table(), "0.1k", {"A": 0.8, "B": 0.2}) == search(table(), 100, {"A": 0.8, "B": 0.2})


@pytest.mark.parametrize("budget,pref,exc,match", [
    (11, {"A": 0.5, "B": 0.5}, ValueError, r"budget 11 FLOPs is below the smallest reachable configuration \(12 FLOPs"),
    (-5, {"A": 0.5, "B": 0.5}, ValueError, r"positive number of FLOPs, got -5"),
    (50, {"A": -0.2, "B": 1.2}, ValueError, r"preference of task 'A' is -0\.2"),
    (50, {"A": 0.6, "B": 0.6}, ValueError, r"sum to 1\.2, not 1 .*not renormalised"),
    (50, {"A": 0.5, "B": 0.5, "C": 0.0}, KeyError, r"unknown task\(s\) \['C'\]"),
    (50, {"A": 1.0}, ValueError, r"misses task\(s\) \['B'\]"),
    ("20X", {"A": 0.5, "B": 0.5}, ValueError, r"budget must be a number of FLOPs such as 4\.2e7 or '42M', got '20X'"),
])
def test_bad_search_input_is_refused_naming_the_value(budget, pref, exc, match):
    with pytest.raises(exc, match=match):
        search(table(), budget, pref)


def test_a_preference_rounded_just_below_zero_reads_as_zero():
    # what 1 - p1 - p2 gives in float arithmetic for some splits: 0 within the sum's tolerance
    assert search(table(), 50, {"A": 1.0, "B": -1e-16}) == search(table(), 50, {"A": 1.0, "B": 0.0})
    with pytest.raises(ValueError, match=r"preference of task 'B' is -0\.001"):
        search(table(), 50, {"A": 1.001, "B": -0.001})


def test_search_cli_prints_the_choice_and_one_line_errors(tmp_path, capsys):
    path = tmp_path / "width_table.json"
    table().save(path)
    assert search_main([str(path), "--budget", "100", "--preference", "A=0.8,B=0.2"]) == 0
    out = capsys.readouterr().out
    assert "encoder width: 1" in out and "A: decoder width 1; expected acc=0.9000" in out and "FLOPs per image: 52 " in out
    assert "B: decoder width 1; expected rmse=1.0000" in out
    assert search_main([str(path), "--budget", "100", "--preference", "A=0.8,B=0.2", "--method", "rule"]) == 0
    out = capsys.readouterr().out
    assert "B: decoder width 0.5; expected rmse=2.0000" in out and "FLOPs per image: 48 " in out
    assert search_main([str(path), "--budget", "0.1k", "--preference", "A=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] <= 100
    assert search_main([str(path), "--budget", "5", "--preference", "A=1"]) == 1
    assert "below the smallest reachable configuration (12 FLOPs" in capsys.readouterr().err
    assert search_main([str(path), "--budget", "50", "--preference", "A=0.7"]) == 1
    assert "sum to 0.7" in capsys.readouterr().err
    assert search_main([str(path), "--budget", "50", "--preference", "A=0.5,B=0.5,A=0.5"]) == 1
    assert "names task 'A' twice" in capsys.readouterr().err
    assert search_main([str(tmp_path), "--budget", "50", "--preference", "A=1"]) == 1  # a folder: one line
    assert "is a folder, not a JSON file" in capsys.readouterr().err
    for bad in ({"A": True, "B": False}, {"A": "0.5", "B": 0.5}):  # widths refuse bools and strings too
        with pytest.raises(ValueError, match="preferences are numbers >= 0"):
            search(table(), 50, bad)


def test_width_table_of_a_model_predicts_mixed_configurations_exactly():
    """The grid's per-task metrics and additive FLOPs equal a direct evaluation at a mixed configuration."""
    import torch

    from mtl.flops import count_flops
    from mtl.models import create_model
    from mtl.models.slimmable.table import build_width_table

    torch.manual_seed(0)
    model = create_model(["semseg", "depth"], backbone={"name": "slim_resnet", "stem": 4, "channels": [8, 8],
                                                        "out_indices": [1, 2], "widths": [0.5, 1.0]},
                         decoder={"name": "slimmable", "channels": 8, "widths": [0.5, 1.0]}, family="slimmable").eval()
    batch = {"image": torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8),
             "semseg": torch.randint(0, 5, (3, 16, 16)), "depth": torch.rand(3, 1, 16, 16) + 0.1}
    t = build_width_table(model, [batch], progress=False)
    cfg = {"encoder": 0.5, "decoders": {"semseg": 1.0, "depth": 0.5}}
    model.set_config(cfg)
    assert t.flops(cfg) == count_flops(model, batch["image"][:1])
    preds = model(batch["image"])
    for name, task in model.tasks.items():
        for mname, metric in task.metrics().items():
            metric.update(preds[name], batch[name])
            assert t.expected(cfg)[name][mname] == pytest.approx(float(metric.compute()), rel=1e-6)
    assert t.higher_is_better == {"semseg": True, "depth": False}


def test_score_controller_reports_the_held_out_score_and_both_methods():
    from mtl.models.slimmable.control import score_controller

    t = table()
    test = WidthTable.from_json(t.to_json())
    test.metrics["A"] = {e: {"0.5": {"acc": 0.9}, "1": {"acc": 0.5}} for e in ("0.5", "1")}
    r = score_controller(t, test, budgets=4, preferences=10, method="rule")
    at = budgets_between(t, 4)
    assert r["method"] == "rule" and r["held_out"]
    assert r["controllability"] == control_report(t, at, 10, 0, "rule", achieved=test)["controllability"]
    assert r["compare"]["rule/in_sample"]["controllability"] == control_report(t, at, 10, 0, "rule")["controllability"]
    assert r["compare"]["rule/held_out"]["controllability"] < r["compare"]["rule/in_sample"]["controllability"]
    with pytest.raises(ValueError, match="search method must be one of"):
        search(t, 50, {"A": 0.5, "B": 0.5}, "greedy")


def test_search_cli_piped_into_a_reader_that_leaves_ends_without_a_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "width_table.json"
    table().save(path)
    proc = subprocess.Popen([sys.executable, "-m", "mtl.models.slimmable.search_cli", str(path), "--budget", "100",
                             "--preference", "A=0.8,B=0.2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the answer is written (`... | head` after its first line)
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "BrokenPipe" not in err and "Traceback" not in err, err


def table_with_missing_cell():
    """table() where B's rmse at (encoder 0.5, decoder 0.5) is NaN (a diverged sub-width): stored as null."""
    t = table()
    t.metrics["B"]["0.5"]["0.5"]["rmse"] = float("nan")
    return t


def test_spearman_gives_nan_when_a_value_is_missing():
    # a missing score has no rank (scipy.stats.spearmanr also gives nan); before, NaN sorted last: rho 1.0
    assert math.isnan(spearman([1, 2, float("nan")], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [1, float("inf"), 3]))


def test_utilities_scale_over_the_finite_cells_and_leave_the_missing_one_nan():
    from mtl.models.slimmable.control import utilities

    u = utilities(table_with_missing_cell())["B"]
    # B's finite -rmse: -2.5, -2.0, -1.0 -> (v + 2.5) / 1.5
    assert math.isnan(u["0.5"]["0.5"])
    assert u["0.5"]["1"] == pytest.approx(0.0) and u["1"]["0.5"] == pytest.approx(0.5 / 1.5) and u["1"]["1"] == 1.0


def test_measured_search_skips_configurations_with_a_missing_metric_after_a_json_round_trip(tmp_path, caplog):
    path = tmp_path / "width_table.json"
    table_with_missing_cell().save(path)
    assert json.loads(path.read_text())["metrics"]["B"]["0.5"]["0.5"]["rmse"] is None
    with caplog.at_level("WARNING"):
        t = WidthTable.load(path)
    assert f"{path}: task 'B' has no finite rmse at (encoder, decoder) widths (0.5, 0.5)" in caplog.text
    # budget 14: encoder 0.5 with (A, B) in (0.5, 0.5) [B missing] or (1, 0.5) [B missing] or (0.5, 1) -> 14
    c = search(t, 14, {"A": 0.5, "B": 0.5})
    assert c.config == {"encoder": 0.5, "decoders": {"A": 0.5, "B": 1.0}} and c.skipped == 2
    # a task preferred 0 does not weigh: its missing metric does not rule the configuration out
    assert search(t, 13, {"A": 1.0, "B": 0.0}).config == {"encoder": 0.5, "decoders": {"A": 0.5, "B": 0.5}}
    with pytest.raises(ValueError, match=r"no configuration within budget 13 FLOPs .* B at \(0\.5, 0\.5\)"):
        search(t, 13, {"A": 0.5, "B": 0.5})


def test_search_cli_on_a_table_with_a_missing_metric_says_so(tmp_path, capsys):
    path = tmp_path / "width_table.json"
    table_with_missing_cell().save(path)
    assert search_main([str(path), "--budget", "14", "--preference", "A=0.5,B=0.5"]) == 0
    captured = capsys.readouterr()
    assert "2 configuration(s) within the budget skipped" in captured.err and "B: decoder width 1;" in captured.out
    assert search_main([str(path), "--budget", "12", "--preference", "A=1", "--method", "rule", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["expected"]["B"] == {"rmse": None}


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["head_flops"]["A"]["1"].pop("0.5"),
     r"head_flops\['A'\]\['1'\]\['0\.5'\] \(task 'A' at encoder width 1, decoder width 0\.5\) is missing"),
    (lambda d: d["encoder_flops"].update({"0.5": None}), r"encoder_flops\['0\.5'\] \(encoder width 0\.5\) is missing"),
    (lambda d: d["metrics"]["B"]["1"]["1"].pop("rmse"),
     r"metrics\['B'\]\['1'\]\['1'\] has no 'rmse' \(task 'B' at encoder width 1, decoder width 1\)"),
    (lambda d: d["metrics"]["A"]["1"]["1"].update({"acc": "high"}), r"metrics\['A'\]\['1'\]\['1'\]\['acc'\] .* is 'high'"),
])
def test_a_table_missing_a_cell_is_refused_naming_file_task_and_cell(tmp_path, capsys, edit, match):
    path = _refused_edited_table(tmp_path, edit, match)
    assert str(path) in capsys.readouterr().err


def _refused_edited_table(tmp_path, edit, match):
    """table() edited by `edit`, saved: loading it is refused with `match` after the path, and so is the CLI."""
    path = tmp_path / "width_table.json"
    data = table().to_json()
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: {match}"):
        WidthTable.load(path)
    assert search_main([str(path), "--budget", "5M", "--preference", "A=1"]) == 1
    return path


def test_controllability_with_a_missing_achieved_metric_is_undefined_and_says_why():
    t = table()
    r = control_report(t, budgets_between(t, 3), n_preferences=5, method="rule", achieved=table_with_missing_cell())
    assert math.isnan(r["controllability"]) and "controllability undefined" in r["note"]
    assert r["per_budget"][0]["unscored"] == {"B": 5}  # the smallest budget: every choice at (0.5, 0.5)


def test_controllability_needs_two_preferences_and_two_budgets():
    t = table()
    with pytest.raises(ValueError, match="at least 2 preference vectors"):
        controllability(t, 100, [{"A": 0.8, "B": 0.2}], "rule")
    with pytest.raises(ValueError, match="budgets=1: give at least 2"):
        budgets_between(t, 1)


def test_controllability_of_a_single_task_table_is_undefined_with_a_note():
    d = table().to_json()
    one = WidthTable.from_json({**d, "tasks": ["A"], **{k: {"A": d[k]["A"]} for k in
                                                       ("head_flops", "metrics", "primary", "higher_is_better")}})
    r = control_report(one, budgets_between(one, 3), n_preferences=4, method="rule")
    # the only task's preference is 1.0 in every vector: no rank correlation exists (was reported as 0)
    assert math.isnan(r["controllability"]) and "needs at least 2 tasks" in r["note"]
    assert r["adherence"] == 1.0


def test_no_scored_configuration_at_a_budget_makes_it_undefined_not_a_failure():
    # the smallest configuration is the only one within the smallest budget; B's metric is missing there
    t = table_with_missing_cell()
    r = control_report(t, budgets_between(t, 3), n_preferences=5)
    first = r["per_budget"][0]
    assert first["no_choice"] > 0 and math.isnan(first["controllability"]) and math.isnan(r["controllability"])
    assert "per_budget[].no_choice" in r["note"]
    assert all(0 <= row["adherence"] <= 1 for row in r["per_budget"][1:])


@pytest.mark.parametrize("edit,match", [
    (lambda d: d.update({"head_flops": []}), r"head_flops: expected a JSON object, got list"),
    (lambda d: d["metrics"].update({"A": None}), r"metrics\['A'\]: expected a JSON object, got NoneType"),
    (lambda d: d["head_flops"]["B"].update({"1": [1, 2]}), r"head_flops\['B'\]\['1'\]: expected a JSON object, got list"),
])
def test_a_badly_shaped_table_is_one_line_naming_the_key(tmp_path, capsys, edit, match):
    _refused_edited_table(tmp_path, edit, match)
    assert "Traceback" not in capsys.readouterr().err


def test_a_table_whose_width_set_is_out_of_order_is_refused_not_searched_wrongly(tmp_path):
    """With width_set [1, 0.5] the search took 1 as the smallest configuration: a budget of 12 FLOPs, which
    every width at 0.5 meets (10 + 1 + 1), was refused as below the smallest configuration (40 + 6 + 6)."""
    t = table()
    assert search(t, 12, {"A": 0.5, "B": 0.5}).config == t.uniform(0.5)
    _refused_edited_table(tmp_path, lambda d: d.update({"width_set": [1.0, 0.5]}),
                          r"width_set must be strictly increasing widths in \(0, 1\] ending at 1 \(the full network\), "
                          r"got \[1\.0, 0\.5\]$")


@pytest.mark.parametrize("width_set", [[0.5, 0.5, 1.0], [0.0, 1.0], [0.5, 1.5], [0.5], ["0.5", 1.0], [True, 1.0], []])
def test_a_width_set_that_is_no_increasing_list_of_widths_ending_at_1_is_refused(tmp_path, width_set):
    _refused_edited_table(tmp_path, lambda d: d.update({"width_set": width_set}),
                          rf"width_set must be strictly increasing widths .* got {re.escape(repr(width_set))}$")


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["encoder_flops"].update({"0.5": -5}), r"encoder_flops\['0\.5'\] \(encoder width 0\.5\) is -5; "
                                                       r"FLOPs must be >= 0$"),
    (lambda d: d["head_flops"]["B"]["1"].update({"0.5": -1}),
     r"head_flops\['B'\]\['1'\]\['0\.5'\] \(task 'B' at encoder width 1, decoder width 0\.5\) is -1; FLOPs must be >= 0$"),
])
def test_negative_flops_are_refused_naming_the_cell(tmp_path, edit, match):
    """A negative cell was accepted and made its configurations look cheaper than the smallest one."""
    _refused_edited_table(tmp_path, edit, match)


@pytest.mark.parametrize("edit,match", [
    # width 0.5 dropped from width_set with its cells left: they were silently never considered
    (lambda d: d.update({"width_set": [1.0]}), r"encoder_flops has cells for width\(s\) \['0\.5'\] outside width_set \['1'\]"),
    (lambda d: d["head_flops"]["A"].update({"0.75": {"0.5": 1, "1": 2}}),
     r"head_flops\['A'\] has cells for width\(s\) \['0\.75'\] outside width_set \['0\.5', '1'\]"),
    (lambda d: d["metrics"]["B"]["0.5"].update({"0.25": {"rmse": 9.0}}),
     r"metrics\['B'\]\['0\.5'\] has cells for width\(s\) \['0\.25'\] outside width_set \['0\.5', '1'\]"),
])
def test_cells_of_widths_outside_the_width_set_are_refused_by_key(tmp_path, edit, match):
    _refused_edited_table(tmp_path, edit, match)


@pytest.mark.parametrize("name", ["head_flops", "metrics", "primary", "higher_is_better"])
def test_entries_for_a_task_outside_tasks_are_refused_by_key(tmp_path, name):
    """A task dropped from `tasks` with its cells left was silently never searched nor scored."""
    if name == "head_flops":  # the first one checked
        _refused_edited_table(tmp_path, lambda d: d.update({"tasks": ["A"]}),
                              r"head_flops has entries for task\(s\) \['B'\] not in tasks \['A'\]")
    _refused_edited_table(tmp_path, lambda d: d[name].update({"C": d[name]["B"]}),
                          rf"{name} has entries for task\(s\) \['C'\] not in tasks \['A', 'B'\]")


def test_choice_curves_read_the_metrics_of_the_scores_table():
    """The PNG drew the validation table's metrics while controllability.json scores the search's choices on the
    test table: with `scores`, the search reads one table and the metrics come from the other."""
    import copy

    from mtl.models.slimmable.control import choice_curves

    val = table()
    test = copy.deepcopy(val)
    test.metrics["A"]["0.5"]["0.5"]["acc"] = 0.45  # only the test table differs
    test.metrics["A"]["1"]["1"]["acc"] = 0.9
    budgets = [12]  # only the smallest configuration fits: encoder 0.5, both heads 0.5 (10 + 1 + 1)
    flops, rel = choice_curves(val, budgets, scores=test)["A"]
    assert flops == [12] and rel == [pytest.approx(0.45 / 0.9)]
    assert choice_curves(val, budgets)["A"][1] == [pytest.approx(0.5 / 0.9)]
    flops, rel = choice_curves(val, budgets, scores=test)["B"]  # lower is better: full / s
    assert rel == [pytest.approx(1.0 / 3.0)]


def test_a_preference_or_table_number_is_a_number_as_mtl_registry_is_real_takes_it():
    """A Fraction passed as a preference or a table's width (numbers.Real), though no checkpoint or JSON record holds
    it; numpy's bool is no number; np.float32 and np.int64 are."""
    from fractions import Fraction

    import numpy as np

    t = table()
    for bad in (Fraction(1, 2), np.bool_(True), True, "0.5"):
        with pytest.raises(ValueError, match=rf"^preference of task 'A' is {re.escape(repr(bad))}; preferences are "):
            check_preference(t, {"A": bad, "B": 0.5})
    assert check_preference(t, {"A": np.float32(0.25), "B": np.float64(0.75)}) == {"A": 0.25, "B": 0.75}
    assert check_preference(t, {"A": np.int64(1), "B": 0})["A"] == 1.0
    with pytest.raises(ValueError, match=r"^t: width_set must be strictly increasing widths in \(0, 1\] ending at 1"):
        table(width_set=(Fraction(1, 2), 1.0)).check("t")
    with pytest.raises(ValueError, match=r"^t: encoder_flops\['1'\] \(encoder width 1\) is Fraction\(40, 1\); expected a number"):
        table().__class__(**{**table().to_json(), "encoder_flops": {"0.5": 10, "1": Fraction(40)}}).check("t")
    table(width_set=(np.float32(0.5), 1.0)).check("t")
