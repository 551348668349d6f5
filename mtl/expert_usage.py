"""Expert usage of MoE models: which experts each task uses, logged during training and drawn as a
task x expert heatmap in the run folder.

Any model (or its ``decoder``) with a ``record_usage`` flag and ``expert_usage(reset=False) ->
{task: (layers, experts) tensor}`` takes part: the task-routed MoE ViT counts routed tokens, the
TaskExpert decoder sums gate weights (its last column, ``mem``, is the task's memory). Optional
``usage_columns`` / ``usage_rows`` / ``usage_unit`` name the columns, the layers and what is counted.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch

from mtl.io import atomic_path, user_path, write_json

log = logging.getLogger(__name__)


def usage_source(model: Any) -> Any | None:
    for obj in (model, getattr(model, "decoder", None)):
        if obj is not None and hasattr(obj, "expert_usage") and hasattr(obj, "record_usage"):
            return obj
    return None


@contextmanager
def usage_paused(model: Any) -> Iterator[None]:
    """No usage recorded inside: a balancer's extra forward passes (FLAT's per-task perturbed weights,
    FAMO's recomputed losses) are not training steps' routing."""
    src = usage_source(model)
    if src is None:
        yield
        return
    was, src.record_usage = src.record_usage, False
    try:
        yield
    finally:
        src.record_usage = was


def usage_columns(src: Any, usage: dict[str, torch.Tensor]) -> list[str]:
    """The source's column names (``mem`` for a task memory), else the expert ids 0..E-1."""
    width = next(iter(usage.values())).shape[-1]
    return list(getattr(src, "usage_columns", None) or [str(e) for e in range(width)])


def usage_shares(usage: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per task and layer, each expert's share of the layer's total (rows sum to 1)."""
    return {t: u.float() / u.float().sum(-1, keepdim=True).clamp_min(1e-12) for t, u in usage.items()}


def save_usage_heatmap(usage: dict[str, torch.Tensor], path: str | Path, title: str = "expert usage",
                       columns: list[str] | None = None, rows: list[str] | None = None) -> Path:
    """One task x expert heatmap per MoE layer (share of the task's routed tokens / gate mass);
    ``columns`` labels the experts (default 0..E-1), ``rows`` the layers (default "layer i")."""
    from matplotlib.figure import Figure

    shares = usage_shares(usage)
    tasks = list(shares)
    layers, experts = shares[tasks[0]].shape
    fig = Figure(figsize=(min(3.0 + 0.35 * experts, 9.0) * min(layers, 3) / 1.5, 0.6 + 0.4 * len(tasks) * ((layers + 2) // 3)))
    axes = fig.subplots((layers + 2) // 3, min(layers, 3), squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= layers:
            ax.set_axis_off()
            continue
        data = torch.stack([shares[t][i] for t in tasks]).numpy()
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_yticks(range(len(tasks)), tasks if i % 3 == 0 else [""] * len(tasks), fontsize=7)
        ax.set_xticks(range(experts), columns or [str(e) for e in range(experts)], fontsize=6)
        ax.set_title(f"{title}: {rows[i] if rows else f'layer {i}'}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    path = user_path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    return path


class ExpertUsageCallback(L.Callback):
    """Records expert usage of the training steps (not validation: its routing is noise-free); every
    ``log_every`` steps logs each task's usage share per column (mean over layers) as
    ``experts/<task>/<column>`` (an expert id, or ``mem``); at the end writes ``expert_usage.png`` and
    ``expert_usage.json`` (raw totals, with their unit, layer and column names) into the run folder. Under DDP the written totals are summed over the ranks (the logged
    shares during training are rank 0's). The totals are kept in checkpoints, so a resumed run's cover
    the whole run (a checkpoint holds rank 0's, so after resuming a DDP run the earlier part counts
    rank 0's tokens only). A model without experts is left alone."""

    def __init__(self, log_every: int = 50, filename: str = "expert_usage.png"):
        self.log_every, self.filename = int(log_every), filename
        self._src: Any = None
        self._earlier: dict[str, torch.Tensor] = {}  # totals restored from a checkpoint
        self._was_recording = False

    def on_train_start(self, trainer, pl_module) -> None:
        self._src = usage_source(pl_module.model)
        if self._src is not None:
            self._src.record_usage = True
            self._src.expert_usage(reset=True)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._src is not None:
            self._was_recording, self._src.record_usage = self._src.record_usage, False

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._src is not None:
            self._src.record_usage = self._was_recording

    def usage(self) -> dict[str, torch.Tensor]:
        """Totals of the whole run: restored ones plus this process's."""
        now = self._src.expert_usage() if self._src is not None else {}
        return {t: self._earlier.get(t, 0) + now.get(t, 0) for t in dict.fromkeys([*self._earlier, *now])}

    def state_dict(self) -> dict[str, Any]:
        return {"usage": {t: u.clone() for t, u in self.usage().items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._earlier = dict(state_dict.get("usage", {}))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._src is None or not self.log_every or trainer.global_step % self.log_every:
            return
        usage = self.usage()
        if not usage:
            return
        columns = usage_columns(self._src, usage)
        values = {f"experts/{t}/{c}": float(v) for t, s in usage_shares(usage).items() for c, v in zip(columns, s.mean(0))}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        src = self._src
        if src is None:
            return
        src.record_usage = False
        now = src.expert_usage()
        # every rank takes part in the sum (a collective), then rank 0 writes
        now = {t: trainer.strategy.reduce(u.to(pl_module.device), reduce_op="sum").cpu() for t, u in now.items()}
        usage = {t: self._earlier.get(t, 0) + now.get(t, 0) for t in dict.fromkeys([*self._earlier, *now])}
        if not usage or not trainer.is_global_zero:
            return
        out = Path(trainer.default_root_dir)
        columns, rows = usage_columns(src, usage), getattr(src, "usage_rows", None)
        write_json(out / "expert_usage.json", {"unit": getattr(src, "usage_unit", None), "layers": rows,
                                               "columns": columns, "usage": {t: u.tolist() for t, u in usage.items()}})
        save_usage_heatmap(usage, out / self.filename, columns=columns, rows=rows)
        for t, s in usage_shares(usage).items():
            log.info("expert usage %s (share per column, mean over layers): %s", t,
                     " ".join(f"{c}={v:.2f}" for c, v in zip(columns, s.mean(0).tolist())))
