"""Weight disentanglement error ξ (Ortiz-Jiménez et al. 2023, Eq. 4) on a real tiny pool: the formula
recomputed by hand, its defining properties, bad input, and the script."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import merging
from merging.pool import HEAD_PREFIX, ModelPool, member_datamodule
from mtl.io import load_model, load_state, read_model_config, save_model

ROOT = Path(__file__).resolve().parents[2]
BATCHES = 2


@pytest.fixture(scope="module")
def pools(smoke_pool, tmp_path_factory):
    """semseg (from the smoke pool) + a classification fine-tune of the same θ0, and a copy of the
    classification model whose shared weights are θ0's (a zero task vector, its own head kept)."""
    from mtl.train import run as train

    root = tmp_path_factory.mktemp("disentangle")
    common = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none"]
    cls = train(common + ["task=[classification]", f"init_from={smoke_pool.pretrained}", "seed=3"],
                run_dir=root / "classification") / "model"
    semseg = next(m.path for m in smoke_pool.members if m.tasks == ["semseg"])
    zero = load_model(cls)
    theta0 = load_state(smoke_pool.pretrained)
    zero.load_state_dict({k: v for k, v in theta0.items() if k in zero.state_dict() and not k.startswith(HEAD_PREFIX)},
                         strict=False)
    save_model(zero, root / "zero", meta=read_model_config(cls)["meta"])
    return {"pair": ModelPool.from_folders(smoke_pool.pretrained, [semseg, cls]),
            "zero": ModelPool.from_folders(smoke_pool.pretrained, [semseg, root / "zero"]),
            "smoke": smoke_pool, "root": root}


def _by_hand(pool, alphas):
    """ξ straight from Eq. 4: state dicts added by hand, each member's own folder for its head. BatchNorm
    running statistics stay θ0's (the merge's default rule), so their task vectors are zero here."""
    theta0 = load_state(pool.pretrained)
    stat = lambda k: k.endswith(("running_mean", "running_var", "num_batches_tracked"))  # noqa: E731
    taus = {m.tasks[0]: {k: torch.zeros_like(v) if stat(k) else v - theta0[k] for k, v in load_state(m.path).items()
                         if k in theta0 and not k.startswith(HEAD_PREFIX)} for m in pool.members}
    both = {k: theta0[k] + sum(a * taus[t][k] for t, a in alphas.items()) for k in taus[next(iter(taus))]}
    xi = 0.0
    for m in pool.members:
        t = m.tasks[0]
        alone = {k: theta0[k] + alphas[t] * taus[t][k] for k in taus[t]}
        preds = []
        for shared in (alone, both):
            model = load_model(m.path).eval()
            model.load_state_dict(shared, strict=False)
            out = []
            loader = member_datamodule(m).test_dataloader()
            with torch.no_grad():
                for i, batch in enumerate(loader):
                    if i >= BATCHES:
                        break
                    out.append(model(batch["image"], tasks=[t])[t].argmax(1).flatten())
            preds.append(torch.cat(out))
        xi += (preds[0] != preds[1]).float().mean().item()
    return xi


def test_matches_the_formula_computed_by_hand(pools):
    pool = pools["pair"]
    res = merging.weight_disentanglement(pool, alphas=[(0.5, 1.5)], max_batches=BATCHES, progress=False)
    (pair, by), = res.errors.items()
    assert set(pair) == {"semseg", "classification"}
    expected = _by_hand(pool, {"semseg": 0.5, "classification": 1.5})
    assert by[(0.5, 1.5)] == pytest.approx(expected, abs=1e-6)
    assert 0 < by[(0.5, 1.5)] <= 2  # these two fine-tunes do interfere at α = (0.5, 1.5)
    assert sum(res.parts[pair][(0.5, 1.5)]) == pytest.approx(by[(0.5, 1.5)])


def test_zero_alphas_give_zero_and_the_matrix_is_symmetric(pools):
    res = merging.weight_disentanglement(pools["pair"], alphas=[0.0, 2.0], max_batches=1, progress=False)
    assert res.mean((0.0, 0.0)) == 0.0  # both models are θ0: nothing can disagree
    m = res.matrix((2.0, 2.0))
    assert torch.isnan(m.diagonal()).all() and m[0, 1] == m[1, 0] and 0 <= m[0, 1] <= 2
    d = res.to_dict()
    assert d["mean"]["0,0"] == 0.0 and d["pairs"][0]["xi"]["2,2"] == pytest.approx(float(m[0, 1]))


def test_a_zero_task_vector_changes_nothing_for_the_other_task(pools):
    # semseg's vector scaled up (a smoke fine-tune moves little) so that it surely moves the other task
    res = merging.weight_disentanglement(pools["zero"], alphas=[(20.0, 1.0)], max_batches=BATCHES, progress=False)
    (pair, _), = res.errors.items()
    assert pair == ("semseg", "classification")
    terms = dict(zip(pair, res.parts[pair][(20.0, 1.0)]))
    assert terms["semseg"] == 0.0  # adding classification's (zero) vector leaves semseg's predictions alone
    assert terms["classification"] > 0.0  # adding semseg's vector does move classification's


def test_bad_input_names_the_task_or_value(pools):
    smoke = pools["smoke"]
    with pytest.raises(ValueError, match=r"regression \(regression\).*predict no classes"):
        merging.weight_disentanglement(smoke, progress=False)
    with pytest.raises(ValueError, match="'nope'"):
        merging.weight_disentanglement(pools["pair"], tasks=["semseg", "nope"], progress=False)
    with pytest.raises(ValueError, match="alphas"):
        merging.weight_disentanglement(pools["pair"], alphas=[(1.0, 2.0, 3.0)], progress=False)
    with pytest.raises(ValueError, match="two different tasks"):
        merging.weight_disentanglement(pools["pair"], pairs=[("semseg", "semseg")], progress=False)
    with pytest.raises(ValueError, match="split"):
        merging.weight_disentanglement(pools["pair"], split="holdout", progress=False)
    with pytest.raises(ValueError, match="max_batches must be >= 1 or None, got 0"):
        merging.weight_disentanglement(pools["pair"], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="eval.device='bogus' is not a device"):
        merging.weight_disentanglement(pools["pair"], device="bogus", progress=False)
    from merging.disentanglement import _alpha_points

    assert _alpha_points(0.3) == [(0.3, 0.3)]  # one number is one α point


def test_script_writes_json_and_png(pools, tmp_path):
    pool = pools["pair"]
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"pretrained": str(pool.pretrained), "models": [str(p) for p in pool.member_paths]}))
    res = subprocess.run([sys.executable, "scripts/disentanglement.py", "--manifest", str(manifest), "--pair", "semseg",
                          "classification", "--grid", "0", "1", "2", "--max-batches", "1", "--out", str(tmp_path / "d")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((tmp_path / "d" / "disentanglement.json").read_text())
    assert sorted(data["alphas"]) == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert data["pairs"][0]["xi"]["0,0"] == 0.0
    assert (tmp_path / "d" / "disentanglement.png").stat().st_size > 1000
