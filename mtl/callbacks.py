"""Lightning callbacks of mtlkit (add them through the `callbacks` config group)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch import nn

log = logging.getLogger(__name__)


class FreezeBatchNormStats(L.Callback):
    """Train with every BatchNorm layer in eval mode: it normalises with its running statistics and never
    updates them, while its affine weights still train.

    The zoo fine-tunes this way so every fine-tuned model keeps the pretrained model's BN statistics:
    weight merging cannot produce statistics that match merged weights, but with shared ones the merged
    model's statistics are exactly those every fine-tuned model was trained and tested with.
    """

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
                m.eval()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning puts the module back in train mode after every validation run
        self._freeze(pl_module)


class ProbeThenFinetune(L.Callback):
    """Two phases in one run: for `probe_epochs` epochs only the task heads train (the shared part is
    frozen: a probe on the pretrained features), then the shared part trains with the heads frozen.

    This is how the merging papers fine-tune CLIP (under fixed zero-shot heads): every task's head then
    fits the pretrained model's features, so θ0 + heads is a meaningful starting point and the task
    vectors τ_t = θ_t − θ0 carry all of the adaptation. `freeze_heads=False` trains heads in phase 2 too.
    `probe_lr_scale` multiplies the scheduled learning rate during the probe (a head from scratch wants
    a larger one than a gentle fine-tune).
    """

    def __init__(self, probe_epochs: int = 1, freeze_heads: bool = True, probe_lr_scale: float = 1.0):
        if probe_epochs < 0:
            raise ValueError(f"probe_epochs must be ≥ 0, got {probe_epochs}")
        if probe_lr_scale <= 0:
            raise ValueError(f"probe_lr_scale must be > 0, got {probe_lr_scale}")
        self.probe_epochs = probe_epochs
        self.freeze_heads = freeze_heads
        self.probe_lr_scale = probe_lr_scale

    def _probing(self, trainer) -> bool:
        return trainer.current_epoch < self.probe_epochs

    def on_fit_start(self, trainer, pl_module) -> None:
        epochs = trainer.max_epochs
        if epochs is not None and 0 <= epochs <= self.probe_epochs:  # the shared part would never train
            raise ValueError(f"trainer.max_epochs={epochs} ends within the probe (callbacks.probe_then_finetune."
                             f"probe_epochs={self.probe_epochs}): only the heads would train and the task vector "
                             "would be zero; train longer, or shorten the probe (debug=smoke: add trainer.max_epochs=2 "
                             "callbacks.probe_then_finetune.probe_epochs=1)")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # the optimiser holds every parameter; a frozen one gets no gradient, so AdamW skips it
        probe = self._probing(trainer)
        heads = {id(p) for p in pl_module.model.decoder.heads.parameters()}
        for p in pl_module.model.parameters():
            p.requires_grad_((id(p) in heads) if probe else (id(p) not in heads or not self.freeze_heads))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.probe_lr_scale == 1.0 or not trainer.lr_scheduler_configs:
            return
        # the scheduler's own value each step (never compounding ours), scaled while probing
        sched = trainer.lr_scheduler_configs[0].scheduler
        scale = self.probe_lr_scale if self._probing(trainer) else 1.0
        for group, lr in zip(trainer.optimizers[0].param_groups, sched.get_last_lr()):
            group["lr"] = lr * scale

    def on_train_end(self, trainer, pl_module) -> None:
        for p in pl_module.model.parameters():
            p.requires_grad_(True)


class MarksRankFailure(L.Callback):
    """DDP: a rank other than 0 writes its ``FAILED.rank<N>`` marker as soon as its fit fails, before Lightning's
    teardown ends its connections: rank 0, which then fails with only a lost connection, finds it and names it
    (`mtl.cli.rank_failures.peer_failures`). The marker is written again, the same, once the error leaves the job."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        from mtl.cli.failures import interruption, write_failure_marker
        from mtl.cli.rank_failures import process_rank

        if trainer.world_size > 1 and process_rank() != "0" and interruption(exception) is None:
            write_failure_marker(self.run_dir, exception)


class ModelCheckpoint(L.pytorch.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, resumable into a new run folder.

    ``mtl-train ckpt_path=<old run>/checkpoints/last.ckpt`` writes into a new run folder; Lightning
    would then forget the best score so far (its checkpoint folder changed) and call the first
    resumed epoch the best, so a resumed run could test another checkpoint than an uninterrupted
    one. Here the record is kept (the old best stays where it is, in the old run folder), and
    files outside this run's checkpoint folder are never deleted. A recorded best whose file is gone (the old
    folder moved, last.ckpt copied elsewhere) could not be tested at the end: the best is then tracked anew,
    from the resumed epochs on, with a warning.

    ``first_epoch``: epochs before it are never the best (a probe phase, whose shared weights are
    still θ0's: the zoo's fine-tunes must not end as θ0 with a zero task vector).
    """

    def __init__(self, *args, first_epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.first_epoch = int(first_epoch)
        # checkpoint file -> {"epoch", "val": that epoch's validation metrics, "val_losses": its losses}; in the
        # callback's state, so a resumed run still knows them for a best checkpoint written before the interruption
        self.saved: dict[str, dict] = {}

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        module, epoch = trainer.lightning_module, trainer.current_epoch
        self.saved[filepath] = {"epoch": epoch, "val": getattr(module, "val_history", {}).get(epoch),
                                "val_losses": getattr(module, "val_loss_history", {}).get(epoch)}
        super()._save_checkpoint(trainer, filepath)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "saved": self.saved}

    @property
    def state_key(self) -> str:
        """Lightning's key (monitor, mode and save schedule), plus the file name without a monitor: last.ckpt's callback
        and ``model_checkpoint`` with ``monitor=null`` would share it, and Lightning refuses two equal keys."""
        if self.monitor is not None:
            return super().state_key
        return self._generate_state_key(monitor=None, mode=self.mode, every_n_train_steps=self._every_n_train_steps,
                                        every_n_epochs=self._every_n_epochs,
                                        train_time_interval=self._train_time_interval, filename=self.filename)

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        if trainer.current_epoch >= self.first_epoch:
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved = dict(state_dict.get("saved") or {})
        best = state_dict.get("best_model_path")
        if best and not Path(best).is_file():
            self.lost_best = best  # what the end of the run names when no epoch after the resume validated
            here = self.dirpath is not None and Path(best).resolve().parent == Path(self.dirpath).resolve()
            why = ("removed from this checkpoint folder after the resumed checkpoint was written, e.g. by the "
                   "interrupted attempt as it kept a later epoch's best" if here else "its run folder moved or deleted")
            if self.monitor is not None:  # (without one, the "best" is the latest save: nothing to report)
                log.warning("the resumed checkpoint's best checkpoint %s is gone (%s): the best by %s is tracked anew "
                            "from the resumed epochs on, and the one tested is the best of those", best, why,
                            self.monitor)
            # this callback's initial values, as Lightning set them from `mode`
            state_dict = {**state_dict, "best_model_path": "", "best_model_score": None, "best_k_models": {},
                          "kth_best_model_path": "", "kth_value": self.kth_value}
        super().load_state_dict({**state_dict, "dirpath": self.dirpath})

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        if self.dirpath and Path(filepath).resolve().parent == Path(self.dirpath).resolve():
            super()._remove_checkpoint(trainer, filepath)
