"""The embedded scenes generator, its datamodule and the local HF-dataset datamodule (all tiny)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mtl.data.scenes_module as dmod
import mtl.data.scenes as scenes
from mtl.data import DATAMODULES, HFImageDataModule, ScenesDataModule, create_datamodule
from mtl.data.scenes import MAX_OBJECTS, camera_rays, render_scenes
from mtl.registry import UnknownNameError

SIZE = 24


@pytest.fixture(scope="module")
def batch():
    return render_scenes(seed=7, start=0, count=16, size=SIZE)


def camera_points(s):
    """Hit points in the camera frame: depth (ray distance) times the unit pixel ray."""
    size = s["depth"].shape[-1]
    rays = camera_rays(size).reshape(size, size, 3)
    return s["depth"][..., None].astype(np.float64) * rays, rays


def floor_normal(pitch):
    # world up (0, 0, 1) seen from a camera pitched down by `pitch` (x right, y down, z forward)
    return np.stack([np.zeros_like(pitch), -np.cos(pitch), -np.sin(pitch)], -1).astype(np.float64)


# --- generator ---------------------------------------------------------------------------------


def test_shapes_and_dtypes(batch):
    n = 16
    expect = {
        "image": (np.uint8, (n, SIZE, SIZE, 3)), "semseg": (np.uint8, (n, SIZE, SIZE)),
        "depth": (np.float32, (n, SIZE, SIZE)), "normals": (np.float32, (n, SIZE, SIZE, 3)),
        "edges": (np.uint8, (n, SIZE, SIZE)), "instance": (np.uint8, (n, SIZE, SIZE)),
        "count": (np.int64, (n,)), "largest": (np.int64, (n,)),
        "pitch": (np.float32, (n,)), "height": (np.float32, (n,)),
    }
    assert set(batch) == set(expect)
    for k, (dtype, shape) in expect.items():
        assert batch[k].dtype == dtype and batch[k].shape == shape, k
    assert set(np.unique(batch["edges"])) <= {0, 1}
    assert batch["semseg"].max() <= 4
    assert (batch["depth"] > 0).all()


def test_deterministic_per_index(monkeypatch):
    full = render_scenes(3, 0, 10, 16)
    part = render_scenes(3, 3, 4, 16)
    # a different chunking must not change anything either
    monkeypatch.setattr(scenes, "_CHUNK_PIXELS", 3 * 16 * 16)
    rechunked = render_scenes(3, 0, 10, 16)
    for k in full:
        np.testing.assert_array_equal(part[k], full[k][3:7], err_msg=k)
        np.testing.assert_array_equal(rechunked[k], full[k], err_msg=k)
    other = render_scenes(4, 3, 4, 16)
    assert not np.array_equal(other["image"], part["image"])
    assert render_scenes(3, 5, 0, 16)["image"].shape == (0, 16, 16, 3)


def test_edges_at_instance_changes_and_creases(batch):
    inst, edges = batch["instance"], batch["edges"].astype(bool)
    normals = batch["normals"]
    cos30 = np.cos(np.deg2rad(30))
    explained = np.zeros_like(edges)
    n_creases = 0
    for axis in (1, 2):
        n = inst.shape[axis]
        a = (slice(None),) * axis + (slice(0, n - 1),)
        b = (slice(None),) * axis + (slice(1, n),)
        changed = inst[a] != inst[b]
        # every instance change is marked on (at least) one side
        assert not (changed & ~(edges[a] | edges[b])).any()
        sharp = (normals[a] * normals[b]).sum(-1) < cos30
        # box faces are planar, so a sharp turn inside one box is a crease and must be marked
        box_crease = ~changed & (batch["semseg"][a] == 3) & sharp
        n_creases += box_crease.sum()
        assert not (box_crease & ~(edges[a] | edges[b])).any()
        explained[a] |= changed | sharp
        explained[b] |= changed | sharp
    # and every boundary pixel sits at an instance change or a crease above 30 degrees
    assert not (edges & ~explained).any()
    assert n_creases > 0
    assert 0.01 < edges.mean() < 0.3


def test_semseg_instance_count_largest(batch):
    sem, inst = batch["semseg"], batch["instance"]
    assert ((inst == 0) == (sem == 0)).all() and ((inst == 1) == (sem == 1)).all()
    for i in range(len(sem)):
        ids = np.unique(inst[i][inst[i] >= 2])
        # objects are numbered 2.. contiguously and each id has one class
        np.testing.assert_array_equal(ids, np.arange(2, 2 + len(ids)))
        assert batch["count"][i] == len(ids)
        pixels = [(inst[i] == j).sum() for j in ids]
        classes = [np.unique(sem[i][inst[i] == j]) for j in ids]
        assert all(len(c) == 1 and c[0] >= 2 for c in classes)
        assert batch["largest"][i] == classes[int(np.argmax(pixels))][0] - 2
    assert ((batch["count"] >= 1) & (batch["count"] <= MAX_OBJECTS)).all()


def test_normals_unit_and_facing_camera(batch):
    _, rays = camera_points(batch)
    n = batch["normals"].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    assert ((n * rays).sum(-1) < 0).all()


def test_floor_depth_and_normals_from_camera(batch):
    _, rays = camera_points(batch)
    pitch = batch["pitch"].astype(np.float64)[:, None, None]
    height = batch["height"].astype(np.float64)[:, None, None]
    # world z of each ray: camera y (down) maps to (0, -sin, -cos), camera z to (0, cos, -sin)
    dz = -np.cos(pitch) * rays[..., 1] - np.sin(pitch) * rays[..., 2]
    t_floor = np.where(dz < 0, height / np.maximum(-dz, 1e-12), np.inf)
    floor = batch["semseg"] == 0
    assert floor.any()
    np.testing.assert_allclose(batch["depth"][floor], t_floor[floor], rtol=1e-5)
    # nearest surface: anything else seen below the horizon is in front of the floor
    assert (batch["depth"][~floor] <= t_floor[~floor] * (1 + 1e-5)).all()
    nf = np.broadcast_to(floor_normal(pitch[:, 0, 0])[:, None, None, :], batch["normals"].shape)
    np.testing.assert_allclose(batch["normals"][floor], nf[floor], atol=1e-5)


def test_planar_faces_and_spheres_resting_on_floor(batch):
    pts, _ = camera_points(batch)
    n = batch["normals"].astype(np.float64)
    nf = floor_normal(batch["pitch"].astype(np.float64))
    checked_faces = checked_spheres = 0
    for i in range(len(pts)):
        # the wall and every box face: one normal, one plane (n . P constant)
        for j in np.unique(batch["instance"][i]):
            m = batch["instance"][i] == j
            cls = batch["semseg"][i][m][0]
            if cls in (1, 3):
                keys = np.round(n[i][m], 3)
                for key in np.unique(keys, axis=0):
                    sel = (keys == key).all(-1)
                    offs = (pts[i][m][sel] * n[i][m][sel]).sum(-1)
                    assert np.ptp(offs) < 2e-3, (i, j)
                    checked_faces += 1
            if cls == 2 and m.sum() >= 6:
                # P = C + r n: fit centre and radius, then the sphere must touch the floor
                A = np.concatenate([np.tile(np.eye(3), (m.sum(), 1)), n[i][m].reshape(-1, 1)], 1)
                sol, *_ = np.linalg.lstsq(A, pts[i][m].reshape(-1), rcond=None)
                centre, r = sol[:3], sol[3]
                assert np.abs(A @ sol - pts[i][m].reshape(-1)).max() < 1e-3
                # floor plane in the camera frame: nf . X = -height; the centre is r above it
                np.testing.assert_allclose(nf[i] @ centre + batch["height"][i], r, atol=1e-3)
                checked_spheres += 1
    assert checked_faces > 10 and checked_spheres > 0


def test_class_balance():
    s = render_scenes(0, 0, 64, 32)
    freq = np.bincount(s["semseg"].ravel(), minlength=5) / s["semseg"].size
    assert freq[0] < 0.6 and freq[2:].sum() > 0.15  # objects are not swamped by floor and wall
    assert len(np.unique(s["largest"])) == 3 and len(np.unique(s["count"])) >= 4


# --- scenes datamodule -------------------------------------------------------------------------

KW = dict(size=16, n_train=20, n_val=8, n_test=6, seed=1, batch_size=8)


def test_datamodule_batches(tmp_path):
    dm = create_datamodule("scenes", cache_dir=tmp_path, **KW)
    assert isinstance(dm, ScenesDataModule)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.info == dict(dm.info, semseg_classes=5, classification_classes=3, image_size=16)
    b = next(iter(dm.train_dataloader()))
    expect = {
        "image": (torch.uint8, (8, 3, 16, 16)), "semseg": (torch.int64, (8, 16, 16)),
        "depth": (torch.float32, (8, 1, 16, 16)), "normals": (torch.float32, (8, 3, 16, 16)),
        "edges": (torch.float32, (8, 1, 16, 16)), "classification": (torch.int64, (8,)),
        "regression": (torch.float32, (8, 1)),
    }
    assert set(b) == set(expect)
    for k, (dtype, shape) in expect.items():
        assert b[k].dtype == dtype and tuple(b[k].shape) == shape, k
    assert sum(len(x["image"]) for x in dm.val_dataloader()) == 8
    assert sum(len(x["image"]) for x in dm.test_dataloader()) == 6
    # rows are the generator's scenes, in the documented layout
    ref = render_scenes(1, dmod.SPLIT_OFFSETS["val"] + 2, 1, 16)
    row = dm.dataset("val")[2]
    np.testing.assert_array_equal(row["image"].permute(1, 2, 0).numpy(), ref["image"][0])
    np.testing.assert_array_equal(row["normals"].permute(1, 2, 0).numpy(), ref["normals"][0])
    np.testing.assert_array_equal(row["depth"][0].numpy(), ref["depth"][0])
    np.testing.assert_array_equal(row["semseg"].numpy(), ref["semseg"][0])
    np.testing.assert_array_equal(row["edges"][0].numpy(), ref["edges"][0])
    assert row["classification"] == ref["largest"][0] and row["regression"][0] == ref["count"][0]
    assert dm.dataset("train").tensors["image"].dtype == torch.uint8  # stays compact in memory


def test_cache_reused_and_keyed(tmp_path, monkeypatch):
    dm = ScenesDataModule(cache_dir=tmp_path, **KW)
    dm.setup()

    def boom(*a, **k):
        raise AssertionError("regenerated a cached dataset")

    monkeypatch.setattr(dmod, "render_scenes", boom)
    again = ScenesDataModule(cache_dir=tmp_path, **KW)
    again.setup()
    assert again.path == dm.path
    assert torch.equal(again.dataset("train").tensors["image"], dm.dataset("train").tensors["image"])
    base = dmod.scenes_cache_key(16, 20, 8, 6, 1)
    for args in [(32, 20, 8, 6, 1), (16, 21, 8, 6, 1), (16, 20, 9, 6, 1), (16, 20, 8, 7, 1), (16, 20, 8, 6, 2)]:
        assert dmod.scenes_cache_key(*args) != base
    with pytest.raises(AssertionError, match="regenerated"):
        ScenesDataModule(cache_dir=tmp_path, **dict(KW, seed=2)).setup()
    # the failed write left nothing behind: only the first, complete folder
    assert [p.name for p in tmp_path.iterdir()] == [dm.path.name]


def test_one_cache_layout_for_python_and_cli(tmp_path, monkeypatch):
    """Python (no cache_dir) and the CLI config put generated data in the same folder per kind."""
    from mtl.cli.common import compose_in_process
    from mtl.data import default_cache_dir

    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir("scenes") == tmp_path / "c" / "scenes"
    dm = ScenesDataModule(**KW)
    dm.prepare_data()
    assert dm.path.parent == tmp_path / "c" / "scenes"
    for data in ("scenes", "zoo"):
        cfg, _ = compose_in_process("mtl.configs", "train", [f"data={data}"], tmp_path / "run")
        assert cfg.data.cache_dir == str(default_cache_dir(data))
    monkeypatch.delenv("MTL_DATA_CACHE")
    assert default_cache_dir("scenes").parts[-3:] == (".cache", "mtlkit", "scenes")
    cfg, _ = compose_in_process("mtl.configs", "train", [], tmp_path / "run")
    assert cfg.data.cache_dir == str(default_cache_dir("scenes"))


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("datasets.DatasetDict.save_to_disk", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dmod.materialize_scenes(cache_dir=tmp_path, **{k: KW[k] for k in ("size", "n_train", "n_val", "n_test")})
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden temporary


def test_data_modules_use_the_shared_atomic_writer():
    """mtl.io.atomic_path is the one atomic writer: no data module renames temporary folders itself."""
    from pathlib import Path

    import mtl.data

    root = Path(mtl.data.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        for own in ("tempfile", "os.rename(", "os.replace(", "shutil.rmtree("):
            assert own not in text, f"{f.relative_to(root)} writes atomically on its own ({own})"


def test_augment_flips_consistently(tmp_path):
    plain = ScenesDataModule(cache_dir=tmp_path, **KW)
    aug = ScenesDataModule(cache_dir=tmp_path, augment=True, **KW)
    torch.manual_seed(0)
    idx = list(range(20))
    a, p = aug.dataset("train").__getitems__(idx), plain.dataset("train").__getitems__(idx)
    flipped = [not torch.equal(a["image"][i], p["image"][i]) for i in idx]
    assert 0 < sum(flipped) < 20
    for i in idx:
        if flipped[i]:
            assert torch.equal(a["image"][i], p["image"][i].flip(-1))
            assert torch.equal(a["semseg"][i], p["semseg"][i].flip(-1))
            n = p["normals"][i].flip(-1).clone()
            n[0] = -n[0]
            assert torch.equal(a["normals"][i], n)
        assert torch.equal(a["regression"][i], p["regression"][i])


def test_registry_errors():
    assert {"scenes", "hf_local"} <= set(DATAMODULES.names())
    with pytest.raises(UnknownNameError, match="hf_local.*scenes"):
        create_datamodule("nope")


# --- local HF datasets -------------------------------------------------------------------------


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
    small = HFImageDataModule(tmp_path / "dd", image_column="img", columns=cols, image_size=8)
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
                           val_fraction=0.2, test_fraction=0.1, image_size=6)
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
    import json

    from datasets import Array3D, Dataset, Features, Value

    from mtl.cli.common import compose_in_process
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
