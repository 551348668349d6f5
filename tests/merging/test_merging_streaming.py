"""The streaming engine: identical to the in-memory path, valid safetensors, atomic output."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merging
import merging.kernels
import merging.methods as methods_mod
from merging.sources import TensorInfo
from merging.streaming import SafetensorsWriter
from merging_toys import assert_same, make_models, save_models

CASES = [
    ("average", {}),
    ("task_arithmetic", {"lam": 0.3}),
    ("task_arithmetic", {"lam": [0.2, 0.5, 0.1]}),
    ("ties", {}),
    ("ties", {"k": 35, "merge_func": "sum", "lam": 0.3}),
    ("ties", {"trim": "per_tensor", "k": 10}),
    ("dare", {"p": 0.5, "base": "task_arithmetic", "seed": 3}),
    ("dare", {"p": 0.3, "base": "ties", "k": 50}),
    ("consensus", {"k": 2}),
    ("consensus", {"k": 1, "base": "ties", "tall_lam": [0.2, 0.4, 0.6], "ties_k": 30}),
]


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    pre, fts = make_models(T=3, seed=11)
    pre_dir, ft_dirs = save_models(tmp_path_factory.mktemp("models"), pre, fts)
    return pre, fts, pre_dir, ft_dirs


@pytest.mark.parametrize("method,hp", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
def test_streaming_equals_in_memory(method, hp, model_files, tmp_path):
    pre, fts, pre_dir, ft_dirs = model_files
    ref = merging.merge(method, pre, fts, **hp)  # dict inputs, kthvalue threshold
    out = merging.merge_to_file(method, pre_dir, ft_dirs, tmp_path / "merged", **hp)  # files, radix
    assert out == tmp_path / "merged" / "model.safetensors"
    assert_same(load_file(str(out)), ref)
    # in-memory path over the same files, and radix select in memory
    assert_same(merging.merge(method, pre_dir, ft_dirs, **hp), ref)
    assert_same(merging.merge(method, pre, fts, select="radix", **hp), ref)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["mtlkit_method"] == method and f.metadata()["mtlkit_convention"] == "paper"


def test_streaming_half_precision_and_file_inputs(tmp_path):
    pre, fts = make_models(T=3, seed=2, dtype=torch.bfloat16)
    pre_p, ft_ps = save_models(tmp_path, pre, fts, folders=False)
    ref = merging.merge("ties", pre, fts)
    assert ref["backbone.conv.weight"].dtype == torch.bfloat16
    out = merging.merge_to_file("ties", pre_p, ft_ps, tmp_path / "m.safetensors")
    assert out == tmp_path / "m.safetensors"
    assert_same(load_file(str(out)), ref)


def test_existing_output_is_refused_unless_overwrite(model_files, tmp_path):
    _, _, pre_dir, ft_dirs = model_files
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite"):
        merging.merge_to_file("average", pre_dir, ft_dirs, out)
    assert out.read_bytes() == b"precious"
    merging.merge_to_file("average", pre_dir, ft_dirs, out, overwrite=True)
    assert "backbone.conv.weight" in load_file(str(out))


@pytest.mark.parametrize("fused", [False, True])
def test_interrupted_merge_leaves_no_output(fused, model_files, tmp_path, monkeypatch):
    _, _, pre_dir, ft_dirs = model_files
    calls = {"n": 0}
    # the third merged tensor fails: in the whole-tensor kernel, or in the chunked kernels (torch or native)
    owner, attr = (merging.kernels.Chunks, "map") if fused else (methods_mod.TaskArithmetic, "merge_tensor")
    original = getattr(owner, attr)

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, attr, failing)
    for target in (tmp_path / "out.safetensors", tmp_path / "folder"):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="disk on fire"):
            merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, target, fused=fused)
        assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temporary files left behind either
    # an existing output survives a failed overwrite
    monkeypatch.setattr(owner, attr, original)
    good = merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, tmp_path / "out.safetensors", fused=fused)
    before = good.read_bytes()
    monkeypatch.setattr(owner, attr, failing)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, good, overwrite=True, fused=fused)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_writer_round_trip_all_dtypes(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 3).bfloat16(),
        "f64": torch.randn(4, dtype=torch.float64),
        "i64": torch.tensor(5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "empty": torch.empty(0, 3),
        "noncontig": torch.randn(4, 6).t(),
    }
    path = tmp_path / "w.safetensors"
    with open(path, "wb") as f:
        w = SafetensorsWriter(f, [(k, TensorInfo(tuple(v.shape), v.dtype)) for k, v in tensors.items()], {"a": "b"})
        for k, v in tensors.items():
            w.write(k, v)
        w.finish()
    back = load_file(str(path))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"a": "b"}
    with open(tmp_path / "x", "wb") as f:
        w = SafetensorsWriter(f, [("a", TensorInfo((2,), torch.float32))])
        with pytest.raises(ValueError, match="does not match"):
            w.write("a", torch.zeros(3))


def test_threads_option_is_restored_and_fsync(model_files, tmp_path):
    pre, fts, pre_dir, ft_dirs = model_files
    before = torch.get_num_threads()
    ref = merging.merge("ties", pre, fts)
    assert_same(merging.merge("ties", pre, fts, threads=1), ref)
    out = merging.merge_to_file("ties", pre_dir, ft_dirs, tmp_path / "m.safetensors", threads=1, fsync=True)
    assert_same(load_file(str(out)), ref)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        merging.merge("ties", pre, fts, threads=0)


def test_read_ahead_hints_run_off_the_merging_thread_and_never_fail_a_merge(model_files, tmp_path, monkeypatch):
    """Read-ahead hints run on a background thread (on cached inputs they are pure kernel work); a hint
    that fails does not fail the merge, and every hint is done before the files close."""
    import threading

    from merging.sources import SafetensorsSource

    pre, fts, pre_dir, ft_dirs = model_files
    seen, closed = [], []
    real_prefetch, real_close = SafetensorsSource.prefetch, SafetensorsSource.close

    def hint(self, key):  # per file: a source left over from another test may be closed (collected) meanwhile
        seen.append((threading.current_thread().name, id(self) in closed))
        real_prefetch(self, key)
        raise OSError("the hint fails")

    def close(self):
        closed.append(id(self))
        real_close(self)

    monkeypatch.setattr(SafetensorsSource, "prefetch", hint)
    monkeypatch.setattr(SafetensorsSource, "close", close)
    out = merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, tmp_path / "m", lam=0.3)
    assert_same(load_file(str(out)), merging.merge("task_arithmetic", pre, fts, lam=0.3))
    assert seen and all(name.startswith("mtl-prefetch") for name, _ in seen)
    assert not any(after_close for _, after_close in seen)


def test_importing_merging_leaves_the_model_world_and_plotting_unloaded():
    # LLM-scale merges budget their peak memory from `import merging`'s baseline (docs/merging.md)
    import subprocess
    import sys

    code = ("import sys, merging; print(sorted(m for m in ('timm', 'torchvision', 'matplotlib', 'scipy', "
            "'mtl.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_submodules_are_reachable_as_attributes_without_importing_them_first():
    import subprocess
    import sys

    code = ("import mtl, merging, pruning; print(mtl.train.run.__module__, merging.job.run.__module__, "
            "pruning.job.__name__, 'train' in dir(mtl), 'learned' in dir(merging), 'job' in dir(pruning)); "
            "import sys; print(hasattr(mtl, 'nope'), hasattr(mtl, '_private')); "
            "print(mtl.exporters.job.run.__module__, mtl.cli.extract.run.__module__)")  # the README's runners
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["mtl.train merging.job pruning.job True True True", "False False",
                                          "mtl.exporters.job mtl.cli.extract"]


def test_file_writers_expand_a_leading_tilde(tmp_path, monkeypatch, home_and_cwd):
    """merge_to_file / write_tall_store took "~/x" as ./~/x while the readers
    (load_state_dict, load_task_model) take it as $HOME/x: a result written to ~/x could not be read back as ~/x."""
    from merging_toys import make_models, save_models

    pre, fts = make_models(T=2, seed=3)
    (tmp_path / "in").mkdir()
    pre_path, ft_paths = save_models(tmp_path / "in", pre, fts)
    home, cwd = home_and_cwd
    written = merging.merge_to_file("task_arithmetic", pre_path, ft_paths, "~/m.safetensors", lam=0.3)
    assert written == home / "m.safetensors"
    want = merging.merge("task_arithmetic", pre, fts, lam=0.3)
    got = load_file(str(home / "m.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    store = merging.write_tall_store(pre_path, ft_paths, "~/s", lam=0.3)
    assert store == home / "s" / "tall.safetensors"
    assert set(merging.load_task_model("~/s", 0)) >= set(want)
    assert list(cwd.iterdir()) == []
