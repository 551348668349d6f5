"""Calibration batches: the first few batches of a split, the same ones every call.

Extraction (``mtl-extract``) and pruning (``mtl-prune``) both score a model on a handful of batches;
the train loader shuffles without a fixed seed, so reading from it directly would make the same
command keep different experts or channels on each run."""
from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader

from mtl.registry import check_int


def check_calib_settings(split: object, n_batches: object) -> None:
    """``calib.split`` is train or val and ``calib.batches`` an int >= 1: checks that need no data, so a job can make
    them before its run folder."""
    if split not in ("train", "val"):
        raise ValueError(f"calib.split must be train or val (the test split is what the result is "
                         f"reported on), got {split!r}")
    check_int("calib.batches", n_batches, low=1)  # 1.5 once ran on 1 batch


def calibration_batches(datamodule, n_batches: int, split: str = "train") -> list[dict[str, torch.Tensor]]:
    """The first ``n_batches`` of ``split`` (train or val) in dataset order, never augmented. Never the test split: the
    result is reported on it, so calibrating there would tune to the test set. A split with fewer batches
    than asked for is an error naming both counts (a run recording calib.batches=8 must not use 4)."""
    check_calib_settings(split, n_batches)
    loader = getattr(datamodule, f"{split}_dataloader")()
    if split == "train":  # the train loader shuffles and may augment; calibration must be repeatable
        dataset = loader.dataset
        if getattr(dataset, "transform", None) is not None:  # a shallow copy: the training run keeps its flips
            dataset = copy.copy(dataset)
            dataset.transform = None
        loader = DataLoader(dataset, batch_size=loader.batch_size, shuffle=False,
                            collate_fn=loader.collate_fn, num_workers=0)
    out = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        out.append(batch)
    if len(out) < n_batches:
        raise ValueError(f"calib.batches={n_batches} but the {split} split has only {len(out)} batch(es); lower it")
    return out
