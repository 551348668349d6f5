"""TALL compressed store (θ0 + τ_MTL + bit-packed masks) round trips, and the PNG plots."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import merging
from merging.storage import pack_mask, unpack_mask
from merging_toys import make_models, save_models


def test_pack_unpack_bits():
    g = torch.Generator().manual_seed(0)
    for shape in [(13,), (3, 5, 7), (8,), ()]:
        m = torch.rand(shape, generator=g) > 0.5
        p = pack_mask(m)
        assert p.dtype == torch.uint8 and p.numel() == (m.numel() + 7) // 8
        assert torch.equal(unpack_mask(p, shape), m)


@pytest.mark.parametrize("mtv", ["sum", "ties"])
def test_streamed_store_round_trip(tmp_path, mtv):
    pre, fts = make_models(T=3, seed=5)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    tall = merging.tall_masks(pre, fts, lam=[0.3, 0.4, 0.5], mtv=mtv)
    path = merging.write_tall_store(pre_dir, ft_dirs, tmp_path / "store", lam=[0.3, 0.4, 0.5], mtv=mtv)
    assert path == tmp_path / "store" / "tall.safetensors"
    load_file(str(path))  # a valid safetensors file
    store = merging.open_store(tmp_path / "store")
    assert store.tasks == ["ft0", "ft1", "ft2"]  # named after the model folders
    for t in range(3):
        rec = merging.load_task_model(tmp_path / "store", f"ft{t}")
        want = tall.reconstruct(t)
        for k, v in want.items():
            assert torch.equal(rec[k], v), (t, k)
        # the task's own head comes back too: a complete task model
        assert torch.equal(rec[f"heads.task{t}.weight"], fts[t][f"heads.task{t}.weight"])
        assert not any(k.startswith("heads.") and f"task{t}" not in k for k in rec)
        for k in tall.tau:
            assert torch.equal(store.mask(t, k), tall.masks[t][k])
    for k, v in store.merged().items():
        assert torch.equal(v, tall.merged[k])
    assert merging.mask_overlap(store) == merging.mask_overlap(tall)
    with pytest.raises(FileExistsError):
        merging.write_tall_store(pre_dir, ft_dirs, tmp_path / "store")


def test_in_memory_save_and_report(tmp_path):
    pre, fts = make_models(T=4, seed=1, heads=False)
    tall = merging.tall_masks(pre, fts, lam=0.4)
    path = tall.save(tmp_path / "t.safetensors", tasks=["a", "b", "c", "d"])
    for t, name in enumerate("abcd"):
        rec = merging.load_task_model(path, name)
        for k, v in tall.reconstruct(t).items():
            assert torch.equal(rec[k], v)
    assert torch.equal(merging.load_task_model(path, 2)["decoder.proj.weight"], tall.reconstruct(2)["decoder.proj.weight"])
    rep = merging.store_report(path)
    assert rep["bytes_stored"] == path.stat().st_size
    full_one = sum(v.numel() * v.element_size() for v in pre.values())
    assert rep["bytes_full_models"] == 4 * full_one
    P = rep["merged_params"]
    assert rep["sections"]["mask"] == sum(4 * ((v.numel() + 7) // 8) for v in tall.tau.values())
    assert rep["sections"]["tau"] == 4 * P and rep["ratio"] < 1
    with pytest.raises(KeyError, match="unknown task"):
        merging.load_task_model(path, "zzz")
    with pytest.raises(merging.MergeInputError, match="TALL store"):
        merging.load_task_model(tmp_path, "a")


def test_in_memory_save_keeps_heads_like_the_streamed_store(tmp_path):
    pre, fts = make_models(T=3, seed=4)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    tall = merging.tall_masks(pre_dir, ft_dirs, lam=0.4)
    saved = tall.save(tmp_path / "mem")
    streamed = merging.write_tall_store(pre_dir, ft_dirs, tmp_path / "stream", lam=0.4)
    for t, name in enumerate(tall.tasks):
        a, b = merging.load_task_model(saved, name), merging.load_task_model(streamed, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert torch.equal(a[f"heads.task{t}.weight"], fts[t][f"heads.task{t}.weight"])
        rec = tall.reconstruct(name)  # a name from .tasks, as load_task_model takes
        assert all(torch.equal(rec[k], tall.reconstruct(t)[k]) for k in rec)
    with pytest.raises(KeyError, match="unknown task 'zzz'"):
        tall.reconstruct("zzz")


def test_reconstruct_returns_the_task_model_load_task_model_returns(tmp_path):
    """reconstruct(t) left model t's head out (load_state_dict into its fine-tuned model: 'Missing key(s)
    heads...'), while load_task_model includes it: both now give the same keys and values, head included, and
    include_task_keys=False leaves it out of both."""
    pre, fts = make_models(T=2, seed=3)
    tall = merging.tall_masks(pre, fts, lam=0.3)
    store = tall.save(tmp_path / "s.safetensors")
    for t, name in enumerate(tall.tasks):
        for heads in (True, False):
            rec, loaded = tall.reconstruct(name, include_task_keys=heads), merging.load_task_model(store, t, heads)
            assert sorted(rec) == sorted(loaded) and all(torch.equal(rec[k], loaded[k]) for k in rec)
        rec = tall.reconstruct(t)
        assert sorted(rec) == sorted(set(pre) | set(fts[t]))  # θ0's keys and model t's own (its head)
        assert torch.equal(rec[f"heads.task{t}.weight"], fts[t][f"heads.task{t}.weight"])
    with pytest.raises(ValueError, match="include_task_keys must be true or false"):
        tall.reconstruct(0, include_task_keys="no")


def test_plots_write_pngs(tmp_path):
    results = {
        "individual": {"mnist": 0.99, "digits": 0.97, "textures": 0.8},
        "task_arithmetic": {"mnist": 0.9, "digits": 0.85, "textures": 0.6},
        "ties": {"mnist": 0.93, "digits": 0.88},
    }
    p = merging.plot_task_accuracy(results, tmp_path / "acc.png")
    pre, fts = make_models(T=3)
    tall = merging.tall_masks(pre, fts)
    q = merging.plot_mask_overlap(tall, tmp_path / "sub" / "overlap.png")
    r = merging.plot_mask_overlap(merging.mask_overlap(tall), tmp_path / "overlap2.png")
    for f in (p, q, r):
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_path_helpers_close_the_store(tmp_path, monkeypatch):
    pre, fts = make_models(T=2, seed=2, heads=False)
    path = merging.tall_masks(pre, fts).save(tmp_path / "t.safetensors", tasks=["a", "b"])
    closed = []
    close = merging.TallStore.close
    monkeypatch.setattr(merging.TallStore, "close", lambda self: (closed.append(self.path), close(self)))
    merging.load_task_model(path, "a")
    merging.store_report(path)
    merging.mask_overlap(path)
    assert closed == [path] * 3
    with merging.open_store(path) as store:  # a caller's store stays open until the caller closes it
        merging.load_task_model(store, "b")
        assert len(closed) == 3
    assert len(closed) == 4


def test_store_task_names_come_from_single_task_model_folders(tmp_path):
    """mtl-train writes every fine-tune to `<run>/model`: the folder names are all "model", the tasks are not."""
    import mtl
    from merging.sources import default_task_names as _default_task_names
    from mtl.models import create_model

    folders = []
    for task in ("mnist", "faces"):
        m = create_model([{"kind": "classification", "name": task, "num_classes": 3}], backbone="test_resnet",
                         decoder={"name": "hps", "channels": 8})
        folders.append(mtl.save_model(m, tmp_path / task / "model"))
    assert _default_task_names(folders) == ["mnist", "faces"]
    assert _default_task_names([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == ["a", "b"]
    assert _default_task_names([folders[0], folders[0]]) == ["task0", "task1"]
    dotted = [tmp_path / "llama-3.1-math", tmp_path / "llama-3.1-code"]  # folders: no suffix to drop
    for d in dotted:
        d.mkdir()
    assert _default_task_names(dotted) == ["llama-3.1-math", "llama-3.1-code"]


def test_a_store_whose_manifest_disagrees_with_its_tensors_is_refused(tmp_path):
    """Edited or foreign stores: each mismatch is named when the store is opened, before any task model
    is rebuilt (a short mask would otherwise unpack with zero bits, a lost key leave models without it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pre, fts = make_models(T=2)
    path = merging.write_tall_store(pre, fts, tmp_path / "good")
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    manifest = json.loads(meta["mtlkit_tall"])
    key = manifest["merged"][0]

    def variant(name, edit_tensors=None, **fields):
        t = dict(tensors)
        if edit_tensors:
            edit_tensors(t)
        m = {**manifest, **fields}
        out = tmp_path / f"{name}.safetensors"
        save_file(t, str(out), metadata={**meta, "mtlkit_tall": json.dumps(m)})
        return out

    cases = [
        (variant("short", lambda t: t.__setitem__(f"mask/0/{key}", t[f"mask/0/{key}"][:1])),
         rf"mask/0/{re.escape(key)} must be \d+ packed bytes"),
        (variant("nomask", lambda t: t.pop(f"mask/1/{key}")), rf"tensor 'mask/1/{re.escape(key)}' is missing"),
        (variant("order", order=[k for k in manifest["order"] if k != key], merged=manifest["merged"][1:]),
         r"tensor '(theta0|tau|mask/\d)/.*' is not in the manifest"),
        (variant("dup", tasks=["a", "a"]), r"task names must be distinct"),
        (variant("ints", tasks=[0, 1]), r"manifest field 'tasks' must be a list of names"),
        (variant("little", mask_bitorder="little"), r"mask_bitorder 'little'"),
        (variant("heads", task_keys=[[]]), r"manifest field 'task_keys' must hold one list of names per task \(2\)"),
        (variant("shape", lambda t: t.__setitem__(f"tau/{key}", t[f"tau/{key}"].reshape(-1)[:1].clone())),
         rf"theta0/{re.escape(key)} has shape .* but tau/{re.escape(key)}"),
        (variant("lamstr", lam="x"), r"manifest field 'lam' must hold one finite λ ≥ 0 per task \(2\), got 'x'"),
        (variant("lamlen", lam=[0.4]), r"manifest field 'lam' must hold one finite λ ≥ 0 per task \(2\), got \[0.4\]"),
        (variant("mtv", mtv=5), r"manifest field 'mtv' must be 'sum' or 'ties', got 5"),
        (variant("bn", bn=None), r"manifest field 'bn' must be one of \['pretrained', 'average', 'merge'\], got None"),
    ]
    for bad, why in cases:
        for read in (merging.open_store, lambda p: merging.load_task_model(p, 0), merging.store_report):
            with pytest.raises(merging.MergeInputError, match=rf"{bad}: not a valid TALL store: {why}"):
                read(bad)
    assert merging.open_store(path).num_tasks == 2  # the unedited store opens
    listed = tmp_path / "listed.safetensors"
    save_file(tensors, str(listed), metadata={**meta, "mtlkit_tall": "[1, 2]"})
    with pytest.raises(merging.MergeInputError, match=r"listed.safetensors: not a valid TALL store: its mtlkit_tall "
                                                      r"manifest must be a JSON object, got a list"):
        merging.open_store(listed)


def test_the_manifest_records_the_bn_rule(tmp_path):
    pre, fts = make_models(T=2)
    for bn in ("pretrained", "average"):
        streamed = merging.write_tall_store(pre, fts, tmp_path / f"s_{bn}", bn=bn)
        saved = merging.tall_masks(pre, fts, bn=bn).save(tmp_path / f"m_{bn}.safetensors")
        for path in (streamed, saved):
            assert merging.open_store(path).manifest["bn"] == bn


def _flip_bit(path, tensor_name):
    """Flip the lowest bit of the first byte of one tensor's data, in place (a disk or copy error)."""
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        start = json.loads(f.read(n))[tensor_name]["data_offsets"][0]
        f.seek(8 + n + start)
        byte = f.read(1)[0]
        f.seek(8 + n + start)
        f.write(bytes([byte ^ 1]))


@pytest.mark.parametrize("section", ["tau", "mask/1"])
def test_a_store_with_one_flipped_bit_is_refused(tmp_path, section):
    pre, fts = make_models(T=2)
    tall = merging.tall_masks(pre, fts)
    for path in (merging.write_tall_store(pre, fts, tmp_path / "streamed"), tall.save(tmp_path / "mem.safetensors")):
        assert merging.open_store(path).num_tasks == 2  # as written
        _flip_bit(path, f"{section}/{next(iter(tall.tau))}")
        for read in (merging.open_store, lambda p: merging.load_task_model(p, 0), merging.mask_overlap):
            with pytest.raises(merging.MergeInputError, match=rf"{re.escape(str(path))}: weights differ from the digest"):
                read(path)


def test_a_version_2_store_without_its_digest_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    pre, fts = make_models(T=2)
    path = merging.write_tall_store(pre, fts, tmp_path / "good")
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta.pop("weights_digest")
    save_file(tensors, str(tmp_path / "bare.safetensors"), metadata=meta)
    with pytest.raises(merging.MergeInputError, match="bare.safetensors: not a valid TALL store: its header has no weights_digest"):
        merging.open_store(tmp_path / "bare.safetensors")


def test_in_memory_save_never_writes_over_or_into_an_input(tmp_path):
    pre, fts = make_models(T=2, seed=3)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    tall = merging.tall_masks(pre_dir, ft_dirs)
    weights = ft_dirs[0] / "model.safetensors"
    before = weights.read_bytes()
    for out in (weights, ft_dirs[0], pre_dir / "store", tmp_path):  # the input's file, the folder, inside, around
        with pytest.raises(ValueError, match=rf"output={re.escape(str(out))} (is|lies inside|holds) the input model folder"):
            tall.save(out, overwrite=True)
    assert weights.read_bytes() == before and not (ft_dirs[0] / "tall.safetensors").exists()
    assert tall.save(tmp_path / "elsewhere").is_file()


def test_task_names_given_as_one_string_are_refused(tmp_path):
    pre, fts = make_models(T=3)
    with pytest.raises(TypeError, match=r"tasks must be a list of 3 names \(one per fine-tuned model\), not the string 'abc'"):
        merging.write_tall_store(pre, fts, tmp_path / "s", tasks="abc")
    with pytest.raises(TypeError, match=r"not the string 'abc'"):
        merging.tall_masks(pre, fts).save(tmp_path / "m.safetensors", tasks="abc")
    assert not (tmp_path / "s").exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("names, err, match", [
    (["a", ""], ValueError, r"^tasks\[1\] is '': a task name must not be empty or blank$"),
    (["a", "  "], ValueError, r"^tasks\[1\] is '  ': a task name must not be empty or blank$"),
    ([1, None], TypeError, r"^tasks\[0\] must be a task name \(a string\), got int 1$"),
    (["a", None], TypeError, r"^tasks\[1\] must be a task name \(a string\), got NoneType None$"),
])
def test_empty_or_non_string_task_names_are_refused_before_writing(tmp_path, names, err, match):
    """tasks=["a", ""] was written, and [1, None] stored as "1" and "None" (load_task_model(s, None) finds no task)."""
    pre, f = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": -torch.ones(3)}]
    with pytest.raises(err, match=match):
        merging.write_tall_store(pre, f, tmp_path / "s.safetensors", tasks=names)
    with pytest.raises(err, match=match):
        merging.tall_masks(pre, f).save(tmp_path / "m.safetensors", tasks=names)
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_store_size_and_the_warning_when_it_outgrows_the_models(tmp_path, caplog, dtype):
    """τ_MTL stays float32 (4 bytes) beside θ0 in the model's dtype (2) and T/8 mask bytes per merged
    parameter: 6 + T/8 against 2·T for the models. T = 2: 6.25 > 4, said in a warning; T = 4: 6.5 < 8."""
    for T, larger in ((2, True), (4, False)):
        pre, fts = make_models(T=T, heads=False, dtype=dtype)
        pre["big"] = torch.randn(64, 256).to(dtype)  # the per-parameter costs, not the header, dominate
        for ft in fts:
            ft["big"] = (pre["big"].float() + 0.05 * torch.randn(64, 256)).to(dtype)
        tall = merging.tall_masks(pre, fts)
        caplog.clear()
        with caplog.at_level("WARNING", logger="merging.storage"):
            path = merging.write_tall_store(pre, fts, tmp_path / f"{dtype}_{T}", tasks=[f"t{i}" for i in range(T)])
        rep = merging.store_report(path)
        P = rep["merged_params"]
        assert rep["sections"]["tau"] == 4 * P and rep["sections"]["theta0"] == 2 * P
        assert (rep["bytes_stored"] > rep["bytes_full_models"]) == larger
        said = [r.getMessage() for r in caplog.records if "more than the" in r.getMessage()]
        assert len(said) == int(larger) and (not said or f"more than the {rep['bytes_full_models']} of the 2 task models" in said[0])
        for t in range(T):  # rebuilt bit for bit, in the model's dtype
            rec = merging.load_task_model(path, t)
            assert all(rec[k].dtype == v.dtype and torch.equal(rec[k], v) for k, v in tall.reconstruct(t).items())


def test_a_task_model_rebuilt_from_a_store_loads_into_its_fine_tuned_architecture(tmp_path):
    """mtl.load_model does not read a store (mtl never imports merging) but says what does; the documented
    path, mtl.load_model(<fine-tuned folder>) + load_state_dict(load_task_model(...)), gives the TALL model."""
    import mtl
    from mtl.io import ModelFolderError
    from mtl.models import create_model

    def model(task, seed):
        torch.manual_seed(seed)
        return create_model([{"kind": "classification", "name": task, "num_classes": 3}], backbone="test_resnet",
                            decoder={"name": "hps", "channels": 8})

    pre = mtl.save_model(model("mnist", 0), tmp_path / "pre")
    fts = [mtl.save_model(model(t, s), tmp_path / t / "model") for t, s in (("mnist", 1), ("faces", 2))]
    store = merging.write_tall_store(pre, fts, tmp_path / "store", lam=0.3)
    for where in (tmp_path / "store", store):
        with pytest.raises(ModelFolderError, match=rf"{re.escape(str(where))} is a TALL store, not a model folder: .*"
                                                   r"merging.load_task_model"):
            mtl.load_model(where)
    tall = merging.tall_masks(pre, fts, lam=0.3)
    for t, task in enumerate(tall.tasks):
        net = mtl.load_model(fts[t])
        net.load_state_dict(merging.load_task_model(store, task))  # strict: every key, the task's head included
        state = net.state_dict()
        assert all(torch.equal(state[k], v) for k, v in tall.reconstruct(t).items())


@pytest.mark.parametrize("k", [None, 2])
def test_mask_overlap_plot_keeps_its_box_off_the_bars_and_names_consensus(k):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle
    from merging.plots import mask_overlap_figure

    # the last bar (used by all 3 tasks) is the tallest, where the box sits (top right)
    ov = {"tasks": 3, "params": 100, "counts": [5, 10, 15, 70], "fractions": [0.05, 0.1, 0.15, 0.7],
          "catastrophic": 0.05, "selfish": 0.1, "universal": 0.7}
    fig = mask_overlap_figure(ov, k=k)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    ax = fig.axes[0]
    box = ax.texts[0].get_bbox_patch().get_window_extent(renderer)
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 4 and not any(b.get_window_extent(renderer).overlaps(box) for b in bars)
    if k is None:
        assert ax.get_title() == "TALL mask overlap" and not ax.lines
    else:
        assert ax.get_title() == "Consensus mask overlap (k = 2)"
        assert "kept by Consensus (≥ 2 tasks): 85.0%" in ax.texts[0].get_text()
        assert list(ax.lines[0].get_xdata()) == [1.5, 1.5]  # between 1 task (dropped) and 2 (kept)
        assert not ax.lines[0].get_window_extent(renderer).overlaps(box)


def test_a_store_is_hashed_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """load_task_model(store, t) in a loop over T tasks re-hashed the whole file T times."""
    import mtl.io

    pre, fts = make_models(T=2)
    path = merging.write_tall_store(pre, fts, tmp_path / "s")
    calls = []
    real = mtl.io.check_weights_digest
    monkeypatch.setattr(mtl.io, "check_weights_digest", lambda *a, **k: calls.append(1) or real(*a, **k))
    for t in range(2):
        merging.load_task_model(path, t)
    merging.open_store(path)
    assert len(calls) == 1
    _flip_bit(path, next(k for k in merging.open_store(path).src.keys() if k.startswith("tau/")))
    with pytest.raises(merging.MergeInputError, match="weights differ from the digest"):
        merging.open_store(path)  # rewritten: checked again
