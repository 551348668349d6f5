"""``round_to``: every method keeps a multiple of it per pruned layer; PAGCP's oracle only tries (and
never over-accepts) rounded counts; bad values are refused by name."""
import math

import pytest
import torch

import mtl
import pruning
from mtl.io import save_model
from mtl.models import create_model
from pruning import pagcp as pagcp_mod
from pruning.graph import LayerGraph
from pruning.job import run

from pruning_toys import TASKS, controlled_losses, toy_batches, toy_model

R = 8


@pytest.fixture(scope="module")
def model():
    return toy_model(varied_bn=False)


@pytest.fixture(scope="module")
def batches():
    return toy_batches(1)


@pytest.fixture(scope="module")
def graph(model, batches):
    return LayerGraph(model, batches[0]["image"][:2])


def _rounded(size, removed):
    """Kept count once ``removed`` (of ``size``) is rounded: kept rounds up to a multiple of R."""
    return min(size, math.ceil((size - removed) / R) * R)


def test_l1_keeps_the_rounded_uniform_count(model, batches, tmp_path):
    ratio = 0.6
    pruned, report = pruning.prune(model, "l1", calib=batches, ratio=ratio, round_to=R)
    plain, _ = pruning.prune(model, "l1", calib=batches, ratio=ratio)
    assert any(r["kept"] % R for r in _["layers"]), "the unrounded plan must have odd widths for this test to bite"
    for row in report["layers"]:
        size = row["size"]
        assert row["kept"] == _rounded(size, min(math.floor(ratio * size + 1e-9), size - 1)), row
        assert row["kept"] == size or row["kept"] % R == 0
    save_model(pruned, tmp_path / "m")  # the plan is data: the rounded folder reloads exactly
    x = batches[0]["image"]
    with torch.no_grad():
        a, b = pruned(x), mtl.load_model(tmp_path / "m")(x)
    assert all(torch.equal(a[t], b[t]) for t in TASKS)


@pytest.mark.parametrize("method,hp", [("l1_global", {"ratio": 0.5}),
                                       ("taylor", {"ratio": 0.5, "combine": "max"}),
                                       ("taylor", {"ratio": 0.5, "scope": "uniform"}),
                                       ("l1", {"flops_target": 0.5})])
def test_every_method_keeps_multiples(model, batches, method, hp):
    _, report = pruning.prune(model, method, calib=batches, round_to=R, **hp)
    pruned_layers = [r for r in report["layers"] if r["kept"] < r["size"]]
    assert pruned_layers
    for row in pruned_layers:
        assert row["kept"] % R == 0 and row["kept"] >= R, row
    if "flops_target" in hp:
        assert report["flops"]["reduction"] >= hp["flops_target"] - 0.02  # the searched ratio compensates


def test_pagcp_oracle_tries_only_rounded_counts_and_never_over_accepts(model, batches, graph, monkeypatch):
    """Controlled losses as in the unrounded oracle test: only layer A matters, semseg's loss is
    1 + f/2 (f = fraction of A's filters zeroed). With rounding, every tried count keeps a multiple of
    R, and the committed count is the largest *rounded* candidate with f/2 ≤ δ_A."""
    layer_a = "backbone.body.layer2.0.conv1"

    monkeypatch.setattr(pagcp_mod, "task_losses", controlled_losses(layer_a, {"semseg": 0.5, "depth": 0.2}))
    removed, steps = pagcp_mod.search(model, graph, batches, budget=40.0, shrink=0.9, round_to=R)
    step = next(s for s in steps if s["layer"] == layer_a)
    size, delta = step["size"], step["delta"]
    candidates = sorted({size - _rounded(size, min(math.floor(r * size + 1e-9), size - 1))
                         for r in pagcp_mod.DEFAULT_RATIOS} - {0})
    allowed = [n for n in candidates if 1 + 0.5 * n / size <= 1 + delta]
    assert allowed and len(allowed) < len(candidates), "δ_A must split the candidates for this test to bite"
    assert step["removed"] == max(allowed) and step["limiting_task"] == "semseg"
    assert [t["units"] for t in step["tried"]] == candidates[:len(allowed) + 1]
    for tried in step["tried"]:
        assert (size - tried["units"]) % R == 0
        assert tried["accepted"] == (1 + 0.5 * tried["units"] / size <= 1 + delta)
    for s in steps:
        if s["removed"]:
            assert (s["size"] - s["removed"]) % R == 0, s


def test_heads_round_by_channels():
    from pruning.graph import Layer
    from pruning.methods import round_removed

    heads = Layer("blk.attn.qkv", size=6, unit="heads", channels_per_unit=3 * 12)  # head_dim 12
    assert round_removed(heads, 3, 8) == 2  # kept heads must be even: 2 heads = 24 channels
    chans = Layer("conv", size=20)
    assert [round_removed(chans, n, 8) for n in (0, 3, 4, 11, 12, 19)] == [0, 0, 4, 4, 12, 12]
    assert round_removed(Layer("small", size=6), 5, 8) == 0  # no multiple of 8 below 6: left whole


@pytest.mark.parametrize("bad", [0, -8, 2.5, 8.0, True, "8"])
def test_bad_round_to_is_refused_by_name(model, batches, graph, bad):
    with pytest.raises(ValueError, match=r"round_to must be a positive integer"):
        pruning.prune(model, "l1", calib=batches, ratio=0.5, round_to=bad)
    with pytest.raises(ValueError, match=r"round_to must be a positive integer"):
        pagcp_mod.search(model, graph, batches, budget=0.1, round_to=bad)


def test_job_refuses_bad_round_to_before_any_work(tmp_path):
    m = create_model(["depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    save_model(m, tmp_path / "src", meta={"data": {"name": "scenes", "size": 32, "n_train": 8, "n_val": 8,
                                                     "n_test": 8, "batch_size": 4}})
    with pytest.raises(ValueError, match=r"prune.round_to must be a positive integer.*got 0"):
        run(["prune=pagcp", f"model={tmp_path / 'src'}", "prune.round_to=0"], run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_job_round_to_writes_a_reloadable_rounded_folder(tmp_path):
    torch.manual_seed(0)  # regression tasks only: an untrained classifier can score 0, leaving Δm undefined
    m = create_model(["semseg", "depth"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    save_model(m, tmp_path / "src", meta={"data": {"name": "scenes", "size": 32, "n_train": 8, "n_val": 8,
                                                     "n_test": 8, "batch_size": 4}})
    report = run(["prune=l1", f"model={tmp_path / 'src'}", "prune.ratio=0.6", f"prune.round_to={R}",
                  "calib.batches=1", "eval.max_batches=1", "eval.latency_repeats=1"], run_dir=tmp_path / "run")
    assert report["hparams"]["round_to"] == R and report["reload_max_abs_diff"] == 0.0
    for row in report["layers"]:
        assert row["kept"] == row["size"] or row["kept"] % R == 0, row
    reloaded = mtl.load_model(tmp_path / "run" / "model")
    assert reloaded.pruning_plan["hparams"]["round_to"] == R


def _widths(m, names):
    return {n: torch.nn.Module.get_submodule(m, n).weight.shape[0] for n in names}


def test_rounds_round_against_the_original_width(model, batches):
    """ratio=0.5 round_to=8 rounds=2 split the ratio (0.293 per round) and rounded each round's kept count up:
    a 16-wide layer kept 12 -> 16 twice, 0 removed, FLOPs -29 % against -74 % in one pass. Round r of R keeps
    round_up(n0 − ⌊n0·(1 − (1 − ratio)^(r/R))⌋) of the original width n0: the last round the one-pass count."""
    ratio, rounds, seen = 0.5, 3, []
    _, one = pruning.prune(model, "l1", calib=batches, ratio=ratio, round_to=R)
    names = [row["layer"] for row in one["layers"]]
    _, report = pruning.prune(model, "l1", calib=batches, ratio=ratio, round_to=R, rounds=rounds,
                              finetune=lambda m: seen.append(_widths(m, names)))
    final = {row["layer"]: row["kept"] for row in report["layers"]}
    assert any(row["size"] == 2 * R for row in one["layers"]), "a 16-wide layer makes the old compounding show"
    for r, widths in enumerate([*seen, final], start=1):
        cumulative = 1 - (1 - ratio) ** (r / rounds)
        for row in one["layers"]:
            n0 = row["size"]
            assert widths[row["layer"]] == _rounded(n0, min(math.floor(cumulative * n0 + 1e-9), n0 - 1)), (r, row)
    assert final == {row["layer"]: row["kept"] for row in one["layers"]}
    assert report["flops"]["reduction"] == one["flops"]["reduction"]


@pytest.mark.slow  # ~12 s: four prunes, two of them FLOPs-target searches
def test_global_rounds_ask_for_the_one_pass_units_and_flops_target_rounds_do_not_overshoot(model, batches):
    """l1_global's later rounds asked for a ratio of the widths they found (0.613 vs 0.715 FLOPs reduction at ratio
    0.5, round_to=4); flops_target=0.5 in 3 rounds met each round's share of the FLOPs it found, every rounded overshoot
    compounding (-79 % against -67 % in one pass)."""
    _, one = pruning.prune(model, "l1_global", calib=batches, ratio=0.5, round_to=4)
    _, two = pruning.prune(model, "l1_global", calib=batches, ratio=0.5, round_to=4, rounds=2)
    total = sum(row["size"] for row in one["layers"])
    assert two["rounds"][-1]["units_asked"] == one["rounds"][0]["units_asked"] == math.floor(0.5 * total)
    assert two["rounds"][-1]["units_removed"] == total - sum(row["kept"] for row in two["layers"])
    assert two["rounds"][-1]["units_removed"] >= 0.9 * math.floor(0.5 * total)
    _, once = pruning.prune(model, "l1", calib=batches, flops_target=0.5, round_to=R)
    _, thrice = pruning.prune(model, "l1", calib=batches, flops_target=0.5, round_to=R, rounds=3)
    assert 0.5 <= thrice["flops"]["reduction"] <= once["flops"]["reduction"] + 1e-9


def test_a_rounding_that_removes_far_fewer_units_is_said_once_after_the_last_round(model, batches, caplog):
    """ratio=0.3 round_to=8 keeps every 16-wide layer whole (⌊4.8⌋ removed, 12 kept, rounded to 16): l1 said
    nothing, and the global methods' shortfall warning was off whenever round_to was set. In rounds, only the last
    round's shortfall is said (a later round makes an earlier one's up)."""
    for method, ratio, rounds in (("l1", 0.3, 2), ("l1_global", 0.1, 1)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pruning.methods"):
            _, report = pruning.prune(model, method, calib=batches, ratio=ratio, round_to=R, rounds=rounds)
        last = report["rounds"][-1]
        assert last["units_removed"] < 0.9 * last["units_asked"]
        said = [r.getMessage() for r in caplog.records if "asks for" in r.getMessage()]
        assert len(said) == 1 and f"asks for {last['units_asked']} of" in said[0] and f"round_to={R}" in said[0], said
        assert "shortfall" not in str(report["rounds"])
