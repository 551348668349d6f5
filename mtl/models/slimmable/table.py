"""The validation table of a slimmable multi-task model: FLOPs and per-task metrics per width.

A task's prediction depends only on the encoder width (encoder + shared neck) and its own decoder's
width, and FLOPs add up over the parts. So a grid of ``len(width_set)**2`` evaluations (encoder width
x one decoder width for all tasks) gives the exact FLOPs and metrics of *every* mixed configuration:
``flops(cfg) = encoder[w_e] + sum_t head[t][w_e][w_t]``, task ``t``'s metrics are ``metrics[t][w_e][w_t]``.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from mtl.flops import count_flops
from mtl.modes import eval_mode
from mtl.models.slimmable.layers import wkey
from mtl.registry import is_real

log = logging.getLogger(__name__)


@dataclass
class WidthTable:
    width_set: list[float]
    tasks: list[str]
    primary: dict[str, str]            # task -> primary metric name
    higher_is_better: dict[str, bool]  # task -> direction of its primary metric
    encoder_flops: dict[str, int]      # w_e -> FLOPs per sample of encoder + neck
    head_flops: dict[str, dict[str, dict[str, int]]]                 # task -> w_e -> w_t -> FLOPs
    metrics: dict[str, dict[str, dict[str, dict[str, float]]]]       # task -> w_e -> w_t -> {metric: value}
    input_size: list[int]

    # --- configurations -----------------------------------------------------------------------------
    def check_config(self, cfg: Mapping[str, Any]) -> None:
        if set(cfg) != {"encoder", "decoders"}:
            raise KeyError(f"a width configuration has keys 'encoder' and 'decoders', got {sorted(cfg)}")
        unknown = [t for t in cfg["decoders"] if t not in self.tasks]
        missing = [t for t in self.tasks if t not in cfg["decoders"]]
        if unknown or missing:
            raise KeyError(f"decoder widths: unknown task(s) {unknown}, missing {missing}; tasks: {', '.join(self.tasks)}")
        for w in [cfg["encoder"], *cfg["decoders"].values()]:
            if wkey(w) not in self.encoder_flops:
                raise ValueError(f"width {w!r} is not in the table's width set {self.width_set}")

    def flops(self, cfg: Mapping[str, Any]) -> int:
        self.check_config(cfg)
        we = wkey(cfg["encoder"])
        return self.encoder_flops[we] + sum(self.head_flops[t][we][wkey(w)] for t, w in cfg["decoders"].items())

    def expected(self, cfg: Mapping[str, Any]) -> dict[str, dict[str, float]]:
        self.check_config(cfg)
        we = wkey(cfg["encoder"])
        return {t: dict(self.metrics[t][we][wkey(w)]) for t, w in cfg["decoders"].items()}

    def score(self, task: str, encoder: float, decoder: float) -> float:
        """Task's primary metric at (encoder, decoder) widths, signed so that higher is better."""
        v = self.metrics[task][wkey(encoder)][wkey(decoder)][self.primary[task]]
        return v if self.higher_is_better[task] else -v

    def uniform(self, width: float) -> dict[str, Any]:
        return {"encoder": width, "decoders": {t: width for t in self.tasks}}

    def missing_cells(self) -> dict[str, list[tuple[str, str]]]:
        """Per task, the (encoder, decoder) width keys whose primary metric is not a finite number."""
        out = {}
        for t in self.tasks:
            bad = [(a, b) for a, row in self.metrics[t].items() for b, m in row.items()
                   if not math.isfinite(m[self.primary[t]])]
            if bad:
                out[t] = bad
        return out

    def check(self, source: str = "width table") -> "WidthTable":
        """Refuse a missing FLOPs or metric cell, naming ``source``, task and cell; read a stored null (how
        JSON keeps a non-finite metric) as NaN; log the cells whose primary metric is not finite (the
        measured search skips the configurations that use them)."""
        keys = _check_width_set(self.width_set, source)
        for name in ("encoder_flops", "head_flops", "metrics", "primary", "higher_is_better"):
            _mapping(getattr(self, name), f"{source}: {name}")
        _only_widths(self.encoder_flops, keys, f"{source}: encoder_flops")
        for name in ("head_flops", "metrics", "primary", "higher_is_better"):  # an extra task would never be read
            extra = [t for t in getattr(self, name) if t not in self.tasks]
            if extra:
                raise ValueError(f"{source}: {name} has entries for task(s) {extra} not in tasks {self.tasks}; "
                                 "remove them or add the task to tasks")
        for k in keys:
            _flops(self.encoder_flops.get(k), f"{source}: encoder_flops[{k!r}] (encoder width {k})")
        for t in self.tasks:
            if t not in self.primary or t not in self.higher_is_better:
                raise ValueError(f"{source}: task {t!r} has no entry in primary / higher_is_better")
            for name in ("head_flops", "metrics"):  # a cell of a width outside the set would never be read
                by_e = _mapping(getattr(self, name).get(t, {}), f"{source}: {name}[{t!r}]")
                _only_widths(by_e, keys, f"{source}: {name}[{t!r}]")
                for a in keys:
                    _only_widths(_mapping(by_e.get(a, {}), f"{source}: {name}[{t!r}][{a!r}]"), keys,
                                 f"{source}: {name}[{t!r}][{a!r}]")
            for a in keys:
                for b in keys:
                    cell = f"task {t!r} at encoder width {a}, decoder width {b}"
                    _flops(self.head_flops.get(t, {}).get(a, {}).get(b),
                           f"{source}: head_flops[{t!r}][{a!r}][{b!r}] ({cell})")
                    m = self.metrics.get(t, {}).get(a, {}).get(b)
                    if not isinstance(m, dict) or self.primary[t] not in m:
                        raise ValueError(f"{source}: metrics[{t!r}][{a!r}][{b!r}] has no {self.primary[t]!r} ({cell})")
                    for name, v in m.items():
                        m[name] = math.nan if v is None else _number(v, f"{source}: metrics[{t!r}][{a!r}][{b!r}]"
                                                                        f"[{name!r}] ({cell})", finite=False)
        for t, cells in self.missing_cells().items():
            log.warning("%s: task %r has no finite %s at (encoder, decoder) widths %s; the measured search skips "
                        "configurations that use them", source, t, self.primary[t],
                        ", ".join(f"({a}, {b})" for a, b in cells))
        return self

    # --- storage ------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "width table") -> "WidthTable":
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a width table is a JSON object, got {type(data).__name__}")
        try:
            table = cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r}") from None
        return table.check(source)

    def save(self, path: str | Path) -> None:
        from mtl.io import write_json

        write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "WidthTable":
        from mtl.io import read_json

        return cls.from_json(read_json(path), str(path))


@torch.no_grad()
def build_width_table(model, batches: Iterable[Mapping[str, torch.Tensor]], max_batches: int | None = None,
                      progress: bool = True, split: str = "") -> WidthTable:
    """Evaluate ``model`` (family ``slimmable``) on ``batches`` at every (encoder, decoder) width pair;
    ``progress``: rate-limited lines ``[width table] <split> i/N batches ...``."""
    from mtl.progress_log import ProgressLog

    ws = list(model.width_set)
    total = len(batches) if hasattr(batches, "__len__") else None
    total = min(total, max_batches) if total is not None and max_batches is not None else total or max_batches
    bar = ProgressLog(f"[width table] {split}".rstrip(), total, unit="batches", enabled=progress)
    tasks = dict(model.tasks)
    saved = model.widths
    with eval_mode(model):  # every module's own mode comes back once the table is built
        metrics = {t: {wkey(a): {wkey(b): task.metrics() for b in ws} for a in ws} for t, task in tasks.items()}
        device = model.mean.device
        sample = None
        try:
            for i, batch in enumerate(batches):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch["image"].to(device)
                sample = x[:1] if sample is None else sample
                size = tuple(x.shape[-2:])
                for we in ws:
                    model.set_widths(encoder=we)
                    z = model.shared(x)
                    for wd in ws:
                        model.set_widths(decoders=wd)
                        preds = model.heads(z, size)
                        for t, task in tasks.items():
                            target = batch[task.target_key].to(device)
                            for m in metrics[t][wkey(we)][wkey(wd)].values():
                                m.to(device).update(preds[t], target)
                bar.update(i + 1, f"{len(ws)}x{len(ws)} width pairs per batch")
            if sample is None:
                raise ValueError("build_width_table got no batches")
            enc, head = {}, {t: {} for t in tasks}
            for we in ws:
                model.set_widths(encoder=we, decoders=1.0)
                enc[wkey(we)] = count_flops(model, sample, [])
                for t in tasks:
                    head[t][wkey(we)] = {}
                    for wd in ws:
                        model.set_widths(decoders={t: wd})
                        head[t][wkey(we)][wkey(wd)] = count_flops(model, sample, [t]) - enc[wkey(we)]
        finally:
            model.set_config(saved)
    values = {t: {a: {b: {n: float(m.compute()) for n, m in ms.items()} for b, ms in row.items()}
                  for a, row in by_e.items()} for t, by_e in metrics.items()}
    table = WidthTable(width_set=ws, tasks=list(tasks), primary={t: task.primary for t, task in tasks.items()},
                       higher_is_better={t: bool(task.directions[task.primary]) for t, task in tasks.items()},
                       encoder_flops=enc, head_flops=head, metrics=values, input_size=list(sample.shape[-2:]))
    return table.check(f"width table ({split or 'evaluated'} split)")


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _check_width_set(width_set: Any, source: str) -> list[str]:
    """The width set's keys. The search reads it in order (the first entry as the smallest configuration, the
    encoder filled from the last down) and budgets end at width 1, so an unsorted set chose wrongly."""
    ws = width_set
    ok = isinstance(ws, list) and len(ws) > 0 and all(
        is_real(w) and 0 < w <= 1 for w in ws)
    if not ok or any(a >= b for a, b in zip(ws, ws[1:])) or ws[-1] != 1:
        raise ValueError(f"{source}: width_set must be strictly increasing widths in (0, 1] ending at 1 (the full "
                         f"network), got {ws!r}")
    keys = [wkey(w) for w in ws]
    if len(set(keys)) < len(keys):
        raise ValueError(f"{source}: width_set {ws!r} has entries written alike to 6 significant digits, the "
                         "precision of the table's keys")
    return keys


def _only_widths(cells: Mapping[str, Any], keys: list[str], where: str) -> None:
    extra = [k for k in cells if k not in keys]
    if extra:
        raise ValueError(f"{where} has cells for width(s) {extra} outside width_set {keys}; remove them or add "
                         "the width to width_set")


def _flops(v: Any, what: str) -> float:
    if _number(v, what) < 0:
        raise ValueError(f"{what} is {v!r}; FLOPs must be >= 0")
    return v


def _number(v: Any, what: str, finite: bool = True) -> float:
    if not is_real(v):
        raise ValueError(f"{what} is {'missing' if v is None else repr(v)}; expected a number")
    if finite and not math.isfinite(v):
        raise ValueError(f"{what} is {v!r}; expected a finite number")
    return v
