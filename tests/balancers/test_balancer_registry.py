"""Every registered balancer runs on a toy model; configs exist; bad input fails clearly."""
import copy
import logging
from pathlib import Path

import pytest
import torch
import yaml

from balancer_toys import Toy, grads_of, toy_batch, toy_ctx
from mtl.balancers import (
    BALANCERS,
    JACOBIAN_METHODS,
    LOSS_LEVEL_METHODS,
    NonFiniteGradientError,
    NonFiniteLossError,
    StepContext,
    check_finite,
    create_balancer,
)
from mtl.registry import UnknownNameError

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "balancer"
ALL = LOSS_LEVEL_METHODS + JACOBIAN_METHODS + ("flat",)


def test_registry_holds_exactly_the_documented_methods():
    assert sorted(ALL) == BALANCERS.names()


@pytest.mark.parametrize("name", ALL)
def test_every_name_runs_one_backward_with_finite_grads(name):
    torch.manual_seed(0)
    model = Toy(bn=True)
    x, y = toy_batch()
    balancer = create_balancer(name, ["a", "b"])
    opt = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=0.01)
    for step in range(2):
        opt.zero_grad(set_to_none=True)
        ctx = toy_ctx(model, x, y, step=step)
        assert check_finite(ctx.losses)
        balancer.backward(ctx)
        for p in model.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert grads_of(model.shared.parameters()).abs().sum() > 0
        for t in ("a", "b"):
            assert grads_of(model.heads[t].parameters()).abs().sum() > 0
        opt.step()
        balancer.after_step(ctx)
    w = balancer.weights()
    assert set(w) == {"a", "b"} and all(torch.isfinite(torch.tensor(v)) for v in w.values())


@pytest.mark.parametrize("name", ALL)
def test_every_name_has_a_config_that_builds(name):
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    assert cfg.pop("name") == name
    assert cfg.get("skip_nonfinite") is False
    balancer = create_balancer(name, ["a", "b"], **cfg)
    assert balancer.registry_name == name


def test_unknown_balancer_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        create_balancer("pcgard", ["a", "b"])
    assert "valid names" in str(err.value) and "pcgrad" in str(err.value) and "famo" in str(err.value)


@pytest.mark.parametrize("tasks, err, match", [
    ("depth", TypeError, r"tasks must be a list of task names.*got 'depth'"),  # not the tasks d, e, p, t, h
    (["a", 3], TypeError, r"tasks must be a list of task names"),
    (["a", "a"], ValueError, r"tasks must name each task once.*\['a', 'a'\]"),
    ([], ValueError, r"tasks must name each task once \(at least one\)"),
])
def test_bad_task_lists_are_named(tasks, err, match):
    with pytest.raises(err, match=match):
        create_balancer("ew", tasks)


def test_unknown_hyperparameter_lists_the_valid_ones():
    with pytest.raises(TypeError, match="cagrad.*hyper-parameters are: c, norm_eps"):
        create_balancer("cagrad", ["a", "b"], alpha=0.3)


@pytest.mark.parametrize("name", JACOBIAN_METHODS + ("flat",))
def test_gradient_method_without_shared_parameters_is_a_clear_error(name):
    model = Toy()
    x, y = toy_batch()
    ctx = toy_ctx(model, x, y)
    ctx.shared_params = []
    with pytest.raises(ValueError, match="no shared trainable parameter"):
        create_balancer(name, ["a", "b"]).backward(ctx)


def test_features_level_without_features_is_a_clear_error():
    model = Toy()
    x, y = toy_batch()
    with pytest.raises(ValueError, match="level=features.*needs StepContext.features"):
        create_balancer("mgda", ["a", "b"], level="features").backward(toy_ctx(model, x, y, features=False))


@pytest.mark.parametrize("name, key, value", [("dwa", "temperature", float("nan")), ("cagrad", "c", float("inf")),
                                             ("gradnorm", "lr", float("nan")), ("mgda", "rtol", float("inf")),
                                             ("flat", "rho", float("-inf")), ("famo", "lr", float("nan"))])
def test_non_finite_hyperparameters_are_refused_when_built(name, key, value):
    """NaN passes every `x < 0` check: DWA's weights turned NaN two windows later, blamed on the data."""
    with pytest.raises(ValueError, match=rf"balancer.{key} must be finite, got {value!r}"):
        create_balancer(name, ["a", "b"], **{key: value})


@pytest.mark.parametrize("name, key, kind", [
    ("cagrad", "c", "float"), ("flat", "rho", "float"), ("dwa", "temperature", "float"), ("famo", "lr", "float"),
    ("gradnorm", "lr", "float"), ("nash_mtl", "tol", "float"), ("uw", "init", "float"), ("mgda", "rtol", "float"),
    ("upgrad", "reg_eps", "float"), ("famo", "eps", "float"), ("gradnorm", "alpha", "float"),
    ("nash_mtl", "update_weights_every", "int"), ("mgda", "max_iters", "int"), ("pcgrad", "skip_nonfinite", "bool"),
])
def test_null_for_a_setting_that_takes_no_none_is_named(name, key, kind):
    """balancer.c=null stopped with "'<' not supported between instances of 'NoneType' and 'int'" (a float() or
    int() message for others), naming neither balancer nor key: None is refused as any other wrong type is."""
    with pytest.raises(TypeError, match=rf"^balancer\.{key} must be {kind}, got None$"):
        create_balancer(name, ["a", "b"], **{key: None})


def test_null_stays_accepted_where_the_annotation_or_the_default_takes_it():
    """``int | None`` (parallel_chunk_size), ``dict | None`` (aggregator_kwargs): None is a value they take."""
    create_balancer("cagrad", ["a", "b"], parallel_chunk_size=None)
    create_balancer("flat", ["a", "b"], aggregator_kwargs=None)


@pytest.mark.parametrize("name, kwargs, message", [
    ("dwa", {"temperature": -1}, "dwa: balancer.temperature must be > 0, got -1"),
    ("dwa", {"window": 0}, "dwa: balancer.window must be 'epoch' or a positive number of steps, got 0"),
    ("cagrad", {"c": -0.1}, "cagrad: balancer.c and balancer.norm_eps must be >= 0, got c=-0.1"),
    ("mgda", {"solver": "qp"}, "mgda: balancer.solver must be one of"),
    ("upgrad", {"reg_eps": 2.0}, "upgrad: balancer.reg_eps must be in [0, 1), got 2.0"),
    ("aligned_mtl", {"scale_mode": "max"}, "aligned_mtl: balancer.scale_mode must be min, median or rmse"),
    ("pcgrad", {"level": "layer"}, "pcgrad: balancer.level must be 'params' or 'features', got 'layer'"),
    ("nash_mtl", {"update_weights_every": 0}, "nash_mtl: balancer.update_weights_every must be >= 1, got 0"),
    ("famo", {"lr": 0}, "famo: balancer.lr must be > 0, got 0"),
    ("gradnorm", {"alpha": -1}, "gradnorm: balancer.alpha must be >= 0, got -1"),
    ("flat", {"rho": -1}, "flat: balancer.rho must be >= 0, got -1"),
    # a key inside aggregator_kwargs is named with its full path
    ("flat", {"aggregator_kwargs": {"reg_eps": 2.0}}, "balancer.aggregator_kwargs.reg_eps must be in [0, 1), got 2.0"),
    ("flat", {"aggregator_kwargs": {"level": "features"}}, "flat: balancer.aggregator_kwargs.level must be 'params'"),
])
def test_range_errors_name_the_full_key(name, kwargs, message):
    with pytest.raises(ValueError) as err:
        create_balancer(name, ["a", "b"], **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_flat_rejects_features_level_and_unknown_aggregator():
    with pytest.raises(ValueError, match="shared parameters only"):
        create_balancer("flat", ["a", "b"], aggregator_kwargs={"level": "features"})
    with pytest.raises(ValueError, match="aggregator must be one of"):
        create_balancer("flat", ["a", "b"], aggregator="ew")
    # a bad key of aggregator_kwargs is named as the user wrote it, not as the inner balancer's own keyword
    with pytest.raises(TypeError, match=r"flat: balancer.aggregator_kwargs for aggregator=upgrad: .*argument 'c'"):
        create_balancer("flat", ["a", "b"], aggregator_kwargs={"c": 0.4})
    # flat's own key is named as flat's, and not taken (then silently overwritten) from aggregator_kwargs
    with pytest.raises(ValueError, match=r"^flat: balancer.parallel_chunk_size must be >= 1 or null, got 0$"):
        create_balancer("flat", ["a", "b"], parallel_chunk_size=0)
    with pytest.raises(ValueError, match=r"set balancer.parallel_chunk_size, not inside balancer.aggregator_kwargs"):
        create_balancer("flat", ["a", "b"], aggregator_kwargs={"parallel_chunk_size": 4})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_names_the_task(bad):
    losses = {"depth": torch.tensor(0.5), "normals": torch.tensor(bad)}
    with pytest.raises(NonFiniteLossError, match="'normals'.*step 7.*skip_nonfinite"):
        check_finite(losses, skip=False, step=7)


def test_nonfinite_loss_skip_logs_and_returns_false(caplog):
    losses = {"depth": torch.tensor(float("nan")), "normals": torch.tensor(1.0)}
    with caplog.at_level(logging.WARNING, logger="mtl.balancers"):
        assert check_finite(losses, skip=True, step=3) is False
    assert "depth" in caplog.text and "skipping this step" in caplog.text
    assert check_finite({"depth": torch.tensor(1.0)}, skip=True)


def nan_gradient_ctx(model, x, y, step):
    """Task a's loss is finite but its gradient is NaN: a norm at its minimum (d‖v‖/dv at v = 0 is 0·∞)."""
    ctx = toy_ctx(model, x, y, step=step)
    z = ctx.features
    ctx.losses["a"] = ctx.losses["a"] + (z - z.detach()).pow(2).sum().sqrt()
    return ctx


GRADIENT_METHODS = [(m, "params") for m in JACOBIAN_METHODS + ("flat", "gradnorm")] + [
    (m, "features") for m in JACOBIAN_METHODS + ("gradnorm",)]


@pytest.mark.parametrize("name,level", GRADIENT_METHODS)
def test_a_nonfinite_gradient_of_a_finite_loss_is_named_or_skipped(name, level, caplog):
    # it reached the solvers: linalg.svd's "input matrix contained non-finite values" (imtl_g, cagrad), nash_mtl's
    # "no bargaining point", or a NaN/inf update (every other method), and skip_nonfinite did not apply
    kw = {} if level == "params" else {"level": level}
    model = Toy()
    x, y = toy_batch()
    ctx = nan_gradient_ctx(model, x, y, step=5)
    assert check_finite(ctx.losses)
    with pytest.raises(NonFiniteGradientError, match=rf"^balancer '{name}': non-finite gradient for task\(s\) 'a' at step 5 "
                                                     r"\(the loss is finite.*skip_nonfinite=true"):
        create_balancer(name, ["a", "b"], **kw).backward(ctx)
    assert all(p.grad is None for p in model.parameters())

    balancer = create_balancer(name, ["a", "b"], skip_nonfinite=True, **kw)
    before = copy.deepcopy(balancer.state_dict())
    with caplog.at_level(logging.WARNING, logger="mtl.balancers"):
        assert balancer.backward(nan_gradient_ctx(model, x, y, step=6)) is False
    assert "'a' at step 6" in caplog.text and "skipping this step" in caplog.text
    assert all(p.grad is None and not hasattr(p, "jac") for p in model.parameters())
    assert repr(before) == repr(balancer.state_dict())  # gradnorm's weights, nash_mtl's schedule untouched
    assert balancer.backward(toy_ctx(model, x, y, step=7)) is None  # the next, finite step runs as usual
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_skip_nonfinite_is_a_balancer_option():
    assert create_balancer("pcgrad", ["a"], skip_nonfinite=True).skip_nonfinite is True
    assert create_balancer("ew", ["a"]).skip_nonfinite is False


def test_missing_task_loss_is_named():
    model = Toy()
    x, y = toy_batch()
    ctx = toy_ctx(model, x, y)
    del ctx.losses["b"]
    with pytest.raises(KeyError, match="'b'"):
        create_balancer("ew", ["a", "b"]).backward(ctx)


def test_ew_default_context_backward_still_works():
    # the original interface: StepContext with the four positional fields and default backward
    p = torch.nn.Parameter(torch.ones(2))
    ctx = StepContext({"a": (p * 2).sum(), "b": (p * 3).sum()}, [p], {"a": [], "b": []}, None)
    create_balancer("ew", ["a", "b"]).backward(ctx)
    assert torch.allclose(p.grad, torch.full((2,), 5.0))


def test_fp16_loss_scaling_is_refused_for_balancers_that_compute_their_own_gradients():
    from types import SimpleNamespace

    from mtl.module import check_precision

    scaled, plain = SimpleNamespace(scaler=object()), SimpleNamespace(scaler=None)
    for name in ("upgrad", "pcgrad", "flat", "gradnorm"):
        b = create_balancer(name, ["a", "b"])
        check_precision(b, plain)
        with pytest.raises(ValueError, match=f"{name}.*bf16-mixed"):
            check_precision(b, scaled)
    for name in ("ew", "uw", "dwa", "rlw", "famo"):  # their backward goes through manual_backward
        check_precision(create_balancer(name, ["a", "b"]), scaled)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(1,), (16,)])
def test_every_name_refuses_a_loss_that_is_not_0_dim(name, shape):
    # stacked, a (1,) loss made a (T, 1) vector and w * L a (T, T) matrix: dwa/uw/rlw stepped with
    # weights other than those they logged, famo/gradnorm crashed unnamed, mgda read each element as a task
    torch.manual_seed(0)
    model = Toy()
    x, y = toy_batch()
    ctx = toy_ctx(model, x, y, step=5, epoch=3)
    ctx.losses["b"] = ctx.losses["b"].expand(shape) if shape == (1,) else (model(x)[1]["b"] - y["b"]) ** 2
    balancer = create_balancer(name, ["a", "b"])
    before = {k: v.clone() for k, v in balancer.state_dict().items() if isinstance(v, torch.Tensor)}
    message = rf"^balancer '{name}': the loss of task 'b' must be a scalar \(0-dim\) tensor, got shape \({shape[0]},\)"
    with pytest.raises(ValueError, match=message):
        balancer.backward(ctx)
    assert all(p.grad is None for p in model.parameters())
    for k, v in before.items():  # nothing moved (dwa's window, famo's logits, ...)
        torch.testing.assert_close(balancer.state_dict()[k], v, rtol=0, atol=0, equal_nan=True)


def test_the_training_step_checks_the_losses_before_the_monitors_backward_passes(monkeypatch):
    """The gradient-cosine monitor ran its per-task backward passes first and failed on a vector loss with
    torch's unnamed 'grad can be implicitly created only for scalar outputs'."""
    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    torch.manual_seed(0)
    model = create_model(["depth", "semseg"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    module = MultiTaskModule(model, balancer="ew", log_weights_every=1)
    shared = model.shared_parameters()[0]
    z = shared.sum() * torch.ones(4, 8)  # a representation on the graph of the shared parameters
    losses = {"depth": (z ** 2).mean(), "semseg": (z ** 2).mean(dim=1)}
    monkeypatch.setattr(module, "_forward_losses", lambda batch: (z, losses))
    monkeypatch.setattr(module, "optimizers", lambda: None)
    monkeypatch.setattr(module, "lr_schedulers", lambda: None)
    with pytest.raises(ValueError, match=r"^balancer 'ew': the loss of task 'semseg' must be a scalar \(0-dim\) "
                                         r"tensor, got shape \(4,\)"):
        module.training_step({"image": torch.zeros(4, 3, 32, 32)}, 0)
    assert shared.grad is None


@pytest.mark.parametrize("tasks", [None, ["depth"]])
def test_recompute_at_unchanged_weights_repeats_the_forwards_losses_under_noisy_gating(monkeypatch, tasks):
    """ctx.recompute ran in train mode with fresh random draws: a noisy top-k router routed tokens unlike the
    forward, so FLAT's perturbed loss and FAMO's after-step loss measured gating noise as well as the step."""
    import types

    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    class Stop(Exception):
        pass

    torch.manual_seed(0)
    model = create_model(["depth", "semseg"], family="task_moe_vit",
                         backbone={"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
                         decoder={"num_experts": 8, "top_k": 2, "noisy": True})
    for m in model.moe_modules():  # a visible noise scale: the routers start with zero noise weights
        for r in m.routers.values():
            torch.nn.init.normal_(r.noise.weight, std=1.0)
    module = MultiTaskModule(model, balancer="ew")
    monkeypatch.setattr(module, "optimizers", lambda: types.SimpleNamespace(zero_grad=lambda set_to_none: None))
    monkeypatch.setattr(module, "lr_schedulers", lambda: None)
    seen = {}

    def backward(ctx):
        seen["forward"] = {t: l.detach() for t, l in ctx.losses.items()}
        with torch.no_grad():
            seen["again"] = ctx.recompute(tasks)
            seen["fresh"] = module._forward_losses(batch)[1]  # what a forward with new draws gives
        raise Stop

    monkeypatch.setattr(module.balancer, "backward", backward)
    batch = {"image": torch.rand(2, 3, 16, 16), "depth": torch.rand(2, 1, 16, 16) + 0.5,
             "semseg": torch.randint(0, 5, (2, 16, 16))}
    with pytest.raises(Stop):
        module.training_step(batch, 0)
    assert set(seen["again"]) == set(tasks or ["depth", "semseg"])
    for t, loss in seen["again"].items():
        assert torch.equal(loss, seen["forward"][t])
    assert any(not torch.equal(seen["fresh"][t], seen["forward"][t]) for t in seen["forward"])  # the noise is real


def test_finite_rows_flags_exactly_the_rows_holding_nan_or_inf():
    from mtl.balancers.gradient import finite_rows

    m = torch.randn(4, 1000)
    m[1, 17], m[2, 999], m[3, 0], m[3, 1] = float("nan"), float("-inf"), float("inf"), float("-inf")
    assert finite_rows(m).tolist() == [True, False, False, False]
    # fp16 rows whose float16 sum would overflow (4000 x 60000 > 65504) are finite: summed in float32
    big = torch.full((2, 4000), 60000.0, dtype=torch.float16)
    assert finite_rows(big).tolist() == [True, True]
    assert finite_rows(torch.randn(3, 2, 5).double()).tolist() == [True] * 3
