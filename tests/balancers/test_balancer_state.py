"""Balancers leave the model as they found it and report their counters."""
import pytest
import torch

from balancer_toys import Toy, toy_batch, toy_ctx
from mtl.balancers import StepContext, create_balancer, freeze_norm_stats


def test_flat_restores_the_weights_when_the_perturbed_pass_fails():
    torch.manual_seed(0)
    model = Toy(bn=True)
    x, y = toy_batch()
    ctx = toy_ctx(model, x, y)  # its forward moves the BN statistics: compare from here on
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def failing_recompute(tasks=None):
        raise RuntimeError("out of memory in the perturbed pass")

    ctx.recompute = failing_recompute
    with pytest.raises(RuntimeError, match="perturbed pass"):
        create_balancer("flat", ["a", "b"], aggregator="upgrad", rho=0.5).backward(ctx)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_freeze_norm_stats_keeps_running_statistics_and_counters():
    torch.manual_seed(0)
    model = Toy(bn=True).train()
    bn = model.shared[1]
    mean, var, n = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    with freeze_norm_stats(model):
        model(torch.randn(8, 4) * 5 + 3)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert int(bn.num_batches_tracked) == n and bn.momentum == 0.1
    model(torch.randn(8, 4) * 5 + 3)  # outside: statistics move again
    assert not torch.equal(bn.running_mean, mean) and int(bn.num_batches_tracked) == n + 1


def test_diagnostics_report_solver_failures_also_nested():
    nash = create_balancer("nash_mtl", ["a", "b"])
    nash.solver_failures, nash.not_converged = 2, 1
    assert nash.diagnostics() == {"solver_failures": 2, "not_converged": 1}
    restored = create_balancer("nash_mtl", ["a", "b"])
    restored.load_state_dict(nash.state_dict())
    assert restored.diagnostics() == {"solver_failures": 2, "not_converged": 1}  # both travel in checkpoints
    flat = create_balancer("flat", ["a", "b"], aggregator="nash_mtl")
    flat.base.solver_failures = 3
    assert flat.diagnostics() == {"base.solver_failures": 3, "base.not_converged": 0, "sharp.solver_failures": 0,
                                  "sharp.not_converged": 0}
    assert create_balancer("ew", ["a", "b"]).diagnostics() == {}


def _nash_step(b, J):
    theta = torch.nn.Parameter(torch.zeros(J.shape[1]))
    b.backward(StepContext({"a": theta @ J[0], "b": theta @ J[1]}, [theta], {"a": [], "b": []}, None))
    return b.weights()


def test_nash_mtl_schedule_weights_and_failures_survive_a_state_dict_round_trip():
    # update_weights_every=3 solves at calls 0, 3, ...: a checkpoint after call 1 must carry the call
    # count and the weights in use, or the resumed run solves at once, at another step
    steps = [torch.tensor([[1.0, 0.0], [-1.0, 0.0]]),  # no bargaining point: equal weights, one failure
             torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 1.0], [0.0, 1.0]]),
             torch.tensor([[1.0, 1.0], [0.5, 2.0]])]
    nash = create_balancer("nash_mtl", ["a", "b"], update_weights_every=3)
    for J in steps[:2]:
        _nash_step(nash, J)
    other = create_balancer("nash_mtl", ["a", "b"], update_weights_every=3)
    other.load_state_dict(nash.state_dict())
    assert other.solver_failures == nash.solver_failures == 1
    for J in steps[2:]:
        assert _nash_step(other, J) == _nash_step(nash, J)
    assert other.weights() != {"a": 1.0, "b": 1.0}  # the solve at call 3 happened in both
    # flat's two nested instances keep theirs too
    flat = create_balancer("flat", ["a", "b"], aggregator="nash_mtl", aggregator_kwargs={"update_weights_every": 3})
    flat.base._calls, flat.sharp.solver_failures = 2, 1
    again = create_balancer("flat", ["a", "b"], aggregator="nash_mtl", aggregator_kwargs={"update_weights_every": 3})
    again.load_state_dict(flat.state_dict())
    assert again.base._calls == 2 and again.diagnostics() == {"base.solver_failures": 0, "base.not_converged": 0,
                                                              "sharp.solver_failures": 1, "sharp.not_converged": 0}


def test_a_checkpoint_saved_before_nash_mtl_kept_state_still_resumes():
    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    model = create_model(["depth", "regression"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    module = MultiTaskModule(model, balancer={"name": "flat", "aggregator": "nash_mtl"}, log_weights_every=0)
    module.balancer.base._calls = 5
    old = {"state_dict": {k: v for k, v in module.state_dict().items() if not k.endswith("_extra_state")}}
    module.on_load_checkpoint(old)  # Lightning calls it before its strict load of the weights
    module.load_state_dict(old["state_dict"])
    assert module.balancer.base._calls == 0 and module.balancer.diagnostics() == {
        "base.solver_failures": 0, "base.not_converged": 0, "sharp.solver_failures": 0, "sharp.not_converged": 0}


def test_a_resume_that_changes_a_balancers_own_optimiser_is_refused_by_name():
    """famo / gradnorm tune their weights with their own optimiser, whose state (lr and weight decay included)
    the checkpoint restores: balancer.lr=0.5 was recorded but trained at the checkpoint's 0.025, and
    balancer.optimizer=sgd failed later with a bare KeyError 'momentum' (Adam's state loaded into SGD)."""
    from types import SimpleNamespace

    from mtl.train_checks import changed_on_resume

    famo = {"name": "famo", "lr": 0.025, "weight_decay": 0.001, "optimizer": "adam", "skip_nonfinite": False}
    stored = {"lr": 2e-3, "weight_decay": 1e-4, "balancer": famo}
    for key, value in (("lr", 0.5), ("weight_decay", 0.1), ("optimizer", "sgd")):
        now = {"lr": 2e-3, "weight_decay": 1e-4, "balancer": {**famo, key: value}}
        assert changed_on_resume(stored, now, {})[:3] == (f"balancer.{key}", value, famo[key])
    now = {"lr": 2e-3, "weight_decay": 1e-4, "balancer": {**famo, "skip_nonfinite": True}}  # may change
    assert changed_on_resume(stored, now, {"a": SimpleNamespace(weight=1.0)}) is None
    # the clipping and a slimmable run's sandwich settings likewise (they apply from the resumed step on)
    base = {"lr": 2e-3, "weight_decay": 1e-4, "balancer": famo, "grad_clip": 1.0, "strategy": {"name": "sandwich", "cikd": True}}
    assert changed_on_resume(base, {**base, "grad_clip": None}, {})[:3] == ("optim.grad_clip", None, 1.0)
    changed = {**base, "strategy": {"name": "sandwich", "cikd": False}}
    assert changed_on_resume(base, changed, {})[:3] == ("strategy.cikd", False, True)
    assert changed_on_resume(base, dict(base), {}) is None
    # a list setting given as a tuple in Python and stored as a list is the same setting
    stored["balancer"], now["balancer"] = {**famo, "x": [1, 2]}, {**famo, "x": (1, 2)}
    assert changed_on_resume(stored, now, {"a": SimpleNamespace(weight=1.0)}) is None


def test_a_resume_compares_model_settings_as_json_does():
    # true and 1 are one value to Python's ==, not to a config: decoder.renormalize=1 passed for a stored true
    from mtl.train_checks import changed_on_resume

    famo = {"name": "famo", "lr": 0.025}
    model = {"tasks": [{"name": "a", "kind": "depth"}], "decoder": {"renormalize": True, "channels": 8.0}}
    stored = {"lr": 2e-3, "balancer": famo, "model": model}
    now = {"lr": 2e-3, "balancer": famo, "model": {**model, "decoder": {"renormalize": 1, "channels": 8}}}
    assert changed_on_resume(stored, now, {})[:3] == ("decoder.renormalize", 1, True)
    now["model"]["decoder"]["renormalize"] = True  # 8 and 8.0 are one number
    assert changed_on_resume(stored, now, {}) is None


def _ddp_module(rank: int, world: int, every: int = 3):
    from types import SimpleNamespace

    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    torch.manual_seed(0)
    model = create_model(["depth", "regression"], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    module = MultiTaskModule(model, balancer={"name": "nash_mtl", "update_weights_every": every}, log_weights_every=0)
    # what on_save/on_load_checkpoint read of Lightning's trainer
    module._trainer = SimpleNamespace(precision="32-true", state=SimpleNamespace(fn="fit"), global_rank=rank,
                                      world_size=world)
    return module


def _module_nash_step(module, J):
    theta = torch.nn.Parameter(torch.zeros(J.shape[1]))
    a, b = module.balancer.tasks
    module.balancer.backward(StepContext({a: theta @ J[0], b: theta @ J[1]}, [theta], {a: [], b: []}, None))
    return module.balancer.weights()


def test_nash_mtl_under_ddp_resumes_each_ranks_own_weights(monkeypatch, caplog):
    # under DDP each rank solves its weights from its own gradients; checkpoints held rank 0's only, so a
    # resume between two solves (update_weights_every=3) gave rank 1 rank 0's weights until the next solve
    grads = {0: [torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[2.0, 1.0], [0.0, 1.0]])],
             1: [torch.tensor([[3.0, 0.5], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.5, 2.0]])]}
    ranks = {r: _ddp_module(r, 2) for r in (0, 1)}
    for r, module in ranks.items():
        _module_nash_step(module, grads[r][0])  # call 0 solves, call 1 (the resume point) follows
    assert ranks[0].balancer.weights() != ranks[1].balancer.weights()
    # Lightning dumps the checkpoint on every rank (the gather is the collective), rank 0 writes its dict
    monkeypatch.setattr("mtl.module.gather_objects", lambda local: [local, {"balancer._extra_state":
                        ranks[1].balancer.get_extra_state()}], raising=False)
    checkpoint = {"state_dict": ranks[0].state_dict()}
    ranks[0].on_save_checkpoint(checkpoint)
    for r in (0, 1):
        resumed = _ddp_module(r, 2)
        ckpt = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
        resumed.on_load_checkpoint(ckpt)
        resumed.load_state_dict(ckpt["state_dict"])
        assert _module_nash_step(resumed, grads[r][1]) == _module_nash_step(ranks[r], grads[r][1]), f"rank {r}"
    # another number of processes: no saved weights are this rank's, so each solves afresh (schedule and
    # counters kept), said once
    other = _ddp_module(0, 3)
    ckpt = {**checkpoint, "state_dict": dict(checkpoint["state_dict"])}
    with caplog.at_level("WARNING", logger="mtl.distributed"):
        other.on_load_checkpoint(ckpt)
    other.load_state_dict(ckpt["state_dict"])
    assert other.balancer._calls == 1 and other.balancer._alpha is None
    assert "saved by 2 process(es), this run has 3" in caplog.text and "balancer.alpha" in caplog.text
    # one process, as before: its own checkpoint resumes exactly, without a warning
    single = _ddp_module(0, 1)
    _module_nash_step(single, grads[0][0])
    monkeypatch.undo()
    checkpoint = {"state_dict": single.state_dict()}
    single.on_save_checkpoint(checkpoint)
    caplog.clear()
    resumed = _ddp_module(0, 1)
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(resumed.balancer._alpha, single.balancer._alpha) and not caplog.text


def test_a_checkpoint_without_per_process_states_does_not_claim_one_process(caplog):
    """A checkpoint from before `balancer_ranks` was kept does not say how many processes saved it: resumed under
    DDP, the warning said it "was saved by 1 process(es)"; in one process it resumes silently, as before."""
    from mtl.distributed import restore_rank_states

    def weights():
        return {"balancer._extra_state": {"calls": 3, "alpha": torch.tensor([1.0, 2.0]), "solver_failures": 0,
                                          "not_converged": 0}}

    balancer = create_balancer("nash_mtl", ["a", "b"])
    with caplog.at_level("WARNING", logger="mtl.distributed"):
        old = weights()
        restore_rank_states(old, None, 0, 2, balancer)
    assert "alpha" not in old["balancer._extra_state"] and old["balancer._extra_state"]["calls"] == 3
    assert "does not record how many processes saved it" in caplog.text and "this run has 2" in caplog.text
    assert "saved by 1 process" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="mtl.distributed"):
        one = weights()
        restore_rank_states(one, None, 0, 1, balancer)
    assert torch.equal(one["balancer._extra_state"]["alpha"], torch.tensor([1.0, 2.0])) and not caplog.text
