"""Guards of the training-free merging API and CLI: outputs never land on inputs, settings that would do
nothing are refused, bad values are named, the TALL result keeps its task names."""
import json

import pytest
import torch

import merging
from merging.job import run
from merging_toys import make_models, save_models


def test_merge_to_file_never_writes_onto_or_into_an_input_folder(tmp_path):
    pre, fts = make_models(T=2, seed=1)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    before = {p: p.read_bytes() for p in (pre_dir / "model.safetensors", ft_dirs[0] / "model.safetensors")}
    for out, how in [(pre_dir, "is"), (ft_dirs[0] / "sub", "lies inside"), (tmp_path, "holds")]:
        with pytest.raises(ValueError, match=rf"output={out} {how} the input model folder"):
            merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, out, overwrite=True)
        with pytest.raises(ValueError, match=rf"output={out} {how} the input model folder"):
            merging.write_tall_store(pre_dir, ft_dirs, out, overwrite=True)
    assert all(p.read_bytes() == b for p, b in before.items())  # inputs untouched
    assert not (ft_dirs[0] / "sub").exists()


@pytest.mark.parametrize("writer", ["merge_to_file", "write_tall_store", "TallMasks.save"])
def test_a_text_overwrite_is_refused_not_taken_as_true(tmp_path, writer):
    """bool("no") is True: merge_to_file(..., overwrite="no") replaced the existing output."""
    pre, fts = make_models(T=2, seed=3)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    out = tmp_path / "out"
    if writer == "merge_to_file":
        written = merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, out, lam=0.3)
        call = lambda ow: merging.merge_to_file("task_arithmetic", pre_dir, ft_dirs, out, lam=0.3, overwrite=ow)
    elif writer == "write_tall_store":
        written = merging.write_tall_store(pre_dir, ft_dirs, out)
        call = lambda ow: merging.write_tall_store(pre_dir, ft_dirs, out, overwrite=ow)
    else:
        tall = merging.tall_masks(pre_dir, ft_dirs)
        written = tall.save(out)
        call = lambda ow: tall.save(out, overwrite=ow)
    before = (written.read_bytes(), written.stat().st_mtime_ns)
    for bad in ("no", "false", 0):
        with pytest.raises(ValueError, match=f"^overwrite must be true or false, got {bad!r}$"):
            call(bad)
    assert (written.read_bytes(), written.stat().st_mtime_ns) == before
    assert sorted(p.name for p in out.iterdir()) == [written.name]


def test_merge_to_file_switches_must_be_bools(tmp_path):
    pre, fts = make_models(T=2, seed=3)
    for key in ("fused", "fsync", "copy_files"):
        with pytest.raises(ValueError, match=f"^{key} must be true or false, got 'no'$"):
            merging.merge_to_file("task_arithmetic", pre, fts, tmp_path / "out.safetensors", lam=0.3, **{key: "no"})
    with pytest.raises(ValueError, match="^include_task_keys must be true or false, got 'no'$"):
        merging.write_tall_store(pre, fts, tmp_path / "store", include_task_keys="no")
    assert list(tmp_path.iterdir()) == []


def test_tall_result_saves_under_the_models_own_names(tmp_path):
    pre, fts = make_models(T=2, seed=2)
    pre_dir, ft_dirs = save_models(tmp_path, pre, fts)
    tall = merging.tall_masks(pre_dir, ft_dirs)
    assert tall.tasks == ["ft0", "ft1"]  # the folder names, as write_tall_store names them
    tall.save(tmp_path / "store")
    assert merging.open_store(tmp_path / "store").tasks == ["ft0", "ft1"]
    rec = merging.load_task_model(tmp_path / "store", "ft1")
    for k, v in tall.reconstruct(1).items():
        assert torch.equal(rec[k], v)
    assert merging.tall_masks(pre, fts).tasks == ["task0", "task1"]  # in-memory inputs have no names


def test_tall_masks_index_and_consensus_k_are_checked():
    pre, fts = make_models(T=3, seed=3)
    tall = merging.tall_masks(pre, fts)
    for t in (3, -1, 1.0):
        with pytest.raises(IndexError, match=rf"task index {t!r} out of range: this result has 3 tasks"):
            tall.reconstruct(t)
    for k in (0, 4, 2.5):
        with pytest.raises(ValueError, match=rf"consensus k must be an int in \[1, 3\].*got {k!r}"):
            tall.consensus(k)
    # merge("consensus") agrees: k=0 (which would keep every entry, i.e. task arithmetic) and k > T are refused
    with pytest.raises(ValueError, match=r"k \(minimum number of tasks using a weight\) must be an int ≥ 1, got 0"):
        merging.merge("consensus", pre, fts, k=0)
    with pytest.raises(ValueError, match="consensus needs at least 4 fine-tuned models, got 3"):
        merging.merge("consensus", pre, fts, k=4)
    # k = 3: the entries every task keeps, by the mask definition
    want = {n: tall.masks[0][n] & tall.masks[1][n] & tall.masks[2][n] for n in tall.tau}
    assert all(torch.equal(tall.consensus(3)[n], want[n]) for n in want)


@pytest.mark.parametrize("call", [
    lambda pre, fts: merging.tall_masks(pre, fts, mtv="sum", k=50),
    lambda pre, fts: merging.tall_masks(pre, fts, mtv="sum", merge_func="junk"),
    lambda pre, fts: merging.tall_masks(pre, fts, trim="junk"),
])
def test_ties_settings_without_the_ties_mtv_are_refused(call):
    pre, fts = make_models(T=2, seed=4)
    with pytest.raises(ValueError, match=r"appl(y|ies) only with mtv='ties' \(got mtv='sum'\)"):
        call(pre, fts)


def test_consensus_refuses_ties_settings_with_the_task_arithmetic_base():
    pre, fts = make_models(T=3, seed=5)
    with pytest.raises(ValueError, match=r"consensus: ties_k, merge_func configure base='ties'"):
        merging.merge("consensus", pre, fts, ties_k=30, merge_func="sum")
    merging.merge("consensus", pre, fts, base="ties", ties_k=30, merge_func="sum")  # where they apply
    with pytest.raises(ValueError, match=r"^consensus: ties_k configures base='ties' and do nothing"):
        merging.merge("consensus", pre, fts, ties_k=30)  # one key: "configures" (it said "ties_k configure")


def test_tall_masks_given_to_merge_points_to_its_entry_point():
    """merging.merge("tall_masks") said only "unknown merge method", though mtl-merge merge=tall_masks exists."""
    pre, fts = make_models(T=2, seed=5)
    from mtl.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match=r"'tall_masks' is not a merge method of merging.merge: .*merging.tall_masks\(pretrained"):
        merging.merge("tall_masks", pre, fts)


@pytest.mark.parametrize("kwargs, err, match", [
    ({"k": "20"}, ValueError, r"k is a percentage in \[0, 100\], got '20'"),
    ({"k": True}, ValueError, r"got True"),
    ({"include": "["}, ValueError, r"include: '\[' is not a valid regular expression"),
    ({"exclude": ["ok", "(x"]}, ValueError, r"exclude: '\(x' is not a valid regular expression"),
])
def test_bad_values_are_named(kwargs, err, match):
    pre, fts = make_models(T=2, seed=6)
    with pytest.raises(err, match=match):
        merging.merge("ties", pre, fts, **kwargs)


def test_one_shard_of_a_sharded_bin_checkpoint_is_refused(tmp_path):
    pre, fts = make_models(T=1, seed=7)
    shard = tmp_path / "pytorch_model-00001-of-00002.bin"
    torch.save(fts[0], shard)
    with pytest.raises(merging.MergeInputError, match=r"one shard of a sharded pytorch_model-\*.bin checkpoint"):
        merging.merge("average", pre, [shard])


def test_cli_refuses_an_empty_lambda_grid_and_two_sources_of_inputs(smoke_pool, tmp_path):
    with pytest.raises(ValueError, match=r"merge.lam_grid is empty"):
        run(["merge=ties", "merge.lam_grid=[]", "pretrained=/nope", "models=[/nope]"], run_dir=tmp_path / "g")
    manifest = tmp_path / "pool.json"
    manifest.write_text(json.dumps({"pretrained": str(smoke_pool.pretrained),
                                    "models": [str(p) for p in smoke_pool.member_paths]}))
    with pytest.raises(ValueError, match=r"pass pool= or pretrained=/models=, not both \(got pool= and models=\)"):
        run(["merge=average", f"pool={manifest}", f"models=[{smoke_pool.member_paths[0]}]"], run_dir=tmp_path / "p")


def test_cli_refuses_overwriting_a_folder_that_is_not_a_model_before_evaluating(smoke_pool, tmp_path, monkeypatch):
    import merging.job as job

    def refuse(*a, **k):
        raise AssertionError("the pool was loaded before the output was checked")

    monkeypatch.setattr(job, "resolve_pool", refuse)
    out = tmp_path / "not_a_model"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    models = ",".join(str(p) for p in smoke_pool.member_paths)
    with pytest.raises(FileExistsError, match=rf"output={out} exists and is not a model folder"):
        run(["merge=average", f"pretrained={smoke_pool.pretrained}", f"models=[{models}]", f"output={out}",
             "overwrite=true"], run_dir=tmp_path / "r")
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("given", ["pretrained", "models"])
def test_debug_smoke_refuses_half_a_pool_at_once_and_never_builds_the_smoke_pool_for_it(tmp_path, monkeypatch, given):
    """debug=smoke with pretrained= alone trained the smoke pool into the run folder before start_run (then refused
    the non-empty folder); with models= alone it merged the smoke pool, ignoring the given models. Half a pool is now
    one line naming both keys, before anything is built or any run folder made."""
    import merging.job as job

    def no_pool(root):
        raise AssertionError(f"the smoke pool was built ({root})")

    monkeypatch.setattr(job, "build_smoke_pool", no_pool)
    pre, fts = make_models(T=2)
    torch.save(pre, tmp_path / "base.pt")
    torch.save(fts[0], tmp_path / "a.pt")
    arg = f"pretrained={tmp_path / 'base.pt'}" if given == "pretrained" else f"models=[{tmp_path / 'a.pt'}]"
    missing = "models" if given == "pretrained" else "pretrained"
    for extra in ([], ["eval=none", f"output={tmp_path / 'out.safetensors'}"]):
        with pytest.raises(ValueError, match=rf"^{given}= needs {missing}=: .*or neither, to merge debug=smoke's pool$"):
            run(["debug=smoke", "merge=task_arithmetic", arg, *extra], run_dir=tmp_path / "run")
        assert not (tmp_path / "run").exists() and not (tmp_path / "out.safetensors").exists()
    with pytest.raises(ValueError, match=rf"^{given}= needs {missing}=: .*, or pool=<manifest.json>$"):  # without smoke
        run(["merge=task_arithmetic", arg], run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_debug_smoke_merges_a_given_pool_not_the_smoke_pool(tmp_path, monkeypatch):
    """pretrained= with models= are used as given under debug=smoke (it only shortens the evaluation)."""
    import merging.job as job

    monkeypatch.setattr(job, "build_smoke_pool", lambda root: pytest.fail(f"the smoke pool was built ({root})"))
    pre, fts = make_models(T=2)
    paths = [tmp_path / n for n in ("base.pt", "a.pt", "b.pt")]
    for p, sd in zip(paths, [pre, *fts]):
        torch.save(sd, p)
    run(["debug=smoke", "eval=none", "merge=task_arithmetic", f"pretrained={paths[0]}", f"models=[{paths[1]},{paths[2]}]",
         f"output={tmp_path / 'out.safetensors'}"], run_dir=tmp_path / "run")
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["pretrained"] == str(paths[0]) and report["models"] == [str(p) for p in paths[1:]]
    assert not (tmp_path / "run" / "smoke_pool").exists()
