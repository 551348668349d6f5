"""family=task_moe_vit (M3ViT-style): task-conditioned routing, sparse single-task path, active FLOPs,
aux losses in training, extraction of a single-task sub-network, bad input."""
import math
import re

import pytest
import torch

import mtl
from mtl.flops import count_flops
from mtl.models.task_moe_vit import TaskMoEViT
from mtl.module import MultiTaskModule
from mtl.tasks import create_task

TASKS = ["semseg", "depth", "classification"]
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "mlp_ratio": 4.0}


def make(gate="per_task", **moe):
    torch.manual_seed(0)
    dec = {"num_experts": 8, "top_k": 2, "gate": gate, **moe}
    return TaskMoEViT([create_task(t) for t in TASKS], VIT, dec)


X = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("gate", ["per_task", "task_embedding"])
def test_single_task_path_equals_that_task_of_the_full_forward(gate):
    model = make(gate).eval()
    full = model(X)
    for t in TASKS:
        assert torch.allclose(model(X, tasks=[t])[t], full[t], atol=1e-5)
    assert torch.allclose(model(X, tasks=["depth", "semseg"])["semseg"], full["semseg"], atol=1e-5)


def test_no_task_requested_gives_no_prediction_as_in_the_multitask_family():
    plain = mtl.create_model(["depth"], backbone="test_resnet").eval()
    assert plain(X, tasks=[]) == {} and make().eval()(X, tasks=[]) == {}


def test_uint8_images_must_have_the_models_three_channels():
    gray = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)  # broadcast against the 3-channel mean before
    for family, model in (("multitask", mtl.create_model(["depth"], backbone="test_resnet").eval()),
                          ("task_moe_vit", make().eval())):
        with pytest.raises(ValueError, match=rf"^{family}: input must be \(B, 3, H, W\), got \(2, 1, 32, 32\)$"):
            model(gray, tasks=["depth"])
    with pytest.raises(ValueError, match=r"got \(2, 1, 32, 32\)"):
        mtl.extract(make(), task="depth", calib=[gray])


@pytest.mark.parametrize("shape", [(3, 32, 32), (2, 1, 32, 32), (1, 2, 3, 32, 32)])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_images_without_batch_dimension_or_three_channels_are_refused_naming_the_family(shape, dtype):
    """One image without its batch dimension failed in the patch embedding's unpacking ("not enough values to
    unpack (expected 4, got 3)"), a gray float image in torch's conv, neither naming the model or the shape."""
    x = torch.zeros(shape, dtype=dtype)
    hint = r" \(one image: x.unsqueeze\(0\)\)" if len(shape) == 3 else ""
    for family, model in (("multitask", mtl.create_model(["depth"], backbone="test_resnet").eval()),
                          ("task_moe_vit", make().eval())):
        with pytest.raises(ValueError, match=rf"^{family}: input must be \(B, 3, H, W\), "
                                             rf"got {re.escape(str(shape))}{hint}$"):
            model(x)
    with pytest.raises(ValueError, match=r"^task_moe_vit: input must be \(B, 3, H, W\)"):
        mtl.extract(make(), task="depth", calib=x)


def test_each_token_goes_to_exactly_k_experts_per_moe_layer():
    model = make().eval()
    model.record_usage = True
    model(X, tasks=["depth"])
    counts = model.expert_usage(reset=True)["depth"]
    tokens = 3 * (32 // 8) ** 2
    assert counts.shape == (2, 8) and counts.sum(-1).tolist() == [2 * tokens, 2 * tokens]


def test_active_flops_are_non_expert_plus_k_over_e_of_expert_flops():
    # one expert on one token: 2*(D*h) + 2*(h*D) FLOPs with h = 4*D/E; tokens per image = (32/8)^2
    d, e, tokens, layers = 32, 8, 16, 2
    per_token_expert = 4 * d * (4 * d // e)
    flops = {k: count_flops(make(top_k=k), X[:1], ["depth"]) for k in (1, 2, 4)}
    non_expert = flops[1] - 1 * tokens * layers * per_token_expert
    all_experts = e * tokens * layers * per_token_expert
    for k in (2, 4):
        assert flops[k] == non_expert + k / e * all_experts
    assert non_expert > 0


def test_config_round_trip_through_a_model_folder(tmp_path):
    model = make("task_embedding", mi_weight=0.01).eval()
    mtl.save_model(model, tmp_path / "m")
    again = mtl.load_model(tmp_path / "m")
    assert isinstance(again, TaskMoEViT) and again.config == model.config
    before, after = model(X), again(X)
    assert all(torch.equal(after[t], y) for t, y in before.items())


def test_default_top1_routing_sends_the_task_loss_gradient_to_the_routers():
    model = make(top_k=1, balance_weight=0.0).train()
    model(X)["depth"].pow(2).mean().backward()
    grads = [m.routers["depth"].gate.weight.grad.norm().item() for m in model.moe_modules()]
    assert min(grads) > 1e-6, grads  # renormalised (p/p = 1) this was ~1e-10
    assert model.config["decoder"]["renormalize"] is False  # the default stored resolved
    assert make(top_k=2).config["decoder"]["renormalize"] is True


def test_a_folder_saved_with_top1_and_renormalize_true_loads_with_identical_outputs_and_a_warning(tmp_path, caplog):
    # the default before 2026-12-06: old code built this model and recorded renormalize=true next to top_k=1
    model = make(top_k=1, renormalize=False).eval()
    model._moe["renormalize"] = True
    for moe in model.moe_modules():
        for r in moe.routers.values():
            r.renormalize = True
    mtl.save_model(model, tmp_path / "m")
    with caplog.at_level("WARNING"):
        again = mtl.load_model(tmp_path / "m")
    assert "decoder.top_k=1 with decoder.renormalize=true" in caplog.text
    assert again.config["decoder"]["renormalize"] is True
    before, after = model(X), again(X)
    assert all(torch.equal(after[t], y) for t, y in before.items())


@pytest.mark.parametrize("flag", ["stored", "_stored"])
def test_the_old_folder_flag_is_no_create_model_option(flag):
    """create_model(..., stored=True) built the top_k=1 + renormalize=true model a new one is refused, and the
    options listed in create_model's errors named that internal flag."""
    dec = {"num_experts": 8, "top_k": 1, "renormalize": True}
    with pytest.raises(TypeError, match=rf"^create_model: {flag}=True is no option of family task_moe_vit "
                                        r"\(its options: mean, std\)$"):
        mtl.create_model(["depth"], family="task_moe_vit", backbone=VIT, decoder=dec, **{flag: True})


def test_aux_losses_are_added_to_each_task_loss_in_training():
    model = make(mi_weight=0.1).train()
    module = MultiTaskModule(model)
    batch = {"image": X, "semseg": torch.randint(0, 5, (3, 32, 32)), "depth": torch.rand(3, 1, 32, 32) + 0.5,
             "classification": torch.randint(0, 3, (3,))}
    torch.manual_seed(3)
    _, losses = module._forward_losses(batch)
    aux = model.aux_loss()
    assert set(aux) == set(TASKS) and all(a.requires_grad for a in aux.values())
    torch.manual_seed(3)
    plain = module.task_losses(model(batch["image"]), batch)
    for t in TASKS:
        assert torch.allclose(losses[t], plain[t] + aux[t], atol=1e-5)
    # balance term: weight 0.01 x Σ_layers cv²; MI term: -0.1 x MI / T (defined in mtl.models.moe)
    from mtl.models.moe import task_expert_mutual_information as mi

    stats = [m.stats for m in model.moe_modules()]
    expected = 0.01 * sum(s["depth"]["balance"] for s in stats) - 0.1 * sum(
        mi(torch.stack([s[t]["mean_probs"] for t in TASKS])) for s in stats) / 3
    assert torch.allclose(aux["depth"], expected)


def test_aux_loss_is_empty_after_an_eval_forward_even_back_in_training_mode():
    """"The last forward (training mode only; empty otherwise)": an eval forward's routing statistics were
    returned as losses (without gradient) once the model was back in train()."""
    model = make(mi_weight=0.1)
    model.eval()
    with torch.no_grad():
        model(X)
    model.train()
    assert model.aux_loss() == {}
    model(X)
    assert set(model.aux_loss()) == set(TASKS)
    model.eval()
    model(X, tasks=["depth"])
    assert model.train().aux_loss() == {}


def test_no_shared_representation_so_features_level_balancers_refuse():
    from mtl.balancers import StepContext, create_balancer

    model = make()
    assert model.shared_representation is False
    losses = {t: y.float().mean() for t, y in model(X).items()}
    ctx = StepContext(losses=losses, shared_params=model.shared_parameters(),
                      task_params={t: model.task_parameters(t) for t in TASKS}, features=None)
    with pytest.raises(ValueError, match="level=features"):
        create_balancer("upgrad", TASKS, level="features").backward(ctx)


@pytest.mark.parametrize("name", ["upgrad", "gradnorm"])
def test_features_level_balancers_are_refused_when_the_module_is_built(name):
    """Not at the first training step, after the data loaders were built."""
    with pytest.raises(ValueError, match=r"^balancer.level=features needs one representation every task head "
                                         r"reads, and family 'task_moe_vit' has none"):
        MultiTaskModule(make(), balancer={"name": name, "level": "features"})
    MultiTaskModule(make(), balancer={"name": name, "level": "params"})


def _route_depth_to_first_four(model):
    # gate rows w0 = a, w1 = -a, w2 = b, w3 = -b, others 0: the two positive logits always win (top-2)
    with torch.no_grad():
        for m in model.moe_modules():
            w = m.routers["depth"].gate.weight
            a, b = torch.randn(2, w.shape[1]) * 5
            w.zero_()
            w[0], w[1], w[2], w[3] = a, -a, b, -b


def test_extraction_round_trip(tmp_path):
    model = make().eval()
    _route_depth_to_first_four(model)
    sub = mtl.extract(model, out=tmp_path / "semseg", task="depth", calib=[X[:2], {"image": X[2:]}])
    report = sub.extraction_report
    assert all(set(k) <= {0, 1, 2, 3} and len(k) >= 2 for k in report["experts_kept"])
    assert report["dropped_token_share"] == [0.0, 0.0] and report["experts_total"] == 16
    again = mtl.load_model(tmp_path / "semseg")
    assert list(again.tasks) == ["depth"]
    # the request is recorded, the calibration images are not (the folder is for shipping)
    assert again.meta["extract"] == {"task": "depth", "calib_batches": 2, "min_share": 0.0}  # defaults recorded too
    assert again.config["decoder"]["experts_kept"] == report["experts_kept"]
    assert torch.allclose(again(X)["depth"], model(X, tasks=["depth"])["depth"], atol=1e-5)
    fresh = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)  # routing stays within the kept experts
    assert torch.allclose(again(fresh)["depth"], model(fresh, tasks=["depth"])["depth"], atol=1e-5)
    assert mtl.flops.count_params(again) < mtl.flops.count_params(model)
    assert count_flops(again, X, ["depth"]) == count_flops(model, X, ["depth"])


def test_extract_takes_the_task_by_position_as_issue_9_writes_it():
    model = make().eval()
    by_name = mtl.extract(model, task="depth", calib=[X])
    by_position = mtl.extract(model, "depth", [X])
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), by_position.state_dict().values()))
    with pytest.raises(TypeError, match=r"extracts with \(task=, calib=, min_share=\); got \(task=\): .*'calib'"):
        mtl.extract(model, "depth")
    with pytest.raises(TypeError, match="task given both by position and as task="):
        mtl.extract(model, "depth", task="semseg", calib=[X])
    with pytest.raises(TypeError, match="got 4 positional arguments"):
        mtl.extract(model, "depth", [X], 0.0, 1)


def test_extraction_with_min_share_reports_what_the_dropped_experts_received():
    model = make().eval()
    sub = model.extract_subnetwork(task="semseg", calib=[X], min_share=0.2)
    rep = sub.extraction_report
    assert all(len(k) >= 2 for k in rep["experts_kept"])  # never fewer than top_k
    assert all(0.0 <= s < 1.0 for s in rep["dropped_token_share"])
    assert rep["dropped_token_share_max"] > 0.0  # 8 experts, top-2: some expert gets under 20 % ... and is dropped


@pytest.mark.parametrize("share", ["a", "0.1", True, None, float("nan"), 1.0, -0.1, __import__("fractions").Fraction(1, 4),
                                   __import__("numpy").bool_(False)])
def test_a_min_share_that_is_no_number_in_0_1_is_refused_by_name_before_routing(share):
    """float("a") failed as "could not convert string to float: 'a'"; float(True) took a bool as 1.0 and "0.1"
    as a number."""
    with pytest.raises(ValueError, match=rf"^min_share must be in \[0, 1\), got {re.escape(repr(share))}$"):
        mtl.extract(make().eval(), task="depth", calib=[X], min_share=share)


def test_a_numpy_min_share_is_a_number_as_mtl_registry_is_real_takes_it():
    """A Fraction passed as a real number (a Decimal did not); np.float32 from a grid is one, as elsewhere."""
    import numpy as np

    from mtl.models.task_moe_extract import check_min_share

    check_min_share(np.float32(0.25))
    check_min_share(np.int64(0))


def test_extraction_from_a_model_whose_kept_experts_are_out_of_order_keeps_each_experts_weights(tmp_path):
    # the parent keeps exactly top_k experts per layer, listed out of order: the child must map each
    # expert's weight rows by id, not by position
    model = make(experts_kept=[[5, 2], [7, 3]]).eval()
    sub = mtl.extract(model, out=tmp_path / "d", task="depth", calib=[X], min_share=0.9)
    assert [sorted(k) for k in sub.extraction_report["experts_kept"]] == [[2, 5], [3, 7]]
    assert torch.allclose(sub(X)["depth"], model(X, tasks=["depth"])["depth"], atol=1e-5)
    assert torch.allclose(mtl.load_model(tmp_path / "d")(X)["depth"], model(X, tasks=["depth"])["depth"], atol=1e-5)


@pytest.mark.parametrize("dec,match", [
    ({"top_k": 9}, r"decoder.top_k must be between 1 and decoder.num_experts=8, got decoder.top_k=9"), ({"top_k": 0}, "decoder.top_k must be an int >= 1, got 0"),
    ({"num_experts": 7}, "num_experts=7"), ({"gate": "shared"}, "'shared'"), ({"bogus": 1}, "bogus"),
    # int(2.5) / bool("no") would build another model than the one asked for
    ({"top_k": 2.5}, r"decoder.top_k must be an int >= 1, got 2.5"),
    ({"num_experts": 8.7}, r"decoder.num_experts must be an int >= 1, got 8.7"),
    ({"every": 1.5}, r"decoder.every must be an int >= 1, got 1.5"),
    ({"expert_hidden": 0}, r"decoder.expert_hidden must be an int >= 1 or null, got 0"),
    ({"channels": 0}, r"decoder.channels must be an int >= 1 or null, got 0"),
    ({"renormalize": "no"}, r"decoder.renormalize must be true or false, got 'no'"),
    ({"noisy": "false"}, r"decoder.noisy must be true or false, got 'false'"),
    ({"top_k": 1, "renormalize": True}, r"decoder.renormalize=true with decoder.top_k=1: the one kept gate weight p/p is "
                                        r"always 1, so the task loss gives the router no gradient"),
    ({"balance_weight": -1}, r"decoder.balance_weight must be a finite number >= 0, got -1"),
    ({"mi_weight": float("nan")}, r"decoder.mi_weight must be a finite number >= 0, got nan"),
])
def test_bad_decoder_settings_name_the_value(dec, match):
    with pytest.raises(ValueError, match=match):
        TaskMoEViT([create_task("depth")], VIT, {"num_experts": 8, "top_k": 2, **dec})


def test_bad_backbone_settings_and_unknown_task():
    with pytest.raises(ValueError, match="num_heads=3"):
        TaskMoEViT([create_task("depth")], {**VIT, "num_heads": 3}, {"num_experts": 8})
    with pytest.raises(ValueError, match=r"decoder.every=5 must be in \[1, backbone.depth=4\]"):
        TaskMoEViT([create_task("depth")], VIT, {"num_experts": 8, "every": 5})  # VIT has depth 4
    TaskMoEViT([create_task("depth")], VIT, {"num_experts": 8, "every": 4})  # one MoE layer, the last block
    # another backbone's settings: its name is the problem, not its keys
    with pytest.raises(ValueError, match="backbone.name must be 'task_moe_vit'.*'resnet18'"):
        TaskMoEViT([create_task("depth")], {"name": "resnet18", "out_indices": [4]}, {"num_experts": 8})
    with pytest.raises(ValueError, match=r"^unknown setting decoder.topk \(did you mean decoder.top_k\?\); the settings "
                                         r"here are: channels, num_experts, top_k, "):
        TaskMoEViT([create_task("depth")], VIT, {"num_experts": 8, "topk": 2})
    with pytest.raises(TypeError, match=r"top_k=2 is no option of family task_moe_vit .* it is a decoder setting: "
                                        r"pass decoder=\{'top_k': 2\}"):
        mtl.create_model(["depth"], backbone=VIT, decoder={"num_experts": 8}, family="task_moe_vit", top_k=2)
    model = make()
    with pytest.raises(KeyError, match="nope"):
        model(X, tasks=["nope"])
    with pytest.raises(KeyError, match="nope"):
        mtl.extract(model, task="nope", calib=[X])


def test_onnx_export_of_parent_and_extracted_models_equals_pytorch(tmp_path):
    """Token dispatch is data-dependent; while exporting, the MoE layers combine every expert's output
    with the same sparse gates instead, so the ONNX graph computes the same function at any batch size."""
    ort = pytest.importorskip("onnxruntime")
    model = make().eval()
    _route_depth_to_first_four(model)
    sub = mtl.extract(model, task="depth", calib=[X])
    x = torch.randint(0, 255, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    for name, m in (("parent", model), ("depth", sub)):
        folder = mtl.save_model(m, tmp_path / name, meta={"data": {"size": 32}})
        out = mtl.export(folder, "onnx", tmp_path / f"{name}_onnx", exporter="torchscript")
        session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x.numpy()})))
        with torch.no_grad():
            ref = m(x)
        for t in m.tasks:
            assert torch.allclose(torch.from_numpy(got[t]), ref[t], atol=1e-4, rtol=1e-3), (name, t)


def test_a_calibration_dict_without_image_names_its_keys():
    with pytest.raises(ValueError, match=r"calib: a batch dict has no 'image' key \(keys: \['img', 'depth'\]\)"):
        mtl.extract(make().eval(), task="depth", calib=[{"img": X, "depth": X[:, :1]}])


def test_extraction_without_calibration_batches_names_calib():
    with pytest.raises(TypeError, match="calib must be calibration batches"):
        mtl.extract(make().eval(), task="depth", calib=None)


def test_task_embeddings_route_tasks_apart_at_init_and_the_mi_loss_moves_them():
    """Zero-initialised embeddings made every task route alike: MI(task; expert) = 0 with zero gradient."""
    model = make("task_embedding", noisy=False, balance_weight=0.0, mi_weight=1.0)
    moe = model.moe_modules()[0]
    tokens = torch.nn.functional.layer_norm(torch.randn(64, 32, generator=torch.Generator().manual_seed(2)), (32,))
    chosen = {t: moe.route(t, tokens).index.sort(-1).values for t in ("depth", "semseg")}
    assert (chosen["depth"] != chosen["semseg"]).any(-1).float().mean() > 0.25  # most tokens: other experts
    model.train()
    model(X, tasks=["depth", "semseg"])
    sum(model.aux_loss().values()).backward()
    # zero embeddings gave ~4e-10 (a stationary point); N(0, 1) ones ~3e-4 through the 0.02-std gate
    assert all(moe.task_embed[t].grad.abs().max() > 1e-5 for t in ("depth", "semseg"))


@pytest.mark.parametrize("args,match", [(["tasks=nope"], r"unknown task\(s\) \['nope'\]"),
                                        (["tasks=depth", "min_share=1.5"], r"min_share must be in \[0, 1\), got 1.5"),
                                        (["tasks=depth", "min_share=abc"], r"min_share must be in \[0, 1\), got 'abc'$"),
                                        (["tasks=depth", "min_share=true"], r"min_share must be in \[0, 1\), got True$"),
                                        (["tasks=depth", "min_share=false"], r"min_share must be in \[0, 1\), got False$"),
                                        (["tasks=depth", "min_share=nan"], r"min_share must be in \[0, 1\), got nan$")])
def test_extract_cli_names_a_bad_task_or_min_share_before_loading_data(tmp_path, args, match):
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract

    # 2 train batches < the default calib.batches=8: checking data first would name calib.batches instead
    mtl.save_model(make(), tmp_path / "m", meta={"data": {"name": "scenes", "size": 32, "n_train": 8, "n_val": 4,
                                                            "n_test": 4, "batch_size": 4}})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'm'}", *args], tmp_path / "run")
    with pytest.raises((KeyError, ValueError), match=match):
        run_extract(cfg, run_dir)
    # min_share, and the task (the folder's config.json names its tasks), are checked before the run folder is made
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize("moe, request_, match", [
    (False, "tasks=depth", r"^model family 'multitask' does not support extraction"),
    (False, "widths={encoder: 0.5}", r"^model family 'multitask' does not support extraction"),
    (True, "widths={encoder: 0.5}", r"^widths= extracts from slimmable models; this 'task_moe_vit' model extracts")])
def test_extract_cli_names_a_family_without_this_extraction_before_its_run_folder(tmp_path, moe, request_, match):
    """Refused after the run folder was made and the model loaded (65 s for the demo's model): a FAILED folder."""
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import run_extract

    model = make() if moe else mtl.create_model(["depth"], backbone="test_resnet")
    # 2 train batches < calib.batches=8, as above
    mtl.save_model(model, tmp_path / "m", meta={"data": {"name": "scenes", "size": 32, "n_train": 8, "n_val": 4,
                                                         "n_test": 4, "batch_size": 4}})
    cfg, run_dir = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'm'}", request_],
                                      tmp_path / "run")
    with pytest.raises((TypeError, ValueError), match=match):
        run_extract(cfg, run_dir)
    assert not run_dir.exists() or not any(run_dir.iterdir())


@pytest.mark.parametrize("kept, match", [
    ([[0, 1, 2, 99], None], r"experts_kept \[0, 1, 2, 99\] must be distinct expert ids in \[0, 8\).*out of range: \[99\]"),
    ([[-1, 0, 1], None], r"out of range: \[-1\]"),
    ([[0, 0, 1], None], r"experts_kept \[0, 0, 1\] must be distinct"),
    ([[3], None], r"keeps 1 expert\(s\), fewer than top_k=2"),
])
def test_experts_kept_is_checked_when_the_model_is_built(kept, match):
    with pytest.raises(ValueError, match=match):
        make(experts_kept=kept)


def test_extraction_takes_one_task_name_and_records_the_calibration_it_saw(tmp_path):
    model = make().eval()
    with pytest.raises(TypeError, match=r"task= takes one task name \(a string\), got \['depth'\]"):
        mtl.extract(model, task=["depth"], calib=[X])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=1,
                                         collate_fn=lambda b: {"image": torch.stack([x for (x,) in b])})
    for calib, n in [({"image": X}, 1), (X, 1), (loader, 3)]:  # one batch dict, one image tensor, a loader
        out = tmp_path / f"d{n}_{type(calib).__name__}"
        mtl.extract(model, out=out, task="depth", calib=calib, min_share=0.1)
        assert mtl.load_model(out).meta["extract"] == {"task": "depth", "calib_batches": n, "min_share": 0.1}


def test_extract_cli_calibrates_on_the_same_batches_every_run(tmp_path):
    from mtl.cli.in_process import compose_in_process
    from mtl.cli.extract import calibration_batches

    data = {"name": "scenes", "size": 32, "n_train": 16, "n_val": 4, "n_test": 4, "batch_size": 4}
    mtl.save_model(make(), tmp_path / "m", meta={"data": data})
    cfg, _ = compose_in_process("mtl.configs.extract_app", "extract", [f"model={tmp_path / 'm'}", "tasks=depth",
                                                                       "calib.batches=2"], tmp_path / "run")
    model = mtl.load_model(tmp_path / "m")
    runs = [calibration_batches(model, cfg) for _ in range(3)]  # the train loader shuffles: these must not
    for other in runs[1:]:
        assert all(torch.equal(a["image"], b["image"]) for a, b in zip(runs[0], other))


def test_a_model_cast_after_loading_takes_uint8_images(tmp_path):
    folder = mtl.save_model(make(), tmp_path / "m")
    model = mtl.load_model(folder).eval()
    with torch.no_grad():
        ref = model(X)["depth"]
        out = model.bfloat16()(X)["depth"]
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), ref, atol=0.1, rtol=0.1)


def test_routing_mi_script_is_zero_when_tasks_route_alike_and_positive_when_they_do_not(tmp_path):
    """scripts/moe_routing_mi.py (the measure docs/models.md quotes): MI(task; expert) of identical
    routers is 0 by definition; routers that send the two tasks to disjoint experts give log 2."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("moe_routing_mi", Path(__file__).resolve().parents[2] / "scripts" / "moe_routing_mi.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    data = {"name": "scenes", "size": 32, "n_train": 4, "n_val": 4, "n_test": 4, "batch_size": 4}
    torch.manual_seed(0)
    model = TaskMoEViT([create_task(t) for t in ("semseg", "depth")], VIT,
                       {"num_experts": 8, "top_k": 2, "gate": "per_task"}).eval()
    for moe in model.moe_modules():
        moe.routers["depth"].load_state_dict(moe.routers["semseg"].state_dict())
    mtl.save_model(model, tmp_path / "same", meta={"data": data})
    rows = script.main(["--model", str(tmp_path / "same")])
    assert all(abs(v) < 1e-6 for v in rows["probs"] + rows["routed"])
    for moe in model.moe_modules():  # depth's logits the negative of semseg's: per token, disjoint top-2 sets
        with torch.no_grad():
            moe.routers["depth"].gate.weight.copy_(-moe.routers["semseg"].gate.weight)
    mtl.save_model(model, tmp_path / "apart", meta={"data": data})
    rows = script.main(["--model", str(tmp_path / "apart")])
    assert all(0.01 < v <= math.log(2) + 1e-6 for v in rows["routed"])  # two tasks: MI is at most log 2
    assert all(0 < v <= math.log(2) + 1e-6 for v in rows["probs"])


def test_init_from_a_multitask_folder_starts_a_single_task_fine_tune(tmp_path, caplog):
    """init_from reads the family's shared weights (its names carry no `backbone.` prefix)."""
    from mtl.warm_start import init_from_folder

    parent = make()
    mtl.save_model(parent, tmp_path / "mt")
    torch.manual_seed(7)
    child = TaskMoEViT([create_task("depth")], VIT, {"num_experts": 8, "top_k": 2})
    stats = init_from_folder(child, tmp_path / "mt")
    own = parent.state_dict()
    for k, v in child.state_dict().items():  # every tensor, the task's head and router included
        assert torch.equal(v, own[k]), k
    assert stats["shared_missed"] == 0
    wider = TaskMoEViT([create_task("depth")], {**VIT, "depth": 6}, {"num_experts": 8, "top_k": 2})
    with caplog.at_level("WARNING"):
        assert init_from_folder(wider, tmp_path / "mt")["shared_missed"] > 0
    assert "shared tensors not loaded" in caplog.text and "blocks.4." in caplog.text
    plain = mtl.create_model(["depth"], backbone="test_resnet")
    with pytest.raises(ValueError, match=r"mt \(backbone 'task_moe_vit'\): none of this model's \d+ encoder "
                                         r"tensors \(backbone 'test_resnet'\) matches"):
        init_from_folder(plain, tmp_path / "mt")


def test_a_model_pool_of_this_family_is_refused_by_name(tmp_path):
    """Its per-task routers and heads live outside decoder.heads: the pool once failed on a key mismatch
    (thousands of characters), then, with unshared='skip', after evaluating every member."""
    from merging.pool import ModelPool

    for name in ("pre", "a", "b"):
        mtl.save_model(make(), tmp_path / name)
    with pytest.raises(ValueError, match=r"pre: model family 'task_moe_vit' cannot be merged by a model pool yet: "
                                         r"each task's weights also live in task_heads.<t>"):
        ModelPool.from_folders(tmp_path / "pre", [tmp_path / "a", tmp_path / "b"])
    from merging.job import run  # mtl-merge: the same line, before any run folder (it once left a FAILED one)

    with pytest.raises(ValueError, match=r"pre: model family 'task_moe_vit' cannot be merged by a model pool yet"):
        run([f"pretrained={tmp_path / 'pre'}", f"models=[{tmp_path / 'a'},{tmp_path / 'b'}]"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_fine_tuning_an_extracted_folder_trains_its_architecture(tmp_path):
    """init_from=<extracted folder> once built the full model from the run's config: the dropped experts'
    rows came back at random, with a warning only."""
    from mtl.warm_start import folder_architecture, init_from_folder

    sub = mtl.extract(make(), out=tmp_path / "semseg", task="semseg", calib=[X], min_share=0.2)
    assert sub.extraction_report["experts_kept_total"] < 8 * len(sub.moe_layers)  # some experts were dropped
    model = folder_architecture(tmp_path / "semseg", [create_task("semseg")])
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in sub.state_dict().items()}
    assert init_from_folder(model, tmp_path / "semseg")["shared_missed"] == 0
    with pytest.raises(ValueError, match=r"semseg holds a sub-network extracted for tasks \['semseg'\] "
                                         r"\(decoder.experts_kept\); fine-tune it on those tasks or a subset of them "
                                         r"\(\['depth'\] have no router there\)"):
        folder_architecture(tmp_path / "semseg", [create_task("depth")])


def test_expert_usage_panels_are_titled_with_their_blocks(tmp_path, monkeypatch):
    """They read 'layer 0/1/2' where the MoE blocks are 1, 3, 5 (every=2)."""
    from matplotlib.axes import Axes

    from mtl.expert_usage import save_usage_heatmap

    model = TaskMoEViT([create_task(t) for t in TASKS], {**VIT, "depth": 6}, {"num_experts": 4, "top_k": 2})
    assert model.usage_rows == ["block 1", "block 3", "block 5"]
    titles = []
    monkeypatch.setattr(Axes, "set_title", lambda self, text, **kw: titles.append(text))
    save_usage_heatmap({t: torch.ones(3, 4) for t in TASKS}, tmp_path / "u.png", rows=model.usage_rows)
    assert titles == ["expert usage: block 1", "expert usage: block 3", "expert usage: block 5"]


def test_an_input_size_not_divisible_by_the_patch_size_is_refused():
    """The strided patch conv dropped the remainder and the heads upsampled back: edge pixels were never seen."""
    model = TaskMoEViT([create_task("depth")], {**VIT, "patch_size": 4}, {"num_experts": 8, "top_k": 2})
    with pytest.raises(ValueError, match=r"^task_moe_vit: input 33x47 is not divisible by backbone.patch_size=4 \(the "
                                         r"patch embedding would drop its last 1 row\(s\) and 3 column\(s\)\)"):
        model(torch.randint(0, 255, (1, 3, 33, 47), dtype=torch.uint8))
    assert model(torch.randint(0, 255, (1, 3, 36, 48), dtype=torch.uint8))["depth"].shape == (1, 1, 36, 48)


def test_a_model_is_copied_and_pickled_after_a_training_forward_without_its_pending_aux_loss():
    """A training forward left graph-carrying ``balance`` / ``mean_probs`` in ``TaskMoE.stats``: deepcopy (SWA's
    AveragedModel, merging.pool.evaluate on another device) failed in torch ("Only Tensors created explicitly
    by the user (graph leaves) support the deepcopy protocol")."""
    import copy
    import io

    from torch.optim.swa_utils import AveragedModel

    model = make().train()
    out = model(X)
    (out["depth"].float().mean() + model.aux_loss()["depth"]).backward()
    pending = model.aux_loss()
    twin = copy.deepcopy(model)
    AveragedModel(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        assert other.training and other.aux_loss() == {}  # a copy starts with no pending aux loss
        torch.testing.assert_close(other.state_dict(), model.state_dict())
    assert {t: v.item() for t, v in model.aux_loss().items()} == {t: v.item() for t, v in pending.items()}
    assert all(m.stats for m in model.moe_modules())  # the original keeps its own
