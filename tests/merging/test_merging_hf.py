"""Hugging Face folders: sharded in and out, base files copied, model card, and bad shard indexes."""
import json
import re

import pytest
import torch

import merging
from merging_toys import write_llama


@pytest.fixture()
def llamas(tmp_path):
    base = write_llama(tmp_path / "base", seed=0, layers=1)
    for i in range(2):
        write_llama(tmp_path / f"ft{i}", seed=i + 1, base=base, layers=1)
    return tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"]


def test_sharded_folder_out_and_back_in(llamas, tmp_path):
    base, fts = llamas
    out = merging.merge_to_file("ties", base, fts, tmp_path / "merged", shard_size=40_000, k=20, lam=1.0)
    assert out == tmp_path / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        shards + ["model.safetensors.index.json", "config.json", "tokenizer_config.json", "README.md"])
    assert json.loads((out / "config.json").read_text()) == json.loads((base / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "method: `ties`" in card and '"k": 20' in card and str(fts[1]) in card
    for f in shards:  # every shard stays under the limit unless it holds one larger tensor
        sd = merging.load_state_dict(out / f)
        assert len(sd) == 1 or sum(v.numel() * v.element_size() for v in sd.values()) <= 40_000
    got = merging.load_state_dict(out)  # the sharded folder is an input too
    want = merging.merge("ties", base, fts, k=20, lam=1.0)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in want.values())
    assert list(got) == list(want) or set(got) == set(want)
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v), k
    # an HF base makes a folder output an HF folder by default: one shard is plain model.safetensors
    single = merging.merge_to_file("task_arithmetic", out, fts, tmp_path / "single", lam=0.3)
    assert sorted(p.name for p in single.iterdir()) == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]


def _shard(tmp_path, base):
    """Re-save the base as a two-shard folder and return (folder, index dict)."""
    folder = tmp_path / "sharded"
    # θ0 by path is refused as a fine-tune of itself: its weights in memory are a zero task vector
    merging.merge_to_file("task_arithmetic", base, [merging.load_state_dict(base)], folder, shard_size=40_000, lam=0.0)
    return folder, json.loads((folder / "model.safetensors.index.json").read_text())


def _assert_nothing_written(tmp_path):
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_shard_is_named(llamas, tmp_path):
    base, fts = llamas
    folder, index = _shard(tmp_path, base)
    gone = sorted(set(index["weight_map"].values()))[1]
    (folder / gone).unlink()
    with pytest.raises(merging.MergeInputError, match=f"shard file\\(s\\) {gone} listed in the index do not exist"):
        merging.merge_to_file("ties", folder, fts, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_tensor_listed_twice_is_named(llamas, tmp_path):
    base, fts = llamas
    folder, index = _shard(tmp_path, base)
    idx = folder / "model.safetensors.index.json"
    text = idx.read_text()
    first = next(iter(index["weight_map"]))
    line = f'"{first}": "{index["weight_map"][first]}"'
    idx.write_text(text.replace(line, line + ",\n    " + line, 1))
    with pytest.raises(merging.MergeInputError, match=f"tensor '{first}' is listed twice"):
        merging.merge_to_file("ties", folder, fts, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_index_without_weight_map_is_named(llamas, tmp_path):
    base, fts = llamas
    folder, _ = _shard(tmp_path, base)
    (folder / "model.safetensors.index.json").write_text('{"metadata": {"total_size": 1}}')
    with pytest.raises(merging.MergeInputError, match='index.json: unreadable shard index: it has no "weight_map"'):
        merging.merge_to_file("ties", folder, fts, tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_tensor_in_the_wrong_shard_is_named(llamas, tmp_path):
    base, fts = llamas
    folder, index = _shard(tmp_path, base)
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(merging.MergeInputError, match=f"'{key}' is mapped to {files[1]}, which does not hold it"):
        merging.merge("ties", folder, fts)


def test_dtype_mismatch_names_tensor_and_file(llamas, tmp_path):
    base, fts = llamas
    sd = merging.load_state_dict(fts[1])
    sd["model.norm.weight"] = sd["model.norm.weight"].float()
    (tmp_path / "f32").mkdir()
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "f32" / "model.safetensors"))
    with pytest.raises(merging.MergeInputError, match="'model.norm.weight' is torch.bfloat16 in .*base.* but torch.float32 in .*f32"):
        merging.merge_to_file("ties", base, [fts[0], tmp_path / "f32"], tmp_path / "out")
    _assert_nothing_written(tmp_path)


def test_errors_on_a_sharded_input_name_the_shard_file(llamas, tmp_path):
    base, fts = llamas
    folder, index = _shard(tmp_path, base)
    key = "model.norm.weight"
    shard = folder / index["weight_map"][key]  # the file the index says holds the tensor
    from safetensors.torch import load_file, save_file

    sd = load_file(str(shard))
    sd[key] = sd[key].float()
    save_file(sd, str(shard), metadata={"format": "pt"})
    with pytest.raises(merging.MergeInputError, match=f"'{key}' is torch.bfloat16 in {fts[0] / 'model.safetensors'} "
                                                      f"but torch.float32 in {shard}"):
        merging.merge_to_file("ties", fts[0], [fts[1], folder], tmp_path / "out")
    sd[key] = sd[key].bfloat16()
    sd[key][0] = float("nan")
    save_file(sd, str(shard), metadata={"format": "pt"})
    for fused in (True, False):
        with pytest.raises(merging.MergeInputError, match=f"tensor '{key}' in {shard} has non-finite values"):
            merging.merge_to_file("ties", folder, fts, tmp_path / "out", fused=fused)
    _assert_nothing_written(tmp_path)


def test_shard_size_needs_a_folder(llamas, tmp_path):
    base, fts = llamas
    with pytest.raises(ValueError, match="shard_size needs a folder"):
        merging.merge_to_file("ties", base, fts, tmp_path / "out.safetensors", shard_size="1MB")
    with pytest.raises(ValueError, match="shard_size must be"):
        merging.merge_to_file("ties", base, fts, tmp_path / "out", shard_size="lots")
    # mergekit reads "5B" as 5 billion parameters: a bare B unit is refused, never taken as 5 bytes
    for size in ("5B", "2048b"):
        with pytest.raises(ValueError, match=f"shard_size '{size}': sizes are bytes, given with a unit"):
            merging.merge_to_file("ties", base, fts, tmp_path / "out", shard_size=size)
    _assert_nothing_written(tmp_path)
    from merging.hf import parse_size

    assert [parse_size(s) for s in (5, "2KB", "1.5MB", "2GiB")] == [5, 2000, 1_500_000, 2 * 1024**3]


@pytest.mark.parametrize("size, why", [(0.5, "0.5 is 0.5 bytes, not a whole number of bytes"),
                                       ("1.0001KB", "'1.0001KB' is 1000.1 bytes, not a whole number of bytes"),
                                       (0, "0 is 0 bytes; a shard holds at least 1 byte"),
                                       ("0MB", "'0MB' is 0 bytes; a shard holds at least 1 byte")])
def test_shard_size_below_one_byte_or_fractional_is_named(llamas, tmp_path, size, why):
    base, fts = llamas  # 0.5 was truncated to 0 bytes and reported as "must be positive, got 0.5"
    with pytest.raises(ValueError, match=f"^shard_size {why}: give a whole number of bytes ≥ 1, or a size with a unit"):
        merging.merge_to_file("ties", base, fts, tmp_path / "out", shard_size=size)
    _assert_nothing_written(tmp_path)
    from merging.hf import parse_size

    assert parse_size(1e9) == 10**9 and parse_size(".5MB") == 500_000  # whole byte counts, however spelt


def test_mtl_merge_eval_none_merges_hf_folders(llamas, tmp_path, monkeypatch):
    from merging.job import run

    base, fts = llamas
    models = ",".join(map(str, fts))
    common = ["eval=none", f"pretrained={base}", f"models=[{models}]"]
    report = run([*common, "merge=ties", "merge.lam=0.8", "shard_size=40000", f"output={tmp_path / 'out'}"],
                 run_dir=tmp_path / "run")
    out = tmp_path / "out"
    assert report["evaluated"] is False and report["selected"] == {"convention": "paper", "k": 20, "merge_func": "mean", "lam": 0.8,
                                                              "trim": "global", "tie_rule": "paper"}
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    want = merging.merge("ties", base, fts, k=20, lam=0.8)
    got = merging.load_state_dict(out)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["output"] == str(out)
    # mergekit's rules from the CLI; with no λ given the method's default is used (no grid without evaluation)
    mk = run([*common, "merge=mergekit_ties", "merge.weight=[1.0,0.5]"], run_dir=tmp_path / "mk")
    got = merging.load_state_dict(mk["output"])
    # metrics.json records the defaults the merge used (mergekit TIES: λ 1, normalize) ...
    assert json.loads((tmp_path / "mk" / "metrics.json").read_text())["selected"] == {
        "convention": "mergekit", "density": 0.2, "weight": [1.0, 0.5], "lam": 1.0, "normalize": True, "rescale": False}
    want = merging.merge("ties", base, fts, convention="mergekit", density=0.2, weight=[1.0, 0.5])
    assert all(torch.equal(got[k], v) for k, v in want.items())
    with pytest.raises(ValueError, match="merge=tall_masks chooses its hyperparameters on task data"):
        run([*common, "merge=tall_masks"], run_dir=tmp_path / "tall")
    # ... and the output's absolute path: a relative output= is the cwd's, not the run folder's
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    ta = run([*common, "merge=task_arithmetic", "output=rel"], run_dir=tmp_path / "ta")
    metrics = json.loads((tmp_path / "ta" / "metrics.json").read_text())
    assert metrics["output"] == ta["output"] == str(tmp_path / "cwd" / "rel") and (tmp_path / "cwd" / "rel").is_dir()
    assert metrics["selected"] == {"convention": "paper", "lam": 0.3}


def test_mtl_merge_ties_and_dare_take_the_mergekit_convention(llamas, tmp_path):
    """merge=ties / merge=dare with merge.convention=mergekit: the configs' paper keys (k, merge_func,
    p, seed) at their defaults give way to mergekit's; k/100 and 1 − p are the kept fraction."""
    from merging.job import run

    base, fts = llamas
    common = ["eval=none", f"pretrained={base}", f"models=[{','.join(map(str, fts))}]", "merge.convention=mergekit"]

    def merged(name, *args):
        torch.manual_seed(0)  # mergekit's DARE draws from torch's global generator
        report = run([*common, *args], run_dir=tmp_path / name)
        return report, merging.load_state_dict(report["output"])

    def want(method, **hp):
        torch.manual_seed(0)
        return merging.merge(method, base, fts, convention="mergekit", **hp)

    def same(got, ref):
        return set(got) == set(ref) and all(torch.equal(got[k], v) for k, v in ref.items())

    cases = [(["merge=ties", "merge.density=0.3", "merge.weight=[1.0,0.5]"], "ties", {"density": 0.3, "weight": [1.0, 0.5]}),
             (["merge=ties"], "ties", {"density": 0.2}),           # k=20 → 20 % kept, per tensor
             (["merge=ties", "merge.k=50"], "ties", {"density": 0.5}),
             # the run's seed (0) seeds DARE's draws: the CLI's merges repeat
             (["merge=dare", "merge.p=0.3"], "dare_ties", {"density": 0.7, "seed": 0}),
             (["merge=dare", "merge.base=task_arithmetic", "merge.density=0.6"], "dare_linear", {"density": 0.6, "seed": 0}),
             (["merge=dare", "merge.p=0.3", "seed=3"], "dare_ties", {"density": 0.7, "seed": 3})]
    for i, (args, method, hp) in enumerate(cases):
        report, got = merged(f"run{i}", *args)
        assert same(got, want(method, **hp)), args
        assert report["selected"]["density"] == hp["density"]
        assert report["selected"].get("seed") == hp.get("seed")
    assert not same(merged("d02", "merge=ties")[1], want("ties", density=0.3))  # the densities do differ
    for args, match in [(["merge=ties", "merge.k=30", "merge.density=0.3"], "k=30 and density=0.3 are both set"),
                        (["merge=ties", "merge.merge_func=sum"], "merge_func='sum' has no meaning under convention=mergekit"),
                        (["merge=dare", "merge.k=30"], "k=30 has no meaning under convention=mergekit")]:
        with pytest.raises(ValueError, match=match):
            run([*common, *args], run_dir=tmp_path / "bad")


def _tied(folder, src):
    """`src` saved tied, as transformers does: no lm_head.weight, tie_word_embeddings true."""
    from safetensors.torch import save_file

    sd = merging.load_state_dict(src)
    del sd["lm_head.weight"]
    folder.mkdir()
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


def test_hf_folder_never_drops_a_tensor_of_the_base(llamas, tmp_path):
    """An untied base (lm_head.weight, tie_word_embeddings false) with a tied fine-tune: skipping
    lm_head.weight would write a folder whose config.json asks for it, so the folder output refuses."""
    base, fts = llamas
    tied = _tied(tmp_path / "tied", fts[1])
    for kw in ({}, {"unshared": "skip"}):
        with pytest.raises(merging.MergeInputError, match="'lm_head.weight' is in .*base/model.safetensors but missing from .*tied/model.safetensors") as e:
            merging.merge_to_file("task_arithmetic", base, [fts[0], tied], tmp_path / "out", **kw)
        assert "cannot be skipped" in str(e.value) and "unshared='skip'" not in str(e.value)
        _assert_nothing_written(tmp_path)
    with pytest.raises(merging.MergeInputError, match="the key filters leave out 'lm_head.weight' of the base model"):
        merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "out", exclude="lm_head")
    _assert_nothing_written(tmp_path)
    # a .safetensors file is no Hugging Face folder: skipping stays possible there
    path = merging.merge_to_file("task_arithmetic", base, [fts[0], tied], tmp_path / "o.safetensors", unshared="skip")
    assert "lm_head.weight" not in merging.load_state_dict(path)
    # a tensor the base lacks may be skipped in a folder too (the base's config says it is tied)
    tied_base = _tied(tmp_path / "tied_base", base)
    out = merging.merge_to_file("task_arithmetic", tied_base, [fts[0], tied], tmp_path / "ok", unshared="skip", lam=0.5)
    got, b, f0, f1 = (merging.load_state_dict(p) for p in (out, tied_base, fts[0], tied))
    assert "lm_head.weight" not in got and (out / "config.json").is_file()
    k = "model.norm.weight"
    want = (b[k].float() + 0.5 * ((f0[k].float() - b[k].float()) + (f1[k].float() - b[k].float()))).to(torch.bfloat16)
    assert torch.equal(got[k], want)


def test_overwrite_replaces_an_earlier_merge_never_a_folder_of_something_else(llamas, tmp_path):
    base, fts = llamas
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no .safetensors weights"):
        merging.merge_to_file("task_arithmetic", base, fts, victim, shard_size=40_000, lam=0.3, overwrite=True)
    assert (victim / "notes.txt").read_text() == "precious" and (victim / "sub").is_dir()
    out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "merged", shard_size=40_000, lam=0.3)
    merging.merge_to_file("task_arithmetic", base, fts, out, shard_size=40_000, lam=0.5, overwrite=True)  # an earlier merge


def _tree(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes() if p.is_file() else None) for p in folder.rglob("*"))


def test_overwrite_refuses_a_folder_holding_what_no_merge_writes(llamas, tmp_path):
    """A Hugging Face output is swapped in whole: a weights folder that also holds a user's files once lost them
    all (checkpoints/, metrics.json, notes) to overwrite=True, whatever the inputs."""
    base, fts = llamas
    victim = tmp_path / "victim"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "checkpoints" / "last.ckpt").write_text("ck")
    (victim / "metrics.json").write_text("{}")
    (victim / "notes.txt").write_text("precious")
    (victim / "README.md").write_text("my own card")
    (victim / "model.safetensors").write_bytes((fts[0] / "model.safetensors").read_bytes())
    before = _tree(victim)
    for pre in (base, merging.load_state_dict(base)):  # a folder base and an in-memory one alike
        with pytest.raises(FileExistsError, match=r"victim holds README.md, checkpoints/, metrics.json, notes.txt, "
                                                  r"which this merge does not write; overwrite=True replaces the whole"):
            merging.merge_to_file("task_arithmetic", pre, fts, victim, shard_size=40_000, lam=0.3, overwrite=True)
        assert _tree(victim) == before
    # a single model.safetensors is written into the folder: everything else there stays
    merging.merge_to_file("task_arithmetic", merging.load_state_dict(base), fts, victim, lam=0.3, overwrite=True)
    assert [e for e in _tree(victim) if e[0] != "model.safetensors"] == [e for e in before if e[0] != "model.safetensors"]


def test_overwrite_replaces_an_earlier_merge_without_stale_shards(llamas, tmp_path):
    base, fts = llamas
    out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "merged", shard_size=40_000, lam=0.3,
                                extra_files={"recipe.yml": "x"})
    assert len(list(out.glob("model-*.safetensors"))) > 2
    (out / ".DS_Store").write_text("")
    merging.merge_to_file("ties", base, fts, out, shard_size="1GB", overwrite=True,  # now one shard
                          extra_files={"recipe.yml": "y"})
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors", "recipe.yml",
                                                     "tokenizer_config.json"]
    assert (out / "recipe.yml").read_text() == "y" and "ties" in (out / "README.md").read_text()
    want = merging.merge("ties", base, fts)
    got = merging.load_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())


def test_a_single_file_merge_over_an_earlier_sharded_merge_leaves_one_set_of_weights(llamas, tmp_path):
    base, fts = llamas
    out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "o", shard_size=40_000, lam=0.3)
    assert (out / "model.safetensors.index.json").exists() and "task_arithmetic" in (out / "README.md").read_text()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(FileExistsError, match=r"o holds sharded weights \(model-00001-of-000\d\d.safetensors, .*"
                                              r"model.safetensors.index.json\); pass overwrite=True"):
        merging.merge_to_file("ties", merging.load_state_dict(base), fts, out)  # once deleted them unasked
    assert sorted(p.name for p in out.iterdir()) == before
    merging.merge_to_file("ties", merging.load_state_dict(base), fts, out, overwrite=True)  # base as a dict: one file
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "model.safetensors.index.json" not in names
    assert not [n for n in names if n.startswith("model-")] and "config.json" in names  # config kept
    card = (out / "README.md").read_text()
    assert "ties" in card and "task_arithmetic" not in card
    want = merging.merge("ties", base, fts)
    got = merging.load_state_dict(out)
    assert set(got) == set(want) and all(torch.equal(got[k], v) for k, v in want.items())
    mine = tmp_path / "mine"  # someone's own folder and README: the merge adds its file, the README stays
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    merging.merge_to_file("ties", merging.load_state_dict(base), fts, mine)
    assert (mine / "README.md").read_text() == "my notes" and (mine / "model.safetensors").is_file()


@pytest.mark.parametrize("name_the_file", [False, True])
def test_a_single_file_merge_never_counts_a_users_shard_like_file_as_an_earlier_merges_shard(llamas, tmp_path,
                                                                                              name_the_file):
    """_earlier_hf_merge matched model-*-of-*.safetensors, broader than the shard names a merge writes: a user's
    model-best-of-3.safetensors was refused as "holds sharded weights", and with overwrite=True deleted."""
    base, fts = llamas
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "model-best-of-3.safetensors").write_bytes(b"precious")
    out = folder / "model.safetensors" if name_the_file else folder
    merging.merge_to_file("task_arithmetic", merging.load_state_dict(base), fts, out, lam=0.3)  # not refused
    merging.merge_to_file("task_arithmetic", merging.load_state_dict(base), fts, out, lam=0.3, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["model-best-of-3.safetensors", "model.safetensors"]
    assert (folder / "model-best-of-3.safetensors").read_bytes() == b"precious"


def test_settings_that_cannot_apply_are_refused_not_ignored(llamas, tmp_path):
    base, fts = llamas
    with pytest.raises(ValueError, match=r"x.safetensors: copy_files=True copies the base folder's files beside the "
                                         r"weights, which needs a folder output"):
        merging.merge_to_file("average", base, fts, tmp_path / "x.safetensors", copy_files=True)
    with pytest.raises(ValueError, match=r"copy_files=True copies the base model folder's non-weight files .* but "
                                         r"pretrained is a state dict, not a folder"):
        merging.merge_to_file("average", merging.load_state_dict(base), fts, tmp_path / "y", copy_files=True)
    for bad in (True, 2.5, "2"):  # DARE's whole-tensor path once passed them to torch.set_num_threads
        with pytest.raises(ValueError, match=r"threads must be an int ≥ 1, got"):
            merging.merge_to_file("dare", base, fts, tmp_path / "z.safetensors", threads=bad)
    with pytest.raises(ValueError, match=r"chunk applies to the chunked kernels; 'dare' has none"):
        merging.merge_to_file("dare", base, fts, tmp_path / "z.safetensors", chunk=4096)
    with pytest.raises(ValueError, match=r"z.safetensors: extra_files are written into a Hugging Face folder"):
        merging.merge_to_file("average", base, fts, tmp_path / "z.safetensors", extra_files={"r.yml": "x"})
    with pytest.raises(ValueError, match=r"extra_files: '../r.yml' is not a plain file name"):
        merging.merge_to_file("average", base, fts, tmp_path / "z", extra_files={"../r.yml": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1"]  # nothing written


def test_a_file_or_an_empty_folder_as_output(llamas, tmp_path):
    base, fts = llamas
    (tmp_path / "afile").write_text("hi")
    with pytest.raises(NotADirectoryError, match="afile is a file, not a folder"):
        merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "afile", overwrite=True)
    assert (tmp_path / "afile").read_text() == "hi"
    (tmp_path / "empty").mkdir()
    out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "empty", lam=0.3)  # no overwrite needed
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_files_describing_uncopied_weights_stay_behind(llamas, tmp_path, caplog):
    """A base holding a PEFT adapter: its adapter_config.json without adapter_model.* would make peft and
    transformers load a missing adapter from the output; a base's mergekit_config.yml describes the base."""
    base, fts = llamas
    (base / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(8, 4)}, str(base / "adapter_model.safetensors"))
    (base / "mergekit_config.yml").write_text("merge_method: linear\n")
    with caplog.at_level("WARNING", logger="merging.hf"):
        out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "merged", lam=0.3)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "tokenizer_config.json"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert f"{base / 'adapter_config.json'} is not copied" in said and f"{base / 'mergekit_config.yml'} is not copied" in said
    # a recipe run writes its own mergekit_config.yml: the base's is replaced without a warning about it
    caplog.clear()
    with caplog.at_level("WARNING", logger="merging.hf"):
        out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "recipe", lam=0.3,
                                    extra_files={"mergekit_config.yml": "merge_method: task_arithmetic\n"})
    assert (out / "mergekit_config.yml").read_text() == "merge_method: task_arithmetic\n"
    assert "mergekit_config.yml" not in " ".join(r.getMessage() for r in caplog.records)


def test_weights_in_other_formats_stay_behind(llamas, tmp_path):
    """Hugging Face repos ship the same model as ONNX (with external data), TFLite, Core ML, rust-bert, Keras,
    Flax, GGUF, torch pickles, at the top or in subfolders: beside the merged weights they would be the base's."""
    base, fts = llamas
    other = ["model.onnx", "model.onnx_data", "decoder.onnx.data", "model.tflite", "Model.mlmodel", "rust_model.ot",
             "tf_model.h5", "model.keras", "flax_model.msgpack", "model.gguf", "pytorch_model.bin", "model.pt",
             "model.pth", "last.ckpt", "pytorch_model.bin.index.json", "MODEL.ONNX"]
    for name in other:
        (base / name).write_text("x")
    (base / "onnx").mkdir()
    (base / "onnx" / "model.onnx").write_text("x")
    (base / "special_tokens_map.json").write_text("{}")  # not weights: copied
    out = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "merged", lam=0.3)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer_config.json"]


def test_folder_with_both_weight_files_reads_model_safetensors_and_says_so(llamas, tmp_path, caplog):
    base, fts = llamas
    folder, _ = _shard(tmp_path, base)  # the base's weights, sharded
    import shutil

    shutil.copy(fts[0] / "model.safetensors", folder / "model.safetensors")  # another set beside them
    with caplog.at_level("WARNING", logger="merging.sources"):
        got = merging.load_state_dict(folder)
        merging.merge_to_file("task_arithmetic", folder, fts, tmp_path / "out", lam=0.3)
    want = merging.load_state_dict(fts[0])
    assert all(torch.equal(got[k], v) for k, v in want.items())  # transformers' choice: model.safetensors
    said = [r.getMessage() for r in caplog.records if "holds both" in r.getMessage()]
    assert len(said) == 1 and f"reading {folder / 'model.safetensors'}" in said[0], said


def test_a_shard_read_before_stays_unmapped(llamas, tmp_path):
    """Mapped input pages count in RSS: a shard no longer being read must not stay mapped (each shard kept up
    to 16 MB mapped until the end of the merge)."""
    base, _ = llamas
    folder, index = _shard(tmp_path, base)
    src = merging.sources.open_source(folder)
    by_file = {}
    for key, f in index["weight_map"].items():
        by_file.setdefault(f, key)
    (first, key_a), (second, key_b) = sorted(by_file.items())[:2]

    def mapped():
        with open("/proc/self/maps") as maps:
            return {line.split()[-1] for line in maps if str(folder) in line}

    try:
        src.get(key_a).sum()  # the tensor is dropped at once, as the engine drops its input views
        assert str(folder / first) in mapped()
        src.get(key_b).sum()
        assert mapped() == {str(folder / second)}
    finally:
        src.close()


@pytest.mark.slow
def test_a_multirun_refuses_one_output_for_all_its_jobs_and_takes_one_per_job(llamas, tmp_path):
    """`mtl-merge -m merge.lam=0.3,0.5 output=o overwrite=true` ran both jobs into one folder: job 1 replaced job 0's
    model while job 0's metrics.json still named it. Now refused at the sweep's start (no folder made, one line);
    an output interpolating the swept value gives each job its own folder."""
    import os
    import subprocess
    import sys

    base, fts = llamas
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    common = ["-m", "eval=none", "merge=task_arithmetic", "merge.lam=0.3,0.5", f"pretrained={base}",
              f"models=[{','.join(map(str, fts))}]"]

    def mtl_merge(*args):
        return subprocess.run([sys.executable, "-m", "merging.cli", *common, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    for output in ("same", "same_${seed}"):  # fixed, or an interpolation alike for every job
        proc = mtl_merge(f"output={output}", "overwrite=true")
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert proc.stderr.startswith(f"error: output={output} is one folder for several jobs of this multirun "
                                      f"(jobs #0 and #1 would both write {tmp_path}/same")
        assert f"e.g. output='{output}_${{merge.lam}}'" in proc.stderr
        assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("same*"))
    proc = mtl_merge("output=per_${merge.lam}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for lam in (0.3, 0.5):
        want = merging.merge("task_arithmetic", base, fts, lam=lam)
        got = merging.load_state_dict(tmp_path / f"per_{lam}")
        assert all(torch.equal(got[k], v) for k, v in want.items())


NOT_SEARCHED = "is not searched"


def test_a_merge_configs_own_grid_is_not_named_as_one_the_user_gave(llamas, tmp_path, caplog):
    """merge=mergekit_ties's own lam_grid was compared with ties.yaml's (its method's), so the documented
    eval=none command warned about a grid nobody gave (and, with merge.lam, told to drop merge.lam)."""
    from merging.job import run

    base, fts = llamas
    common = ["eval=none", "merge=mergekit_ties", "merge.weight=[1.0,0.7]", f"pretrained={base}",
              f"models=[{','.join(map(str, fts))}]"]
    for i, more in enumerate([[], ["merge.lam=1.0"]]):
        caplog.clear()
        run([*common, *more], run_dir=tmp_path / f"own{i}")
        assert NOT_SEARCHED not in caplog.text
    for i, more in enumerate([["merge.lam_grid=[0.5,1.0]"], ["merge.lam_grid=[0.5,1.0]", "merge.lam=1.0"]]):
        caplog.clear()
        run([*common, *more], run_dir=tmp_path / f"given{i}")
        assert "merge.lam_grid=[0.5, 1.0] is not searched" in caplog.text


@pytest.mark.slow
def test_the_documented_mergekit_ties_command_warns_of_no_grid(llamas, tmp_path):
    """The same through the CLI, where the chosen config file is Hydra's runtime choice."""
    import os
    import subprocess
    import sys

    base, fts = llamas
    env = dict(os.environ, MTL_OUTPUT_DIR=str(tmp_path / "outputs"))
    args = ["eval=none", "merge=mergekit_ties", "merge.weight=[1.0,0.7]", f"pretrained={base}",
            f"models=[{','.join(map(str, fts))}]", f"output={tmp_path / 'o'}"]
    for more, warned in (([], False), (["merge.lam_grid=[0.5,1.0]", "overwrite=true"], True)):
        proc = subprocess.run([sys.executable, "-m", "merging.cli", *args, *more], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (NOT_SEARCHED in proc.stderr) == warned, proc.stderr


@pytest.mark.parametrize("text", ["[" * 200_000 + "]" * 200_000, "{"])
def test_a_base_config_json_that_is_not_json_is_named(llamas, tmp_path, text):
    """Nested too deep, it escaped as a bare RecursionError naming no file; cut short, it was taken for no
    config (a plain folder) and the merge went on."""
    base, fts = llamas
    cfg = base / "config.json"
    cfg.write_text(text)
    with pytest.raises(merging.MergeInputError, match=rf"^{cfg}: not valid JSON \("):
        merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "out", lam=0.3)
    _assert_nothing_written(tmp_path)


def test_a_shard_index_given_as_a_model_names_its_folder(llamas, tmp_path):
    base, fts = llamas
    sharded = merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "sharded", shard_size=40_000, lam=0.3)
    index = sharded / "model.safetensors.index.json"
    # it reached torch.load: "not a PyTorch/Lightning checkpoint (Unsupported operand 123)"
    want = f"{index} is a Hugging Face shard index, not a model: pass its folder {sharded}"
    with pytest.raises(merging.MergeInputError, match=f"^{re.escape(want)}$"):
        merging.merge("task_arithmetic", index, fts)
    assert set(merging.load_state_dict(sharded)) == set(merging.load_state_dict(base))  # the folder itself reads
    # a pytorch_model.bin index too (its folder of .bin shards is not supported: said, not "pass its folder")
    bin_index = tmp_path / "bins" / "pytorch_model.bin.index.json"
    bin_index.parent.mkdir()
    bin_index.write_text('{"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}')
    with pytest.raises(merging.MergeInputError, match=f"^{re.escape(str(bin_index))} is a Hugging Face shard index, "
                                                      "not a model: sharded pytorch_model-.*bin checkpoints are not supported"):
        merging.open_source(bin_index)


@pytest.mark.parametrize("extra, said", [
    # parsed by merge_to_file, after the run folder (an error line, then run_dir: and a FAILED folder)
    (("shard_size=5B",), r"^shard_size '5B': sizes are bytes"),
    (("shard_size=0.5",), r"^shard_size 0\.5 is 0\.5 bytes"),
    # overwrite=true over an earlier output holding a user's file: refused by merge_to_file, after the run folder
    (("overwrite=true", "NOTES"), r"/out holds notes\.txt, which this merge does not write"),
    # a vocabulary of another size: from the headers, before the run folder since 4c7eb53 (kept so)
    (("VOCAB",), r"^models do not match: 'lm_head\.weight' has shape \(256, 64\) .* but \(264, 64\)"),
    # a new .safetensors output: merge_to_file's output check ran before the run folder only on an existing output
    (("shard_size=1MB", "FILE"), r"/out\.safetensors: shard_size needs a folder output, not a \.safetensors file$"),
    # an earlier .safetensors output: was merge_to_file's 'pass overwrite=True', the API's spelling, not the CLI's
    (("EARLIER", "FILE"), r"/out\.safetensors exists; pass overwrite=true to replace it$"),
])
def test_an_eval_none_merge_refused_by_its_settings_or_output_leaves_no_run_folder(llamas, tmp_path, console, capfd,
                                                                                  extra, said):
    from tests.test_early_config_checks import _refused_without_folder

    base, fts = llamas
    out = tmp_path / ("out.safetensors" if "FILE" in extra else "out")
    if "NOTES" in extra or "EARLIER" in extra:
        merging.merge_to_file("task_arithmetic", base, fts, out, lam=0.3)
    if "NOTES" in extra:
        (out / "notes.txt").write_text("mine")
    if "VOCAB" in extra:
        fts = [fts[0], tmp_path / "vocab"]
        write_llama(fts[1], seed=5, layers=1, vocab=264)
    before = _tree(out) if out.exists() else None
    message = _refused_without_folder(console, capfd, "merging.cli", "eval=none", "merge=mergekit_ties",
                                      f"pretrained={base}", f"models=[{fts[0]},{fts[1]}]", f"output={out}",
                                      *(e for e in extra if e not in ("NOTES", "VOCAB", "FILE", "EARLIER")))
    assert re.search(said, message), message
    assert (_tree(out) if out.exists() else None) == before


@pytest.mark.parametrize("tied, extra, kw", [
    # was passed by the header check (it skipped the key), then refused by merge_to_file after the run folder
    (True, ("+merge.unshared=skip",), {"unshared": "skip"}),
    # was refused early, but with "pass unshared='skip'", which the merge itself then refused
    (True, (), {}),
    # was passed by the header check, then refused by merge_to_file after the run folder
    (False, ("+merge.exclude=lm_head.*",), {"exclude": "lm_head.*"}),
])
def test_an_eval_none_merge_into_a_hf_folder_is_refused_early_as_the_merge_refuses_it(llamas, tmp_path, console,
                                                                                     capfd, tied, extra, kw):
    """The header check before the run folder plans keys for a Hugging Face folder output (every θ0 tensor kept),
    as merge_to_file does: one error line, no folder, and the merge's own words."""
    from tests.test_early_config_checks import _refused_without_folder

    base, fts = llamas
    if tied:
        fts = [_tied(tmp_path / "tied", fts[0]), fts[1]]
    with pytest.raises(merging.MergeInputError) as direct:
        merging.merge_to_file("task_arithmetic", base, fts, tmp_path / "direct", lam=0.3, **kw)
    assert "a Hugging Face folder holds every tensor of its base model" in str(direct.value)
    message = _refused_without_folder(console, capfd, "merging.cli", "eval=none", "merge=task_arithmetic",
                                      f"pretrained={base}", f"models=[{fts[0]},{fts[1]}]", f"output={tmp_path / 'out'}",
                                      *extra)
    assert message == str(direct.value)
    assert not (tmp_path / "out").exists()
