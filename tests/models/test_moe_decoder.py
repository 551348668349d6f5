"""decoder=moe (TaskExpert-style): memory rule by hand, both backbone kinds, the shared/heads split."""
import math

import pytest
import torch

import mtl
from mtl.models.decoders.moe import TaskExpertPath, update_memory
from mtl.tasks import create_task

BACKBONES = {"cnn": {"name": "test_resnet", "out_indices": [1, 2, 3]},
             "vit": {"name": "test_vit", "img_size": 32, "patch_size": 4}}


def test_update_rules_formula():
    m, f = torch.tensor([2.0]), torch.tensor([6.0])
    assert update_memory("replace", m, f).item() == 6.0
    assert update_memory("average", m, f).item() == 4.0
    assert update_memory("gated", m, f, torch.tensor([math.log(3.0)])).item() == pytest.approx(0.75 * 6 + 0.25 * 2)
    with pytest.raises(ValueError, match="'sum'"):
        update_memory("sum", m, f)


@pytest.mark.parametrize("rule,expected", [("replace", 1.25), ("average", 0.8125), ("gated", 1.078125)])
def test_memory_through_two_stages_by_hand(rule, expected):
    # N=2 experts, D=1, one token. Gates: zero weights, bias (0, 0, log 2) -> p = (1/4, 1/4, 1/2).
    # stage 0: experts (2, 4), memory 0 -> f = 2/4 + 4/4 + 0 = 1.5
    # stage 1: experts (0, 2)            -> f = 0 + 2/4 + m/2
    # replace: m = 1.5, then 0.5 + 0.75 = 1.25
    # average: m = 0.75, f = 0.875, m = 0.8125
    # gated (σ(a) = 3/4): m = 1.125, f = 1.0625, m = 0.75 * 1.0625 + 0.25 * 1.125 = 1.078125
    path = TaskExpertPath(create_task("depth"), channels=1, num_experts=2, num_stages=2, memory_update=rule)
    with torch.no_grad():
        for g in path.gates:
            g.weight.zero_()
            g.bias.copy_(torch.tensor([0.0, 0.0, math.log(2.0)]))
        if path.update_logit is not None:
            path.update_logit.fill_(math.log(3.0))
    z = [torch.tensor([9.0, 2.0, 4.0]).view(1, 3, 1, 1, 1), torch.tensor([9.0, 0.0, 2.0]).view(1, 3, 1, 1, 1)]
    memory, gates = path.mix(z)
    assert memory.item() == pytest.approx(expected)
    assert torch.allclose(gates[0], torch.tensor([0.25, 0.25, 0.5]))


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_moe_decoder_on_cnn_and_vit_single_task_path_equals_full_forward(kind):
    torch.manual_seed(0)
    model = mtl.create_model(["semseg", "depth", "classification"], backbone=BACKBONES[kind],
                             decoder={"name": "moe", "channels": 8, "num_experts": 3, "memory_update": "average"}).eval()
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    full = model(x)
    assert full["semseg"].shape == (2, 5, 32, 32) and full["classification"].shape == (2, 3)
    for t in full:
        assert torch.allclose(model(x, tasks=[t])[t], full[t], atol=1e-6)


def test_experts_live_in_the_shared_part_gates_and_memory_in_the_task_part():
    model = mtl.create_model(["depth", "semseg"], backbone=BACKBONES["cnn"], decoder={"name": "moe", "channels": 8, "num_experts": 3})
    own = {id(p) for p in model.task_parameters("depth")}
    shared = {id(p) for p in model.shared_parameters()}
    path = model.decoder.heads["depth"]
    assert {id(p) for p in path.gates.parameters()} <= own and id(path.memory_init) in own
    assert {id(p) for p in model.decoder.experts.parameters()} <= shared


def test_task_losses_reach_the_shared_weights_only_through_the_representation():
    # what makes balancer.level=features exact: dL/dθ_shared == (dz/dθ_shared)^T dL/dz for each task
    torch.manual_seed(0)
    model = mtl.create_model(["depth", "semseg"], backbone=BACKBONES["cnn"], decoder={"name": "moe", "channels": 8, "num_experts": 3})
    x = torch.randn(2, 3, 16, 16)
    z = model.shared(x)
    preds = model.heads(z, (16, 16))
    shared = model.shared_parameters()
    for t in ("depth", "semseg"):
        loss = preds[t].square().mean()
        direct = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
        dz = torch.autograd.grad(loss, z, retain_graph=True)
        via_z = torch.autograd.grad(z, shared, grad_outputs=dz, retain_graph=True, allow_unused=True)
        for a, b in zip(direct, via_z):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("dec, match", [
    ({"num_experts": 2.5}, r"decoder.num_experts must be int, got 2.5"),
    ({"expert_hidden": 0}, r"decoder.expert_hidden must be an int >= 1 or null, got 0"),
    ({"expert_hidden": -3}, r"decoder.expert_hidden must be an int >= 1 or null, got -3"),
    ({"channels": 0}, r"decoder.channels must be an int >= 1, got 0"),
])
def test_bad_sizes_name_the_key(dec, match):
    with pytest.raises((TypeError, ValueError), match=match):
        mtl.create_model(["depth"], backbone=BACKBONES["cnn"], decoder={"name": "moe", **dec})


def test_bad_stage_index_names_the_value():
    with pytest.raises(ValueError, match="stage index 5"):
        mtl.create_model(["depth"], backbone=BACKBONES["cnn"], decoder={"name": "moe", "stages": [0, 5]})
    with pytest.raises(ValueError, match="'sum'"):
        mtl.create_model(["depth"], backbone=BACKBONES["cnn"], decoder={"name": "moe", "memory_update": "sum"})


@pytest.mark.parametrize("stages, match", [
    ([0.5], r"decoder.stages must hold int stage indices, got \[0.5\] \(0.5 is float\)"),
    ([1.9], r"decoder.stages must hold int stage indices, got \[1.9\]"),
    ([True], r"decoder.stages must hold int stage indices, got \[True\] \(True is bool\)"),
    ("12", r"decoder.stages must be a list of backbone stage indices .*, got '12' \(str\)"),
    (2, r"decoder.stages must be a list of backbone stage indices such as \[2\] .*, got 2 \(int\)"),
    ([], r"decoder.stages must name at least one backbone stage"),
    ([-1], r"decoder.stages: stage index -1 does not exist"),
    ([1, 1], r"decoder.stages \[1, 1\] name a stage more than once"),
])
def test_stages_are_taken_as_given_or_refused_naming_the_value(stages, match):
    """int() once built stage 0 from [0.5] (config.json kept 0.5), stage 1 from [1.9] and [True], stages
    [1, 2] from "12"; a bare int failed with "'int' object is not iterable"."""
    with pytest.raises(ValueError, match=match):
        mtl.create_model(["depth"], backbone=BACKBONES["cnn"], decoder={"name": "moe", "stages": stages})


def test_stage_subset_and_expert_usage():
    model = mtl.create_model(["depth"], backbone=BACKBONES["cnn"],
                             decoder={"name": "moe", "channels": 8, "num_experts": 3, "stages": [2]})
    model.decoder.record_usage = True
    model(torch.randn(2, 3, 32, 32))
    usage = model.decoder.expert_usage(reset=True)["depth"]
    assert usage.shape == (1, 4) and usage.sum().item() == pytest.approx(2 * 2 * 2, rel=1e-5)  # gate mass = tokens (2x2 at stage 2)


def test_expert_usage_names_the_memory_column_in_the_logged_keys_and_the_json(tmp_path):
    """The (N+1)-th gate column is the task memory, not an expert: it was logged as experts/<task>/<N> and
    written as an unlabelled column. The values are gate mass: per stage each token's N+1 weights sum to 1."""
    import json
    from types import SimpleNamespace

    from mtl.expert_usage import ExpertUsageCallback

    model = mtl.create_model(["depth", "semseg"], backbone=BACKBONES["cnn"],
                             decoder={"name": "moe", "channels": 8, "num_experts": 2, "stages": [1, 2]})
    logged = []
    logger = SimpleNamespace(log_metrics=lambda values, step: logged.append(values))
    trainer = SimpleNamespace(global_step=0, loggers=[logger], is_global_zero=True, default_root_dir=str(tmp_path),
                              strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    cb = ExpertUsageCallback(log_every=1)
    cb.on_train_start(trainer, module)
    model(torch.randn(2, 3, 32, 32))
    cb.on_train_batch_end(trainer, module, None, None, 0)
    assert sorted(logged[0]) == [f"experts/{t}/{c}" for t in ("depth", "semseg") for c in ("0", "1", "mem")]
    cb.on_train_end(trainer, module)
    saved = json.loads((tmp_path / "expert_usage.json").read_text())
    assert saved["unit"] == "gate mass" and saved["columns"] == ["0", "1", "mem"]
    assert saved["layers"] == ["backbone stage 1", "backbone stage 2"]
    tokens = 2 * 4 * 4  # both stages resized to stage 1's 4x4 grid, 2 images
    for t in ("depth", "semseg"):
        assert [len(row) for row in saved["usage"][t]] == [3, 3]
        assert [sum(row) for row in saved["usage"][t]] == pytest.approx([tokens, tokens], rel=1e-5)
