"""Run by test_balancer_ddp.py: ``python ddp_worker.py OUT_DIR``. Lightning's DDP launcher re-runs
this script once per rank (2 CPU processes, gloo). Several toy models, one balancer each, train
side by side; every rank writes its parameters and balancer state to OUT_DIR/rank<r>.pt."""
from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from balancer_toys import Toy
from mtl.balancers import StepContext, check_finite, create_balancer, freeze_norm_stats
from mtl.balancers.base import sync_grads

METHODS = {
    "pcgrad": {},                                   # random projection order
    "graddrop": {},                                 # random sign masks
    "upgrad_features": {"name": "upgrad", "level": "features"},
    "flat": {"aggregator": "mgda", "rho": 0.1},
    "famo": {},                                     # own logits, updated after the step
    "gradnorm": {},                                 # own weights
    "dwa": {"window": 2},
    "uw": {},                                       # learnable log-variances
}


class SideBySide(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.models = torch.nn.ModuleDict({k: Toy(bn=True) for k in METHODS})
        self.balancers = torch.nn.ModuleDict(
            {k: create_balancer(kw.pop("name", k), ["a", "b"], **kw) for k, kw in ((k, dict(v)) for k, v in METHODS.items())})
        self.first_losses: list[float] = []
        self.init = {k: torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for k, m in self.models.items()}

    def training_step(self, batch, batch_idx):
        x, ya, yb = batch
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)
        for key, model in self.models.items():
            balancer = self.balancers[key]
            params = list(model.parameters()) + list(balancer.parameters())

            def losses_of(tasks=None, model=model):
                _, p = model(x, tasks)
                return {t: F.mse_loss(v, {"a": ya, "b": yb}[t]) for t, v in p.items()}

            def recompute(tasks=None, model=model):
                with freeze_norm_stats(model):
                    return losses_of(tasks)

            def backward(loss, params=params):
                # autograd.grad + explicit averaging: several models share one DDP wrapper here, so
                # its reducer (one backward per iteration) cannot be used; this tests the balancers'
                # own synchronisation of their state
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for p, g in zip(params, grads):
                    if g is not None:
                        p.grad = g
                sync_grads(params)

            z, preds = model(x)
            losses = {t: F.mse_loss(v, {"a": ya, "b": yb}[t]) for t, v in preds.items()}
            if key == "pcgrad" and batch_idx == 0:
                self.first_losses.append(float(losses["a"].detach()))
            ctx = StepContext(losses, [p for p in model.shared.parameters()],
                              {t: list(h.parameters()) for t, h in model.heads.items()}, z,
                              backward=backward, recompute=recompute, step=self.global_step, epoch=self.current_epoch)
            assert check_finite(losses, balancer.skip_nonfinite, ctx.step)
            balancer.backward(ctx)
            ctx._balancer = balancer
            self._pending = getattr(self, "_pending", []) + [ctx]
        opt.step()
        for ctx in self._pending:
            ctx._balancer.after_step(ctx)
        self._pending = []

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main(out: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    data = TensorDataset(x, x.sum(1) + 0.1 * torch.randn(64, generator=g), x[:, 0] * x[:, 1])
    module = SideBySide()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=8, shuffle=True))
    state = {k: torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for k, m in module.models.items()}
    for k in METHODS:  # balancer state that must agree across ranks
        for name, t in module.balancers[k].state_dict().items():
            if isinstance(t, torch.Tensor):
                state[f"{k}/{name}"] = t.detach().clone()
    state.update({f"init/{k}": v for k, v in module.init.items()})
    state["first_losses"] = torch.tensor(module.first_losses)
    state["steps"] = torch.tensor(trainer.global_step)
    torch.save(state, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))


class ParamDigest(L.Callback):
    """For the real-CLI DDP test: every rank saves its parameters and balancer state at the end of fit
    (``+callbacks.digest._target_=ddp_worker.ParamDigest +callbacks.digest.out=DIR``)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = Path(out)

    def on_train_end(self, trainer, pl_module) -> None:
        state = {"params": torch.cat([p.detach().reshape(-1) for p in pl_module.model.parameters()]),
                 "steps": torch.tensor(trainer.global_step)}
        for name, t in pl_module.balancer.state_dict().items():
            if isinstance(t, torch.Tensor):
                state[f"balancer/{name}"] = t.detach().clone()
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.out / f"rank{trainer.global_rank}.pt")
