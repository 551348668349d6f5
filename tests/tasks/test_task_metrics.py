"""Split-level metrics on hand-computed cases, accumulated over several update() calls."""
import math

import numpy as np
import pytest
import torch

from mtl.tasks import create_task
from mtl.tasks.metrics import BoundaryFScore, MeanIoU, MedianAngularError


def _compute(metric, batches):
    for pred, target in batches:
        metric.update(pred, target)
    out = metric.compute()
    assert out.ndim == 0 and out.dtype == torch.float32
    return out.item()


def _onehot_logits(labels, num_classes):
    return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


def test_accuracy_classification():
    m = create_task("classification").metrics()["accuracy"]
    b1 = (torch.tensor([[2.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, 2]))
    b2 = (torch.tensor([[0, 0, 1.0]]), torch.tensor([2]))
    assert _compute(m, [b1, b2]) == pytest.approx(2 / 3)


def test_miou_over_two_updates_by_hand():
    # 3 classes, class 2 never occurs (neither target nor prediction) -> left out of the mean.
    t1 = torch.tensor([[[0, 0], [1, 255]]])
    p1 = torch.tensor([[[0, 1], [1, 1]]])
    t2 = torch.tensor([[[1, 1], [0, 0]]])
    p2 = torch.tensor([[[1, 0], [0, 0]]])
    # confusion over the split (target, pred): (0,0)=3 (0,1)=1 (1,0)=1 (1,1)=2
    # IoU_0 = 3 / (4 + 4 − 3) = 3/5; IoU_1 = 2 / (3 + 3 − 2) = 1/2
    task = create_task("semseg", num_classes=3)
    ms = task.metrics()
    batches = [(_onehot_logits(p1, 3), t1), (p2, t2)]  # logits and labels are both accepted
    assert _compute(ms["miou"], batches) == pytest.approx(0.55)
    assert _compute(ms["pixel_acc"], batches) == pytest.approx(5 / 7)
    # the mean of per-batch mIoUs (0.5 and 7/12) would differ: accumulation is over the split
    assert (0.5 + 7 / 12) / 2 != pytest.approx(0.55)


def test_miou_class_predicted_but_absent_counts_as_zero():
    m = MeanIoU(3, ignore_index=255)
    t = torch.tensor([[[0, 0], [1, 1]]])
    p = torch.tensor([[[0, 2], [1, 1]]])
    # IoU_0 = 1/2, IoU_1 = 1, IoU_2 = 0/1 = 0 (union 1: predicted, never in the target)
    assert _compute(m, [(p, t)]) == pytest.approx(0.5)


def test_miou_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        MeanIoU(3).update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))


def test_merge_state_equals_single_metric():
    # what DDP does: every state is summed across processes
    t1, p1 = torch.tensor([[[0, 0], [1, 255]]]), torch.tensor([[[0, 1], [1, 1]]])
    t2, p2 = torch.tensor([[[1, 1], [0, 0]]]), torch.tensor([[[1, 0], [0, 0]]])
    for metric_name in ("miou", "pixel_acc"):
        a, b = (create_task("semseg", num_classes=3).metrics()[metric_name] for _ in range(2))
        a.update(p1, t1)
        b.update(p2, t2)
        a.merge_state(b)
        assert a.compute().item() == pytest.approx(0.55 if metric_name == "miou" else 5 / 7)


def test_depth_rmse_abs_rel_skip_invalid_pixels():
    ms = create_task("depth").metrics()
    # valid (pred, target): (2, 2), (3, 5) in batch 1; (4, 8) in batch 2; target 0 = invalid
    b1 = (torch.tensor([1.0, 2.0, 3.0, 9.0]).view(1, 1, 2, 2), torch.tensor([0.0, 2.0, 5.0, 0.0]).view(1, 1, 2, 2))
    b2 = (torch.tensor([4.0, 7.0]).view(1, 1, 1, 2), torch.tensor([8.0, 0.0]).view(1, 1, 1, 2))
    # per pixel over the split: errors 0, 2, 4
    assert _compute(ms["rmse"], [b1, b2]) == pytest.approx(math.sqrt(20 / 3))
    assert _compute(ms["abs_rel"], [b1, b2]) == pytest.approx((0 + 2 / 5 + 4 / 8) / 3)


def test_depth_abs_err_and_metric_choice():
    task = create_task("depth", metrics=["abs_err", "abs_rel"])
    assert task.primary == "abs_err" and set(task.directions) == {"abs_err", "abs_rel"}
    ms = task.metrics()
    b1 = (torch.tensor([1.0, 2.0, 3.0, 9.0]).view(1, 1, 2, 2), torch.tensor([0.0, 2.0, 5.0, 0.0]).view(1, 1, 2, 2))
    b2 = (torch.tensor([4.0, 7.0]).view(1, 1, 1, 2), torch.tensor([8.0, 0.0]).view(1, 1, 1, 2))
    # abs_err = Σ|p − t| / |V| over the valid pixels (2,2), (3,5), (4,8): (0 + 2 + 4) / 3
    assert _compute(ms["abs_err"], [b1, b2]) == pytest.approx(2.0)
    assert set(ms) == {"abs_err", "abs_rel"}
    with pytest.raises(ValueError, match="metrics must be"):
        create_task("depth", metrics=["rmse", "delta"])


def test_regression_mae_rmse():
    ms = create_task("regression", out_dim=2).metrics()
    b1 = (torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 2.0]]))
    b2 = (torch.tensor([[3.0, 5.0]]), torch.tensor([[1.0, 1.0]]))
    assert _compute(ms["mae"], [b1, b2]) == pytest.approx(7 / 4)
    assert _compute(ms["rmse"], [b1, b2]) == pytest.approx(math.sqrt(21 / 4))


def _normals(vectors):
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(1, 3, 1, len(vectors))


def test_normals_angles_known_vectors():
    s, c = math.sin(math.radians(20)), math.cos(math.radians(20))
    up = [0.0, 0.0, 1.0]
    # angles 0°, 20° | 45°, 90°, 180°; zero-target pixel ignored
    b1 = (_normals([[0, 0, 5.0], [s, 0, c], [1, 1, 1]]), _normals([up, up, [0, 0, 0]]))
    b2 = (_normals([[1.0, 0, 1.0], [0, 2.0, 0], [0, 0, -1.0]]), _normals([up, up, up]))
    ms = create_task("normals").metrics()
    got = {k: _compute(m, [b1, b2]) for k, m in ms.items()}
    assert got["mean_angle"] == pytest.approx((0 + 20 + 45 + 90 + 180) / 5, abs=1e-4)
    assert got["median_angle"] == pytest.approx(45.0, abs=1e-6)
    assert got["pct_11_25"] == pytest.approx(20.0)
    assert got["pct_22_5"] == pytest.approx(40.0)
    assert got["pct_30"] == pytest.approx(40.0)


def test_normals_angles_are_scale_free_at_extreme_magnitudes():
    """p×t and p·t of 1e-25 or 1e20 vectors under/overflow float32 (they scored 0° and 90°)."""
    from mtl.tasks.metrics import angles_deg

    up = [0.0, 0.0, 1.0]
    preds = _normals([[1e-25, 0, 0], [1e20, 0, 1e20], [1e-30, 0, 1e-30], [-3e38, 0, 0]])
    assert angles_deg(preds, _normals([up] * 4)).tolist() == pytest.approx([90.0, 45.0, 45.0, 90.0], abs=1e-4)


def test_normals_median_even_count_and_zero_prediction():
    m = MedianAngularError()
    up = [0.0, 0.0, 1.0]
    # angles 0°, 90° (a zero prediction has no direction: 90°), 90°, 180° -> median (90 + 90) / 2
    m.update(_normals([[0, 0, 1.0], [0, 0, 0], [1.0, 0, 0], [0, 0, -1.0]]), _normals([up] * 4))
    assert m.compute().item() == pytest.approx(90.0)
    m.reset()
    m.update(_normals([[0, 0, 1.0], [1.0, 0, 1.0], [1.0, 0, 0], [0, 0, -1.0]]), _normals([up] * 4))
    assert m.compute().item() == pytest.approx(67.5)  # (45 + 90) / 2


def test_normals_nan_target_pixels_are_invalid():
    up, nan = [0.0, 0.0, 1.0], float("nan")
    # angles 0° and 90°; the NaN-target pixel is left out of the mean and the median alike
    pred = _normals([[0, 0, 1.0], [1.0, 0, 0], [0, 0, -1.0]])
    target = _normals([up, up, [nan, 0, 1.0]])
    ms = create_task("normals").metrics()
    got = {k: _compute(m, [(pred, target)]) for k, m in ms.items()}
    assert got["mean_angle"] == pytest.approx(45.0) and got["median_angle"] == pytest.approx(45.0)
    assert got["pct_30"] == pytest.approx(50.0)


def test_normals_median_matches_numpy_within_resolution():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 7, 9, generator=g), torch.randn(2, 3, 7, 9, generator=g)
    m = MedianAngularError()
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])
    cos = torch.nn.functional.cosine_similarity(pred.double(), target.double(), dim=1)
    exact = np.median(np.degrees(np.arccos(cos.clamp(-1, 1).numpy())))
    assert abs(m.compute().item() - exact) <= 0.005 + 1e-6


def _line(col, size=5):
    x = torch.zeros(1, 1, size, size)
    x[..., col] = 1.0
    return x


def test_edge_f_score_tolerance():
    target = _line(2)
    logits = _line(3) * 20 - 10  # a predicted line one pixel to the right
    assert _compute(BoundaryFScore(tolerance=0), [(logits, target)]) == 0.0
    assert _compute(BoundaryFScore(tolerance=1), [(logits, target)]) == pytest.approx(1.0)
    task = create_task("edges")  # default: tolerance 1, threshold 0.5
    assert _compute(task.metrics()["f_score"], [(logits, target)]) == pytest.approx(1.0)


def test_edge_f_score_accumulates_precision_recall():
    target = torch.cat([_line(2), torch.zeros(1, 1, 5, 5)])
    pred = torch.cat([_line(2), torch.zeros(1, 1, 5, 5)])
    pred[1, 0, 0, 0] = 1.0  # a false positive in an image without boundaries
    m = BoundaryFScore(tolerance=1, from_logits=False)
    m.update(pred[:1], target[:1])
    m.update(pred[1:], target[1:])
    p, r = 5 / 6, 1.0
    assert m.compute().item() == pytest.approx(2 * p * r / (p + r))
    empty = BoundaryFScore()
    empty.update(torch.full((1, 1, 3, 3), -5.0), torch.zeros(1, 1, 3, 3))
    assert empty.compute().item() == 0.0  # no predictions, no targets: P = R = F = 0


def test_empty_split_is_nan():
    m = create_task("depth").metrics()["rmse"]
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    assert math.isnan(m.compute().item())


def test_a_nan_depth_prediction_makes_the_errors_nan_and_delta_m_refuses():
    """docs/tasks.md: an error has no worst value, so one diverged pixel makes the split's errors NaN."""
    from mtl.evaluation import delta_m

    task = create_task("depth", metrics=["rmse", "abs_err", "abs_rel", "delta1"])
    pred = torch.full((1, 1, 1, 2), 2.0)
    pred[0, 0, 0, 0] = float("nan")
    metrics = task.metrics()
    for metric in metrics.values():
        metric.update(pred, torch.full((1, 1, 1, 2), 2.0))
    got = {k: float(v.compute()) for k, v in metrics.items()}
    assert all(math.isnan(got[k]) for k in ("rmse", "abs_err", "abs_rel")) and got["delta1"] == 0.5
    with pytest.raises(ValueError, match="task 'depth' metric 'rmse' is nan in the metrics; Δm is undefined"):
        delta_m({"depth": got}, {"depth": {"rmse": 1.0}}, {"depth": task})


def test_median_angle_of_a_diverged_prediction_is_the_worst_not_the_best():
    target = torch.zeros(1, 3, 1, 2)
    target[:, 2] = 1.0
    m = MedianAngularError()
    m.update(torch.full((1, 3, 1, 2), float("nan")), target)
    assert m.compute().item() == pytest.approx(180.0)
    # every normals metric agrees: one diverged pixel of two scores 180°, the other 0°
    pred = target.clone()
    pred[0, :, 0, 0] = float("nan")
    metrics = create_task("normals").metrics()
    for metric in metrics.values():
        metric.update(pred, target)
    got = {k: float(v.compute()) for k, v in metrics.items()}
    assert got["mean_angle"] == pytest.approx(90.0) and got["median_angle"] == pytest.approx(90.0)
    assert all(v == pytest.approx(0.5) for k, v in got.items() if k.startswith("pct")) or \
        all(v == pytest.approx(50.0) for k, v in got.items() if k.startswith("pct"))


def test_mean_iou_refuses_labels_outside_the_classes():
    m = MeanIoU(3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        m.update(torch.tensor([3, 5]), torch.tensor([0, 0]))  # once landed in class 1's cell
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        m.update(torch.tensor([0, 1]), torch.tensor([0, 4]))
    m.update(torch.tensor([0, 2]), torch.tensor([0, 255]))  # 255 ignored
    assert m.confmat.sum() == 1


def test_nan_scores_count_as_wrong_not_as_class_0():
    """argmax of all-NaN logits is 0; a diverged model must not get class 0's share as credit."""
    seg = create_task("semseg", num_classes=3).metrics()
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, :, 0, 0] = torch.tensor([5.0, 0.0, 0.0])       # right (class 0)
    logits[0, :, 0, 1] = torch.tensor([float("nan"), 0, 0])  # no prediction for a class-0 pixel
    logits[0, :, 1, 0] = torch.tensor([0.0, 5.0, 0.0])       # right (class 1)
    logits[0, :, 1, 1] = torch.tensor([0.0, float("inf"), 0])  # no prediction for a class-2 pixel
    target = torch.tensor([[[0, 0], [1, 2]]])
    for m in seg.values():
        m.update(logits, target)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1 -> 1; class 2: FN 1 -> 0; mean 0.5. Pixel accuracy 2/4.
    assert seg["miou"].compute().item() == pytest.approx(0.5)
    assert seg["pixel_acc"].compute().item() == pytest.approx(0.5)
    acc = create_task("classification").metrics()["accuracy"]
    acc.update(torch.full((4, 3), float("nan")), torch.tensor([0, 0, 1, 2]))
    assert acc.compute().item() == 0.0


def test_depth_delta_thresholds_by_hand():
    """δ_k: share of valid pixels with max(p/t, t/p) < 1.25^k; p ≤ 0 or NaN never within."""
    task = create_task("depth", metrics=["delta1", "delta2", "delta3", "rmse"])
    assert task.directions == {"delta1": True, "delta2": True, "delta3": True, "rmse": False}
    m = task.metrics()
    t = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0]).view(1, 1, 2, 3)    # last pixel invalid
    p = torch.tensor([1.2, 1.5, 1.9, -1.0, float("nan"), 5.0]).view(1, 1, 2, 3)
    for metric in m.values():
        metric.update(p, t)
    # ratios 1.2, 1.5, 1.9, (p<0), (NaN): δ1 1/5, δ2 (1.5625) 2/5, δ3 (1.953) 3/5
    assert m["delta1"].compute().item() == pytest.approx(1 / 5)
    assert m["delta2"].compute().item() == pytest.approx(2 / 5)
    assert m["delta3"].compute().item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="delta4"):
        create_task("depth", metrics=["delta4"])


def test_class_scores_of_another_shape_are_refused_not_broadcast():
    """4 score rows against 1 target once counted 4 correct out of 1 (accuracy 4.0)."""
    acc = create_task("classification", num_classes=3).metrics()["accuracy"]
    with pytest.raises(ValueError, match=r"predictions \(4, 3\) do not match target \(1,\)"):
        acc.update(torch.tensor([[1.0, 0, 0]] * 4), torch.tensor([0]))
    seg = create_task("semseg", num_classes=3).metrics()
    for m in seg.values():  # pixel_acc broadcast (2, 1, 4) over (2, 5, 4); miou raised a raw IndexError
        with pytest.raises(ValueError, match=r"predictions \(2, 3, 1, 4\) do not match target \(2, 5, 4\)"):
            m.update(torch.randn(2, 3, 1, 4), torch.zeros(2, 5, 4, dtype=torch.long))
    assert acc.total == 0 and seg["pixel_acc"].total == 0


def test_accuracy_refuses_labels_outside_the_classes_like_miou():
    acc = create_task("classification", num_classes=3).metrics()["accuracy"]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or equal ignore_index=-100, got \[9\]$"):
        acc.update(torch.tensor([[1.0, 0, 0]]), torch.tensor([9]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        acc.update(torch.tensor([3]), torch.tensor([0]))  # a predicted label, passed directly
    acc.update(torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), torch.tensor([0, -100]))  # ignored target allowed
    acc.update(torch.full((1, 3), float("nan")), torch.tensor([1]))  # no prediction: wrong, not refused
    assert (acc.correct.item(), acc.total.item()) == (1, 2)
    pix = create_task("semseg", num_classes=3).metrics()["pixel_acc"]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\) or equal ignore_index=255"):
        pix.update(torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 7]]]))
