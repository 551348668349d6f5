"""NYUv2 / Cityscapes loaders on tiny fixtures built here in each format (npy layout, labelled .mat)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl.data import create_datamodule

H, W = 6, 8


def write_npy_layout(root: Path, n_train=3, n_val=2, classes=13, normals=True, label_dir="label", hw=(H, W)):
    """<root>/{train,val}/{image,label,depth[,normal]}/<i>.npy as MTAN/LibMTL store them."""
    rng = np.random.default_rng(0)
    h, w = hw
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            d = root / split
            for sub in ("image", label_dir, "depth", *(("normal",) if normals else ())):
                (d / sub).mkdir(parents=True, exist_ok=True)
            np.save(d / "image" / f"{i}.npy", rng.random((h, w, 3)).astype(np.float32))
            label = rng.integers(0, classes, (h, w)).astype(np.float32)
            label[0, 0] = -1  # ignored pixel
            np.save(d / label_dir / f"{i}.npy", label)
            depth = rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32)
            depth[0, 1] = 0.0  # invalid pixel
            np.save(d / "depth" / f"{i}.npy", depth)
            if normals:
                n3 = rng.normal(size=(h, w, 3)).astype(np.float32)
                n3 /= np.linalg.norm(n3, axis=-1, keepdims=True)
                n3[0, 2] = 0.0  # invalid pixel
                np.save(d / "normal" / f"{i}.npy", n3)
    return root


def test_nyuv2_npy_shapes_dtypes_and_masks(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    dm = create_datamodule("nyuv2", root=str(root), size=None)
    assert dm.info["semseg_classes"] == 13 and dm.info["image_size"] == [H, W]
    b = next(iter(dm.train_dataloader()))
    assert b["image"].dtype == torch.uint8 and b["image"].shape == (3, 3, H, W)
    assert b["semseg"].dtype == torch.int64 and b["semseg"].shape == (3, H, W)
    assert b["depth"].dtype == torch.float32 and b["depth"].shape == (3, 1, H, W)
    assert b["normals"].dtype == torch.float32 and b["normals"].shape == (3, 3, H, W)
    # −1 -> the semseg task's ignore_index 255; 0 depth / zero normals stay the invalid mark
    assert (b["semseg"][:, 0, 0] == 255).all() and (b["semseg"][:, 1:] < 13).all()
    assert (b["depth"][:, 0, 0, 1] == 0).all() and (b["depth"][:, 0, 1:] > 0).all()
    assert (b["normals"][:, :, 0, 2] == 0).all()
    # the image is the stored [0, 1] float scaled to uint8
    first = np.load(root / "val" / "image" / "0.npy")
    test = dm.dataset("test").tensors["image"][0]
    assert torch.equal(test, torch.from_numpy(np.round(first * 255).astype(np.uint8).transpose(2, 0, 1)))
    # val defaults to the test folder (MTAN/LibMTL); n_train limits
    assert len(dm.dataset("val")) == len(dm.dataset("test")) == 2
    assert len(create_datamodule("nyuv2", root=str(root), n_train=2, size=None).dataset("train")) == 2


def test_resize_is_nearest_for_targets(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    dm = create_datamodule("nyuv2", root=str(root), size=[3, 4])
    t = dm.dataset("train").tensors
    assert t["image"].shape[-2:] == (3, 4) and t["semseg"].shape[-2:] == (3, 4)
    assert t["depth"].shape[-2:] == (3, 4) and t["normals"].shape[-2:] == (3, 4)
    # nearest: every resized label/depth value is one of the stored ones (no blending with invalid 0)
    label = np.load(root / "train" / "label" / "0.npy")
    stored = set(np.where(label == -1, 255, label).astype(int).ravel())
    assert set(t["semseg"][0].int().ravel().tolist()) <= stored
    depth = np.load(root / "train" / "depth" / "0.npy")
    assert set(t["depth"][0].ravel().tolist()) <= set(depth.ravel().tolist())
    # an int sets the height and keeps the aspect (6x8 -> 3x4)
    assert create_datamodule("nyuv2", root=str(root), size=3).dataset("train").tensors["image"].shape[-2:] == (3, 4)


def test_resized_targets_sample_the_pixel_under_the_image_pixels_centre():
    """6 -> 2 columns, a step after source column 3: output column 1 covers source columns 3..5 and
    is centred on column 4 (dark); the bilinear image is dark there (96), so the targets must be too.
    Plain "nearest" sampled column 3 (bright): the targets sat half an output pixel off the image."""
    from mtl.data.benchmarks import resize_sample

    img = torch.zeros(3, 6, 6, dtype=torch.uint8)
    img[:, :, :4] = 255
    label = torch.zeros(6, 6, dtype=torch.uint8)
    label[:, :4] = 1
    depth = torch.ones(1, 6, 6)
    depth[:, :, :4] = 2.0
    out = resize_sample({"image": img, "semseg": label, "depth": depth}, (2, 2))
    assert out["image"][0, 0].tolist() == [255, 96]
    assert out["semseg"][0].tolist() == [1, 0] and out["depth"][0, 0].tolist() == [2.0, 1.0]


def test_cityscapes_7_and_19_classes(tmp_path):
    root = write_npy_layout(tmp_path / "cs", classes=7, normals=False)
    dm = create_datamodule("cityscapes", root=str(root), size=None)
    b = next(iter(dm.val_dataloader()))
    assert set(b) == {"image", "semseg", "depth"} and dm.info["semseg_classes"] == 7
    assert int(b["semseg"][b["semseg"] != 255].max()) < 7
    with pytest.raises(FileNotFoundError, match=r"label_19"):
        create_datamodule("cityscapes", root=str(root), num_classes=19).setup()
    (root / "train" / "label").rename(root / "train" / "labels")
    with pytest.raises(FileNotFoundError, match=r"cs/train has neither label_7/ nor label/ \(7-class"):
        create_datamodule("cityscapes", root=str(root)).setup()
    root19 = write_npy_layout(tmp_path / "cs19", classes=19, normals=False, label_dir="label_19")
    dm19 = create_datamodule("cityscapes", root=str(root19), num_classes=19, size=None)
    assert dm19.info["semseg_classes"] == 19 and len(dm19.dataset("train")) == 3


def test_a_benchmark_says_when_its_val_split_is_its_test_split(tmp_path):
    """mtl-merge reads `val_is_test` to record and warn that it selected on test (val_fraction=0 serves test as val)."""
    root = write_npy_layout(tmp_path / "cs", n_train=4, classes=7, normals=False)
    same = create_datamodule("cityscapes", root=str(root), size=None)
    same.setup()
    assert same.val_is_test and torch.equal(same.dataset("val").tensors["image"], same.dataset("test").tensors["image"])
    assert not create_datamodule("cityscapes", root=str(root), size=None, val_fraction=0.5).val_is_test
    assert not create_datamodule("scenes", size=32, n_train=4, n_val=2, n_test=2).val_is_test


def test_bad_root_and_layout_name_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.*train/image"):
        create_datamodule("nyuv2", root=str(tmp_path / "missing")).setup()
    root = write_npy_layout(tmp_path / "nyu", normals=False)
    with pytest.raises(FileNotFoundError, match=r"train/normal"):
        create_datamodule("nyuv2", root=str(root)).setup()
    root = write_npy_layout(tmp_path / "nyu2")
    (root / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/depth/1\.npy"):
        create_datamodule("nyuv2", root=str(root)).setup()
    np.save(root / "train" / "label" / "0.npy", np.full((H, W), 13.0))
    with pytest.raises(ValueError, match=r"train/label/0\.npy.*label 13"):
        create_datamodule("nyuv2", root=str(root)).setup()
    (root / "train" / "image").rename(root / "train" / "images")
    with pytest.raises(FileNotFoundError, match=r"train/image\b"):
        create_datamodule("nyuv2", root=str(root)).setup()


@pytest.mark.parametrize("damage, match", [
    (lambda r: [np.save(r / "train" / d / "1.npy", np.ones((H + 2, W, c), np.float32) * v)
                for d, c, v in (("image", 3, 0.5), ("label", 1, 1), ("depth", 1, 2), ("normal", 3, 3 ** -0.5))],
     r"train/image/1\.npy: size \(8, 8\) differs from \(6, 8\) of the first image .*train/image/0\.npy; "
     r"pass data.size"),
    (lambda r: np.save(r / "train" / "image" / "0.npy", np.full((H, W, 3), 200.0, np.float32)),
     r"train/image/0\.npy: float image values reach 200; expected \[0, 1\]"),
    (lambda r: np.save(r / "train" / "label" / "99.npy", np.zeros((H, W), np.float32)),
     r"train/label/99\.npy has no image"),
    (lambda r: np.save(r / "train" / "image" / "0.npy", np.full((H, W, 3), 4000, np.int64)),  # 16-bit
     r"train/image/0\.npy: int64 image values span 4000\.\.4000; expected 0-255"),
    (lambda r: np.save(r / "train" / "image" / "0.npy", np.full((H, W, 3), -0.5, np.float32)),
     r"train/image/0\.npy: float image values go down to -0\.5; expected \[0, 1\] \(not normalised\)"),
    (lambda r: np.save(r / "train" / "normal" / "1.npy", np.full((H, W, 3), 0.5, np.float32)),  # length 0.866
     r"train/normal/1\.npy: half the normals are off unit length by 0\.134 or more \(median length 0\.866\)"),
    (lambda r: (r / "train" / "depth" / "0.npy").write_bytes(b"not an array"),
     r"train/depth/0\.npy: not a plain numeric \.npy array"),
    (lambda r: np.save(r / "train" / "depth" / "0.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
     r"train/depth/0\.npy: not a plain numeric \.npy array \(not an \.npy file, or one holding Python objects"),
    (lambda r: (r / "train" / "depth" / "0.npy").write_text("hello"),  # not a pickle: no hint to unpickle it
     r"train/depth/0\.npy: not a plain numeric \.npy array \(not an \.npy file, or one holding Python objects, "
     r"which are never unpickled\)$"),
    (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), 1.5, np.float32)),  # never rounded to 2
     r"train/label/0\.npy: label 1\.5 is not a whole number"),
    (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), np.nan, np.float32)),
     r"train/label/0\.npy: labels hold NaN or infinite values"),
    (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), 1e20, np.float32)),  # not wrapped in int64
     r"train/label/0\.npy: label 1e\+20 is outside 0\.\.12"),
    # uint64 ids from 2**63 wrapped in the int64 cast: 2**64 - 1 became −1 (every pixel silently ignored)
    (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), 2**64 - 1, np.uint64)),
     r"train/label/0\.npy: label 18446744073709551615 is outside 0\.\.12"),
    (lambda r: np.save(r / "train" / "label" / "0.npy", np.full((H, W), 2**63, np.uint64)),  # was named negative
     r"train/label/0\.npy: label 9223372036854775808 is outside 0\.\.12"),
    (lambda r: np.save(r / "train" / "image" / "0.npy", np.full((H, W, 3), 0.5 + 0.5j, np.complex64)),
     r"train/image/0\.npy: image of dtype complex64; expected uint8"),
    (lambda r: np.save(r / "train" / "normal" / "1.npy", np.full((H, W, 3), "a")),  # was numpy's bare, unnamed error
     r"train/normal/1\.npy: normals of dtype <U1; expected floats \(or integers\)"),
    (lambda r: np.save(r / "train" / "depth" / "1.npy", np.full((H, W), 2 + 3j, np.complex64)),  # was loaded as 2
     r"train/depth/1\.npy: depth of dtype complex64; expected floats \(or integers\)"),
    (lambda r: np.save(r / "train" / "image" / "1.npy",  # NaN would cast to black
                       np.where(np.eye(H, W, dtype=bool)[..., None], np.nan, np.full((H, W, 3), 0.5, np.float32))),
     r"train/image/1\.npy: image holds NaN or infinite values; expected floats in \[0, 1\]"),
    (lambda r: np.save(r / "train" / "image" / "2 (copy).npy", np.zeros((H, W, 3), np.float32)),  # not skipped unseen
     r"train/image/2 \(copy\)\.npy: not named <i>\.npy with an integer index"),
])
def test_bad_files_are_named_not_silently_mended(tmp_path, damage, match):
    """Stored at another size (resized with a distorted aspect), 0-255 floats (clipped to white),
    negative floats (normalised images: clipped to black), normals in another encoding than unit
    vectors, a label without an image (ignored) or an unreadable file (an unnamed numpy error) each
    name the file."""
    root = write_npy_layout(tmp_path / "nyu")
    damage(root)
    with pytest.raises(ValueError, match=match):
        create_datamodule("nyuv2", root=str(root)).setup()


def test_integer_images_of_0_255_load_as_uint8(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    img = np.random.default_rng(0).integers(0, 256, (H, W, 3))  # int64, as np.load gives many saved arrays
    np.save(root / "train" / "image" / "0.npy", img)
    got = create_datamodule("nyuv2", root=str(root)).dataset("train").tensors["image"][0]
    assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(img).permute(2, 0, 1).to(torch.uint8))


def test_a_bool_image_reads_as_0_255_in_every_loader(tmp_path):
    """True is full intensity: as the float image 1.0 and as PIL converts a 1-bit image to RGB."""
    from PIL import Image as PILImage
    from datasets import Dataset

    from mtl.data import HFImageDataModule

    mask = np.zeros((6, 8, 3), bool)
    mask[2:4, 3:6] = True
    want = np.asarray(PILImage.fromarray(mask[..., 0]).convert("RGB")).transpose(2, 0, 1)  # PIL's reading: 0/255
    root = write_npy_layout(tmp_path / "nyu", hw=(6, 8))
    np.save(root / "train" / "image" / "0.npy", mask)
    npy = create_datamodule("nyuv2", root=str(root), size=None).dataset("train").tensors["image"][0]
    Dataset.from_dict({"img": np.repeat(mask[None], 4, 0).tolist()}).save_to_disk(str(tmp_path / "hf"))
    hf = HFImageDataModule(tmp_path / "hf", image_column="img").dataset("train").tensors["image"][0]
    assert np.array_equal(npy.numpy(), want) and np.array_equal(hf.numpy(), want)


@pytest.mark.parametrize("kw, match", [
    ({"size": "32"}, r"data\.size must be null .* got '32'"),
    ({"size": 32.0}, r"data\.size must be null .* got 32\.0"),
    ({"size": [32, 0]}, r"data\.size must be null .* got \[32, 0\]"),
    ({"num_classes": 300}, r"nyuv2: data\.num_classes must be in 1\.\.254 \(255 marks ignored pixels\), got 300"),
])
def test_bad_size_and_class_counts_are_named(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        create_datamodule("nyuv2", root=str(tmp_path), **kw)


def test_a_sample_limit_of_zero_is_named(tmp_path):
    root = write_npy_layout(tmp_path / "nyu")
    with pytest.raises(ValueError, match=r"nyuv2: n_train must be a positive int or null \(all\), got 0"):
        create_datamodule("nyuv2", root=str(root), n_train=0)


def test_normals_a_few_pixels_off_unit_length_pass(tmp_path):
    """Bilinear resizing shortens normals at creases: a few such pixels are no other encoding."""
    root = write_npy_layout(tmp_path / "nyu")
    n3 = np.load(root / "train" / "normal" / "0.npy")
    n3[1:3] *= 0.9  # 16 of 47 valid pixels at length 0.9
    np.save(root / "train" / "normal" / "0.npy", n3)
    t = create_datamodule("nyuv2", root=str(root), size=None).dataset("train").tensors["normals"][0]
    assert torch.allclose(t, torch.from_numpy(n3.transpose(2, 0, 1)))


def test_zero_padded_file_names_are_read_by_their_index(tmp_path):
    """``0000.npy`` was parsed as index 0 and then opened as ``0.npy`` (not found). Names are kept per
    index, in numeric order, and padding may differ between folders; two names of one index raise."""
    plain = create_datamodule("nyuv2", root=str(write_npy_layout(tmp_path / "plain")), size=None)
    root = write_npy_layout(tmp_path / "padded")
    for f in root.glob("*/*/*.npy"):
        if f.parent.name != "label":  # labels stay 0.npy, 1.npy, ...
            f.rename(f.with_name(f"{int(f.stem):04d}.npy"))
    padded = create_datamodule("nyuv2", root=str(root), size=None)
    for split in ("train", "test"):
        a, b = plain.dataset(split).tensors, padded.dataset(split).tensors
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (root / "train" / "image" / "1.npy").write_bytes((root / "train" / "image" / "0001.npy").read_bytes())
    with pytest.raises(ValueError, match=r"train/image: 0001\.npy and 1\.npy are both index 1; keep one"):
        create_datamodule("nyuv2", root=str(root), size=None).setup()


def write_nyu_mat(path: Path, n=5, hw=(H, W)):
    """A tiny nyu_depth_v2_labeled.mat: HDF5, arrays stored transposed as MATLAB v7.3 does."""
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(1)
    h, w = hw
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 10, (n, h, w)).astype(np.float32)
    labels = rng.integers(0, 895, (n, h, w)).astype(np.uint16)
    labels[:, 0, 0] = 0  # unlabelled
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = labels.transpose(0, 2, 1)
    return images, depths, labels


def test_nyuv2_labelled_mat(tmp_path):
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    images, depths, labels = write_nyu_mat(mat)
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"trainNdxs": [1, 3, 5], "testNdxs": [2, 4]}))  # 1-based, as splits.mat
    mapping = [-1] + [(i - 1) % 13 for i in range(1, 895)]  # a made-up table: raw i -> (i - 1) mod 13
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    dm = create_datamodule("nyuv2", root=str(mat), splits_file=str(splits), class_mapping=str(tmp_path / "map.json"),
                           size=None)
    train, test = dm.dataset("train").tensors, dm.dataset("test").tensors
    assert set(train) == {"image", "semseg", "depth"} and len(train["image"]) == 3 and len(test["image"]) == 2
    # train sample 1 is MATLAB image 3 (0-based 2), in (C, H, W)
    assert torch.equal(train["image"][1], torch.from_numpy(images[2].transpose(2, 0, 1)))
    assert torch.allclose(train["depth"][1, 0], torch.from_numpy(depths[2]))
    expected = np.where(labels[2] == 0, 255, (labels[2].astype(int) - 1) % 13)
    assert torch.equal(train["semseg"][1], torch.from_numpy(expected))
    with pytest.raises(ValueError, match="class_mapping"):
        create_datamodule("nyuv2", root=str(mat), splits_file=str(splits)).setup()
    with pytest.raises(FileNotFoundError, match="nyu_depth_v2_labeled.mat"):
        create_datamodule("nyuv2", root=str(tmp_path / "nope.mat")).setup()
    # the release has no normals: experiment=nyuv2 (semseg, depth, normals) on it says so at setup
    from mtl.train import run

    with pytest.raises(ValueError, match=r"'normals' have no targets.*\['depth', 'semseg'\]"):  # before any step
        run(["experiment=nyuv2", f"data.root={mat}", f"data.splits_file={splits}",
             f"data.class_mapping={tmp_path / 'map.json'}", "debug=smoke"], run_dir=tmp_path / "r")


def mat_inputs(tmp_path: Path, splits=None) -> dict:
    """splits_file (1-based JSON, as splits.mat) and an inline class_mapping for a `write_nyu_mat` file."""
    path = tmp_path / "splits.json"
    path.write_text(json.dumps(splits or {"trainNdxs": [1, 3, 5], "testNdxs": [2, 4]}))
    return {"splits_file": str(path), "class_mapping": [-1] + [i % 13 for i in range(894)], "size": None}


def rewrite_mat(mat: Path, key: str, change) -> None:
    """Replace dataset ``key`` of a `write_nyu_mat` file by ``change(its array)`` (h5py's layout: (N, W, H))."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(mat, "r+") as f:
        a = f[key][()]
        del f[key]
        f[key] = change(a)


@pytest.mark.parametrize("key, change, stored", [
    ("labels", lambda a: a[:, ::2, ::2], (3, 4)),  # half size
    ("depths", lambda a: a.transpose(0, 2, 1), (W, H)),  # (N, H, W): transposed against MATLAB's (N, W, H)
], ids=["half-size-labels", "transposed-depths"])
def test_a_mat_target_at_another_size_than_its_image_is_refused_not_resized(tmp_path, key, change, stored):
    """Was resized onto the image without a word (a transposed depth map stretched, every pixel misaligned)."""
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_nyu_mat(mat)
    rewrite_mat(mat, key, change)
    dm = create_datamodule("nyuv2", root=str(mat), **mat_inputs(tmp_path))
    with pytest.raises(ValueError) as e:
        dm.setup()
    assert str(e.value) == f"{mat}: {key}[0]: size {stored} differs from its image's {(H, W)}"


@pytest.mark.parametrize("key", ["depths", "labels"])
def test_a_mat_dataset_with_fewer_entries_than_images_is_named(tmp_path, key):
    """Was h5py's bare "Index (3) out of range for (0-2)" at the first image past its end."""
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_nyu_mat(mat)
    rewrite_mat(mat, key, lambda a: a[:3])
    with pytest.raises(ValueError) as e:
        create_datamodule("nyuv2", root=str(mat), **mat_inputs(tmp_path)).setup()
    assert str(e.value) == (f"nyuv2: {str(mat)!r}: {key!r} holds 3 entries, 'images' 5; every image needs its depth "
                            "and labels")


def test_the_mat_loader_checks_labels_and_depth_as_the_npy_loader(tmp_path, caplog):
    """Fractional float labels were truncated (astype(int64)), and millimetre or negative depth passed without the
    npy loader's warnings."""
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    write_nyu_mat(mat)
    rewrite_mat(mat, "labels", lambda a: a.astype(np.float64) + 0.5)
    with pytest.raises(ValueError) as e:
        create_datamodule("nyuv2", root=str(mat), **mat_inputs(tmp_path)).setup()
    assert str(e.value) == f"{mat}: labels[0]: label 0.5 is not a whole number; expected integer class ids"
    write_nyu_mat(mat)
    rewrite_mat(mat, "depths", lambda a: (a * 1000).astype(np.uint16))
    with caplog.at_level("WARNING"):
        create_datamodule("nyuv2", root=str(mat), **mat_inputs(tmp_path)).setup()
    assert caplog.text.count(f"{mat}: depths[0]: depth stored as uint16 integers up to ") == 1, caplog.text  # once
    caplog.clear()
    rewrite_mat(mat, "depths", lambda a: np.where(np.arange(len(a))[:, None, None] == 2, -1.0, a.astype(np.float32)))
    with caplog.at_level("WARNING"):
        dm = create_datamodule("nyuv2", root=str(mat), **mat_inputs(tmp_path))
        dm.setup()
    assert f"1 depth map(s) of {mat} (train) hold negative values (first: {mat}: depths[2])" in caplog.text
    assert float(dm.dataset("train").tensors["depth"][1].max()) == -1.0  # kept, as the npy loader keeps them


@pytest.mark.slow  # two CLI trainings, ~20 s of CPU each; test_in_process_smoke_training is the fast variant
@pytest.mark.parametrize("experiment, hw, kw, tasks", [
    ("nyuv2", (36, 48), {}, {"semseg", "depth", "normals"}),
    ("cityscapes", (32, 64), {"classes": 7, "normals": False}, {"semseg", "depth"}),
])
def test_cli_smoke_training_on_fixture(tmp_path, experiment, hw, kw, tasks):
    """`mtl-train experiment=<benchmark> data.root=<dir> debug=smoke` through the real CLI."""
    import mtl

    root = write_npy_layout(tmp_path / experiment, n_train=4, n_val=2, hw=hw, **kw)
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    proc = subprocess.run([sys.executable, "-m", "mtl.cli.train", f"experiment={experiment}", f"data.root={root}",
                           "debug=smoke"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("run_dir: "), last
    run_dir = Path(last.removeprefix("run_dir: "))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]) == tasks
    assert set(metrics["test"]["depth"]) == {"abs_err", "abs_rel"}
    assert {"miou", "pixel_acc"} <= set(metrics["test"]["semseg"])
    model = mtl.load_model(run_dir / "model")
    assert set(model.tasks) == tasks
    assert model.tasks["semseg"].num_classes == (13 if experiment == "nyuv2" else 7)
    h = 32  # debug=smoke: data.size=32 sets the height, the width keeps the aspect
    x = torch.zeros(1, 3, h, round(h * hw[1] / hw[0]))
    out = model.eval()(x)
    assert out["semseg"].shape[-2:] == x.shape[-2:]
    assert all(math.isfinite(v) for t in metrics["test"].values() for v in t.values())


def test_in_process_smoke_training_and_bad_root(tmp_path):
    import mtl
    from mtl.train import run

    root = write_npy_layout(tmp_path / "nyu", n_train=2, n_val=1, hw=(12, 16))
    tiny = ["debug=smoke", "data.size=12", "data.batch_size=2", "viz.num_samples=0", "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    run_dir = run(["experiment=nyuv2", f"data.root={root}", *tiny], run_dir=tmp_path / "r")
    model = mtl.load_model(run_dir / "model")
    assert set(model.tasks) == {"semseg", "depth", "normals"} and model.tasks["semseg"].num_classes == 13
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]["normals"]) == {"mean_angle", "median_angle", "pct_11_25", "pct_22_5", "pct_30"}
    with pytest.raises(FileNotFoundError, match=r"nowhere.*train/image"):
        run(["experiment=cityscapes", f"data.root={tmp_path / 'nowhere'}", *tiny], run_dir=tmp_path / "r2")
    assert not (tmp_path / "r2").exists()  # a missing root is refused with the settings, before the run folder


def test_an_int_size_never_stretches_an_image_of_another_aspect(tmp_path):
    """data.size=<int> keeps each image's aspect; one stored at another aspect is named, not stretched."""
    root = write_npy_layout(tmp_path / "nyu")
    np.save(root / "train" / "image" / "2.npy", np.zeros((2 * H, 2 * H, 3), np.float32))
    for sub, shape in (("label", (2 * H, 2 * H)), ("depth", (2 * H, 2 * H, 1)), ("normal", (2 * H, 2 * H, 3))):
        a = np.zeros(shape, np.float32)
        np.save(root / "train" / sub / "2.npy", a)
    with pytest.raises(ValueError, match=r"train/image/2\.npy: size \(12, 12\) has another aspect than \(6, 8\) "
                                         r"of the first image .*0\.npy \(data.size=3 gives \(3, 3\), not \(3, 4\)\)"):
        create_datamodule("nyuv2", root=str(root), size=3).setup()
    dm = create_datamodule("nyuv2", root=str(root), size=[3, 4])  # one shape for all: fine
    dm.setup()
    assert tuple(dm.dataset("train").tensors["image"].shape[-2:]) == (3, 4)


def test_negative_and_millimetre_depth_are_reported(tmp_path, caplog):
    root = write_npy_layout(tmp_path / "nyu")
    np.save(root / "train" / "depth" / "1.npy", -np.ones((H, W, 1), np.float32))
    np.save(root / "train" / "depth" / "0.npy", np.full((H, W), 3000, np.uint16))
    with caplog.at_level("WARNING"):
        dm = create_datamodule("nyuv2", root=str(root))
        dm.setup()
    text = caplog.text
    assert "depth stored as uint16 integers up to 3000 is used as it is; if these are millimetres" in text
    assert "1 depth map(s) of" in text and "hold negative values (first: " in text and "1.npy" in text
    depth = dm.dataset("train").tensors["depth"]
    assert float(depth[1].min()) == -1.0  # kept; the task's mask (target > 0) leaves those pixels out


def test_the_millimetre_warning_comes_once_per_dataset(tmp_path, caplog):
    """The train and the val folder each repeated it word for word."""
    root = write_npy_layout(tmp_path / "nyu")
    for split in ("train", "val"):
        np.save(root / split / "depth" / "0.npy", np.full((H, W), 3000, np.uint16))
    with caplog.at_level("WARNING"):
        create_datamodule("nyuv2", root=str(root)).setup()
    assert caplog.text.count("if these are millimetres") == 1, caplog.text


def test_the_original_cityscapes_release_is_named_not_misread(tmp_path):
    (tmp_path / "cs" / "leftImg8bit" / "train").mkdir(parents=True)
    (tmp_path / "cs" / "gtFine").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds leftImg8bit \(the original release\) but no train/ folder; "
                                                r"this loader reads the preprocessed npy release"):
        create_datamodule("cityscapes", root=str(tmp_path / "cs")).setup()


def test_a_folder_holding_the_labelled_mat_says_how_to_read_it(tmp_path):
    """The loader reads nyu_depth_v2_labeled.mat when data.root is the file itself (with splits and class mapping)."""
    mat = tmp_path / "nyu" / "nyu_depth_v2_labeled.mat"
    mat.parent.mkdir()
    write_nyu_mat(mat)
    with pytest.raises(FileNotFoundError, match=r"^nyuv2: data.root .*nyu' holds nyu_depth_v2_labeled\.mat but no "
                                                r"train/ folder; to read the \.mat, point data\.root at the file "
                                                r"\(.*nyu/nyu_depth_v2_labeled\.mat\) and set data\.splits_file and "
                                                r"data\.class_mapping") as e:
        create_datamodule("nyuv2", root=str(mat.parent)).setup()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["splits_file", "class_mapping"])
def test_mat_only_settings_with_the_npy_layout_are_refused_not_ignored(tmp_path, key):
    root = write_npy_layout(tmp_path / "nyu")
    with pytest.raises(ValueError, match=rf"^nyuv2: data.{key} is read only with the labelled .mat release .* npy "
                                         r"layout, already split and mapped to 13 classes\); drop it"):
        create_datamodule("nyuv2", root=str(root), **{key: str(tmp_path / "x.mat")}).setup()


def test_hidden_side_files_are_no_samples(tmp_path):
    """macOS leaves "._<i>.npy" beside each file on copied drives: skipped, while a visible stray name is named."""
    root = write_npy_layout(tmp_path / "nyu")
    (root / "train" / "image" / "._0.npy").write_bytes(b"\0\5\0\7Mac OS X")
    dm = create_datamodule("nyuv2", root=str(root))
    dm.setup()
    assert len(dm.dataset("train")) == 3


@pytest.mark.parametrize("name", ["nyuv2", "cityscapes"])
def test_an_unknown_setting_is_named_with_the_base_class_settings(tmp_path, name):
    """size, n_train, ... reach the shared base through **kwargs; they are settings of nyuv2/cityscapes all the same."""
    with pytest.raises(TypeError, match=r"^unknown setting data\.n_trian \(did you mean data\.n_train\?\); the "
                                        r"settings here are: root, num_classes, .*size, n_train, .*augment$"):
        create_datamodule(name, root=str(tmp_path), n_trian=3)
    with pytest.raises(TypeError, match=r"^data\.n_train must be int, got '3'"):
        create_datamodule(name, root=str(tmp_path), n_train="3")


@pytest.mark.parametrize("args, message", [
    (["experiment=nyuv2", "data.root={missing}"],
     "nyuv2: data.root '{missing}' does not exist (expected {missing}/train/image/<i>.npy; see docs/data.md)"),
    (["experiment=cityscapes", "data.root={missing}"],
     "cityscapes: data.root '{missing}' does not exist (expected {missing}/train/image/<i>.npy; see docs/data.md)"),
    (["experiment=nyuv2", "data.root={missing}.mat"],
     "nyuv2: expected the labelled release file '{missing}.mat' (nyu_depth_v2_labeled.mat; see docs/data.md)"),
    (["data=hf_local", "data.path={missing}", "task=classification"],
     "hf_local: no dataset at '{missing}' (expected a save_to_disk folder, or .parquet/.arrow files)"),
])
def test_a_data_root_that_does_not_exist_leaves_no_run_folder(tmp_path, args, message):
    """Refused in the datamodule's own words with the other data settings, before the run folder (was FAILED)."""
    from mtl.train import run

    missing = tmp_path / "nonexistent"
    with pytest.raises(FileNotFoundError) as e:
        run([a.format(missing=missing) for a in args] + ["debug=smoke", "logger=none"], run_dir=tmp_path / "run")
    assert str(e.value) == message.format(missing=missing)
    assert not (tmp_path / "run").exists()
