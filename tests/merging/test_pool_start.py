"""A pool refuses a member fine-tuned from another θ0 (its meta records the start's weights digest)."""
import json

import pytest
import torch

import mtl
from merging.pool import ModelPool
from mtl.io import recorded_weights_digest
from mtl.models import create_model


def _folder(tmp_path, name, task, meta=None, seed=0):
    torch.manual_seed(seed)
    m = create_model([{"kind": "classification", "name": task, "num_classes": 3}], backbone="test_resnet")
    return mtl.save_model(m, tmp_path / name, meta=meta or {})


def test_a_member_of_another_start_is_refused_naming_it_and_both_starts(tmp_path):
    pre = _folder(tmp_path, "pre", "p")
    other = _folder(tmp_path, "other", "p", seed=1)
    ok = _folder(tmp_path, "a", "a", {"init_from": str(pre), "init_from_weights_digest": recorded_weights_digest(pre)})
    bad = _folder(tmp_path, "b", "b", {"init_from": str(other),
                                        "init_from_weights_digest": recorded_weights_digest(other)})
    legacy = _folder(tmp_path, "c", "c", {"init_from": str(other)})  # a path alone: trusted, as before
    assert [m.tasks for m in ModelPool.from_folders(pre, [ok, legacy]).members] == [["a"], ["c"]]
    with pytest.raises(ValueError, match=rf"^{bad}: fine-tuned from another θ0 \({other}, weights digest "
                                         rf"{recorded_weights_digest(other)}\) than the pool's pretrained {pre} "):
        ModelPool.from_folders(pre, [ok, bad])
    manifest = tmp_path / "pool.json"
    manifest.write_text(json.dumps({"pretrained": "pre", "models": ["a", "b"]}))
    with pytest.raises(ValueError, match="fine-tuned from another θ0"):
        ModelPool.from_manifest(manifest)


def test_a_linearised_start_stands_for_the_plain_start_it_was_made_from(tmp_path):
    pre = _folder(tmp_path, "pre", "p")
    digest = recorded_weights_digest(pre)
    lin = _folder(tmp_path, "pre_lin", "p", {"linearized_from_weights_digest": digest}, seed=2)
    ft = _folder(tmp_path, "a", "a", {"init_from_weights_digest": digest})
    ModelPool.from_folders(lin, [ft])


def test_eval_none_merges_check_the_start_too(tmp_path):
    from merging.job import run

    pre = _folder(tmp_path, "pre", "p")
    other = _folder(tmp_path, "other", "p", seed=1)
    bad = _folder(tmp_path, "b", "b", {"init_from_weights_digest": recorded_weights_digest(other)})
    with pytest.raises(ValueError, match=rf"^{bad}: fine-tuned from another θ0"):
        run(["merge=task_arithmetic", "eval=none", f"pretrained={pre}", f"models=[{bad}]"], run_dir=tmp_path / "run")


SMOKE = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none", "task=[regression]"]


def test_a_fine_tune_of_a_fine_tune_merges_against_its_root_and_not_another(tmp_path):
    """θ0 → ft1 → ft2 (mtl-train init_from=ft1): ft2 − θ0 is a task vector of θ0, so the pool of θ0 accepts ft2,
    and the pool of another θ0 still refuses it. The same for the tangent-space chain: linearize=true from θ0,
    continued with family=linearized, merged against θ0's linearised folder (as build_zoo.py --linear saves it)."""
    from mtl.io import load_model
    from mtl.models import linearize
    from mtl.train import run

    def train(name, *more):
        return run(SMOKE + list(more), run_dir=tmp_path / name) / "model"

    pre = run(SMOKE[:-1] + ["task=[classification]"], run_dir=tmp_path / "pre") / "model"
    ft1 = train("ft1", f"init_from={pre}")
    ft2 = train("ft2", f"init_from={ft1}")
    assert [m.path for m in ModelPool.from_folders(pre, [ft2]).members] == [ft2]

    other = load_model(pre)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other = mtl.save_model(other, tmp_path / "other")
    with pytest.raises(ValueError, match=rf"^{ft2}: fine-tuned from another θ0 \({ft1}, weights digest "
                                         rf"{recorded_weights_digest(ft1)}, itself descending from "
                                         rf"{recorded_weights_digest(pre)}\) than the pool's pretrained {other} "):
        ModelPool.from_folders(other, [ft2])

    lin1 = train("lin1", "linearize=true", f"init_from={pre}")
    lin2 = train("lin2", "family=linearized", f"init_from={lin1}")
    theta0 = mtl.save_model(linearize(load_model(pre)), tmp_path / "model_linearized",
                            meta={"linearized_from_weights_digest": recorded_weights_digest(pre)})
    assert [m.path for m in ModelPool.from_folders(theta0, [lin2]).members] == [lin2]
    with pytest.raises(ValueError, match=rf"^{lin2}: fine-tuned from another θ0"):
        ModelPool.from_folders(other, [lin2])


def test_a_fine_tune_of_the_linearised_theta0_itself_merges_against_it(tmp_path):
    """family=linearized init_from=<the linearised θ0 folder> starts from that folder's weights: its pool accepts it."""
    pre = _folder(tmp_path, "pre", "p")
    lin = _folder(tmp_path, "pre_lin", "p", {"linearized_from_weights_digest": recorded_weights_digest(pre)}, seed=2)
    ft = _folder(tmp_path, "a", "a", {"init_from_weights_digest": recorded_weights_digest(lin)})
    ModelPool.from_folders(lin, [ft])


@pytest.mark.parametrize("extra", [(), ("eval=none", "merge.lam=0.3")])
def test_a_member_of_another_start_leaves_no_run_folder(tmp_path, console, capfd, extra):
    """The same-θ0 check read config.json alone but ran after the run folder (an error line, then run_dir: and a
    FAILED folder): now one error line and no folder, evaluated or not."""
    from tests.test_early_config_checks import _refused_without_folder

    pre = _folder(tmp_path, "pre", "p")
    other = _folder(tmp_path, "other", "p", seed=1)
    bad = _folder(tmp_path, "b", "b", {"init_from_weights_digest": recorded_weights_digest(other)})
    message = _refused_without_folder(console, capfd, "merging.cli", "merge=task_arithmetic", f"pretrained={pre}",
                                      f"models=[{bad}]", *extra)
    assert message.startswith(f"{bad}: fine-tuned from another θ0"), message
