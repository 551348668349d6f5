"""Balancers leave the model as they found it and report their counters."""
import pytest
import torch

from balancer_toys import Toy, toy_batch, toy_ctx
from mtl.balancers import create_balancer, freeze_norm_stats


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
    nash.solver_failures = 2
    assert nash.diagnostics() == {"solver_failures": 2}
    flat = create_balancer("flat", ["a", "b"], aggregator="nash_mtl")
    flat.base.solver_failures = 3
    assert flat.diagnostics() == {"base.solver_failures": 3, "sharp.solver_failures": 0}
    assert create_balancer("ew", ["a", "b"]).diagnostics() == {}
