"""mtl.extract leaves the caller's world as it was: torch's random streams (a sub-network is built with a
random init that its weights then replace), the model's weights, every module's train/eval mode and a pending
aux_loss()."""
import pytest
import torch

import mtl

VIT = {"name": "task_moe_vit", "img_size": 32, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3}
SLIM = {"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16], "depths": [1, 2, 1], "out_indices": [1, 2, 3]}


def _moe():
    return mtl.create_model(["semseg", "depth"], family="task_moe_vit", backbone=VIT,
                            decoder={"name": "task_moe_vit", "channels": 16, "num_experts": 4, "top_k": 2})


def _slim():
    return mtl.create_model(["semseg", "depth"], family="slimmable", backbone=SLIM,
                            decoder={"name": "slimmable", "channels": 12})


X = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
CASES = {"task_moe_vit": (_moe, {"task": "depth", "calib": [X]}),
         "slimmable": (_slim, {"widths": {"encoder": 0.5}})}


@pytest.mark.parametrize("family", CASES)
@pytest.mark.parametrize("modes", ["eval", "train", "mixed"])
def test_extract_leaves_rng_weights_and_modes_as_they_were(family, modes):
    make, request = CASES[family]
    torch.manual_seed(0)
    model = make()
    model.train(modes != "eval")
    if modes == "mixed":
        next(model.children()).eval()  # e.g. a frozen-BN backbone
    flags = {n: m.training for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    mtl.extract(model, **request)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == flags
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_a_text_overwrite_is_refused_before_anything_is_extracted_or_written(tmp_path):
    """bool("no") is True: extract(..., out=existing, overwrite="no") replaced the existing folder."""
    model = _slim()
    out = tmp_path / "sub"
    mtl.extract(model, widths={"encoder": 0.5}, out=out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError, match="^overwrite must be true or false, got 'no'$"):
        mtl.extract(model, widths={"encoder": 0.25}, out=out, overwrite="no")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_measuring_a_training_model_keeps_its_pending_aux_loss():
    """mtl.extract's (and model_stats') eval-mode calibration forward overwrote the MoE routing statistics, so a
    loop doing forward -> extract/FLOPs for monitoring -> loss + aux_loss() trained that step without its
    balance loss (aux_loss() came back {} with the model still in training mode)."""
    torch.manual_seed(0)
    model = _moe().train()
    model(X)
    before = model.aux_loss()
    assert set(before) == {"semseg", "depth"}
    mtl.extract(model, task="depth", calib=[X])
    mtl.model_stats(model, X)
    after = model.aux_loss()
    assert set(after) == set(before)
    for t, loss in before.items():
        assert torch.equal(after[t], loss) and after[t].requires_grad  # still the training forward's graph
