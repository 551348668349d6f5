"""hf_local column decoding on hand-made pixels: channel layouts, unreadable rows, empty or mismatched parquet
splits, binary 0/255 masks, integer depth units (tiny datasets built in each test)."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from mtl.data import HFImageDataModule, create_datamodule


def _png(a: np.ndarray) -> dict:
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(a).save(buf, "PNG")
    return {"bytes": buf.getvalue(), "path": None}


def _save(path, columns: dict, features: dict | None = None) -> str:
    from datasets import Dataset, Features

    Dataset.from_dict(columns, features=Features(features) if features else None).save_to_disk(str(path))
    return str(path)


def _train_row(path, **kw) -> dict:
    """Row 0 of the train split: with no val/test split and no fractions, train keeps every row in order."""
    dm = create_datamodule("hf_local", path=path, val_fraction=0.25, test_fraction=0.25, seed=0, **kw)
    dm.setup()
    return dm.dataset("train")[0]


# -- channel layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("h", [1, 3, 4])
def test_png_images_of_height_1_3_4_keep_their_pixels(tmp_path, h):
    """A decoded PNG is (H, W, C) whatever H is: pixel (y, x) of channel c is the stored one."""
    from datasets import Image

    pixels = np.arange(h * 8 * 3, dtype=np.uint8).reshape(h, 8, 3)
    path = _save(tmp_path / "ds", {"image": [_png(pixels)] * 4}, {"image": Image()})
    got = _train_row(path)["image"].numpy()
    assert got.shape == (3, h, 8)
    assert (got == pixels.transpose(2, 0, 1)).all()


def test_png_and_numeric_image_agree_when_resized_to_height_4(tmp_path):
    """The auditor's case: 8x8 RGB resized to 4x4. Red grows down the rows, green along the columns and blue is
    constant, so whatever the filter, red stays constant along each row, green along each column, blue at 77;
    the PNG column and the same pixels as numbers agree within the two resizers' rounding."""
    from datasets import Image, Sequence, Value

    ys, xs = np.mgrid[0:8, 0:8]
    pixels = np.stack([ys * 30, xs * 30, np.full_like(ys, 77)], -1).astype(np.uint8)
    feats = {"image": Image(), "img_num": Sequence(Sequence(Sequence(Value("uint8"))))}
    path = _save(tmp_path / "ds", {"image": [_png(pixels)] * 4, "img_num": [pixels.tolist()] * 4}, feats)
    png = _train_row(path, image_column="image", size=4)["image"].numpy().astype(int)
    num = _train_row(path, image_column="img_num", size=4)["image"].numpy().astype(int)
    for got in (png, num):
        red, green, blue = got
        assert (red == red[:, :1]).all() and (np.diff(red[:, 0]) > 0).all()
        assert (green == green[:1]).all() and (np.diff(green[0]) > 0).all()
        assert (blue == 77).all()
    assert np.abs(png - num).max() <= 1


def test_png_normals_at_height_3_decode_per_pixel(tmp_path):
    """An 8-bit normals PNG (128, 128, 255) is (0, 0, 1) after the [-1, 1] mapping, also at height 3."""
    from datasets import Image

    img = np.zeros((3, 8, 3), np.uint8)
    nrm = np.zeros((3, 8, 3), np.uint8)
    nrm[...] = (128, 128, 255)
    nrm[0, 0] = (255, 128, 128)  # +x
    path = _save(tmp_path / "ds", {"image": [_png(img)] * 4, "nrm": [_png(nrm)] * 4},
                 {"image": Image(), "nrm": Image()})
    n = _train_row(path, columns={"nrm": "normals"})["normals"].numpy()
    assert n.shape == (3, 3, 8)
    assert np.allclose(n[:, 1, 1], [0.0039, 0.0039, 1.0], atol=1e-3)
    assert np.allclose(n[:, 0, 0], [1.0, 0.0039, 0.0039], atol=1e-3)


@pytest.mark.parametrize("shape,column", [((4, 4, 3), "image"), ((3, 8, 3), "nrm")])
def test_numeric_shape_that_reads_both_ways_is_refused(tmp_path, shape, column):
    """(4, 4, 3) is a 4x4 RGB image or a 4x3 RGBA one; (3, 8, 3) normals are 3x8 or 8x3: not guessed."""
    from datasets import Array3D, Image

    a = np.full(shape, 7 if column == "image" else 0.5, np.uint8 if column == "image" else np.float32)
    cols = {"image": [_png(np.zeros((3, 8, 3), np.uint8))] * 4, column: [a] * 4}
    feats = {"image": Image(), column: Array3D(shape, str(a.dtype))}
    path = _save(tmp_path / "ds", cols, feats)
    kw = {} if column == "image" else {"columns": {"nrm": "normals"}}
    with pytest.raises(ValueError, match=rf"column '{column}'.*{re.escape(str(shape))}.*data.channels_last"):
        _train_row(path, **kw)


def test_channels_last_says_how_to_read_an_ambiguous_shape(tmp_path):
    from datasets import Array3D

    pixels = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    path = _save(tmp_path / "ds", {"image": [pixels] * 4}, {"image": Array3D((4, 4, 3), "uint8")})
    hwc = _train_row(path, channels_last=True)["image"].numpy()
    assert (hwc == pixels.transpose(2, 0, 1)).all()
    chw = _train_row(path, channels_last=False)["image"].numpy()  # (C=4, H=4, W=3): alpha (channel 3) dropped
    assert chw.shape == (3, 4, 3) and (chw == pixels[:3]).all()


# -- unreadable image rows -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cut", [lambda b: b[:40], lambda b: b[:-40], lambda b: b"not a png"])
def test_a_corrupt_image_names_its_row_without_the_relative_path_hint(tmp_path, cut):
    from datasets import Image

    good = _png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    cut = {"bytes": cut(good["bytes"]), "path": None}  # stored bytes: no file, so no path advice
    path = _save(tmp_path / "ds", {"image": [good, good, cut, good]}, {"image": Image()})
    with pytest.raises(ValueError, match=r"image column 'image' of split 'train': cannot read the image in row 2") as e:
        _train_row(path)
    assert "relative" not in str(e.value) and "\n" not in str(e.value)


def test_a_missing_relative_file_names_row_path_and_working_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from PIL import Image as PILImage

    PILImage.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / "a.png")
    rows = [{"bytes": None, "path": str(tmp_path / "a.png")}] * 3 + [{"bytes": None, "path": "pics/b.png"}]
    pq.write_table(pa.table({"image": rows}), tmp_path / "train.parquet")
    with pytest.raises(ValueError, match=r"row 3 \(file pics/b.png\).*relative paths are read from the working "
                                         r"directory"):
        _train_row(str(tmp_path / "train.parquet"))


# -- parquet splits ------------------------------------------------------------------------------------------

def _parquet(path, n: int, **columns) -> None:
    from datasets import Dataset, Features, Image, Value

    feats = {"image": Image(), **{c: Value("int64") for c in columns}}
    rows = {"image": [_png(np.zeros((5, 5, 3), np.uint8))] * n, **{c: [v] * n for c, v in columns.items()}}
    Dataset.from_dict(rows, features=Features(feats)).to_parquet(str(path))


def test_an_empty_parquet_split_is_named_like_an_empty_saved_split(tmp_path):
    _parquet(tmp_path / "train.parquet", 6, y=1)
    _parquet(tmp_path / "test.parquet", 0, y=1)
    with pytest.raises(ValueError, match=r"cannot be loaded: split\(s\) \['test'\] hold 0 rows"):
        _train_row(str(tmp_path), columns={"y": "classification"})


def test_parquet_shards_with_different_columns_name_both_files(tmp_path):
    _parquet(tmp_path / "train-0.parquet", 3, mask=1)
    _parquet(tmp_path / "train-1.parquet", 3, seg=1)
    with pytest.raises(ValueError, match=r"^hf_local: .*train-0\.parquet.*train-1\.parquet.*'mask'.*'seg'") as e:
        _train_row(str(tmp_path))
    assert "\n" not in str(e.value)


def test_parquet_shards_with_the_same_columns_in_another_order_load(tmp_path):
    _parquet(tmp_path / "train-0.parquet", 3, a=1, b=2)
    _parquet(tmp_path / "train-1.parquet", 3, b=2, a=1)
    row = _train_row(str(tmp_path), columns={"a": "classification", "b": "regression"})
    assert row["classification"].item() == 1 and row["regression"].tolist() == [2.0]


# -- binary 0/255 masks --------------------------------------------------------------------------------------

def _binary_masks(tmp_path) -> str:
    from datasets import Image

    mask = np.zeros((6, 6), np.uint8)
    mask[2:5, 1:4] = 255  # the foreground, stored the usual 8-bit way
    return _save(tmp_path / "ds", {"image": [_png(np.zeros((6, 6, 3), np.uint8))] * 6, "mask": [_png(mask)] * 6},
                 {"image": Image(), "mask": Image()})


@pytest.mark.parametrize("classes", [None, 2])
def test_a_0_255_mask_is_refused_pointing_to_semseg_map(tmp_path, classes):
    """255 is the ignore mark: read as it is, every labelled pixel is background, one class to learn."""
    path = _binary_masks(tmp_path)
    with pytest.raises(ValueError, match=r"column 'mask' \(semseg\) of split 'train' holds only 0 and 255.*"
                                         r"data.semseg_map=\{0: 0, 255: 1\}"):
        _train_row(path, columns={"mask": "semseg"}, semseg_classes=classes)


def test_a_train_split_of_class_0_with_more_classes_declared_is_told_so_not_sent_to_the_0_255_map(tmp_path):
    """With semseg_classes=3 the 0/255 advice would turn a multi-class dataset's ignored pixels into class 1."""
    path = _binary_masks(tmp_path)
    with pytest.raises(ValueError, match=r"holds only 0 and 255.*class 0 although semseg_classes=3: no other class "
                                         r"can be learned from it; check the split") as e:
        _train_row(path, columns={"mask": "semseg"}, semseg_classes=3)
    assert "set semseg_classes=2 and" in str(e.value)


def test_a_0_255_mask_through_semseg_map_has_two_classes(tmp_path):
    dm = create_datamodule("hf_local", path=_binary_masks(tmp_path), columns={"mask": "semseg"},
                           semseg_map={0: 0, 255: 1}, val_fraction=0.25, test_fraction=0.25)
    seg = dm.dataset("train")[0]["semseg"]
    assert seg[3, 2].item() == 1 and seg[0, 0].item() == 0 and int(seg.sum()) == 9
    assert dm.info["semseg_classes"] == 2


# -- integer depth units -------------------------------------------------------------------------------------

@pytest.mark.parametrize("stored", ["png", "numbers"])
def test_16_bit_integer_depth_gets_the_millimetre_warning(tmp_path, caplog, stored):
    from datasets import Array2D, Image

    depth = np.arange(36, dtype=np.uint16).reshape(6, 6) * 250 + 1244  # up to 9994: millimetres, likely
    image = [_png(np.zeros((6, 6, 3), np.uint8))] * 4
    column, feature = ([_png(depth)] * 4, Image()) if stored == "png" else ([depth] * 4, Array2D((6, 6), "uint16"))
    path = _save(tmp_path / "ds", {"image": image, "dep": column}, {"image": Image(), "dep": feature})
    with caplog.at_level("WARNING"):
        row = _train_row(path, columns={"dep": "depth"})
    assert "column 'dep' (depth) of split 'train': depth stored as uint16 integers up to 9994 is used as it is; " \
           "if these are millimetres, divide by 1000" in caplog.text
    assert float(row["depth"].max()) == 9994.0  # kept as stored


def test_the_millimetre_warning_comes_once_per_dataset(tmp_path, caplog):
    """Each stored split (train, validation, test) repeated the same warning word for word."""
    from datasets import Array2D, Dataset, DatasetDict, Features, Image

    depth = np.full((6, 6), 3000, np.uint16)
    features = Features({"image": Image(), "dep": Array2D((6, 6), "uint16")})
    split = Dataset.from_dict({"image": [_png(np.zeros((6, 6, 3), np.uint8))] * 2, "dep": [depth] * 2},
                              features=features)
    DatasetDict({"train": split, "validation": split, "test": split}).save_to_disk(str(tmp_path / "ds"))
    with caplog.at_level("WARNING"):
        create_datamodule("hf_local", path=str(tmp_path / "ds"), columns={"dep": "depth"}).setup()
    assert caplog.text.count("if these are millimetres") == 1, caplog.text


def test_depth_in_metres_gets_no_unit_warning(tmp_path, caplog):
    from datasets import Array2D, Image

    path = _save(tmp_path / "ds", {"image": [_png(np.zeros((6, 6, 3), np.uint8))] * 4,
                                   "dep": [np.full((6, 6), 9.5, np.float32)] * 4},
                 {"image": Image(), "dep": Array2D((6, 6), "float32")})
    with caplog.at_level("WARNING"):
        _train_row(path, columns={"dep": "depth"})
    assert "millimetres" not in caplog.text


# -- label maps in memory ------------------------------------------------------------------------------------

def _labels(path, **columns):
    """An hf_local train split of 2x2 images with numeric label-map columns, all rows kept (no carving)."""
    from datasets import Dataset, DatasetDict

    n = len(next(iter(columns.values())))
    DatasetDict({"train": Dataset.from_dict({"img": np.zeros((n, 2, 2, 3), np.uint8).tolist(), **columns}),
                 "validation": Dataset.from_dict({"img": np.zeros((1, 2, 2, 3), np.uint8).tolist(),
                                                  **{c: v[:1] for c, v in columns.items()}}),
                 "test": Dataset.from_dict({"img": np.zeros((1, 2, 2, 3), np.uint8).tolist(),
                                            **{c: v[:1] for c, v in columns.items()}})}).save_to_disk(str(path))
    return path


def test_class_255_among_more_than_255_classes_is_refused_not_ignored(tmp_path):
    """With semseg_classes=300, id 255 lies in the classes' range but stays the ignore mark: its pixels were
    silently neither learned nor scored. Refused naming the column and count; semseg_map can move it."""
    seg = [[[0, 299], [255, 255]], [[1, 2], [3, 255]]]
    path = _labels(tmp_path / "dd", seg=seg)
    with pytest.raises(ValueError, match=r"column 'seg' \(semseg\) of split 'train' holds id 255 in 3 pixels, which "
                                         r"semseg_classes=300 makes a class id.*data.semseg_map"):
        HFImageDataModule(path, image_column="img", semseg_classes=300, columns={"seg": "semseg"}).setup()
    lut = list(range(300)) + [300]
    lut[255] = 300  # class 255 moved to 300 (raw 300 is unused)
    dm = HFImageDataModule(path, image_column="img", semseg_classes=301, semseg_map=lut, columns={"seg": "semseg"})
    assert dm.dataset("train").__getitems__([0, 1])["semseg"].tolist() == [[[0, 299], [300, 300]], [[1, 2], [3, 300]]]
    with pytest.raises(ValueError, match=r"data.semseg_map maps 255 to 301; .*class ids ints in 0..300 but 255"):
        HFImageDataModule(path, image_column="img", semseg_classes=301, semseg_map={255: 301}, columns={"seg": "semseg"})
    # 255 mapped to itself: ignored on purpose, accepted
    dm = HFImageDataModule(path, image_column="img", semseg_classes=300, semseg_map=list(range(300)),
                           columns={"seg": "semseg"})
    assert dm.dataset("train").__getitems__([0])["semseg"].tolist() == seg[:1]


def test_label_maps_stay_uint8_in_memory_and_are_cast_per_batch(tmp_path):
    """docs/data.md: label maps stay uint8 in memory (8x less than int64) and batches carry int64 / float32."""
    seg = [[[0, 3], [-1, 254]], [[1, 1], [255, 2]]]
    edges = [[[0, 1], [1, 0]], [[0, 0], [0, 1]]]
    dm = HFImageDataModule(_labels(tmp_path / "dd", seg=seg, e=edges), image_column="img",
                           columns={"seg": "semseg", "e": "edges"})
    train = dm.dataset("train")
    assert train.tensors["semseg"].dtype == torch.uint8 and train.tensors["edges"].dtype == torch.uint8
    batch = train.__getitems__([0, 1])
    assert batch["semseg"].dtype == torch.int64 and batch["edges"].dtype == torch.float32
    assert batch["semseg"].tolist() == [[[0, 3], [255, 254]], [[1, 1], [255, 2]]]  # −1: the ignore mark 255
    assert batch["edges"].tolist() == [[[[0.0, 1.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 1.0]]]]


def test_ids_above_255_and_edge_probabilities_keep_a_wider_type(tmp_path):
    seg = [[[0, 299], [5, 254]]]
    edges = [[[0.0, 0.25], [1.0, 0.5]]]
    dm = HFImageDataModule(_labels(tmp_path / "dd", seg=seg, e=edges), image_column="img", semseg_classes=300,
                           columns={"seg": "semseg", "e": "edges"})
    batch = dm.dataset("train").__getitems__([0])
    assert batch["semseg"].dtype == torch.int64 and batch["semseg"].tolist() == seg
    assert batch["edges"].dtype == torch.float32 and batch["edges"][0, 0].tolist() == edges[0]
