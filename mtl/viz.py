"""Pictures of predictions beside targets, one row per sample and a pair of columns per task."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mtl.modes import eval_mode


def _to_image(task, t: torch.Tensor) -> np.ndarray | None:
    """A dense map (C, H, W) -> something imshow understands; None for image-level outputs."""
    if t.ndim < 2:
        return None
    if t.ndim == 2:
        return t.float().numpy()
    if t.shape[0] == 3:  # normals in [-1, 1] -> RGB
        return ((t.float().permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)
    return t[0].float().numpy()


def _class_colours(task, target: torch.Tensor):
    """(colour map, number of classes) for a dense map of class ids (semantic segmentation): a scale from
    the pair's own min/max would give one class another colour in each row, and an ignore label of 255
    would squeeze every class into the bottom of the map. None for other tasks."""
    n = getattr(task, "num_classes", None)
    if n is None or target.ndim < 2 or target.is_floating_point():
        return None
    from matplotlib import colormaps

    cmap = colormaps["tab20" if n <= 20 else "turbo"].resampled(n).with_extremes(bad="black")
    return cmap, n


def _label(task, t: torch.Tensor, names: list[str] | None = None) -> str:
    if t.numel() == 1:
        if t.is_floating_point():
            return f"{t.item():.2f}"
        i = int(t.item())
        return names[i] if names and 0 <= i < len(names) else str(i)
    return np.array2string(t.float().numpy(), precision=2)


@torch.no_grad()
def save_predictions(model, batch: dict[str, torch.Tensor], path: str | Path, num_samples: int = 4,
                     class_names: dict[str, list[str]] | None = None) -> Path:
    """``class_names``: {task: names} for image-level class ids (the data module's ``info["<task>_names"]``)."""
    from matplotlib.figure import Figure  # object-oriented: the user's pyplot backend is untouched

    from mtl.io import atomic_path, user_path

    n = min(num_samples, batch["image"].shape[0])
    images = batch["image"][:n]
    with eval_mode(model):  # per module: a frozen-BN model stays so
        preds = model(images)
    tasks = list(model.tasks.values())
    cols = 1 + 2 * len(tasks)
    fig = Figure(figsize=(1.6 * cols, 1.7 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).cpu().numpy())
        axes[i, 0].set_title("input" if i == 0 else "", fontsize=7)
        for j, task in enumerate(tasks):
            pred = task.postprocess(preds[task.name][i : i + 1].float())[0].cpu()
            target = batch[task.target_key][i].cpu()
            pair = [_to_image(task, pred), _to_image(task, target)]
            # one colour scale per pair, so prediction and target are comparable
            lo, hi = (min(float(p.min()) for p in pair), max(float(p.max()) for p in pair)) if pair[1] is not None else (0, 1)
            classes = _class_colours(task, target)
            for k, (what, t, img) in enumerate((("pred", pred, pair[0]), ("target", target, pair[1]))):
                ax = axes[i, 1 + 2 * j + k]
                if img is None:
                    ax.text(0.5, 0.5, _label(task, t, (class_names or {}).get(task.name)), ha="center",
                            va="center", fontsize=9)
                elif img.ndim == 3:
                    ax.imshow(img)
                elif classes is not None:  # one fixed colour per class; unlabelled pixels (255) masked
                    cmap, n = classes
                    ax.imshow(np.ma.masked_outside(img, 0, n - 1), cmap=cmap, vmin=-0.5, vmax=n - 0.5,
                              interpolation="nearest")
                else:
                    ax.imshow(img, cmap="viridis", vmin=lo, vmax=hi)
                if i == 0:
                    ax.set_title(f"{task.name}\n{what}", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = user_path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path
