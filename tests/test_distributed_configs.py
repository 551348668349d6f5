"""trainer=ddp with num_nodes, trainer=fsdp, and which balancers FSDP can run."""
import pytest

from mtl.balancers import create_balancer
from mtl.cli.in_process import compose_in_process
from mtl.distributed import check_strategy, fsdp_compatible


def test_ddp_multi_node_config_composes():
    cfg, _ = compose_in_process("mtl.configs", "train", ["trainer=ddp", "trainer.num_nodes=4", "trainer.devices=8"])
    assert (cfg.trainer.strategy, cfg.trainer.num_nodes, cfg.trainer.devices) == ("ddp", 4, 8)


def test_fsdp_config_composes_to_lightnings_fsdp_strategy():
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    cfg, _ = compose_in_process("mtl.configs", "train", ["trainer=fsdp"])
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.num_nodes == 1
    try:
        trainer = L.Trainer(strategy=cfg.trainer.strategy, accelerator="cpu", devices=2, logger=False)
    except Exception as e:  # Lightning's FSDP needs CUDA; say so rather than pretend it ran
        assert "GPU" in str(e) or "CUDA" in str(e) or "cuda" in str(e)
    else:
        assert isinstance(trainer.strategy, FSDPStrategy)


@pytest.mark.parametrize("name,ok", [("ew", True), ("dwa", True), ("uw", True), ("rlw", True), ("famo", False),
                                     ("gradnorm", False), ("pcgrad", False), ("upgrad", False), ("nash_mtl", False)])
def test_fsdp_runs_loss_level_balancers_only(name, ok):
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    balancer = create_balancer(name, tasks=["a", "b"])
    assert fsdp_compatible(balancer) is ok
    check_strategy(balancer, DDPStrategy())  # DDP runs every balancer
    if ok:
        check_strategy(balancer, FSDPStrategy())
    else:
        with pytest.raises(ValueError, match=rf"balancer={name} does not run under trainer=fsdp.*one of: .*dwa, ew"):
            check_strategy(balancer, FSDPStrategy())


def test_famo_without_recompute_runs_under_fsdp():
    assert fsdp_compatible(create_balancer("famo", tasks=["a", "b"], recompute=False))


def test_fsdp_switches_the_monitors_gradient_cosines_off_and_keeps_its_weights(caplog):
    import torch
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from mtl.balancers import BalancerMonitor, StepContext

    ddp_monitor, monitor = BalancerMonitor(every=1), BalancerMonitor(every=1)
    check_strategy(create_balancer("ew", tasks=["a", "b"]), DDPStrategy(), ddp_monitor)
    assert ddp_monitor.cosines
    with caplog.at_level("WARNING", logger="mtl.distributed"):
        check_strategy(create_balancer("ew", tasks=["a", "b"]), FSDPStrategy(), monitor)
    assert not monitor.cosines and "no gradient cosines" in caplog.text
    # the monitor then never takes per-task gradients of the (sharded) shared parameters
    w = torch.nn.Parameter(torch.ones(2))
    ctx = StepContext({"a": w.sum() * 2, "b": -w.sum()}, [w], {"a": [], "b": []}, None)
    assert monitor.before_backward(ctx) == {} and w.grad is None
    assert monitor.after_step(ctx, create_balancer("ew", tasks=["a", "b"])) == {"balancer/weight/a": 1.0,
                                                                                "balancer/weight/b": 1.0}
    assert ddp_monitor.before_backward(ctx) == {"balancer/cos/a-b": pytest.approx(-1.0)}
