"""The demo's speed switches: the optimiser MultiTaskModule builds and the demo's own schedule."""
import lightning as L
import torch

from mtl.cli.in_process import compose_in_process
from mtl.models import create_model
from mtl.module import MultiTaskModule


def test_the_optimiser_is_fused_adamw_with_two_groups():
    """On CPU torch's default AdamW is a per-parameter loop of small ops; the fused kernel does the
    same update (compared here against the unfused one on one step)."""
    torch.manual_seed(0)
    model = create_model(["depth", "classification"], backbone="test_resnet", decoder={"name": "hps", "channels": 8})
    module = MultiTaskModule(model, lr=1e-2, weight_decay=0.1)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    module.trainer = trainer
    opt = module.configure_optimizers()["optimizer"]
    assert opt.defaults["fused"] is True
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # the fused step equals the reference step (same update rule, float rounding only)
    ref = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups],
                            lr=1e-2, foreach=False)
    params = [p for g in opt.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    grads = [p.grad.clone() for p in params]
    opt.step()
    fused_after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s, g in zip(params, start, grads):
            p.copy_(s)
            p.grad = g
    ref.step()
    for p, f in zip(params, fused_after):
        torch.testing.assert_close(p.detach(), f, rtol=1e-5, atol=1e-6)


def test_demo_schedule_fits_the_time_budget():
    """The demo's training work stays what docs/BENCHMARKS.md's estimate was made for."""
    cfg, _ = compose_in_process("mtl.configs", "train", ["experiment=scenes_hps"])
    samples = cfg.data.n_train * cfg.trainer.max_epochs
    pixels = cfg.data.size ** 2
    assert samples * pixels <= 2000 * 3 * 48 ** 2, "the demo's training work grew: re-measure and update the docs"
    assert cfg.data.n_test >= 500  # the test split that the table and Δm are computed on stays large

