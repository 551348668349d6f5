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
