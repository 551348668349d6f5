"""A model folder's meta.data rebuilt on another machine: its cache_dir pinned the writer's machine."""
import logging

import pytest
from omegaconf import OmegaConf

import mtl
from mtl.folder_data import data_record, rebuild_config

ELSEWHERE = "/proc/otherhost/home/alice/.cache/mtlkit/scenes"  # a copy from a colleague's machine
SCENES = {"name": "scenes", "size": 16, "n_train": 8, "n_val": 2, "n_test": 2, "seed": 0, "batch_size": 4}


def test_the_default_cache_is_not_recorded_a_chosen_one_is(tmp_path, monkeypatch):
    from mtl.cli.in_process import compose_in_process

    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "c"))
    for data in ("scenes", "zoo"):  # the CLI resolves its default to this machine's absolute path
        cfg, _ = compose_in_process("mtl.configs", "train", [f"data={data}"], tmp_path / "run")
        kw = OmegaConf.to_container(cfg.data, resolve=True)
        assert kw["cache_dir"] == str(tmp_path / "c" / data) and "cache_dir" not in data_record(kw)
    chosen = {**SCENES, "cache_dir": str(tmp_path / "big" / "scenes")}
    assert data_record(chosen)["cache_dir"] == str(tmp_path / "big" / "scenes")


def test_a_folder_from_another_machine_calibrates_in_this_machines_cache(tiny_model, tmp_path, monkeypatch, caplog):
    from merging.pool import Member, member_datamodule
    from mtl.cli.extract import calibration_batches
    from pruning.calib import datamodule_for

    monkeypatch.setenv("MTL_DATA_CACHE", str(tmp_path / "here"))
    folder = mtl.save_model(tiny_model, tmp_path / "m", meta={"data": {**SCENES, "cache_dir": ELSEWHERE}})
    model = mtl.load_model(folder)
    with caplog.at_level(logging.WARNING, logger="mtl.folder_data"):
        dm = datamodule_for(model, None, folder)  # mtl-prune
        batches = calibration_batches(model, OmegaConf.create(  # mtl-extract
            {"model": str(folder), "calib": {"split": "train", "batches": 1, "data": None}}))
        member_datamodule(Member(folder, model.config, list(model.tasks), model.meta["data"]))  # mtl-merge
    assert dm.path.parent == tmp_path / "here" / "scenes" and len(batches) == 1
    assert f"{folder / 'config.json'}: key meta.data.cache_dir={ELSEWHERE} is not a writable folder here" in caplog.text


def test_a_missing_dataset_is_named_by_its_key(tmp_path):
    file = tmp_path / "m" / "config.json"
    stored = {"name": "nyuv2", "root": str(tmp_path / "nyu"), "class_mapping": [1, -1, 2]}
    with pytest.raises(FileNotFoundError, match=rf"{file}: key meta.data.root='{tmp_path / 'nyu'}': no such file or "
                                                r"folder here .*pass calib.data.root=<path>"):
        rebuild_config(stored, {}, file, "calib.data")
    assert rebuild_config(stored, {"root": str(tmp_path)}, file, "calib.data")["root"] == str(tmp_path)


def _override(key, data):
    return f"{key}={{" + ", ".join(f"{k}: {v}" for k, v in data.items()) + "}"


def _scenes_elsewhere(tmp_path, monkeypatch):
    """A data config with a relative cache_dir, given from one working directory, read back from another."""
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    monkeypatch.chdir(here)
    return {**SCENES, "cache_dir": "rel_cache"}, here / "rel_cache", there


def test_mtl_prune_records_the_data_it_was_given_from_any_working_directory(tiny_model, tmp_path, monkeypatch):
    """mtl-prune's data= on a folder without a data record was stored as given: relative to the command's
    working directory, so the pruned folder rebuilt other data (or was refused) anywhere else."""
    from pruning.calib import datamodule_for
    from pruning.job import run

    source = mtl.save_model(tiny_model, tmp_path / "m", meta={})
    data, cache, there = _scenes_elsewhere(tmp_path, monkeypatch)
    run(["prune=l1", f"model={source}", f"output={tmp_path / 'pruned'}", "prune.ratio=0.5", "calib.batches=1",
         "eval.max_batches=1", "eval.latency_repeats=1", _override("data", data)], run_dir=tmp_path / "run")
    monkeypatch.chdir(there)
    pruned = mtl.load_model(tmp_path / "pruned")
    assert pruned.meta["data"]["cache_dir"] == pruned.meta["prune"]["data"]["cache_dir"] == str(cache)
    assert datamodule_for(pruned, None, tmp_path / "pruned").path.parent == cache


def test_mtl_extract_records_the_data_it_was_given_from_any_working_directory(tmp_path, monkeypatch):
    """mtl-extract widths= on a folder without a data record stored calib.data as given, as mtl-prune did."""
    from mtl.cli.extract import run
    from pruning.calib import datamodule_for

    slim = mtl.create_model(["depth"], family="slimmable", decoder={"name": "slimmable", "channels": 12},
                            backbone={"name": "slim_resnet", "stem": 8, "channels": [8, 16, 16], "depths": [1, 2, 1],
                                      "out_indices": [1, 2, 3]})
    source = mtl.save_model(slim.eval(), tmp_path / "slim", meta={})
    data, cache, there = _scenes_elsewhere(tmp_path, monkeypatch)
    run([f"model={source}", "widths={encoder: 0.5}", f"output={tmp_path / 'sub'}", _override("calib.data", data)],
        run_dir=tmp_path / "run")
    monkeypatch.chdir(there)
    sub = mtl.load_model(tmp_path / "sub")
    assert sub.meta["data"]["cache_dir"] == str(cache)
    assert datamodule_for(sub, None, tmp_path / "sub").path.parent == cache


def test_a_data_config_naming_another_dataset_replaces_the_record_unchecked(tiny_model, tmp_path):
    """Pruned on scenes a model trained on hf_local path=/x, on a machine without /x: refused naming data.path."""
    from pruning.calib import datamodule_for

    gone = str(tmp_path / "x")
    folder = mtl.save_model(tiny_model, tmp_path / "m", meta={"data": {"name": "hf_local", "path": gone, "size": 32}})
    assert rebuild_config({"name": "hf_local", "path": gone, "size": 32}, {"name": "scenes", "size": 64},
                          folder / "config.json", "data") == {"name": "scenes", "size": 64}
    dm = datamodule_for(mtl.load_model(folder), {**SCENES, "cache_dir": str(tmp_path / "c")}, folder)
    assert dm.path.parent == tmp_path / "c"
    with pytest.raises(FileNotFoundError, match=r"key meta.data.path="):  # the same dataset still is checked
        rebuild_config({"name": "hf_local", "path": gone}, {"name": "hf_local", "size": 64}, folder, "data")
