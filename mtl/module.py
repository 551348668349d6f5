"""MultiTaskModule: one LightningModule for any MultiTaskModel and any Balancer."""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Mapping

import lightning as L
import torch
from torch import nn

from mtl.balancers import (Balancer, BalancerMonitor, StepContext, check_finite, check_level, create_balancer,
                           freeze_norm_stats)
from mtl.distributed import gather_objects, pooled_means, rank_local_states, restore_rank_states
from mtl.expert_usage import usage_paused
from mtl.io import as_plain, not_a_model
from mtl.models import MultiTaskModel, create_model
from mtl.models.families import last_shared_weight
from mtl.registry import check_int, check_kwargs, is_real
from mtl.sweep import loss_names
from mtl.train_checks import changed_on_resume, resume_refusal

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """Every random generator training draws from (torch CPU/CUDA, numpy, random) as plain data:
    Lightning's checkpoints do not store them, and the train loader's shuffle draws its seed from torch."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, gauss_next = states["python"]
    random.setstate((version, tuple(state), gauss_next))


def torch_rng(device: torch.device) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
    """The torch generators a forward on ``device`` draws from (CPU, and that CUDA device), for ``replayed_rng``."""
    device = torch.device(device)
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    return cuda, torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]


@contextmanager
def replayed_rng(saved: tuple[list[int], torch.Tensor, list[torch.Tensor]]) -> Iterator[None]:
    """Inside: torch's generators as ``saved`` (so dropout and MoE gating noise draw exactly as then);
    afterwards: as on entry (the training stream does not see the replay)."""
    cuda, cpu, states = saved
    with torch.random.fork_rng(devices=cuda):
        torch.set_rng_state(cpu)
        for d, state in zip(cuda, states):
            torch.cuda.set_rng_state(state, d)
        yield


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def balancer_config(balancer: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"name": ..., **settings}`` from a balancer name, such a dict, or None (``ew``)."""
    if balancer is None:
        return {"name": "ew"}
    if isinstance(balancer, str):
        return {"name": balancer}
    if not isinstance(balancer, Mapping) or "name" not in balancer:
        raise TypeError(f"balancer must be a name or a dict with its 'name' and settings (e.g. {{'name': 'uw'}}), "
                        f"got {balancer!r}")
    return dict(balancer)


def check_optim_values(lr: Any, weight_decay: Any, warmup_ratio: Any, min_lr_ratio: Any, grad_clip: Any) -> None:
    """The optimiser settings, each refused by its ``optim.<key>`` name: torch checks lr and weight decay only when
    the optimiser is built, and lets an infinite one through to fail at the first step as a non-finite loss; out of
    range the others train silently wrong (a negative lr floor or clip norm turns descent into ascent)."""
    for key, value, ok, rng in (("optim.lr", lr, lambda v: v > 0, "> 0"),
                                ("optim.weight_decay", weight_decay, lambda v: v >= 0, ">= 0"),
                                ("optim.warmup_ratio", warmup_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
                                ("optim.min_lr_ratio", min_lr_ratio, lambda v: 0 <= v <= 1, "in [0, 1]"),
                                ("optim.grad_clip", grad_clip, lambda v: v > 0, "> 0 (or null: no clipping)")):
        if key == "optim.grad_clip" and value is None:
            continue
        if not is_real(value):  # numpy's numbers too (np.float32 from a grid); recorded as plain ones (as_plain)
            raise TypeError(f"{key} must be a finite number {rng}, got {value!r} ({type(value).__name__})")
        if not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{key} must be a finite number {rng}, got {value!r}")


def check_optim(optim: Mapping[str, Any]) -> None:
    """An ``mtl-train`` config's ``optim`` group, checked before any run folder or data exists: an unknown key would
    otherwise reach ``MultiTaskModule`` as an unexpected keyword argument."""
    import inspect

    params = inspect.signature(MultiTaskModule.__init__).parameters
    check_optim_values(**{k: optim.get(k, params[k].default) for k in OPTIM_KEYS})
    check_kwargs(MultiTaskModule.__init__, dict(optim), "optim", given=tuple(set(params) - set(OPTIM_KEYS)))


#: the MultiTaskModule arguments the ``optim`` config group sets
OPTIM_KEYS = ("lr", "weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip")


class MultiTaskModule(L.LightningModule):
    """Trains a MultiTaskModel with a Balancer in manual-optimisation mode.

    Manual optimisation keeps one code path for loss-level and gradient-aggregation methods:
    the balancer fills ``.grad``; this module clips, steps and schedules. ``model``: a model or its config
    (a folder is loaded first, with mtl.load_model); ``balancer``: a name (``"uw"``) or ``{"name": ..., **settings}``,
    default ``ew``; ``start``: a fine-tune's start record (`mtl.warm_start.start_record` of its ``init_from``), kept
    in its checkpoints so that a resume keeps it (and refuses another); ``initial_weights``: the backbone's
    ``checkpoint_path`` / ``pretrained`` it started from (`mtl.warm_start.initial_weights`), kept the same way.
    """

    def __init__(
        self,
        model: MultiTaskModel | dict[str, Any],
        balancer: str | dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_ratio: float = 0.05,
        min_lr_ratio: float = 0.0,
        grad_clip: float | None = None,
        log_weights_every: int = 50,
        strategy: dict[str, Any] | None = None,
        start: dict[str, Any] | None = None,
        initial_weights: dict[str, Any] | None = None,
    ):
        super().__init__()
        check_optim_values(lr, weight_decay, warmup_ratio, min_lr_ratio, grad_clip)
        log_weights_every = check_int("log_weights_every", log_weights_every, 0, " (0: off)")  # as an int: hparams go into checkpoints
        self.automatic_optimization = False
        if not isinstance(model, (nn.Module, Mapping)):
            raise not_a_model("MultiTaskModule", model, "a model (nn.Module) or a model config dict")
        self.model = model if isinstance(model, nn.Module) else create_model(config=dict(model))
        self.tasks = self.model.tasks
        # numbers as Python's at every depth (np.int64 passes check_int, np.float64 is a float), the model's config and
        # the balancer's and strategy's dicts too: hparams go into every checkpoint, and torch.load(weights_only=True),
        # as mtl-train resumes, refuses numpy scalars
        settings = as_plain(dict(
            model=self.model.config, balancer=balancer_config(balancer), lr=lr, weight_decay=weight_decay,
            warmup_ratio=warmup_ratio, min_lr_ratio=min_lr_ratio, grad_clip=grad_clip,
            log_weights_every=log_weights_every, strategy=strategy))
        balancer, strategy = settings["balancer"], settings["strategy"]
        self.save_hyperparameters({**settings, "start": start, "initial_weights": initial_weights})
        bal = dict(balancer)
        self.balancer: Balancer = create_balancer(bal.pop("name"), list(self.tasks), **bal)
        check_level(self.balancer, self.model)
        # balancer monitoring: weights + gradient cosines every N steps, PNG at the end
        self.monitor = BalancerMonitor(every=log_weights_every) if log_weights_every else None
        self.val_metrics = nn.ModuleDict({n: nn.ModuleDict(t.metrics()) for n, t in self.tasks.items()})
        self.test_metrics = nn.ModuleDict({n: nn.ModuleDict(t.metrics()) for n, t in self.tasks.items()})
        self.results: dict[str, dict[str, dict[str, float]]] = {}
        self.scored: dict[str, int] = {}  # stage -> images its last evaluation scored (all processes)
        self._seen: dict[str, int] = {}
        self._loss_sums: dict[str, dict[str, torch.Tensor]] = {}  # stage -> {logged name: Σ_b n_b·L_b} (this process)
        self.val_history: dict[int, dict[str, dict[str, float]]] = {}  # epoch -> its validation metrics
        self.val_loss_history: dict[int, dict[str, float]] = {}  # epoch -> its validation losses, as logged
        # a model family's extra per-step work (mtl.strategies), e.g. the sandwich rule of slimmable models
        self.strategy = None
        if strategy:
            from mtl.strategies import create_strategy

            strat = dict(strategy)
            self.strategy = create_strategy(strat.pop("name"), self.model, **strat)

    # --- losses -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, tasks=None) -> dict[str, torch.Tensor]:
        return self.model(x, tasks)

    def task_losses(self, preds: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], weighted: bool = True):
        out = {}
        for name, task in self.tasks.items():
            loss = task.loss(preds[name], batch[task.target_key])
            out[name] = loss * task.weight if weighted else loss
        return out

    def _forward_losses(self, batch):
        x = batch["image"]
        z = self.model.shared(x)
        preds = self.model.heads(z, tuple(x.shape[-2:]))
        return z, self.with_aux_losses(self.task_losses(preds, batch))

    def with_aux_losses(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the model's own per-task training losses of the last forward, if it has any (``aux_loss()``,
        e.g. an MoE's load balance), so every balancer sees them as part of each task's loss."""
        aux = self.model.aux_loss() if hasattr(self.model, "aux_loss") else {}
        return {t: l + aux[t] if t in aux else l for t, l in losses.items()}

    # --- training ---------------------------------------------------------------------------
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        sched = self.lr_schedulers()
        if self.strategy is not None:
            self.strategy.before_forward(self, batch)
        rng = torch_rng(self.device)  # what the forward draws: recompute replays it
        z, losses = self._forward_losses(batch)
        # --- balancer wiring: loss checks, recompute closure, monitor ---------------------------
        self.balancer.check_losses(losses)  # before the monitor's backward passes, which would fail unnamed
        if not check_finite(losses, self.balancer.skip_nonfinite, self.global_step):
            return None  # skipped (skip_nonfinite=true; logged): no backward, no optimiser step

        def recompute(tasks=None) -> dict[str, torch.Tensor]:
            # same batch, current weights, BN running stats untouched, caller's grad mode, the forward's
            # random draws (dropout, MoE gating noise); `tasks` restricts the heads run (flat perturbs one task at a time)
            names = list(self.tasks) if tasks is None else list(tasks)
            x = batch["image"]
            with replayed_rng(rng), freeze_norm_stats(self.model), usage_paused(self.model):
                preds = self.model.heads(self.model.shared(x), tuple(x.shape[-2:]), names)
            return self.with_aux_losses({n: self.tasks[n].loss(preds[n], batch[self.tasks[n].target_key]) * self.tasks[n].weight
                                         for n in names})

        ctx = StepContext(
            losses=losses,
            shared_params=self.model.shared_parameters(),
            anchor=self._last_shared_weight(),
            task_params={t: self.model.task_parameters(t) for t in self.tasks},
            # a model without one representation all heads read (task-conditioned backbone) gives None
            features=z if getattr(self.model, "shared_representation", True) else None,
            backward=self.manual_backward,
            recompute=recompute,
            step=self.global_step,
            epoch=self.current_epoch,
        )
        monitor_logs = self.monitor.before_backward(ctx) if self.monitor else {}
        opt.zero_grad(set_to_none=True)
        if self.balancer.backward(ctx) is False:
            return None  # a non-finite task gradient with skip_nonfinite=true (logged): no optimiser step
        strategy_logs = self.strategy.after_backward(self, batch, ctx) if self.strategy is not None else {}
        opt.step()  # clips (optim.grad_clip) in on_before_optimizer_step, once fp16's scaler has unscaled
        sched.step()
        self.balancer.after_step(ctx)
        if self.monitor:
            monitor_logs |= self.monitor.after_step(ctx, self.balancer)
        # --- end balancer wiring -----------------------------------------------------------------

        total = sum(l.detach() for l in losses.values())
        bs = batch["image"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, loss in losses.items():
            self.log(f"train/{name}/loss", loss.detach(), batch_size=bs)
        # their epoch means, what a checkpoint monitor of the training split reads (a step value is the last batch's)
        for name, loss in zip(loss_names(self.tasks, "train", epoch=True), (total, *(losses[t] for t in self.tasks))):
            self.log(name, loss.detach(), on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        for key, value in strategy_logs.items():
            self.log(key, value, batch_size=bs)
        if monitor_logs:
            # straight to the loggers at the step they describe: self.log would re-emit these values
            # at every later logging step until the next due step (stale rows in csv/tensorboard)
            for logger in self.loggers:
                logger.log_metrics(monitor_logs, step=ctx.step)
        return total

    # --- balancer monitor: plot in the run folder, history in checkpoints ------------------------
    def on_train_end(self) -> None:
        if self.monitor and self.trainer.is_global_zero:
            from pathlib import Path

            self.monitor.save_plot(Path(self.trainer.default_root_dir) / "balancer_weights.png")

    def _last_shared_weight(self) -> nn.Parameter | None:
        """GradNorm's W, found once (a walk over every parameter, not one per step). Held in a tuple: a
        Parameter set as a module attribute would be registered, and land in checkpoints twice."""
        if getattr(self, "_anchor", None) is None:
            self._anchor = (last_shared_weight(self.model),)
        return self._anchor[0]

    def on_fit_start(self) -> None:
        from mtl.distributed import check_strategy

        from mtl.strategies import STRATEGIES

        needed = getattr(self.model, "trains_with", None)
        if needed and not isinstance(self.strategy, STRATEGIES.get(needed)):
            family = self.model.config.get("family")
            raise ValueError(f"family {family!r} trains its widths with strategy.name={needed}; without it only the full "
                             f"width learns and the narrower widths keep their initial statistics (add "
                             f"strategy={{name: {needed}}}, e.g. experiment=scenes_slimmable)")

        check_precision(self.balancer, self.trainer.precision_plugin)
        check_strategy(self.balancer, self.trainer.strategy, self.monitor)

    def on_train_start(self) -> None:
        resumed = getattr(self, "_checkpoint_schedule_steps", None)
        if resumed is None or resumed == self._schedule_steps:
            return
        # a resume that trains longer (or shorter): the restored optimiser holds the old curve's last lr, which
        # the first step would use; from here on the lr follows the new curve at the current step
        sched = self.lr_schedulers()
        for group, base, fn in zip(sched.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * fn(sched.last_epoch)
        # and the scheduler's record of it, as its own step() keeps it: get_last_lr() (which ProbeThenFinetune
        # scales each batch) would otherwise give the old curve's last lr for the first resumed step
        sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
        log.warning("resumed with a learning-rate schedule of %d steps (the checkpoint's: %d): the lr continues on "
                    "the new curve from step %d (now %.3g)", self._schedule_steps, resumed, sched.last_epoch,
                    sched.optimizer.param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.monitor:
            checkpoint["balancer_monitor"] = self.monitor.state_dict()
        checkpoint["rng_states"] = rng_states()
        local = rank_local_states(self.balancer)
        if local:  # every rank's (nash_mtl's weights differ per rank); the state_dict holds rank 0's only
            checkpoint["balancer_ranks"] = gather_objects(local)
        if getattr(self, "_schedule_steps", None) is not None:
            checkpoint["schedule_steps"] = self._schedule_steps
        if self._trainer is not None:
            checkpoint["precision"] = str(self._trainer.precision)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("hyper_parameters") or {}
        changed = changed_on_resume(stored, self.hparams, self.tasks)
        if changed is not None:
            raise ValueError(resume_refusal(changed))
        if self.hparams.get("start") is None and stored.get("start") is not None:
            self.hparams["start"] = stored["start"]  # the weights go on from the checkpoint's start: its record too
        trainer = self._trainer
        saved, now = checkpoint.get("precision"), str(trainer.precision) if trainer is not None else None
        if saved is not None and now is not None and saved != now and trainer.state.fn == "fit":  # testing in another is fine
            raise ValueError(f"trainer.precision={now} differs from the checkpoint's {saved}: the run would continue "
                             f"in another precision than it trained in; resume with trainer.precision={saved}, or start "
                             "a new run from its weights with init_from=<model folder>")
        # a checkpoint from before a balancer kept state across steps (nash_mtl's solve schedule) lacks
        # its key: that state starts afresh (set_extra_state(None)) rather than the strict load refusing it
        weights = checkpoint.get("state_dict")
        for key in self.balancer.state_dict() if weights is not None else ():
            if key.endswith("_extra_state"):
                weights.setdefault(f"balancer.{key}", None)
        if weights is not None and trainer is not None and trainer.state.fn == "fit":
            restore_rank_states(weights, checkpoint.get("balancer_ranks"), trainer.global_rank, trainer.world_size,
                                self.balancer)
        if self.monitor and "balancer_monitor" in checkpoint:
            self.monitor.load_state_dict(checkpoint["balancer_monitor"])
        self._checkpoint_schedule_steps = checkpoint.get("schedule_steps")  # compared in on_train_start
        if "rng_states" in checkpoint:
            # the next epoch's shuffle (and rlw/pcgrad draws, dropout) continue exactly as without the stop
            set_rng_states(checkpoint["rng_states"])

    def on_before_optimizer_step(self, optimizer) -> None:
        """``optim.grad_clip``: Lightning calls this inside ``opt.step()``, after fp16's scaler has unscaled the
        gradients (in training_step they are still scaled, and clipping them there left a norm of grad_clip/scale).
        Clipped directly, as Lightning's own clipping would: it refuses fused optimisers under bf16 for no reason."""
        if self.hparams.grad_clip:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip)

    # --- evaluation -------------------------------------------------------------------------
    def _share_norm_statistics(self) -> None:
        """DDP syncs buffers only at a training forward, so after the last step each rank holds its own
        BatchNorm statistics; evaluation (and the saved model) use rank 0's."""
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for buf in self.model.buffers():
                torch.distributed.broadcast(buf, src=0)

    def on_validation_epoch_start(self):
        self._share_norm_statistics()

    def on_test_epoch_start(self):
        self._share_norm_statistics()

    def _eval_step(self, batch, metrics: nn.ModuleDict, stage: str) -> None:
        preds = self.model(batch["image"])
        losses = self.task_losses(preds, batch, weighted=False)
        bs = batch["image"].shape[0]
        self._seen[stage] = self._seen.get(stage, 0) + bs
        for name, task in self.tasks.items():
            target = batch[task.target_key]
            for metric in metrics[name].values():
                metric.update(preds[name], target)
        # the losses' batch-size-weighted sums, divided once at the end over all processes (_eval_epoch_end)
        sums = self._loss_sums.setdefault(stage, {})
        for key, loss in zip(loss_names(self.tasks, stage), (sum(losses.values()), *losses.values())):
            loss = loss.detach()
            sums[key] = sums.get(key, 0.0) + loss.to(torch.promote_types(loss.dtype, torch.float32)) * bs

    def _eval_epoch_end(self, metrics: nn.ModuleDict, stage: str) -> None:
        result: dict[str, dict[str, float]] = {}
        for name, group in metrics.items():
            result[name] = {}
            for mname, metric in group.items():
                value = metric.compute()
                metric.reset()
                result[name][mname] = float(value)
                # already the same on every process (torchmetrics syncs its states): "max" keeps it exactly, and
                # sync_dist=True spares Lightning's advice to sync an epoch-level value under DDP
                self.log(f"{stage}/{name}/{mname}", value, sync_dist=True, reduce_fx="max", prog_bar=False)
        self.results[stage] = result
        trainer = getattr(self, "_trainer", None)
        # each process scored its own share, the ranks' shares differ by up to one image (unrepeated sampler)
        reduce = partial(trainer.strategy.reduce, reduce_op="sum") if trainer is not None and trainer.world_size > 1 \
            else None
        sums = self._loss_sums.pop(stage, {})
        zero = torch.zeros((), device=self.device)
        losses, self.scored[stage] = pooled_means({n: sums.get(n, zero) for n in loss_names(self.tasks, stage)},
                                                  self._seen.pop(stage, 0), reduce)
        for key, value in losses.items():  # already over all processes: "max" of equal values, as above
            self.log(key, value, sync_dist=True, reduce_fx="max", prog_bar=key == "val/loss")
        if stage == "val" and trainer is not None and not trainer.sanity_checking:
            self.val_history[self.current_epoch] = result
            self.val_loss_history[self.current_epoch] = {n: float(v) for n, v in losses.items()}

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end(self.val_metrics, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end(self.test_metrics, "test")

    # --- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or n.startswith("balancer.") else decay).append(p)
        # fused: one vectorised kernel per parameter instead of ~10 small ops each; on CPU torch's
        # default is a per-parameter loop of small ops, a sizeable share of a small model's step
        fused = all(p.device.type in ("cpu", "cuda") for p in decay + no_decay) or None
        if self.hparams.grad_clip and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            fused = None  # a fused AdamW unscales inside its step: the scaler would not unscale before clipping
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, fused=fused,
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        self._schedule_steps = total
        warmup = int(self.hparams.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total, warmup, self.hparams.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def check_precision(balancer: Balancer, precision_plugin: Any) -> None:
    """fp16 mixed precision scales the loss before backward and unscales before the step; a balancer
    that computes its gradients through ``torch.autograd.grad`` is never scaled, so its update would
    shrink by the scale factor. bf16 needs no scaling and works with every balancer."""
    if getattr(precision_plugin, "scaler", None) is not None and balancer.computes_own_gradients:
        raise ValueError(
            f"balancer {balancer.name!r} computes gradients with torch.autograd.grad, which fp16 loss scaling "
            "(trainer.precision=16-mixed) does not cover; use trainer.precision=bf16-mixed or 32-true")
