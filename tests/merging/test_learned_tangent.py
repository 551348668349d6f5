"""Tangent-space (linearised) models: equal to the plain model at θ0, linear in θ − θ0, trainable,
reloadable from a folder, and mergeable by the learned merges through functional_call."""
import pytest
import torch

import merging
import mtl
from mtl.models import LinearizedModel, create_model, linearize


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/merging/conftest.py


def plain_model(seed=0, decoder="hps"):
    torch.manual_seed(seed)
    tasks = [{"kind": "classification", "name": "a", "num_classes": 3}, {"kind": "semseg", "name": "s", "num_classes": 4}]
    m = create_model(tasks, backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                     decoder={"name": decoder, "channels": 8})
    return m.double().eval()


def offsets(model, seed, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
            if not n.startswith("decoder.heads.")}


def shared_at(model, delta):
    params = {n: p.detach() + delta[n] for n, p in model.named_parameters() if n in delta}
    return torch.func.functional_call(model, params, (X,), {"tasks": ["a"]}, strict=False)["a"]


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("decoder", ["hps", "moe"])  # moe shares several feature maps (a list)
def test_linearized_equals_plain_at_theta0(decoder):
    plain = plain_model(decoder=decoder)
    lin = linearize(plain).eval()
    assert isinstance(lin, LinearizedModel) and lin.config["family"] == "linearized"
    with torch.no_grad():
        a, b = plain(X), lin(X)
    for t in a:
        torch.testing.assert_close(a[t], b[t], rtol=1e-10, atol=1e-10)


def test_linearized_shared_features_are_linear_in_the_offset_with_several_feature_maps():
    """decoder=moe shares a list of feature maps (its task heads gate them non-linearly, so the check is on
    the shared representation, which is what the expansion covers)."""
    import copy

    lin = linearize(plain_model(decoder="moe")).eval()
    d1, d2 = offsets(lin, 1), offsets(lin, 2)

    def feats(delta):
        m = copy.deepcopy(lin)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in delta:
                    p.add_(delta[n])
            return torch.cat([f.flatten() for f in m.shared(X)])

    f0, f1, f2 = feats({}), feats(d1), feats(d2)
    mix = feats({n: 0.7 * d1[n] - 1.3 * d2[n] for n in d1})
    torch.testing.assert_close(mix, f0 + 0.7 * (f1 - f0) - 1.3 * (f2 - f0), rtol=1e-9, atol=1e-9)


def test_linearized_output_is_linear_in_the_offset():
    """f_lin(θ0 + α δ1 + β δ2) = f(θ0) + α [f_lin(θ0 + δ1) − f(θ0)] + β [f_lin(θ0 + δ2) − f(θ0)]."""
    lin = linearize(plain_model()).eval()
    d1, d2 = offsets(lin, 1), offsets(lin, 2)
    zero = {n: torch.zeros_like(v) for n, v in d1.items()}
    with torch.no_grad():
        # heads are linear layers on the shared features here, so the logits are linear in θ − θ0 too
        f0, f1, f2 = shared_at(lin, zero), shared_at(lin, d1), shared_at(lin, d2)
        alpha, beta = 0.7, -1.3
        mix = shared_at(lin, {n: alpha * d1[n] + beta * d2[n] for n in d1})
    torch.testing.assert_close(mix, f0 + alpha * (f1 - f0) + beta * (f2 - f0), rtol=1e-9, atol=1e-9)


def test_linearized_is_the_first_order_expansion():
    """f(θ0 + εδ) − f_lin(θ0 + εδ) shrinks like ε²: the tangent term is the true derivative."""
    plain = plain_model()
    lin = linearize(plain).eval()
    d = offsets(lin, 3, scale=1.0)
    errs = []
    with torch.no_grad():
        for eps in (1e-2, 1e-3):
            delta = {n: eps * v for n, v in d.items()}
            errs.append(float((shared_at(plain, delta) - shared_at(lin, delta)).abs().max()))
    assert errs[1] < errs[0] / 30  # quadratic: ~100× smaller for 10× smaller ε


def test_linearized_trains_and_reloads(tmp_path):
    lin = linearize(plain_model().float()).train()
    assert all(not m.training for m in lin.modules() if isinstance(m, torch.nn.BatchNorm2d))
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    x = X.float()
    loss = lin(x, tasks=["a"])["a"].logsumexp(1).mean()
    loss.backward()
    assert lin.backbone.body.conv1[0].weight.grad is not None
    opt.step()
    point_before = {k: v.clone() for k, v in lin.point().items()}
    mtl.save_model(lin, tmp_path / "lin")
    back = mtl.load_model(tmp_path / "lin")
    assert isinstance(back, LinearizedModel)
    assert all(torch.equal(back.point()[k], point_before[k]) for k in point_before)
    back.eval(), lin.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x)["s"], lin(x)["s"])


def test_learned_merge_of_linearized_models_matches_task_arithmetic_at_zero_steps():
    """θ0's buffers travel in every linearised fine-tune; tensors nobody changed get no coefficient."""
    base = linearize(plain_model().float()).eval()
    pre = {k: v.clone() for k, v in base.state_dict().items()}
    fts = []
    for i in range(2):
        d = offsets(base, 10 + i)
        fts.append({k: v + d[k].float() if k in d else v.clone() for k, v in pre.items()})
    data = {"a": [X.float()], "s": [X.float()]}
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=base, tasks=["a", "s"], steps=0, progress=False)
    assert not any(g.startswith("theta0.") for g in res.groups)
    assert not any(".heads." in k for k in res.state_dict)  # task-specific: never merged
    for k in res.state_dict:
        if k.startswith("theta0.") or not pre[k].is_floating_point():
            assert torch.equal(res.state_dict[k], pre[k])
    w = "backbone.body.conv1.0.weight"
    torch.testing.assert_close(res.state_dict[w], pre[w] + 0.3 * (fts[0][w] - pre[w]) + 0.3 * (fts[1][w] - pre[w]))
    res = merging.learn("adamerging", pre, fts, unlabeled=data, model=base, tasks=["a", "s"], steps=3, lr=0.05,
                        granularity="task", progress=False)
    assert not torch.equal(res.coefficients, torch.full((2,), 0.3))


def test_a_plain_theta0_with_linearized_fine_tunes_is_refused_naming_the_forms(tmp_path):
    """The expansion-point buffers are missing from the plain model: the error says why and how to fix it,
    instead of suggesting unshared='skip' (which would merge tangent-space vectors as plain ones)."""
    m = plain_model().float()
    pre, lin = mtl.save_model(m, tmp_path / "pre"), mtl.save_model(linearize(m), tmp_path / "lin")
    for a, b in ((pre, lin), (lin, pre)):
        with pytest.raises(merging.MergeInputError) as err:
            merging.merge("task_arithmetic", a, [b])
        text = str(err.value)
        assert f"{lin / 'model.safetensors'} is a linearized (tangent-space) model and" in text
        assert f"{pre / 'model.safetensors'} is not" in text and "unshared='skip'" not in text
        assert "theta0/" not in text  # the forms, not every expansion-point key
        with pytest.raises(merging.MergeInputError, match="is a linearized .tangent-space. model and"):
            merging.merge("task_arithmetic", a, [b], unshared="skip")  # skipping would merge them as plain ones


def test_a_linearized_fine_tune_expanded_around_another_point_is_refused(tmp_path):
    m = plain_model().float()
    pre = mtl.save_model(linearize(m), tmp_path / "pre")
    ft = mtl.save_model(linearize(m), tmp_path / "ft")  # same expansion point
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if n.startswith("backbone.")).add_(0.1)
    other = mtl.save_model(linearize(m), tmp_path / "other")  # expanded around the moved weights
    merging.merge("task_arithmetic", pre, [ft])
    with pytest.raises(merging.MergeInputError, match=r"other/model.safetensors is linearized around another point "
                                                      r"than .*pre/model.safetensors: its expansion point 'theta0\..*"
                                                      r"differs by up to 0.1"):
        merging.merge("task_arithmetic", pre, [ft, other])


def test_a_linearized_vit_runs_and_equals_the_plain_model_at_theta0():
    """Forward-mode AD has no rule for the fused CPU attention kernel: the first forward failed."""
    torch.manual_seed(0)
    plain = create_model([{"kind": "depth"}], backbone={"name": "test_vit", "img_size": 32, "patch_size": 4}).double().eval()
    lin = linearize(plain).eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(X)["depth"], plain(X)["depth"], rtol=1e-10, atol=1e-10)


def test_families_the_expansion_cannot_rebuild_are_refused_by_name():
    import pruning

    slim = create_model(["depth"], backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16], "depths": [1, 1],
                                             "out_indices": [1, 2]}, decoder={"name": "slimmable", "channels": 8},
                        family="slimmable")
    with pytest.raises(ValueError, match="linearize: family 'slimmable' cannot be linearised"):
        linearize(slim)  # it ran at full width whatever widths were set
    moe = create_model(["depth"], backbone={"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
                       decoder={"num_experts": 4, "top_k": 2}, family="task_moe_vit")
    with pytest.raises(ValueError, match="linearize: family 'task_moe_vit' cannot be linearised"):
        linearize(moe)
    with pytest.raises(ValueError, match="linearize: family 'linearized' cannot be linearised"):
        linearize(linearize(plain_model()))
    pruned = pruning.prune(plain_model().float(), "l1", example=X.float(), ratio=0.5)[0]
    with pytest.raises(ValueError, match="linearize: a pruned model cannot be linearised"):
        linearize(pruned)


def test_a_training_start_keeps_the_expansion_point(tmp_path):
    """family=linearized from a plain folder expands around the loaded weights (not the random init); a
    linearized folder loaded into a plain model (which would drop its θ0) is refused."""
    from mtl.warm_start import init_from_folder, keep_expansion_point

    plain = mtl.save_model(plain_model(seed=1).float(), tmp_path / "plain")
    lin = LinearizedModel.from_config({**plain_model(seed=2).config, "family": "linearized"})
    init_from_folder(lin, plain)
    keep_expansion_point(lin, plain)
    loaded = mtl.load_model(plain).state_dict()
    assert all(torch.equal(v, loaded[k]) for k, v in lin.point().items())
    with torch.no_grad():
        torch.testing.assert_close(lin.eval()(X.float())["s"], mtl.load_model(plain).eval()(X.float())["s"])
    folder = mtl.save_model(linearize(plain_model(seed=1).float()), tmp_path / "lin")
    with pytest.raises(ValueError, match="is a linearized .tangent-space. model: continue it with family=linearized"):
        keep_expansion_point(plain_model(seed=2).float(), folder)


def test_mtl_merge_refuses_mixed_forms_before_evaluating_the_pool(tmp_path, monkeypatch):
    import merging.job as job

    def never(*a, **k):
        raise AssertionError("the pool was evaluated before its inputs were checked")

    monkeypatch.setattr(job, "Evaluator", never)

    def one_task(task):  # same shared weights (seed), one head each: a pool of two fine-tunes
        torch.manual_seed(0)
        return create_model([task], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                            decoder={"name": "hps", "channels": 8})

    a, s = one_task({"kind": "classification", "name": "a", "num_classes": 3}), one_task({"kind": "depth", "name": "s"})
    pre = mtl.save_model(a, tmp_path / "pre")
    lins = [mtl.save_model(linearize(m), tmp_path / f"lin_{i}") for i, m in enumerate((a, s))]
    with pytest.raises(merging.MergeInputError, match="are linearized .tangent-space. models and .*pre/model.safetensors is not"):
        job.run(["merge=task_arithmetic", f"pretrained={pre}", f"models=[{lins[0]},{lins[1]}]", "+merge.unshared=skip"],
                run_dir=tmp_path / "run")
    lin_pre = mtl.save_model(linearize(a), tmp_path / "lin_pre")  # lins[0] again would be refused as θ0 among the models
    with pytest.raises(ValueError, match="bn='recompute' is not available for linearised models"):
        job.run(["merge=task_arithmetic", f"pretrained={lin_pre}", f"models=[{lins[0]},{lins[1]}]",
                 "+merge.bn=recompute"], run_dir=tmp_path / "run2")


def test_a_linearized_model_runs_and_trains_under_bf16_autocast():
    """bf16-mixed training: the expansion runs outside autocast (forward-mode AD has no rule through its
    casts), so the shared representation is the float32 one and only the heads compute in bf16."""
    lin = linearize(plain_model().float())
    with torch.no_grad():
        for p in lin.parameters():  # θ ≠ θ0: the tangent term is not zero
            p.add_(1e-2 * torch.randn_like(p))
    lin.eval()
    x = X.float()
    with torch.no_grad():
        want = lin.shared(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = lin.shared(x)
            out = lin(x, tasks=["a"])["a"]
    torch.testing.assert_close(got, want)
    assert out.dtype == torch.bfloat16
    lin.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lin(x, tasks=["a"])["a"].float().logsumexp(1).mean()
    loss.backward()
    assert lin.backbone.body.conv1[0].weight.grad is not None


def test_family_linearized_trains_from_a_folder_keeping_its_running_statistics(tmp_path):
    """`family=linearized init_from=<folder>` (plain, then linearised: continuing a tangent-space fine-tune)
    trains with the start's BN running statistics unchanged (the expansion is around one fixed function).
    A model built in that family kept training-mode BN through Lightning's mode restore, and its statistics
    update failed inside the jvp at the first step."""
    from mtl.train import run

    smoke = ["experiment=scenes_hps", "debug=smoke", "viz.num_samples=0", "logger=none"]
    pre = run(smoke + ["task=[classification]"], run_dir=tmp_path / "pre") / "model"
    first = run(smoke + ["task=[regression]", "family=linearized", f"init_from={pre}"], run_dir=tmp_path / "a") / "model"
    second = run(smoke + ["task=[regression]", "family=linearized", f"init_from={first}"], run_dir=tmp_path / "b") / "model"
    start = mtl.load_model(pre).state_dict()
    stats = [k for k in start if k.endswith(("running_mean", "running_var")) and not k.startswith("decoder.heads.")]
    assert stats
    for folder in (first, second):
        model = mtl.load_model(folder)
        assert isinstance(model, LinearizedModel)
        assert all(torch.equal(model.state_dict()[k], start[k]) for k in stats)
        assert all(torch.equal(v, start[k]) for k, v in model.point().items())  # θ0 is the plain start's weights
