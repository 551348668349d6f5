"""The local HF-dataset datamodule (``hf_local``): formats, carving, bad input, the CLI (all tiny)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtl.data import HFImageDataModule, create_datamodule


def _tiny_hf(n, seed):
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 20, 20, 3), dtype=np.uint8)
    masks = rng.integers(0, 4, (n, 20, 20), dtype=np.uint8)
    return imgs, masks, {
        "img": [PILImage.fromarray(x) for x in imgs],
        "mask": [PILImage.fromarray(m) for m in masks],
        "label": rng.integers(0, 3, n).tolist(),
        "score": rng.normal(size=n).astype(np.float32).tolist(),
    }


def test_hf_local_save_to_disk_round_trip(tmp_path):
    from datasets import Dataset, DatasetDict, Features, Image, Value

    feats = Features({"img": Image(), "mask": Image(), "label": Value("int64"), "score": Value("float32")})
    parts = {sp: _tiny_hf(n, i) for i, (sp, n) in enumerate([("train", 10), ("validation", 4), ("test", 3)])}
    DatasetDict({sp: Dataset.from_dict(d, features=feats) for sp, (_, _, d) in parts.items()}).save_to_disk(
        str(tmp_path / "dd"))
    cols = {"label": "classification", "mask": "semseg", "score": "regression"}
    dm = create_datamodule("hf_local", path=tmp_path / "dd", image_column="img", columns=cols, batch_size=4)
    dm.setup()
    b = next(iter(dm.val_dataloader()))
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 3, 20, 20)
    imgs, masks, d = parts["validation"]
    assert torch.equal(b["image"], torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert torch.equal(b["semseg"], torch.from_numpy(masks).long())
    assert torch.equal(b["classification"], torch.tensor(d["label"]))
    assert b["regression"].shape == (4, 1) and torch.allclose(b["regression"][:, 0], torch.tensor(d["score"]))
    assert len(dm.dataset("train")) == 10 and len(dm.dataset("test")) == 3
    info = dm.info
    assert info["image_size"] == 20 and info["semseg_classes"] <= 4 and info["classification_classes"] <= 3

    # resized: bilinear for the image, nearest for the label map
    small = HFImageDataModule(tmp_path / "dd", image_column="img", columns=cols, size=8)
    s = small.dataset("train")[0]
    assert s["image"].shape == (3, 8, 8) and s["semseg"].shape == (8, 8)
    assert set(s["semseg"].unique().tolist()) <= set(np.unique(parts["train"][1][0]).tolist())


def test_hf_local_parquet_arrays_and_carving(tmp_path):
    from datasets import Array3D, Dataset, Features, Value

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 12, 12, 3), dtype=np.uint8)
    feats = Features({"pixels": Array3D((12, 12, 3), "uint8"), "y": Value("int64")})
    ds = Dataset.from_dict({"pixels": imgs, "y": np.arange(30) % 3}, features=feats)
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    dm = HFImageDataModule(tmp_path / "pq", image_column="pixels", columns={"y": "classification"},
                           val_fraction=0.2, test_fraction=0.1, size=6)
    dm.setup()
    n = {sp: len(dm.dataset(sp)) for sp in ("train", "val", "test")}
    assert n == {"train": 21, "val": 6, "test": 3}
    tr = dm.dataset("train").tensors
    assert tr["image"].shape == (21, 3, 6, 6) and tr["image"].dtype == torch.uint8
    # carved splits are disjoint and cover every row once
    ys = torch.cat([dm.dataset(sp).tensors["classification"] for sp in n])
    assert sorted(ys.tolist()) == sorted((np.arange(30) % 3).tolist())


def test_hf_local_bad_input(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        HFImageDataModule(missing).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        HFImageDataModule(tmp_path / "empty").setup()
    from datasets import Array3D, Dataset, Features

    Dataset.from_dict({"pixels": np.zeros((4, 2, 2, 3), np.uint8)},
                      features=Features({"pixels": Array3D((2, 2, 3), "uint8")})).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(KeyError, match="'image'"):
        HFImageDataModule(tmp_path / "d").setup()
    with pytest.raises(KeyError, match="no split 'dev'"):
        HFImageDataModule(tmp_path / "d", image_column="pixels", splits={"val": "dev"}).setup()


def test_hf_local_has_a_config_file_for_the_cli(tmp_path):
    """``data=hf_local`` composes from configs/data/hf_local.yaml and trains end to end."""
    import inspect

    from datasets import Array3D, Dataset, Features, Value

    from mtl.cli.in_process import compose_in_process
    from mtl.train import run

    rng = np.random.default_rng(0)
    feats = Features({"pixels": Array3D((16, 16, 3), "uint8"), "y": Value("int64")})
    Dataset.from_dict({"pixels": rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), "y": np.arange(40) % 3},
                      features=feats).save_to_disk(str(tmp_path / "ds"))
    cfg, _ = compose_in_process("mtl.configs", "train", ["data=hf_local", f"data.path={tmp_path / 'ds'}"])
    params = set(inspect.signature(HFImageDataModule).parameters)
    assert set(cfg.data) - {"name"} <= params  # every key of the file is an argument of the module
    run_dir = run(["data=hf_local", f"data.path={tmp_path / 'ds'}", "data.image_column=pixels",
                   "data.columns={y: classification}", "task=classification", "backbone=test_resnet",
                   "decoder.channels=8", "trainer.max_epochs=1", "data.batch_size=8", "viz.num_samples=0",
                   "logger=none", "~callbacks.progress_bar", "log_weights_every=0"], run_dir=tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == {"classification"} and metrics["global_steps"] == 4  # 32 train rows / 8


def _save(path, **cols):
    from datasets import Dataset

    Dataset.from_dict(cols).save_to_disk(str(path))
    return path


SMOKE = ["backbone=test_resnet", "decoder.channels=8", "viz.num_samples=0", "logger=none",
         "~callbacks.progress_bar", "log_weights_every=0"]


def test_cli_takes_the_class_count_from_the_data_and_runs_with_debug_smoke(tmp_path):
    """The classification task config leaves num_classes to the data (10 here, not scenes' 3), and
    ``debug=smoke``'s data.size / n_* settings are hf_local arguments too."""
    import mtl
    from mtl.train import run

    rng = np.random.default_rng(0)
    ds = _save(tmp_path / "ds", img=rng.integers(0, 256, (60, 20, 20, 3), dtype=np.uint8).tolist(),
               label=(np.arange(60) % 10).tolist())
    run_dir = run(["data=hf_local", f"data.path={ds}", "data.image_column=img", "data.columns={label: classification}",
                   "task=classification", "debug=smoke", *SMOKE], run_dir=tmp_path / "run")
    model = mtl.load_model(run_dir / "model")
    assert model.tasks["classification"].num_classes == 10
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["classification"]
    with pytest.raises(ValueError, match=r"task.classification.num_classes=4 but the data has 10 classes"):
        run(["data=hf_local", f"data.path={ds}", "data.image_column=img", "data.columns={label: classification}",
             "task=classification", "task.classification.num_classes=4", "debug=smoke", *SMOKE],
            run_dir=tmp_path / "small")


def test_a_task_without_a_column_is_refused_before_training(tmp_path):
    from mtl.train import run

    ds = _save(tmp_path / "ds", img=np.zeros((20, 8, 8, 3), np.uint8).tolist(), label=(np.arange(20) % 2).tolist())
    with pytest.raises(ValueError, match=r"hf_local .*task\(s\) 'depth' have no targets.*\['classification'\]"):
        run(["data=hf_local", f"data.path={ds}", "data.image_column=img", "data.columns={label: classification}",
             "task=[classification,depth]", "debug=smoke", *SMOKE], run_dir=tmp_path / "run")
    # a class-count task without its column: the missing column is named, not a missing class count
    with pytest.raises(ValueError, match=r"task 'semseg' has no targets in this data \(no 'semseg'\); it provides "
                                         r"\['classification'\]"):
        run(["data=hf_local", f"data.path={ds}", "data.image_column=img", "data.columns={label: classification}",
             "task=semseg", "debug=smoke", *SMOKE], run_dir=tmp_path / "run2")


def test_label_maps_must_match_their_images(tmp_path):
    img = np.zeros((6, 8, 8, 3), np.uint8).tolist()
    half = _save(tmp_path / "half", img=img, mask=np.zeros((6, 4, 4), np.uint8).tolist())
    with pytest.raises(ValueError, match=r"column 'mask' \(semseg\) of split 'train' holds a \(4, 4\) map for a "
                                         r"\(8, 8\) image in row 0; set data.size"):
        HFImageDataModule(half, image_column="img", columns={"mask": "semseg"}).setup()
    rgb = _save(tmp_path / "rgb", img=img, mask=np.zeros((6, 8, 8, 3), np.uint8).tolist())
    with pytest.raises(ValueError, match=r"column 'mask' \(semseg\) of split 'train' has 3 channels.*not an RGB colour "
                                         r"map"):
        HFImageDataModule(rgb, image_column="img", columns={"mask": "semseg"}).setup()
    # data.size resizes both, so a smaller map is fine then
    dm = HFImageDataModule(half, image_column="img", columns={"mask": "semseg"}, size=4)
    assert dm.dataset("train").tensors["semseg"].shape[-2:] == (4, 4)


@pytest.mark.parametrize("column, key, held", [("label", "semseg", "one value"), ("label", "depth", "one value"),
                                               ("score", "edges", "a 5-vector")])
def test_a_per_row_column_mapped_to_a_dense_key_is_named_as_such(tmp_path, column, key, held):
    """A class column mapped to semseg said "has 6 channels per pixel (shape ())": 6 was the row count. The
    error now says what the column holds per row, naming the column and the split."""
    rng = np.random.default_rng(0)
    ds = _save(tmp_path / "d", image=rng.integers(0, 256, (6, 8, 10, 3)).tolist(), label=[0, 1, 2, 0, 1, 2],
               score=rng.random((6, 5)).tolist())
    with pytest.raises(ValueError, match=rf"^hf_local: column '{column}' \({key}\) of split 'train' holds {held} per "
                                         rf"row .*where {key} needs an \(H, W\) map per row$"):
        create_datamodule("hf_local", path=ds, columns={column: key}).setup()


@pytest.mark.parametrize("as_image", [False, True])
def test_a_transposed_label_map_is_refused_even_when_resized(tmp_path, as_image):
    """The size check runs on the maps as stored: resizing both to data.size would hide a (W, H) mask."""
    from PIL import Image as PILImage

    img = np.zeros((3, 12, 16, 3), np.uint8)
    mask = np.zeros((3, 16, 12), np.uint8)
    if as_image:
        import datasets

        rows = {"img": [PILImage.fromarray(a) for a in img], "mask": [PILImage.fromarray(m) for m in mask]}
        path = tmp_path / "img_ds"
        datasets.Dataset.from_dict(rows, features=datasets.Features(
            {"img": datasets.Image(), "mask": datasets.Image()})).save_to_disk(str(path))
    else:
        path = _save(tmp_path / "arr", img=img.tolist(), mask=mask.tolist())
    for size in (None, 8, [6, 8]):
        with pytest.raises(ValueError, match=r"holds a \(16, 12\) map for a \(12, 16\) image in row 0; its aspect "
                                             r"differs"):
            HFImageDataModule(path, image_column="img", columns={"mask": "semseg"}, size=size).setup()


def test_column_errors_name_the_column(tmp_path):
    ragged = _save(tmp_path / "ragged", img=np.zeros((4, 5, 5, 3), np.uint8).tolist(), y=[[1.0], [1.0, 2.0], [0.0], [1.0]])
    with pytest.raises(ValueError, match=r"column 'y' .*different lengths"):
        HFImageDataModule(ragged, image_column="img", columns={"y": "regression"}).setup()
    holes = _save(tmp_path / "holes", img=np.zeros((4, 5, 5, 3), np.uint8).tolist(), y=[1, None, 0, 1])
    with pytest.raises(ValueError, match=r"column 'y' .*missing values"):
        HFImageDataModule(holes, image_column="img", columns={"y": "classification"}).setup()


def test_split_mapping_and_fractions(tmp_path):
    from datasets import Dataset, DatasetDict

    def part(n, y0):
        return Dataset.from_dict({"img": np.zeros((n, 5, 5, 3), np.uint8).tolist(), "y": [y0] * n})

    DatasetDict({"train": part(10, 0), "validation": part(10, 1), "test": part(4, 2)}).save_to_disk(str(tmp_path / "dd"))
    dm = HFImageDataModule(tmp_path / "dd", image_column="img", columns={"y": "classification"},
                           splits={"train": "validation"}, val_fraction=0.2)
    # val is carved from the mapped train split, not the same 'validation' rows again
    assert len(dm.dataset("train")) == 8 and len(dm.dataset("val")) == 2
    with pytest.raises(ValueError, match=r"has no val split and val_fraction=0"):
        HFImageDataModule(tmp_path / "dd", image_column="img", splits={"train": "validation"},
                          val_fraction=0).setup()
    with pytest.raises(ValueError, match="val_fraction must be in"):
        HFImageDataModule(tmp_path / "dd", val_fraction=1.5)
    small = HFImageDataModule(tmp_path / "dd", image_column="img", n_train=3, n_test=1)
    assert [len(small.dataset(s)) for s in ("train", "val", "test")] == [3, 10, 1]


def test_parquet_image_structs_without_metadata_are_decoded(tmp_path):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image as PILImage

    rng = np.random.default_rng(1)
    arrays = rng.integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    blobs = []
    for a in arrays:
        buf = io.BytesIO()
        PILImage.fromarray(a).save(buf, format="PNG")
        blobs.append({"bytes": buf.getvalue(), "path": None})
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"image": blobs, "y": list(range(5))}), tmp_path / "pq" / "train.parquet")
    dm = HFImageDataModule(tmp_path / "pq", columns={"y": "classification"}, val_fraction=0.2, test_fraction=0.2)
    got = torch.cat([dm.dataset(s).tensors["image"] for s in ("train", "val", "test")])
    order = torch.cat([dm.dataset(s).tensors["classification"] for s in ("train", "val", "test")])
    assert torch.equal(got, torch.from_numpy(arrays[order.numpy()]).permute(0, 3, 1, 2))


def test_resized_label_maps_stay_on_their_images_pixels(tmp_path):
    """6x6 -> 2x2, a step after column 3: output column 1 is centred on source column 4 (dark, the
    image 96 there); the mask and depth take that pixel, not column 3 as plain "nearest" did."""
    img = np.zeros((4, 6, 6, 3), np.uint8)
    img[:, :, :4] = 255
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[:, :, :4] = 1
    ds = _save(tmp_path / "ds", img=img.tolist(), mask=mask.tolist(), d=(mask + 1.0).tolist())
    t = HFImageDataModule(ds, image_column="img", columns={"mask": "semseg", "d": "depth"}, size=2,
                          val_fraction=0.25, test_fraction=0.25).dataset("train").tensors
    assert t["image"][0, 0, 0].tolist() == [255, 96]
    assert t["semseg"][0, 0].tolist() == [1, 0] and t["depth"][0, 0, 0].tolist() == [2.0, 1.0]


def test_8bit_normals_keep_all_zero_pixels_invalid(tmp_path):
    """(0, 0, 0) is the invalid mark of 8-bit normal maps; mapped to [−1, 1] it became the valid
    normal (−1, −1, −1)/√3. Other pixels are mapped and renormalised: (255, 0, 0) -> (1, −1, −1)/√3."""
    from datasets import Dataset, Features, Image
    from PIL import Image as PILImage

    nrm = np.zeros((2, 2, 3), np.uint8)
    nrm[0, 1] = (255, 0, 0)
    n = 4
    Dataset.from_dict({"img": [PILImage.fromarray(np.zeros((2, 2, 3), np.uint8))] * n,
                       "nrm": [PILImage.fromarray(nrm)] * n},
                      features=Features({"img": Image(), "nrm": Image()})).save_to_disk(str(tmp_path / "ds"))
    t = HFImageDataModule(tmp_path / "ds", image_column="img", columns={"nrm": "normals"}, val_fraction=0.25,
                          test_fraction=0.25).dataset("train").tensors["normals"][0]
    assert t[:, 0, 0].tolist() == [0.0, 0.0, 0.0] and t[:, 1, :].abs().sum() == 0
    assert torch.allclose(t[:, 0, 1], torch.tensor([1.0, -1.0, -1.0]) / 3 ** 0.5)


def test_float_normals_must_be_unit_vectors(tmp_path):
    """Stored as numbers (not an 8-bit image), normals are taken as given: unit vectors (all-zero =
    invalid) load unchanged; another encoding, e.g. (n + 1) / 2 in [0, 1], is refused naming the column."""
    img = np.zeros((4, 2, 2, 3), np.uint8).tolist()
    unit = np.zeros((4, 2, 2, 3), np.float32)
    unit[..., 2] = 1.0
    unit[:, 0, 0] = 0.0  # invalid pixel
    kw = dict(image_column="img", columns={"n": "normals"}, val_fraction=0.25, test_fraction=0.25)
    t = HFImageDataModule(_save(tmp_path / "ok", img=img, n=unit.tolist()), **kw).dataset("train").tensors["normals"]
    assert t[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0] and t[0, :, 1, 1].tolist() == [0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"hf_local: column 'n' \(normals\) of split .*off unit length by 0\.225"):
        HFImageDataModule(_save(tmp_path / "enc", img=img, n=((unit + 1) / 2).tolist()), **kw).dataset("train")


def test_label_values_are_checked_not_passed_on(tmp_path):
    """Semseg −1 (the common ignore mark) becomes the ignore index 255; a class id at or past the
    given class count, a negative id, a fraction or a string column raise naming column and split."""
    img = np.zeros((4, 2, 2, 3), np.uint8).tolist()
    kw = dict(image_column="img", val_fraction=0.25, test_fraction=0.25)
    sem = np.zeros((4, 2, 2), np.int64)
    sem[:, 0, 0], sem[:, 1, 1] = -1, 2
    dm = HFImageDataModule(_save(tmp_path / "ok", img=img, m=sem.tolist()), columns={"m": "semseg"}, **kw)
    assert dm.dataset("train").tensors["semseg"][0].tolist() == [[255, 0], [0, 2]] and dm.info["semseg_classes"] == 3
    with pytest.raises(ValueError, match=r"column 'm' \(semseg\) of split 'train' holds 2, outside 0\.\.1 "
                                         r"\(semseg_classes=2; −1 and 255 mark ignored pixels\)"):
        HFImageDataModule(tmp_path / "ok", columns={"m": "semseg"}, semseg_classes=2, **kw).setup()
    sem[0, 0, 1] = -2
    with pytest.raises(ValueError, match=r"column 'm' \(semseg\) of split 'train' holds -2, below 0"):
        HFImageDataModule(_save(tmp_path / "neg", img=img, m=sem.tolist()), columns={"m": "semseg"}, **kw).setup()
    with pytest.raises(ValueError, match=r"column 'm' \(semseg\) of split 'train' holds -0\.5; semseg needs whole"):
        HFImageDataModule(_save(tmp_path / "half", img=img, m=(sem + 0.5).tolist()), columns={"m": "semseg"},
                          **kw).setup()
    with pytest.raises(ValueError, match=r"column 'y' \(classification\) of split 'train' holds 3, outside 0\.\.2 "
                                         r"\(classification_classes=3\)"):
        HFImageDataModule(_save(tmp_path / "c", img=img, y=[0, 1, 3, 2]), columns={"y": "classification"},
                          classification_classes=3, **kw).setup()
    with pytest.raises(ValueError, match=r"column 'y' of split 'train' holds .* values \(e\.g\. 'a'\), not numbers"):
        HFImageDataModule(_save(tmp_path / "s", img=img, y=list("abcd")), columns={"y": "classification"},
                          **kw).setup()


def test_unlabelled_classification_rows_are_refused_naming_the_split(tmp_path):
    """HF test splits often hold −1 (no label); taken as a class id it broke the loss or the metrics."""
    from datasets import Dataset, DatasetDict

    def part(ys):
        return Dataset.from_dict({"img": np.zeros((len(ys), 2, 2, 3), np.uint8).tolist(), "y": ys})

    DatasetDict({"train": part([0, 1, 2, 1]), "validation": part([0, 1]), "test": part([-1, -1])}).save_to_disk(
        str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"column 'y' \(classification\) of split 'test' holds −1 in 2 of 2 rows"):
        HFImageDataModule(tmp_path / "dd", image_column="img", columns={"y": "classification"}).setup()


def test_a_classification_column_holds_one_id_per_row(tmp_path):
    """An (N, 2) column was flattened to 2N labels: row i got the labels of rows 2i and 2i+1 / 2,
    misaligned without an error. (N,) and (N, 1) are accepted."""
    img = np.zeros((4, 2, 2, 3), np.uint8)
    img[:, 0, 0, 0] = np.arange(4)  # the row id, to follow rows through the carving
    kw = dict(image_column="img", columns={"y": "classification"}, val_fraction=0.25, test_fraction=0.25)
    two = _save(tmp_path / "two", img=img.tolist(), y=[[i % 3, (i + 1) % 3] for i in range(4)])
    with pytest.raises(ValueError, match=r"column 'y' \(classification\) of split 'train' has shape \(4, 2\); "
                                         r"classification needs one class id per row"):
        HFImageDataModule(two, **kw).setup()
    t = HFImageDataModule(_save(tmp_path / "one", img=img.tolist(), y=[[i % 3] for i in range(4)]),
                          **kw).dataset("train").tensors
    assert t["classification"].tolist() == (t["image"][:, 0, 0, 0] % 3).tolist()


def test_two_columns_for_one_batch_key_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"column 'a' and column 'b' both map to batch key 'regression'"):
        HFImageDataModule(tmp_path, columns={"a": "regression", "b": "regression"})
    with pytest.raises(ValueError, match=r"image_column 'img' and column 'pic' both map to batch key 'image'"):
        HFImageDataModule(tmp_path, image_column="img", columns={"pic": "image"})


def test_a_none_row_in_a_list_column_is_named_as_missing(tmp_path):
    img = np.zeros((4, 5, 5, 3), np.uint8).tolist()
    row = _save(tmp_path / "row", img=img, y=[[1.0, 2.0], None, [0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"column 'y' .*row 1 is missing \(None\)"):
        HFImageDataModule(row, image_column="img", columns={"y": "regression"}).setup()
    entry = _save(tmp_path / "entry", img=img, y=[[1.0, 2.0], [0.0, 1.0], [0.0, None], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"column 'y' .*row 2 has a missing \(None\) entry"):
        HFImageDataModule(entry, image_column="img", columns={"y": "regression"}).setup()


def _images(path, img, **cols):
    """The train split's rows as its batches carry them (label maps may be stored smaller)."""
    train = HFImageDataModule(_save(path, img=img, **cols), image_column="img", columns={k: k2 for k, k2 in
                              {"e": "edges", "d": "depth", "r": "regression", "y": "classification"}.items() if k in cols},
                              val_fraction=0.25, test_fraction=0.25).dataset("train")
    return train.__getitems__(range(len(train)))


def test_numeric_images_are_scaled_or_refused_never_clipped(tmp_path):
    # one random image four times: the splits are carved at random, the train rows are still this image
    base = np.repeat(np.random.default_rng(0).integers(0, 256, (1, 2, 3, 3)).astype(np.uint8), 4, 0)
    want = torch.from_numpy(base).permute(0, 3, 1, 2)[:2]
    y = [0, 1, 0, 1]
    assert torch.equal(_images(tmp_path / "f01", (base / 255).astype(np.float32).tolist(), y=y)["image"], want)
    assert torch.equal(_images(tmp_path / "f255", base.astype(np.float32).tolist(), y=y)["image"], want)
    grey = _images(tmp_path / "g1", base[..., :1].tolist(), y=y)["image"]  # (H, W, 1): repeated to RGB
    assert grey.shape == (2, 3, 2, 3) and torch.equal(grey[:, 1], want[:, 0])
    rgba = np.concatenate([base, np.full((4, 2, 3, 1), 7, np.uint8)], -1)
    assert torch.equal(_images(tmp_path / "rgba", rgba.tolist(), y=y)["image"], want)  # alpha dropped
    with pytest.raises(ValueError, match=r"image column 'img' of split 'train' holds negative pixel values .*normalised"):
        _images(tmp_path / "norm", ((base / 255 - 0.5) / 0.25).astype(np.float32).tolist(), y=y)
    with pytest.raises(ValueError, match=r"image column 'img' .* holds int64 pixel values in 79\.\.3983; images are 8-bit"):
        _images(tmp_path / "u16", (base.astype(np.int64) * 16 + 15).tolist(), y=y)
    with pytest.raises(ValueError, match=r"image column 'img' .* has shape \(2, 3, 5\) per image"):
        _images(tmp_path / "c5", np.zeros((4, 2, 3, 5), np.uint8).tolist(), y=y)


def test_edge_masks_of_0_255_read_as_0_1_and_other_values_are_refused(tmp_path):
    img = np.zeros((4, 2, 2, 3), np.uint8).tolist()
    e = np.zeros((4, 2, 2), np.uint8)
    e[:, 0, 1] = 255
    t = _images(tmp_path / "e255", img, e=e.tolist())["edges"]
    assert t.dtype == torch.float32 and t[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert torch.equal(_images(tmp_path / "e01", img, e=(e // 255).tolist())["edges"], t)
    with pytest.raises(ValueError, match=r"column 'e' \(edges\) of split 'train' holds values in 0\.\.3; edges need 1 = boundary"):
        _images(tmp_path / "e3", img, e=(e % 4).tolist())


def test_missing_depth_is_invalid_and_missing_regression_is_refused(tmp_path):
    img = np.zeros((4, 2, 2, 3), np.uint8).tolist()
    d = np.ones((4, 2, 2), np.float32)
    d[:, 1, 1] = np.nan
    t = _images(tmp_path / "d", img, d=d.tolist())["depth"]
    assert t[0, 0].tolist() == [[1.0, 1.0], [1.0, 0.0]]  # NaN -> 0, the invalid mark the depth metrics skip
    with pytest.raises(ValueError, match=r"column 'r' \(regression\) of split 'train' holds a missing value .* row 2"):
        _images(tmp_path / "r", img, r=[[1.0], [2.0], [float("nan")], [3.0]])


def test_size_as_h_w_and_the_reported_image_size(tmp_path):
    """[H, W] resizes to H x W, as for the benchmark modules; info reports an int when square, [H, W] otherwise.
    A Image column (PIL, sizes (W, H)) and a numeric one land on the same shape."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    pics = [PILImage.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(6)]
    Dataset.from_dict({"img": pics, "y": [0, 1, 2] * 2}, features=Features({"img": Image(), "y": Value("int64")})
                      ).save_to_disk(str(tmp_path / "pil"))
    arr = _save(tmp_path / "arr", img=rng.integers(0, 256, (6, 24, 32, 3)).tolist(), y=[0, 1, 2] * 2)
    for path in (tmp_path / "pil", arr):
        kw = dict(image_column="img", columns={"y": "classification"}, val_fraction=0.2, test_fraction=0.2)
        assert HFImageDataModule(path, **kw).info["image_size"] == [24, 32]
        dm = HFImageDataModule(path, size=[12, 20], **kw)
        assert dm.dataset("train").tensors["image"].shape[-2:] == (12, 20) and dm.info["image_size"] == [12, 20]
        assert HFImageDataModule(path, size=10, **kw).info["image_size"] == 10


@pytest.mark.parametrize("kw, match", [
    ({"size": [16, 24, 3]}, r"data\.size must be null \(as stored\), a positive int \(a square side\) or \[H, W\]"),
    ({"size": 0}, r"data\.size must be null .*got 0"),
    ({"n_train": 2.5}, r"hf_local: data\.n_train must be an int >= 1 or null \(all rows\), got 2\.5"),
    ({"n_test": 0}, r"hf_local: data\.n_test must be an int >= 1 or null"),
])
def test_bad_sizes_and_limits_are_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        HFImageDataModule(tmp_path, **kw)


def test_wide_pil_images_are_judged_by_their_values_not_clipped(tmp_path):
    """16-bit images loaded all white and float [0, 1] images all black through PIL's RGB conversion."""
    from datasets import Dataset, Features, Image, Value
    from PIL import Image as PILImage

    def save(name, img):
        Dataset.from_dict({"image": [img] * 10, "label": [0, 1] * 5},
                          features=Features({"image": Image(), "label": Value("int64")})).save_to_disk(str(tmp_path / name))
        return create_datamodule("hf_local", path=str(tmp_path / name), columns={"label": "classification"})

    wide = np.full((8, 8), 40000, np.uint16)
    wide[:4] = 1000
    with pytest.raises(ValueError, match=r"image column 'image' of split 'train' holds int32 pixel values in 1000..40000"):
        save("u16", PILImage.fromarray(wide)).setup()
    ramp = np.tile(np.linspace(0, 1, 8, dtype=np.float32), (8, 1))
    dm = save("f32", PILImage.fromarray(ramp, mode="F"))
    dm.setup()
    got = dm.dataset("train").tensors["image"][0]
    assert torch.equal(got[0, 0], torch.from_numpy(np.round(ramp[0] * 255).astype(np.uint8)))  # scaled, as arrays are
    low = save("u16low", PILImage.fromarray(np.full((8, 8), 200, np.uint16)))
    low.setup()
    assert low.dataset("train").tensors["image"].unique().tolist() == [200]


def test_a_saved_split_of_zero_rows_is_named(tmp_path):
    from datasets import Dataset, DatasetDict

    def rows(n):
        return Dataset.from_dict({"image": [np.zeros((4, 4, 3), np.uint8)] * n, "label": [0] * n})

    DatasetDict({"train": rows(10), "validation": rows(2), "test": rows(0)}).save_to_disk(str(tmp_path / "p"))
    with pytest.raises(ValueError, match=r"cannot be loaded: split\(s\) \['test'\] hold 0 rows"):  # was IndexError
        create_datamodule("hf_local", path=str(tmp_path / "p"), columns={"label": "classification"}).setup()


def test_a_class_label_column_gives_its_declared_class_count(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    feats = Features({"image": Image(), "label": ClassLabel(names=["a", "b", "c", "d", "e"])})
    Dataset.from_dict({"image": [PILImage.new("RGB", (4, 4))] * 6, "label": [0, 1, 2] * 2},
                      features=feats).save_to_disk(str(tmp_path / "c"))
    dm = create_datamodule("hf_local", path=str(tmp_path / "c"), columns={"label": "classification"})
    assert dm.info["classification_classes"] == 5  # not 3, the largest label seen + 1


def _image_ds(path, images, masks):
    import datasets

    datasets.Dataset.from_dict({"img": images, "mask": masks}, features=datasets.Features(
        {"img": datasets.Image(), "mask": datasets.Image()})).save_to_disk(str(path))
    return path


def test_size_h_w_and_an_image_label_column_resized_like_a_numeric_one(tmp_path):
    """data.size=[H, W] is accepted (documented), and a PNG mask picks the same source pixels as the same
    ids stored as numbers (both nearest-exact: PIL's nearest differs at half-pixel ties, 32 -> 10)."""
    from PIL import Image as PILImage

    ids = (np.arange(24 * 32).reshape(24, 32) % 251).astype(np.uint8)
    img = np.zeros((6, 24, 32, 3), np.uint8)
    png = _image_ds(tmp_path / "png", [PILImage.fromarray(a) for a in img], [PILImage.fromarray(ids)] * 6)
    arr = _save(tmp_path / "arr", img=img.tolist(), mask=np.stack([ids] * 6).tolist())
    got = {}
    for name, path in (("png", png), ("arr", arr)):
        dm = create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "semseg"}, size=[10, 10],
                               semseg_classes=251)  # through the registry's kwarg check, as the CLI
        got[name] = dm.dataset("train").tensors["semseg"]
    assert got["png"].shape[-2:] == (10, 10)
    torch.testing.assert_close(got["png"], got["arr"])
    rows = (torch.arange(10) + 0.5) * 24 / 10  # the source pixel under each output pixel's centre
    cols = (torch.arange(10) + 0.5) * 32 / 10
    want = torch.from_numpy(ids.astype(np.int64))[rows.long()][:, cols.long()]
    assert torch.equal(got["png"][0], want)


def test_missing_rows_wide_labels_and_encoded_bytes_are_named(tmp_path):
    from PIL import Image as PILImage

    from mtl.train import data_info

    img = [PILImage.fromarray(np.zeros((4, 4, 3), np.uint8))] * 3
    none_img = _image_ds(tmp_path / "none_img", [img[0], img[1], None], [PILImage.fromarray(np.zeros((4, 4), np.uint8))] * 3)
    dm = HFImageDataModule(none_img, image_column="img", columns={"mask": "semseg"})
    with pytest.raises(ValueError, match=r"image column 'img' of split 'train' has no image in row 2"):
        data_info(dm)  # not swallowed into "no info" (an AttributeError inside a property would be)
    wide = np.zeros((3, 8, 8), np.int32)
    wide[:, 0, 0] = 65535  # a 16-bit mask's ignore mark
    dm = HFImageDataModule(_save(tmp_path / "wide", img=np.zeros((3, 8, 8, 3), np.uint8).tolist(), mask=wide.tolist()),
                           image_column="img", columns={"mask": "semseg"})
    with pytest.raises(ValueError, match=r"column 'mask' \(semseg\) of split 'train' holds 65535; semseg class ids "
                                         r"lie in 0\.\.254"):
        dm.setup()
    blob = _save(tmp_path / "blob", img=[b"\xff\xd8\xff" + bytes(5000)] * 2, y=[0, 1])
    with pytest.raises(ValueError) as e:
        HFImageDataModule(blob, image_column="img", columns={"y": "classification"}).setup()
    assert len(str(e.value)) < 300 and "not numbers" in str(e.value)


def test_an_image_path_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image as PILImage

    (tmp_path / "ds" / "imgs").mkdir(parents=True)
    for i in range(4):
        PILImage.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "ds" / "imgs" / f"{i}.png")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": f"imgs/{i}.png"} for i in range(4)], type=struct),
                             "y": [0, 1, 0, 1]}), tmp_path / "ds" / "train.parquet")
    monkeypatch.chdir(tmp_path)  # relative paths resolve from here, not from the dataset folder
    with pytest.raises(ValueError, match=r"image column 'image' of split 'train': cannot read the image in row 0 "
                                         r"\(file imgs/0\.png\): .*; relative paths are read from the working directory"):
        create_datamodule("hf_local", path=tmp_path / "ds", columns={"y": "classification"}).setup()
    monkeypatch.chdir(tmp_path / "ds")
    dm = create_datamodule("hf_local", path=tmp_path / "ds", columns={"y": "classification"})
    dm.setup()
    assert dm.info["image_size"] == 8


def test_semseg_map_turns_raw_ids_into_class_ids(tmp_path):
    """Cityscapes-style labelIds -> trainIds: a list indexed by raw id; 255 entries and raw 255 are ignored;
    a raw id the map does not list is named, never passed through."""
    m = np.zeros((6, 8, 8), np.int64)
    m[:, 0, 0], m[:, 0, 1], m[:, 2, 2] = 7, 26, 255
    path = _save(tmp_path / "ds", img=np.zeros((6, 8, 8, 3), np.uint8).tolist(), mask=m.tolist())
    lut = [255] * 34
    lut[7], lut[26] = 0, 13
    dm = create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "semseg"}, semseg_map=lut)
    dm.setup()
    t = dm.dataset("train").tensors["semseg"][0]
    assert t[0, 0] == 0 and t[0, 1] == 13 and t[2, 2] == 255 and t[1, 1] == 255  # raw 0 -> ignored
    assert dm.info["semseg_classes"] == 14
    as_dict = create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "semseg"},
                                semseg_map={0: 255, 7: 0, 26: 13})
    as_dict.setup()
    assert torch.equal(as_dict.dataset("train").tensors["semseg"], dm.dataset("train").tensors["semseg"])
    with pytest.raises(ValueError, match=r"holds raw id 26, which data.semseg_map does not list"):
        create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "semseg"},
                          semseg_map={0: 255, 7: 0}).setup()
    with pytest.raises(ValueError, match=r"data.semseg_map maps 7 to 300"):
        create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "semseg"}, semseg_map={7: 300})
    with pytest.raises(ValueError, match=r"data.semseg_map is set but no column maps to semseg"):
        create_datamodule("hf_local", path=path, image_column="img", columns={"mask": "depth"}, semseg_map=lut)
