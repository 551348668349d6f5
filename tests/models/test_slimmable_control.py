"""The width controller on hand-made tables: budget, preferences, Spearman, controllability, CLI."""
import itertools
import json
import math

import pytest

from mtl.models.slimmable.control import (budgets_between, check_preference, control_report, controllability, min_flops,
                                          sample_preferences, search, spearman)
from mtl.models.slimmable.search_cli import main as search_main
from mtl.models.slimmable.table import WidthTable


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


def test_search_never_exceeds_a_budget_that_some_config_meets():
    t = table()
    prefs = [{"A": a, "B": 1 - a} for a in (0.0, 0.2, 0.5, 0.7, 1.0)]
    for budget in range(12, 60):
        for p in prefs:
            feasible = [c for c in all_configs(t) if t.flops(c) <= budget]
            choice = search(t, budget, p)
            assert feasible and choice.flops <= budget, (budget, p, choice)
            assert choice.flops == t.flops(choice.config)


def test_preferred_task_gets_the_wider_decoder_and_the_encoder_fills_the_budget():
    t = table()
    c = search(t, 100, {"A": 0.8, "B": 0.2})
    assert c.config == {"encoder": 1.0, "decoders": {"A": 1.0, "B": 0.5}}
    assert c.expected == {"A": {"acc": 0.9}, "B": {"rmse": 2.0}}
    # 40 + 6 + 2 = 48 does not fit 47: encoder steps down to 0.5 (10 + 3 + 1 = 14)
    assert search(t, 47, {"A": 0.8, "B": 0.2}).config == {"encoder": 0.5, "decoders": {"A": 1.0, "B": 0.5}}
    # 13 FLOPs: only the least preferred can give: B is already at 0.5, so A narrows
    assert search(t, 13, {"A": 0.8, "B": 0.2}).config == {"encoder": 0.5, "decoders": {"A": 0.5, "B": 0.5}}


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
    r = controllability(t, 100, prefs)
    hand = 1.5 / math.sqrt(3.0)
    assert r["spearman"] == {"A": pytest.approx(hand), "B": pytest.approx(hand)}
    assert r["controllability"] == pytest.approx(hand)
    assert r["adherence"] == 1.0


def test_control_report_over_budgets_is_positive_and_within_budget():
    t = table()
    report = control_report(t, budgets_between(t, 5), n_preferences=20)
    assert report["adherence"] == 1.0 and report["controllability"] > 0
    for p in sample_preferences(t.tasks, 50, seed=3):
        assert min(p.values()) >= 0 and sum(p.values()) == pytest.approx(1, abs=1e-12)
        check_preference(t, p)


@pytest.mark.parametrize("budget,pref,exc,match", [
    (11, {"A": 0.5, "B": 0.5}, ValueError, r"budget 11 FLOPs is below the smallest reachable configuration \(12 FLOPs"),
    (-5, {"A": 0.5, "B": 0.5}, ValueError, r"positive number of FLOPs, got -5"),
    (50, {"A": -0.2, "B": 1.2}, ValueError, r"preference of task 'A' is -0\.2"),
    (50, {"A": 0.6, "B": 0.6}, ValueError, r"sum to 1\.2, not 1 .*not renormalised"),
    (50, {"A": 0.5, "B": 0.5, "C": 0.0}, KeyError, r"unknown task\(s\) \['C'\]"),
    (50, {"A": 1.0}, ValueError, r"misses task\(s\) \['B'\]"),
])
def test_bad_search_input_is_refused_naming_the_value(budget, pref, exc, match):
    with pytest.raises(exc, match=match):
        search(table(), budget, pref)


def test_search_cli_prints_the_choice_and_one_line_errors(tmp_path, capsys):
    path = tmp_path / "width_table.json"
    table().save(path)
    assert search_main([str(path), "--budget", "100", "--preference", "A=0.8,B=0.2"]) == 0
    out = capsys.readouterr().out
    assert "encoder width: 1" in out and "A: decoder width 1; expected acc=0.9000" in out and "48" in out
    assert search_main([str(path), "--budget", "0.1k", "--preference", "A=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["flops"] <= 100
    assert search_main([str(path), "--budget", "5", "--preference", "A=1"]) == 1
    assert "below the smallest reachable configuration (12 FLOPs" in capsys.readouterr().err
    assert search_main([str(path), "--budget", "50", "--preference", "A=0.7"]) == 1
    assert "sum to 0.7" in capsys.readouterr().err


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
