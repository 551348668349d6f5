"""The embedded scenes generator and its datamodule (all tiny)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import mtl.data.scenes_module as dmod
import mtl.data.scenes as scenes
from mtl.data import DATAMODULES, ScenesDataModule, create_datamodule
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
    from mtl.cli.in_process import compose_in_process
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
    # set but empty counts as unset on both sides (the config's oc.env gave "": the CLI cached at /scenes)
    monkeypatch.setenv("MTL_DATA_CACHE", "")
    for data in ("scenes", "zoo"):
        cfg, _ = compose_in_process("mtl.configs", "train", [f"data={data}"], tmp_path / "run")
        assert cfg.data.cache_dir == str(Path.home() / ".cache" / "mtlkit" / data) == str(default_cache_dir(data))


@pytest.mark.parametrize("home", [None, "rel/home"])
def test_without_an_absolute_home_the_default_cache_asks_for_one(tmp_path, monkeypatch, home):
    """No MTL_DATA_CACHE and no absolute home ($HOME unset without a passwd entry: ``~`` stays ``~``; or a relative
    $HOME): default_cache_dir gave a relative folder, so Python cached the data under the working folder. It now
    asks for HOME or MTL_DATA_CACHE, as the CLIs do (normalize_path_env), and writes nothing."""
    import os

    from mtl.cli.common import normalize_path_env
    from mtl.data import default_cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MTL_DATA_CACHE")
    if home is None:
        monkeypatch.delenv("HOME", raising=False)
        monkeypatch.setattr(os.path, "expanduser", lambda p: p)  # (what it gives for a uid without a passwd entry)
    else:
        monkeypatch.setenv("HOME", home)
    for call in (lambda: default_cache_dir("scenes"), lambda: ScenesDataModule(**KW).prepare_data(),
                 normalize_path_env):
        with pytest.raises(ValueError, match=r"^no home folder \(\$HOME.*\): set HOME, or MTL_DATA_CACHE"):
            call()
    assert not any(tmp_path.iterdir())
    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "c"))  # enough
    assert default_cache_dir("scenes") == tmp_path / "c" / "scenes"


@pytest.mark.parametrize("how", ["cache_dir", "env"])
def test_a_cache_folder_with_a_tilde_is_under_home(tmp_path, monkeypatch, home_and_cwd, how):
    """cache_dir="~/probe" (or MTL_DATA_CACHE="~/probe") was written to a literal ./~/probe in the working directory,
    then read from $HOME/probe by datasets.load_from_disk: every run failed with "corrupt data cache entry"."""
    home, cwd = home_and_cwd
    if how == "env":
        monkeypatch.setenv("MTL_DATA_CACHE", "~/probe")
    kw = dict(KW, cache_dir="~/probe/scenes" if how == "cache_dir" else None)
    dm = ScenesDataModule(**kw)
    dm.setup()
    assert dm.path.parent == home / "probe" / "scenes" and dm.path.is_dir()
    assert list(cwd.iterdir()) == []  # no ./~ tree
    monkeypatch.setattr(dmod, "_scenes_split", lambda *a: pytest.fail("the cached scenes were rendered again"))
    again = ScenesDataModule(**kw)
    again.setup()
    assert again.path == dm.path and torch.equal(again._data["train"][0]["image"], dm._data["train"][0]["image"])


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


def test_flips_leave_arrays_not_shaped_like_the_image_alone():
    from mtl.data.memory import random_hflip

    torch.manual_seed(0)
    image = torch.arange(8 * 3 * 4 * 6, dtype=torch.float32).view(8, 3, 4, 6)
    batch = {"image": image.clone(), "depth": image[:, :1].clone(), "semseg": image[:, 0].clone(),
             "keypoints": torch.arange(8 * 3 * 2).view(8, 3, 2)}
    out = random_hflip({k: v.clone() for k, v in batch.items()})
    flipped = [not torch.equal(out["image"][i], image[i]) for i in range(8)]
    assert 0 < sum(flipped) < 8
    for i in range(8):
        want = image[i].flip(-1) if flipped[i] else image[i]
        assert torch.equal(out["image"][i], want) and torch.equal(out["depth"][i], want[:1])
        assert torch.equal(out["semseg"][i], want[0])
    assert torch.equal(out["keypoints"], batch["keypoints"])  # (B, 3, 2): not a grid, never flipped


def test_calibration_batches_are_never_augmented(tmp_path):
    from mtl.data.calibration import calibration_batches

    aug = ScenesDataModule(cache_dir=tmp_path, augment=True, **KW)
    plain = {k: v[:8] for k, v in aug.dataset("train").tensors.items()}  # stored order, unflipped
    torch.manual_seed(0)
    runs = [calibration_batches(aug, 1)[0] for _ in range(3)]
    assert all(torch.equal(r["image"], plain["image"]) and torch.equal(r["normals"], plain["normals"]) for r in runs)
    assert aug.train_dataloader().dataset.transform is not None  # training still flips


def test_registry_errors():
    assert {"scenes", "hf_local"} <= set(DATAMODULES.names())
    with pytest.raises(UnknownNameError, match="hf_local.*scenes"):
        create_datamodule("nope")


def test_a_corrupt_scenes_cache_entry_is_named_with_what_to_do(tmp_path):
    import os

    path = dmod.materialize_scenes(size=8, n_train=4, n_val=2, n_test=2, cache_dir=tmp_path)
    os.truncate(next((path / "train").glob("*.arrow")), 300)
    with pytest.raises(ValueError, match=rf"^{path}: corrupt data cache entry .*; delete this folder and it is rebuilt"):
        dmod.load_scenes_tensors(path, "train")


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_scenes_cache_entry_without_its_record_is_named_with_what_to_do(tmp_path, damage):
    """An interrupted copy without mtlkit_scenes.json gave a bare FileNotFoundError (a truncated one a JSONDecodeError),
    not the corrupt-entry message that says to delete the folder."""
    path = dmod.materialize_scenes(size=8, n_train=4, n_val=2, n_test=2, cache_dir=tmp_path)
    record = path / "mtlkit_scenes.json"
    record.unlink() if damage == "missing" else record.write_text(record.read_text()[:5])
    with pytest.raises(ValueError, match=rf"^{path}: corrupt data cache entry \(.*mtlkit_scenes.json.*\); delete this "
                                         "folder and it is rebuilt on the next run$"):
        dmod.load_scenes_tensors(path, "train")


def test_an_empty_split_is_refused_before_anything_is_cached(tmp_path):
    """An empty split once reached the cache and broke every later run with the same sizes."""
    with pytest.raises(ValueError, match="data.n_val must be an int >= 1, got 0"):
        dmod.materialize_scenes(size=8, n_train=4, n_val=0, n_test=2, cache_dir=tmp_path)
    for kwargs, key in [({"size": "abc"}, "data.size"), ({"n_train": "abc"}, "data.n_train"), ({"size": 8.5}, "data.size")]:
        with pytest.raises(ValueError, match=rf"{key} must be an int >= 1, got"):  # not a numpy error from inside
            dmod.materialize_scenes(**{"size": 8, "n_train": 4, "n_val": 2, "n_test": 2, **kwargs}, cache_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_asking_for_more_calibration_batches_than_the_split_has_is_refused(tmp_path):
    """mtl-prune recorded calib.batches=8 and used 4 without a word (mtl-extract refused it): one rule now."""
    from mtl.data.calibration import calibration_batches

    dm = ScenesDataModule(cache_dir=tmp_path, **KW)
    n = len(dm.train_dataloader())
    assert len(calibration_batches(dm, n)) == n
    with pytest.raises(ValueError, match=rf"calib.batches={n + 1} but the train split has only {n} batch\(es\); lower it"):
        calibration_batches(dm, n + 1)


def test_mtl_extract_names_calib_data_settings_as_they_are_set():
    from mtl.cli.extract import _checked_calib_data

    with pytest.raises(TypeError, match=r"unknown setting calib.data.batchsize \(did you mean calib.data.batch_size\?\); the settings here are: .*batch_size"):
        _checked_calib_data({"name": "scenes", "batchsize": 8})
    with pytest.raises(ValueError, match=r"calib.data.root is required for data 'nyuv2'"):
        _checked_calib_data({"name": "nyuv2"})
    assert _checked_calib_data({"name": "scenes", "size": 32}) == {"name": "scenes", "size": 32}


def test_numpy_int_settings_render_the_same_scenes(tmp_path):
    # numpy ints pass the int checks; they must reach the cache key and the DataLoader as Python ints
    ref = ScenesDataModule(size=8, n_train=4, n_val=2, n_test=2, seed=1, batch_size=2, cache_dir=tmp_path)
    d = ScenesDataModule(size=np.int64(8), n_train=np.int64(4), n_val=np.int32(2), n_test=2, seed=np.int64(1),
                         batch_size=np.int64(2), cache_dir=tmp_path)
    for m in (ref, d):
        m.prepare_data()
        m.setup()
    assert d.path == ref.path
    assert next(iter(d.train_dataloader()))["image"].shape[0] == 2


def test_numpy_int_settings_leave_a_checkpoint_that_loads_with_weights_only(tmp_path):
    """The data module's hyperparameters go into every checkpoint: recorded as given, np.int64 settings (taken since
    e2802d8) made it one torch.load(weights_only=True), mtl-train's resume, refuses."""
    import lightning as L

    from mtl.models import create_model
    from mtl.module import MultiTaskModule

    d = ScenesDataModule(size=np.int64(16), n_train=np.int64(2), n_val=2, n_test=2, seed=np.int64(1),
                         batch_size=np.int64(2), cache_dir=str(tmp_path))
    model = create_model([{"kind": "depth"}], backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                         decoder={"name": "hps", "channels": 8})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(MultiTaskModule(model, log_weights_every=0), datamodule=d)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    hp = torch.load(tmp_path / "last.ckpt", weights_only=True)["datamodule_hyper_parameters"]
    assert {k: (hp[k], type(hp[k])) for k in ("size", "seed", "batch_size")} == {
        "size": (16, int), "seed": (1, int), "batch_size": (2, int)}
    assert type(d.hparams_initial["batch_size"]) is int  # the loggers' copy (hparams.yaml) too
