"""Serving a dataset held in memory as torch tensors: the dataset, the batch collation, the one
augmentation and the LightningDataModule base every mtlkit data module builds on.

A batch is one tensor index per key (``__getitems__``), with no per-row formatting. Batch layout
(what the task code relies on):

    image           uint8   (B, 3, H, W)
    semseg          int64   (B, H, W)
    depth           float32 (B, 1, H, W)   0 = invalid
    normals         float32 (B, 3, H, W)   unit, camera frame (x right, y down, z forward)
    edges           float32 (B, 1, H, W)   0/1
    classification  int64   (B,)
    regression      float32 (B, k)
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from mtl.registry import check_int

SPLITS = ("train", "val", "test")


class TensorDictDataset(Dataset):
    """Rows of a dict of equally long tensors; ``__getitems__`` serves a whole batch at once.

    ``cast`` maps keys to the dtype a batch should carry when storage keeps a smaller one (uint8 label
    maps become int64 / float32 per batch, which is cheap, instead of 8x the memory for the split).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        cast: Mapping[str, torch.dtype] | None = None,
        transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    ):
        lengths = {k: len(v) for k, v in tensors.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns differ in length: {lengths}")
        self.tensors = dict(tensors)
        self.cast = dict(cast or {})
        self.transform = transform
        self._len = next(iter(lengths.values()), 0)

    def __len__(self) -> int:
        return self._len

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = {}
        for k, t in self.tensors.items():
            v = t[idx]
            out[k] = v.to(self.cast[k]) if k in self.cast else v
        return self.transform(out) if self.transform is not None else out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}


def collate_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``__getitems__`` already returns the batch; module-level so worker processes can pickle it."""
    return batch


def random_hflip(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Flip half the samples left-right; dense targets follow and normals' x component changes sign.

    Dense means shaped like the image's grid: (B, H, W) or (B, C, H, W) with the image's H and W. Other
    per-sample arrays (keypoints, box lists passed through by ``hf_local``) are left as they are: a
    left-right flip of their last axis would scramble them, not mirror them."""
    first = next(iter(batch.values()))
    flip = torch.rand(len(first)) < 0.5
    if not flip.any():
        return batch
    grid = tuple(batch["image"].shape[-2:]) if "image" in batch else None
    for k, v in batch.items():
        if v.ndim >= 3 and (grid is None or tuple(v.shape[-2:]) == grid) and v.ndim <= 4:
            v[flip] = v[flip].flip(-1)
            if k == "normals":
                v[flip, 0] = -v[flip, 0]
    return batch


class TensorDataModule(LightningDataModule):
    """Shared loaders: subclasses fill ``self._data[split]`` with TensorDictDatasets in ``_load``."""

    #: the val split is the test split itself (a benchmark without a validation split): what val selects
    #: is selected on test; mtl-merge records and warns of it
    val_is_test: bool = False

    def __init__(self, batch_size: int = 32, num_workers: int = 0, augment: bool = False):
        super().__init__()
        # as Python ints: the DataLoader refuses numpy's
        self.batch_size, self.num_workers = self.check_loader_settings(batch_size=batch_size, num_workers=num_workers)
        self.augment = augment
        self._data: dict[str, TensorDictDataset] = {}

    def save_hyperparameters(self, *args: Any, frame: Any = None, **kwargs: Any) -> None:
        """Lightning's, with numpy scalars (settings `check_int` takes) recorded as Python numbers: every checkpoint
        holds them, and torch.load(weights_only=True), as mtl-train resumes, refuses numpy's."""
        from mtl.io import as_plain

        super().save_hyperparameters(*args, frame=frame or inspect.currentframe().f_back, **kwargs)
        for key, value in self.hparams.items():
            self.hparams[key] = as_plain(value)
        self._hparams_initial = copy.deepcopy(self._hparams)  # the loggers' copy (hparams.yaml) too

    @staticmethod
    def check_loader_settings(batch_size: Any = 32, num_workers: Any = 0, **_: Any) -> tuple[int, int]:
        """The loader settings every subclass takes; `mtl.data.check_datamodule` judges them before a run folder."""
        return check_int("data.batch_size", batch_size, 1), check_int("data.num_workers", num_workers, 0)

    def _load(self) -> dict[str, TensorDictDataset]:
        raise TypeError(f"{type(self).__name__} must implement _load")

    def setup(self, stage: str | None = None) -> None:
        if not self._data:  # every split at once: loading is fast and Lightning calls setup per stage
            self._data = self._load()
            if self.augment:
                self._data["train"].transform = random_hflip
        self._check_targets()

    def _check_targets(self) -> None:
        """Fail before training when a task needs a target this data lacks (the NYUv2 .mat has no
        normals; a zoo set's labels are named after it), not at the first batch with a bare KeyError."""
        tasks = getattr(getattr(self.trainer, "lightning_module", None), "tasks", None) if self.trainer else None
        provided = set(self._data["train"].tensors) - {"image"}
        missing = {name: task.target_key for name, task in dict(tasks or {}).items()
                   if task.target_key not in provided}
        if missing:
            what = ", ".join(f"{n!r}" + (f" (target {k!r})" if k != n else "") for n, k in missing.items())
            raise ValueError(f"{self.source()}: task(s) {what} have no targets in this data; it provides "
                             f"{sorted(provided)} (choose tasks with task=[...])")

    def source(self) -> str:
        """The data's name in error messages."""
        return type(self).__name__

    def dataset(self, split: str) -> TensorDictDataset:
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        self.setup()
        return self._data[split]

    def _loader_options(self, shuffle: bool) -> dict[str, Any]:
        """Extra DataLoader arguments of a subclass (a seeded generator, pin_memory, ...)."""
        return {}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.dataset(split)
        sampler = None
        if split != "train" and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # Lightning's default sampler pads every rank to the same length by repeating samples, which
            # metrics would count twice; evaluation sees each sample exactly once
            from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

            sampler = UnrepeatedDistributedSampler(data, shuffle=False)
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle if sampler is None else None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            # workers start afresh every epoch: persistent ones would carry their random streams (augmentation)
            # and draw their base seed once per run, which a resumed run cannot repeat bit for bit
            persistent_workers=False,
            **self._loader_options(shuffle),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
