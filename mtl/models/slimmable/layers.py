"""Slimmable layers (Yu et al., "Slimmable Neural Networks", ICLR 2019): one shared weight, of which a
width multiplier keeps the leading ``weight[:out, :in]`` slice at run time.

Every layer reads its input and output width from a named *width group* (``in_key`` / ``out_key``;
``None`` = a fixed side, e.g. the RGB input or a head's output): ``apply_widths(model, {"encoder": 0.5,
"decoder.depth": 1.0})`` sets them on every layer at once, so layers never disagree about a width.

Batch norm is *switchable* (Yu et al. 2019; shared affine as in universally slimmable networks,
Yu & Huang 2019): the affine parameters are sliced like the weights, the running statistics are
private to each width of a fixed set (one row per width), because statistics of a 0.25-wide network
differ from the leading quarter of the full network's. A norm whose input also depends on another width
group (a task head's first norm reads features computed at the *encoder's* width) keeps one row per
pair (that group's width, its own width): its statistics at decoder width 0.25 differ between encoder
widths 0.25 and 1.0, so one row per configuration, as switchable BN is defined. A width outside the set
gets its own rows only by recalibration on training batches (``SlimmableMultiTaskModel.calibrate_widths``).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: default width set: switchable BN keeps one row of statistics per entry
DEFAULT_WIDTHS = (0.25, 0.5, 0.75, 1.0)


def channels_at(full: int, width: float) -> int:
    """Channels a layer of ``full`` channels keeps at ``width`` (the one rounding rule everywhere)."""
    return max(1, int(math.floor(full * width + 0.5)))


def check_width(width: float, what: str = "width") -> float:
    if isinstance(width, (bool, str)):  # float(True) is 1.0, float("0.5") a string stored as a width: typos
        raise ValueError(f"{what} must be a number in (0, 1], got {width!r}")
    try:
        w = float(width)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in (0, 1], got {width!r}") from None
    if not (0.0 < w <= 1.0) or not math.isfinite(w):
        raise ValueError(f"{what} must be in (0, 1], got {width!r}")
    return w


def wkey(width: float) -> str:
    """A width's key in width tables (JSON object keys): 6 significant digits."""
    return f"{float(width):g}"


def check_width_set(widths: Iterable[float], key: str = "the width set") -> tuple[float, ...]:
    """The sorted width set; ``key`` names the setting in errors (``backbone.widths``). Entries that
    ``width_index`` or ``wkey`` cannot tell apart are refused: they would get BN rows of their own that
    ``set_widths`` never selects, or share one width-table key."""
    ws = tuple(sorted({check_width(w, f"{key} entry") for w in widths}))
    if not ws:
        raise ValueError(f"{key} is empty")
    if ws[-1] != 1.0:
        raise ValueError(f"{key} must contain 1.0 (the full network), got {list(ws)}")
    for a, b in zip(ws, ws[1:]):
        if width_index((a,), b) is not None or wkey(a) == wkey(b):
            why = (f"closer than {WIDTH_TOLERANCE:g}, so set_widths takes one for the other"
                   if width_index((a,), b) is not None else f"width tables write both as {wkey(a)!r}")
            raise ValueError(f"{key} entries {a!r} and {b!r} cannot be told apart ({why}); keep one of them")
    return ws


#: two widths closer than this are the same width
WIDTH_TOLERANCE = 1e-9


def width_index(width_set: Sequence[float], width: float) -> int | None:
    for i, w in enumerate(width_set):
        if abs(w - width) < WIDTH_TOLERANCE:
            return i
    return None


class OneValuePerChannel(ValueError):
    """A training-mode batch norm got one value per channel (one image at 1x1): no variance to estimate.
    ``module`` is the norm, so a caller can name its layer."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...], message: str | None = None):
        super().__init__(message or "batch norm statistics need more than one value per channel, "
                         f"got an input of shape {shape}")
        self.module, self.shape = module, shape


class _Sliced:
    """What sliced conv and linear layers share: the full weight (out, in, ...) stays, the forward uses
    ``weight[:out(w_out), :in(w_in)]``; a side without a width key keeps its full size."""

    def _init_slicing(self, in_key: str | None, out_key: str | None) -> None:
        self.in_key, self.out_key = in_key, out_key
        self.in_width = self.out_width = 1.0

    def active(self) -> tuple[int, int]:
        full_out, full_in = self.weight.shape[:2]
        cin = channels_at(full_in, self.in_width) if self.in_key else full_in
        cout = channels_at(full_out, self.out_width) if self.out_key else full_out
        return cin, cout

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cin, cout = self.active()
        return self.weight[:cout, :cin], (self.bias[:cout] if self.bias is not None else None)


class SlimConv2d(_Sliced, nn.Conv2d):
    """``nn.Conv2d`` holding the full weight; runs on ``weight[:out(w_out), :in(w_in)]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
                 bias: bool = True, in_key: str | None = None, out_key: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self._init_slicing(in_key, out_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.sliced()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)


class SlimLinear(_Sliced, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 in_key: str | None = None, out_key: str | None = None):
        super().__init__(in_features, out_features, bias=bias)
        self._init_slicing(in_key, out_key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.sliced()
        return F.linear(x, weight, bias)


class SwitchableBatchNorm2d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm2d with sliced affine parameters and private running statistics per width.

    ``running_means[row, :channels_at(C, width)]`` are the statistics of a width; ``row = i`` for
    ``widths[i]``, or, with ``cond_key`` (the group the input's distribution also depends on),
    ``row = j * len(widths) + i`` for the pair (``widths[j]`` of ``cond_key``, ``widths[i]``).
    A ``_BatchNorm`` subclass, so code that handles batch norm generically (freezing statistics,
    ``momentum``) treats it like any other; ``momentum=None`` gives a cumulative average (recalibration).
    """

    def __init__(self, num_features: int, widths: Sequence[float] = DEFAULT_WIDTHS, key: str | None = None,
                 eps: float = 1e-5, momentum: float | None = 0.1, cond_key: str | None = None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True, track_running_stats=False)
        self.track_running_stats = True
        self.key, self.cond_key = key, cond_key
        self.width = self.cond_width = 1.0
        self.widths: tuple[float, ...] = check_width_set(widths)
        rows = self._rows(len(self.widths))
        self.register_buffer("running_means", torch.zeros(rows, num_features))
        self.register_buffer("running_vars", torch.ones(rows, num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _rows(self, k: int) -> int:
        return k * k if self.cond_key else k

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-D input (B, C, H, W), got {x.dim()}-D")

    def reset_running_stats(self) -> None:
        if hasattr(self, "running_means"):
            self.running_means.zero_()
            self.running_vars.fill_(1.0)
            self.num_batches_tracked.zero_()

    def _index(self, width: float) -> int:
        k = width_index(self.widths, width)
        if k is None:
            raise ValueError(f"width {width} is not in this model's width set {list(self.widths)}; "
                             "add it with model.calibrate_widths([...], batches) (BN recalibration)")
        return k

    def row(self, width: float | None = None, cond_width: float | None = None) -> int:
        i = self._index(self.width if width is None else width)
        if not self.cond_key:
            return i
        return self._index(self.cond_width if cond_width is None else cond_width) * len(self.widths) + i

    def add_width(self, width: float) -> None:
        """New (uncalibrated: mean 0, var 1) statistics rows for ``width`` (and, with ``cond_key``, for
        every pair it is part of)."""
        if width_index(self.widths, width) is not None:
            return
        widths = tuple(sorted(self.widths + (float(width),)))
        k, new = len(self.widths), widths.index(float(width))
        c, dev = self.num_features, self.running_means.device

        def grow(t: torch.Tensor, fill: float) -> torch.Tensor:
            t = t.view(k if self.cond_key else 1, k, c)
            t = torch.cat([t[:, :new], torch.full_like(t[:, :1], fill), t[:, new:]], 1)
            if self.cond_key:
                t = torch.cat([t[:new], torch.full_like(t[:1], fill), t[new:]], 0)
            return t.reshape(-1, c).contiguous().to(dev)

        self.running_means, self.running_vars = grow(self.running_means, 0.0), grow(self.running_vars, 1.0)
        self.widths = widths

    def upgrade_stats(self, stats: torch.Tensor) -> torch.Tensor | None:
        """Per-pair rows from statistics stored with one row per own width (folders written before
        per-pair statistics): every ``cond_key`` width shares that row, which is what those models
        computed. ``None`` when ``stats`` is not of that older shape."""
        k = len(self.widths)
        if self.cond_key and k > 1 and tuple(stats.shape) == (k, self.num_features):
            return stats.repeat(k, 1)
        return None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("running_means", "running_vars"):
            t = state_dict.get(prefix + name)
            upgraded = self.upgrade_stats(t) if t is not None else None
            if upgraded is not None:
                state_dict[prefix + name] = upgraded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        c = channels_at(self.num_features, self.width) if self.key else self.num_features
        k = self.row()
        factor = 0.0
        if self.training:
            if x.numel() <= x.shape[1]:  # torch's own error would not say which layer or width
                raise OneValuePerChannel(self, tuple(x.shape))
            self.num_batches_tracked.add_(1)
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        # rows are contiguous, so batch_norm's in-place update of the statistics lands in the buffers
        return F.batch_norm(x, self.running_means[k, :c], self.running_vars[k, :c], self.weight[:c], self.bias[:c],
                            self.training, factor, self.eps)

    def extra_repr(self) -> str:
        cond = f", cond_key={self.cond_key!r}" if self.cond_key else ""
        return f"{self.num_features}, widths={list(self.widths)}, key={self.key!r}{cond}"


SLIM_TYPES = (SlimConv2d, SlimLinear, SwitchableBatchNorm2d)


def apply_widths(module: nn.Module, widths: Mapping[str, float]) -> None:
    """Set every slimmable layer's widths from ``{group key: width}`` (every key a layer uses must be given)."""
    for name, m in module.named_modules():
        if isinstance(m, SwitchableBatchNorm2d):
            if m.key:
                m.width = widths[m.key]
            if m.cond_key:
                m.cond_width = widths[m.cond_key]
        elif isinstance(m, (SlimConv2d, SlimLinear)):
            if m.in_key:
                m.in_width = widths[m.in_key]
            if m.out_key:
                m.out_width = widths[m.out_key]


# --- one factory per layer kind: slimmable when ``widths`` is given, a plain torch layer otherwise -----
def conv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False, widths: Sequence[float] | None = None,
         in_key: str | None = None, out_key: str | None = None) -> nn.Conv2d:
    if widths is None:
        return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
    return SlimConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias, in_key=in_key, out_key=out_key)


def linear(cin: int, cout: int, widths: Sequence[float] | None = None,
           in_key: str | None = None, out_key: str | None = None) -> nn.Linear:
    if widths is None:
        return nn.Linear(cin, cout)
    return SlimLinear(cin, cout, in_key=in_key, out_key=out_key)


def batchnorm(c: int, widths: Sequence[float] | None = None, key: str | None = None,
              cond_key: str | None = None) -> nn.Module:
    return nn.BatchNorm2d(c) if widths is None else SwitchableBatchNorm2d(c, widths, key=key, cond_key=cond_key)
