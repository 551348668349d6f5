"""Split-level metrics for the built-in tasks (torchmetrics `Metric`s).

Every metric keeps only sums, counts or fixed-size histograms as state (reduced with "sum", so
DDP sync is exact), accumulates over all `update` calls of a split and `compute`s a float32
scalar tensor. Sums are float64 and counts int64 so large splits do not lose precision.
A metric that saw no valid element computes NaN. `update` takes the raw head output.
See docs/tasks.md for the exact definitions.
"""
from __future__ import annotations

import abc

import torch
import torch.nn.functional as F
from torchmetrics import Metric

_F64 = torch.float64


NO_LABEL = -1  # a prediction whose class scores are not all finite: wrong whatever the target


def _labels(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class scores (N, C, ...) -> labels (N, ...); labels pass through. Scores with a NaN or Inf
    (a diverged model) become ``NO_LABEL``: argmax would read them as class 0 and give it credit."""
    is_scores = preds.ndim == target.ndim + 1
    # scores lose dim 1 to the argmax; any other mismatch would broadcast and count elements twice
    if (preds.shape[:1] + preds.shape[2:] if is_scores else preds.shape) != target.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} do not match target {tuple(target.shape)}")
    if is_scores:
        labels = preds.argmax(dim=1)
        return labels.masked_fill_(~torch.isfinite(preds).all(dim=1), NO_LABEL)
    return preds


def _check_label_range(labels: torch.Tensor, num_classes: int, ignore_index: int | None) -> None:
    """Refuse labels outside [0, num_classes): counted as merely wrong they would hide a label-map bug."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)].unique()[:5].tolist()
        raise ValueError(f"labels must lie in [0, {num_classes}) or equal ignore_index={ignore_index}, got {bad}")


def _same_shape(preds: torch.Tensor, target: torch.Tensor) -> None:
    if preds.shape != target.shape:
        raise ValueError(f"predictions {tuple(preds.shape)} do not match target {tuple(target.shape)}")


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return (num.to(_F64) / den.to(_F64)).float()  # 0/0 -> NaN on purpose: nothing was measured


class _SumMetric(Metric):
    is_differentiable = False
    full_state_update = False

    def _sum_state(self, name: str, dtype: torch.dtype) -> None:
        self.add_state(name, default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")


class Accuracy(_SumMetric):
    """Fraction of correct labels over all non-ignored elements of the split.

    preds: scores (N, C, ...) (argmax over dim 1) or labels (N, ...); target: labels (N, ...).
    Serves image classification (N,) and pixel accuracy (N, H, W) alike. With `num_classes`, target
    labels (and labels passed as predictions) outside [0, num_classes) and not ignored are refused.
    """

    higher_is_better = True

    def __init__(self, ignore_index: int | None = None, num_classes: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.num_classes = None if num_classes is None else int(num_classes)
        self._sum_state("correct", torch.int64)
        self._sum_state("total", torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        labels = _labels(preds, target)
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None \
            else target != self.ignore_index
        if self.num_classes is not None:
            predicted = labels[valid]
            if preds.ndim == target.ndim + 1:  # scores: NO_LABEL marks a non-finite prediction, not a bad label
                predicted = predicted[predicted != NO_LABEL]
            _check_label_range(target[valid], self.num_classes, self.ignore_index)
            _check_label_range(predicted, self.num_classes, self.ignore_index)
        self.correct += ((labels == target) & valid).sum()
        self.total += valid.sum()

    def compute(self) -> torch.Tensor:
        return _ratio(self.correct, self.total)


class MeanIoU(_SumMetric):
    """Mean intersection-over-union from a confusion matrix accumulated over the whole split.

    IoU_c = TP_c / (TP_c + FP_c + FN_c). Classes whose union is empty over the whole split (absent in
    both predictions and targets) are left out of the mean rather than counted as 0 or 1.
    """

    higher_is_better = True

    def __init__(self, num_classes: int, ignore_index: int | None = 255, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        c = self.num_classes
        # rows: target class, columns: predicted class
        self.add_state("confmat", default=torch.zeros(c, c, dtype=torch.int64), dist_reduce_fx="sum")
        # per target class: pixels whose scores were not finite (no prediction: a false negative only)
        self.add_state("unpredicted", default=torch.zeros(c, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        labels = _labels(preds, target)
        valid = torch.ones_like(target, dtype=torch.bool) if self.ignore_index is None \
            else target != self.ignore_index
        c = self.num_classes
        if preds.ndim == target.ndim + 1:  # scores: NO_LABEL marks a non-finite prediction
            none = valid & (labels == NO_LABEL)
            if none.any():
                missed = target[none].long()
                _check_label_range(missed, c, self.ignore_index)
                self.unpredicted += torch.bincount(missed, minlength=c)
                valid = valid & ~none
        t, p = target[valid].long(), labels[valid].long()
        # a label ≥ c inside the flattened index would land in another class's cell, not past the end
        _check_label_range(t, c, self.ignore_index)
        _check_label_range(p, c, self.ignore_index)
        counts = torch.bincount(t * c + p, minlength=c * c)
        self.confmat += counts.view(c, c)

    def compute(self) -> torch.Tensor:
        cm = self.confmat.to(_F64)
        tp = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) + self.unpredicted.to(_F64) - tp
        present = union > 0
        if not present.any():
            return torch.tensor(float("nan"), device=cm.device)
        return (tp[present] / union[present]).mean().float()


class _ValidErrorMetric(_SumMetric):
    """Shared state for errors over elements: sum of a per-element error and the element count."""

    higher_is_better = False

    def __init__(self, ignore_nonpositive_targets: bool = False, **kwargs):
        super().__init__(**kwargs)
        # depth marks invalid pixels with 0; regression targets may be any real number
        self.ignore_nonpositive_targets = ignore_nonpositive_targets
        self._sum_state("error_sum", _F64)
        self._sum_state("count", torch.int64)

    @abc.abstractmethod
    def _error(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element error of the valid elements."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        _same_shape(preds, target)
        preds, target = preds.to(_F64), target.to(_F64)
        if self.ignore_nonpositive_targets:
            valid = target > 0  # also drops NaN targets
            preds, target = preds[valid], target[valid]
        self.error_sum += self._error(preds, target).sum()
        self.count += target.numel()


class MeanAbsoluteError(_ValidErrorMetric):
    """mean |p − t| over all (valid) elements of the split."""

    def _error(self, preds, target):
        return (preds - target).abs()

    def compute(self) -> torch.Tensor:
        return _ratio(self.error_sum, self.count)


class RootMeanSquaredError(_ValidErrorMetric):
    """sqrt(mean (p − t)²) with the mean over all (valid) elements of the split (not per image)."""

    def _error(self, preds, target):
        return (preds - target).square()

    def compute(self) -> torch.Tensor:
        return _ratio(self.error_sum, self.count).sqrt()


class AbsoluteRelativeError(_ValidErrorMetric):
    """mean |p − t| / t over elements with t > 0 (the only ones where it is defined)."""

    def __init__(self, **kwargs):
        super().__init__(ignore_nonpositive_targets=True, **kwargs)

    def _error(self, preds, target):
        return (preds - target).abs() / target

    def compute(self) -> torch.Tensor:
        return _ratio(self.error_sum, self.count)


class ThresholdAccuracy(_ValidErrorMetric):
    """δ < thr: share of elements with t > 0 whose max(p/t, t/p) is below ``threshold`` (1.25, 1.25², 1.25³
    in the depth literature, Eigen et al. 2014). A prediction ≤ 0 or non-finite never counts as within."""

    higher_is_better = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(ignore_nonpositive_targets=True, **kwargs)
        self.threshold = float(threshold)

    def _error(self, preds, target):
        ratio = torch.maximum(preds / target, target / preds)
        return ((preds > 0) & (ratio < self.threshold)).to(_F64)  # NaN compares False

    def compute(self) -> torch.Tensor:
        return _ratio(self.error_sum, self.count)


def normals_valid(target: torch.Tensor) -> torch.Tensor:
    """(B, H, W) mask of the pixels with a normal: not all-zero and no NaN component."""
    return (target != 0).any(dim=1) & ~target.isnan().any(dim=1)


def _unit_max(v: torch.Tensor) -> torch.Tensor:
    """Each vector divided by its largest |component| (angles unchanged): p×t and p·t of a 1e-25 or a
    1e20 prediction would under- or overflow float32 and turn its angle into 0° or 90°."""
    return v / v.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)


def angles_deg(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Angles in degrees between (B, 3, H, W) vectors at the valid pixels (``normals_valid``), flat.

    atan2(|p×t|, p·t) is scale-free and accurate near 0° and 180°, where acos of a float32 cosine
    is not. A zero prediction has no direction and scores 90°, as the normalised zero vector would; a
    non-finite one (NaN, Inf) 180°, the worst, so the mean, median and within-t° shares agree on it.
    """
    _same_shape(preds, target)
    if preds.ndim != 4 or preds.shape[1] != 3:
        raise ValueError(f"normals must be (B, 3, H, W), got {tuple(preds.shape)}")
    valid = normals_valid(target)
    p = _unit_max(preds.float().permute(0, 2, 3, 1)[valid])
    t = _unit_max(target.float().permute(0, 2, 3, 1)[valid])
    ang = torch.rad2deg(torch.atan2(torch.linalg.cross(p, t).norm(dim=-1), (p * t).sum(-1)))
    ang = torch.where((p != 0).any(dim=-1), ang, torch.full_like(ang, 90.0))
    # a non-finite prediction (diverged) has no direction worth scoring: 180°, the worst, for every metric
    return torch.where(torch.isfinite(ang), ang, torch.full_like(ang, 180.0))


class MeanAngularError(_SumMetric):
    """Mean angle (degrees) between predicted and target normals over all valid pixels of the split."""

    higher_is_better = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._sum_state("angle_sum", _F64)
        self._sum_state("count", torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        ang = angles_deg(preds, target)
        self.angle_sum += ang.to(_F64).sum()
        self.count += ang.numel()

    def compute(self) -> torch.Tensor:
        return _ratio(self.angle_sum, self.count)


class MedianAngularError(_SumMetric):
    """Median angle (degrees) over all valid pixels of the split.

    Memory stays bounded: each angle is rounded to the nearest multiple of `resolution` (0.01° by
    default, so the result is within resolution/2 of the exact median) and counted in a fixed
    histogram over [0°, 180°]. For an even count the two middle values are averaged (like numpy).
    """

    higher_is_better = False

    def __init__(self, resolution: float = 0.01, **kwargs):
        super().__init__(**kwargs)
        if not resolution > 0:
            raise ValueError(f"resolution must be > 0, got {resolution}")
        self.resolution = float(resolution)
        self.num_bins = int(round(180.0 / self.resolution)) + 1
        self.add_state("hist", default=torch.zeros(self.num_bins, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        ang = angles_deg(preds, target).to(_F64)
        # a non-finite angle (a diverged prediction) would round to INT64_MIN and count as 0°, the best
        # score: it counts as 180°, the worst, as the mean angle's NaN would say
        ang = torch.where(torch.isfinite(ang), ang, 180.0)
        idx = torch.round(ang / self.resolution).long().clamp_(0, self.num_bins - 1)
        self.hist += torch.bincount(idx, minlength=self.num_bins)

    def compute(self) -> torch.Tensor:
        n = int(self.hist.sum())
        if n == 0:
            return torch.tensor(float("nan"), device=self.hist.device)
        cum = self.hist.cumsum(0)
        ranks = torch.tensor([(n - 1) // 2, n // 2], device=cum.device)  # 0-based middle ranks
        bins = torch.searchsorted(cum, ranks, right=True)
        return (bins.to(_F64) * self.resolution).mean().float()


class AngleWithin(_SumMetric):
    """Percentage (0–100) of valid pixels whose angle is strictly below `threshold` degrees."""

    higher_is_better = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self._sum_state("hits", torch.int64)
        self._sum_state("count", torch.int64)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        ang = angles_deg(preds, target)
        self.hits += (ang < self.threshold).sum()
        self.count += ang.numel()

    def compute(self) -> torch.Tensor:
        return 100.0 * _ratio(self.hits, self.count)


class BoundaryFScore(_SumMetric):
    """Boundary F-score with a pixel tolerance, accumulated over the split.

    An approximation of the BSDS ODS F-measure: one fixed threshold, no thinning of predictions and
    no one-to-one (bipartite) matching. A predicted boundary pixel is correct if a target boundary
    pixel lies within `tolerance` pixels (Chebyshev distance, via max-pool dilation of the target);
    a target boundary pixel is recalled if a predicted one lies within `tolerance` of it.
    precision = matched predicted / predicted, recall = matched target / target (split totals);
    each is 0 when its denominator is 0, and F = 2PR/(P+R), 0 when P+R = 0 (as in the BSDS code).
    """

    higher_is_better = True

    def __init__(self, tolerance: int = 1, threshold: float = 0.5, from_logits: bool = True, **kwargs):
        super().__init__(**kwargs)
        if int(tolerance) != tolerance or tolerance < 0:
            raise ValueError(f"tolerance must be a non-negative integer number of pixels, got {tolerance}")
        self.tolerance = int(tolerance)
        self.threshold = float(threshold)
        self.from_logits = from_logits
        for s in ("pred_matched", "pred_total", "target_matched", "target_total"):
            self._sum_state(s, torch.int64)

    def _dilate(self, x: torch.Tensor) -> torch.Tensor:
        if self.tolerance == 0:
            return x
        k = 2 * self.tolerance + 1
        return F.max_pool2d(x.float(), kernel_size=k, stride=1, padding=self.tolerance) > 0

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        _same_shape(preds, target)
        if preds.ndim != 4:
            raise ValueError(f"edges must be (B, 1, H, W), got {tuple(preds.shape)}")
        prob = torch.sigmoid(preds.float()) if self.from_logits else preds.float()
        p = prob > self.threshold
        t = target > 0.5
        self.pred_matched += (p & self._dilate(t)).sum()
        self.pred_total += p.sum()
        self.target_matched += (t & self._dilate(p)).sum()
        self.target_total += t.sum()

    def compute(self) -> torch.Tensor:
        precision = self.pred_matched.to(_F64) / self.pred_total.clamp(min=1)
        recall = self.target_matched.to(_F64) / self.target_total.clamp(min=1)
        s = precision + recall
        return torch.where(s > 0, 2 * precision * recall / s, torch.zeros_like(s)).float()
