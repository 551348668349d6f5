"""Task interface, registry, config round trip and every loss on hand-computed cases."""
import inspect
import math

import pytest
import torch

from mtl.registry import UnknownNameError
from mtl.tasks import TASKS, Task, create_task

NON_DEFAULT = {
    "classification": {"num_classes": 8, "label_smoothing": 0.1, "ignore_index": -1},
    "regression": {"out_dim": 3, "loss": "mse"},
    "semseg": {"num_classes": 7, "ignore_index": 254},
    "depth": {"metrics": ["abs_err", "abs_rel"]},
    "normals": {},
    "edges": {"tolerance": 2, "threshold": 0.3},
}


def test_base_class_is_abstract():
    with pytest.raises(TypeError):
        Task()
    assert inspect.isabstract(Task)


def test_registry_has_all_kinds():
    assert set(TASKS.names()) == set(NON_DEFAULT)
    for kind in TASKS:
        assert TASKS.get(kind).kind == kind


@pytest.mark.parametrize("kind", sorted(NON_DEFAULT))
def test_to_config_round_trip(kind):
    task = create_task(kind, name=f"my_{kind}", weight=2.5, target_key="tgt", **NON_DEFAULT[kind])
    cfg = task.to_config()
    assert cfg["kind"] == kind
    # every constructor argument must be stored, or a model folder cannot rebuild the task
    assert set(inspect.signature(type(task)).parameters) <= set(cfg)
    again = create_task(**cfg)
    assert type(again) is type(task) and again.to_config() == cfg
    assert again.name == f"my_{kind}" and again.weight == 2.5 and again.target_key == "tgt"


@pytest.mark.parametrize("kind", sorted(NON_DEFAULT))
def test_metrics_directions_primary(kind):
    task = create_task(kind)
    assert task.name == kind and task.target_key == kind
    m1, m2 = task.metrics(), task.metrics()
    assert set(m1) == set(task.directions)
    assert task.primary in task.directions
    for name, metric in m1.items():
        assert metric is not m2[name]  # fresh objects
        assert metric.higher_is_better == task.directions[name]
        for fx in metric._reductions.values():
            assert fx is not None  # every state syncs under DDP


def test_directions():
    assert create_task("classification").directions == {"accuracy": True}
    assert create_task("regression").directions == {"mae": False, "rmse": False}
    assert create_task("depth").directions == {"rmse": False, "abs_rel": False}
    assert create_task("edges").primary == "f_score"
    assert create_task("normals").primary == "mean_angle"
    assert create_task("semseg").primary == "miou"


def test_several_tasks_of_one_kind():
    a = create_task("classification", name="mnist", num_classes=10)
    b = create_task("classification", name="digits", num_classes=4, target_key="digits")
    assert (a.name, a.out_channels, a.target_key) == ("mnist", 10, "classification")
    assert (b.name, b.out_channels, b.target_key) == ("digits", 4, "digits")


def test_bad_arguments():
    with pytest.raises(UnknownNameError, match="valid names: classification, depth"):
        create_task("segmentation")
    with pytest.raises(TypeError, match="num_clases"):
        create_task("semseg", num_clases=3)
    with pytest.raises(ValueError, match="valid names: l1, mse"):
        create_task("regression", loss="huber")
    for bad in (-1, "abc", True, float("nan")):  # "abc" once failed as float("abc"), naming no key
        with pytest.raises(ValueError, match=r"task 'depth': weight must be a finite number >= 0, got"):
            create_task("depth", weight=bad)
    with pytest.raises(ValueError, match="'/'"):
        create_task("depth", name="a/b")


def test_out_channels():
    assert [create_task(k).out_channels for k in ("classification", "regression", "semseg", "depth",
                                                   "normals", "edges")] == [3, 1, 5, 1, 3, 1]
    assert not create_task("classification").dense and create_task("edges").dense


def test_classification_ce_and_label_smoothing():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1])
    logz = [math.log(math.exp(2) + 2), math.log(1 + math.e + math.exp(3))]
    nll = [logz[0] - 2.0, logz[1] - 1.0]
    task = create_task("classification")
    assert task.loss(logits, target).item() == pytest.approx(sum(nll) / 2, rel=1e-6)

    eps = 0.3  # (1 − ε)·NLL + ε·mean over classes of −log p_c
    uniform = [(3 * logz[0] - 2.0) / 3, (3 * logz[1] - 4.0) / 3]
    expected = sum((1 - eps) * n + eps * u for n, u in zip(nll, uniform)) / 2
    smooth = create_task("classification", label_smoothing=eps)
    assert smooth.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_classification_ignore_index():
    task = create_task("classification", ignore_index=-1)
    logits = torch.tensor([[2.0, 0.0, 0.0], [5.0, -5.0, 0.0]])
    assert task.loss(logits, torch.tensor([0, -1])).item() == pytest.approx(math.log(math.exp(2) + 2) - 2, rel=1e-6)
    logits.requires_grad_(True)
    loss = task.loss(logits, torch.tensor([-1, -1]))
    loss.backward()  # all ignored: zero, finite, still differentiable
    assert loss.item() == 0.0 and torch.all(logits.grad == 0)


def test_semseg_ce_ignores_255():
    task = create_task("semseg", num_classes=2)
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, :, 0, 0] = torch.tensor([1.0, 0.0])
    logits[0, :, 0, 1] = torch.tensor([-9.0, 9.0])  # labelled 255: must not count
    target = torch.tensor([[[1, 255]]])
    assert task.loss(logits, target).item() == pytest.approx(math.log(math.e + 1), rel=1e-6)
    assert task.loss(logits, torch.full((1, 1, 2), 255)).item() == 0.0


def test_semseg_ignore_index_must_lie_outside_the_classes():
    """Inside [0, C) the head still predicts that class and mIoU would average in its IoU of 0."""
    with pytest.raises(ValueError, match=r"ignore_index=0 is one of its num_classes=3 classes \[0, 3\)"):
        create_task("semseg", num_classes=3, ignore_index=0)
    for outside in (3, 255, -1):
        assert create_task("semseg", num_classes=3, ignore_index=outside).ignore_index == outside


def test_dense_shape_checks():
    with pytest.raises(ValueError, match="resolution"):
        create_task("depth").loss(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="channels"):
        create_task("semseg").loss(torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError):  # (B,1) vs (B,) would broadcast to (B,B)
        create_task("regression").loss(torch.zeros(4, 1), torch.zeros(4))


def test_regression_l1_and_mse():
    pred = torch.tensor([[1.0, 2.0], [3.0, 5.0]])
    target = torch.tensor([[0.0, 2.0], [1.0, 1.0]])  # errors 1, 0, 2, 4
    assert create_task("regression", out_dim=2).loss(pred, target).item() == pytest.approx(7 / 4)
    assert create_task("regression", out_dim=2, loss="mse").loss(pred, target).item() == pytest.approx(21 / 4)


def test_depth_l1_valid_pixels_only():
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 2.0, 5.0, 0.0]).view(1, 1, 2, 2)
    assert create_task("depth").loss(pred, target).item() == pytest.approx(1.0)  # (|2−2| + |3−5|) / 2
    pred.requires_grad_(True)
    loss = create_task("depth").loss(pred, torch.zeros(1, 1, 2, 2))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(pred.grad == 0)


def test_normals_cosine_loss():
    pred = torch.tensor([[2.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 3)
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)  # last pixel invalid
    # pixel 1: same direction (1 − 1 = 0); pixel 2: orthogonal (1 − 0 = 1); pixel 3 ignored
    assert create_task("normals").loss(pred, target).item() == pytest.approx(0.5)


def test_normals_loss_gradient_ignores_invalid_pixels_and_survives_zero_vectors():
    pred = torch.tensor([[0.0, 0, 0], [0, 3.0, 0], [0, 0, 1.0]]).T.reshape(1, 3, 1, 3).requires_grad_(True)
    target = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 0]]).T.reshape(1, 3, 1, 3)
    loss = create_task("normals").loss(pred, target)
    loss.backward()
    # a zero prediction normalises to zero (cos 0, loss 1) with a finite gradient, like F.normalize
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[..., 2] == 0)  # the invalid pixel gets no gradient
    # d/dp (1 - p_x/|p|) / 2 at p = (0, 3, 0): -(1/|p|)(e_x - p_x p/|p|^2) / 2 = (-1/6, 0, 0)
    assert pred.grad[0, :, 0, 1].tolist() == pytest.approx([-1 / 6, 0.0, 0.0])


def test_nan_targets_are_invalid_pixels_in_loss_and_gradient():
    """NaN marks a missing depth / normal (docs/tasks.md); the product-with-mask form would give NaN."""
    pred = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).requires_grad_(True)
    target = torch.tensor([float("nan"), 2.0, 5.0, 0.0]).view(1, 1, 2, 2)
    loss = create_task("depth").loss(pred, target)
    loss.backward()
    assert loss.item() == pytest.approx(1.0)  # (|2−2| + |3−5|) / 2
    assert pred.grad.view(-1).tolist() == pytest.approx([0.0, 0.0, -0.5, 0.0])  # d/dp |p−5|/2 at p = 3
    npred = torch.tensor([[2.0, 0, 0], [0, 3.0, 0]]).T.reshape(1, 3, 1, 2).requires_grad_(True)
    ntarget = torch.tensor([[1.0, 0, 0], [float("nan"), 1.0, 0]]).T.reshape(1, 3, 1, 2)
    nloss = create_task("normals").loss(npred, ntarget)
    nloss.backward()
    assert nloss.item() == pytest.approx(0.0) and torch.all(npred.grad == 0)  # only pixel 1 counts


def test_edges_class_balanced_weights_and_loss():
    from mtl.tasks.dense import EdgesTask

    target = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 2, 2)
    w = EdgesTask.balanced_weights(target)
    # beta = fraction of negatives = 3/4 weights the positives; the negatives get 1 − beta
    assert w.flatten().tolist() == [0.75, 0.25, 0.25, 0.25]
    logits = torch.tensor([0.0, 0.0, 2.0, -1.0]).view(1, 1, 2, 2)
    per_pixel = [math.log(2), math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))]
    expected = (0.75 * per_pixel[0] + 0.25 * sum(per_pixel[1:])) / 4
    assert create_task("edges").loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # no boundary pixel in the batch: beta = 1, negatives weigh 0
    assert create_task("edges").loss(logits, torch.zeros_like(target)).item() == 0.0


def test_postprocess():
    logits = torch.tensor([[0.1, 2.0, -1.0]])
    assert create_task("classification").postprocess(logits).tolist() == [1]
    seg = torch.zeros(1, 5, 2, 2)
    seg[0, 3, 0, 1] = 1
    assert create_task("semseg").postprocess(seg).tolist() == [[[0, 3], [0, 0]]]
    assert create_task("edges").postprocess(torch.zeros(1, 1, 1, 1)).item() == 0.5
    n = create_task("normals").postprocess(torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1))
    assert n.flatten().tolist() == pytest.approx([0.6, 0.0, 0.8])
    assert torch.equal(create_task("depth").postprocess(torch.ones(1, 1, 2, 2)), torch.ones(1, 1, 2, 2))


def test_classification_ignore_index_must_lie_outside_the_classes():
    """Inside [0, C) that class's images would drop out while its predictions still count against others."""
    with pytest.raises(ValueError, match=r"ignore_index=0 is one of its num_classes=3 classes \[0, 3\)"):
        create_task("classification", num_classes=3, ignore_index=0)
    assert create_task("classification", num_classes=3, ignore_index=3).ignore_index == 3


@pytest.mark.parametrize("kind, pred, target, found", [
    ("semseg", torch.zeros(1, 3, 1, 2), torch.tensor([[[0, 255]]]), "[255]"),
    ("classification", torch.zeros(2, 3), torch.tensor([0, 7]), "[7]"),
])
def test_out_of_range_labels_name_the_task_and_the_values(kind, pred, target, found):
    task = create_task(kind, num_classes=3, ignore_index=-1)
    with pytest.raises(ValueError, match=rf"task '{kind}': target labels must lie in \[0, 3\) or equal "
                                         rf"ignore_index=-1; found \{found}"):
        task.loss(pred, target)


def test_a_task_ignore_index_other_than_the_datas_mark_is_refused_before_training():
    from omegaconf import OmegaConf

    from mtl.train import build_tasks

    info = {"semseg_classes": 3, "semseg_ignore_index": 255}
    cfg = OmegaConf.create({"task": {"semseg": {"kind": "semseg", "ignore_index": -1}}})
    with pytest.raises(ValueError, match=r"task.semseg.ignore_index=-1 but this data marks unlabelled pixels 255"):
        build_tasks(cfg, info)
    cfg.task.semseg.ignore_index = 255
    assert build_tasks(cfg, info)[0].ignore_index == 255
    assert build_tasks(cfg, {"semseg_classes": 3})[0].num_classes == 3  # data without a mark: nothing to compare


def test_labels_are_checked_before_the_loss_off_the_cpu(monkeypatch):
    """On a GPU an out-of-range target is a device-side assert that breaks every later CUDA call, so the
    catch-and-name path cannot run: there the labels are checked first (forced here on the CPU)."""
    import torch.nn.functional as F

    from mtl.tasks.base import checked_cross_entropy

    real, calls = F.cross_entropy, []
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ValueError, match=r"task 'seg': target labels must lie in \[0, 3\) or equal "
                                         r"ignore_index=255; found \[4\]"):
        checked_cross_entropy("seg", torch.zeros(1, 3, 1, 2), torch.tensor([[[4, 255]]]), 3, 255, precheck=True)
    assert calls == []  # refused before the loss ran
    ok = checked_cross_entropy("seg", torch.zeros(1, 3, 1, 2), torch.tensor([[[2, 255]]]), 3, 255, precheck=True)
    assert calls == [1] and ok.item() == pytest.approx(math.log(3))


def test_float_class_targets_and_unrelated_loss_errors_are_not_mislabelled(monkeypatch):
    import torch.nn.functional as F

    task = create_task("classification", num_classes=3)
    with pytest.raises(ValueError, match=r"task 'classification': class-id targets must be integers, got torch.float32"):
        task.loss(torch.zeros(2, 3), torch.tensor([0.9, 2.5]))  # .long() would read classes 0 and 2

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(F, "cross_entropy", oom)
    with pytest.raises(RuntimeError, match="out of memory"):  # not reported as bad labels
        task.loss(torch.zeros(2, 3), torch.tensor([0, 2]))
