"""One image size (data.size=null) or aspect (an int data.size) across all splits of a dataset, not only within
each split: NYUv2/Cityscapes npy folders and hf_local (tiny fixtures built here)."""
from __future__ import annotations

import numpy as np
import pytest

from mtl.data import HFImageDataModule, create_datamodule
from tests.data.test_benchmarks import write_npy_layout


def _val_at(root, hw):
    """Every val sample of the npy layout stored at ``hw``."""
    for i in range(2):
        for sub, c in (("image", 3), ("label", 0), ("depth", 1), ("normal", 3)):
            a = np.zeros((*hw, c) if c else hw, np.float32)
            if sub == "normal":
                a[..., 2] = 1.0
            np.save(root / "val" / sub / f"{i}.npy", a)


def test_a_val_image_of_another_size_than_train_is_named_with_size_null(tmp_path):
    root = write_npy_layout(tmp_path / "nyu", hw=(6, 8))
    _val_at(root, (5, 5))
    with pytest.raises(ValueError, match=r"val/image/0\.npy: size \(5, 5\) differs from \(6, 8\) of the first image "
                                         r".*train/image/0\.npy; pass data.size"):
        create_datamodule("nyuv2", root=str(root), size=None).setup()


def test_a_val_image_of_another_aspect_than_train_is_named_with_an_int_size(tmp_path):
    root = write_npy_layout(tmp_path / "nyu", hw=(6, 8))
    _val_at(root, (5, 5))
    with pytest.raises(ValueError, match=r"val/image/0\.npy: size \(5, 5\) has another aspect than \(6, 8\) of the "
                                         r"first image .*train/image/0\.npy \(data.size=3 gives \(3, 3\), not \(3, 4\)"):
        create_datamodule("nyuv2", root=str(root), size=3).setup()
    dm = create_datamodule("nyuv2", root=str(root), size=[3, 4])  # one shape for every split: fine
    assert {tuple(dm.dataset(s).tensors["image"].shape[-2:]) for s in ("train", "test")} == {(3, 4)}


def test_hf_local_splits_of_other_image_sizes_are_named_with_size_null(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_dict({"img": np.zeros((4, 6, 8, 3), np.uint8).tolist()}),
                 "validation": Dataset.from_dict({"img": np.zeros((2, 5, 5, 3), np.uint8).tolist()})}
                ).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"^hf_local: image column 'img' of split 'validation' in .*dd' holds \(5, 5\) "
                                         r"images, split 'train' \(6, 8\) ones; pass data.size"):
        HFImageDataModule(tmp_path / "dd", image_column="img").setup()
    dm = HFImageDataModule(tmp_path / "dd", image_column="img", size=[3, 4])
    assert {tuple(dm.dataset(s).tensors["image"].shape[-2:]) for s in ("train", "val")} == {(3, 4)}



@pytest.mark.parametrize("name, kwargs, message", [
    ("scenes", {"n_val": 0}, "data.n_val must be an int >= 1, got 0"),
    ("scenes", {"size": 0}, "data.size must be an int >= 1, got 0"),
    ("scenes", {"batch_size": 0}, "data.batch_size must be an int >= 1, got 0"),
    # judged before the path: no folder is read for a limit the module would refuse
    ("hf_local", {"path": "/nonexistent/ds", "n_test": 0}, "hf_local: data.n_test must be an int >= 1 or null"),
    ("nyuv2", {"root": "/nonexistent/nyu", "num_workers": -2}, "data.num_workers must be an int >= 0, got -2"),
])
def test_split_and_loader_settings_are_judged_without_building_the_module(name, kwargs, message):
    """`check_datamodule` (what the CLIs call before a run folder) refuses what the module's constructor would."""
    from mtl.data import check_datamodule

    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        check_datamodule(name, **kwargs)
