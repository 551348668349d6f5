"""save_model(overwrite=True) over a model folder holding other files: they were deleted without a word."""
import logging

import pytest
from omegaconf import OmegaConf

import mtl


def test_a_users_files_in_a_model_folder_are_named_not_deleted(tiny_model, tmp_path):
    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "notes.txt").write_text("precious")
    (folder / "README.md").write_text("my own card")  # no export.json: not mtl-export's
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(FileExistsError, match=rf"save_model: {folder} holds README.md, notes.txt besides the model "
                                              "folder's config.json and model.safetensors; replacing the folder would "
                                              "delete them"):
        mtl.save_model(tiny_model, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_job_names_them_before_its_work(tiny_model, tmp_path):
    from mtl.cli.jobs import start_run

    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / "notes.txt").write_text("precious")
    cfg = OmegaConf.create({"output": str(folder), "overwrite": True, "name": "prune"})
    with pytest.raises(FileExistsError, match=rf"output: {folder} holds notes.txt besides"):
        start_run(cfg, tmp_path / "run", model_output=True)
    assert not (tmp_path / "run").exists()


def test_an_exported_folders_card_and_report_go_with_the_weights_they_describe(tiny_model, tmp_path, caplog):
    source = mtl.save_model(tiny_model, tmp_path / "m")
    out = mtl.export(source, "folder", out=tmp_path / "exported")
    assert {"README.md", "export.json"} <= {p.name for p in out.iterdir()}
    with caplog.at_level(logging.WARNING, logger="mtl.io"):
        mtl.save_model(tiny_model, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "removed README.md and export.json" in caplog.text


def test_file_manager_and_editor_metadata_is_no_reason_to_refuse(tiny_model, tmp_path):
    """Finder's .DS_Store, Windows' Thumbs.db and the .ipynb_checkpoints/ JupyterLab makes beside an opened
    config.json are written by tools, not users: the job CLIs and save_model refused to replace such a folder."""
    from mtl.cli.jobs import start_run

    folder = mtl.save_model(tiny_model, tmp_path / "m")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "Thumbs.db").write_bytes(b"\0")
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "config-checkpoint.json").write_text("{}")
    cfg = OmegaConf.create({"output": str(folder), "overwrite": True, "name": "prune"})
    start_run(cfg, tmp_path / "run", model_output=True)  # not refused
    mtl.save_model(tiny_model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    (folder / "notes.ipynb").write_text("{}")  # a user's file still is
    with pytest.raises(FileExistsError, match=r"holds notes.ipynb besides"):
        mtl.save_model(tiny_model, folder)


def test_a_folder_holding_only_file_manager_metadata_is_replaced(tiny_model, tmp_path):
    """A model folder with a .DS_Store beside it was replaced, but a folder with only a .DS_Store was refused as
    'exists and is not a model folder'."""
    from mtl.cli.jobs import start_run

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"\0")
    cfg = OmegaConf.create({"output": str(folder), "overwrite": True, "name": "prune"})
    start_run(cfg, tmp_path / "run", model_output=True)  # not refused
    mtl.save_model(tiny_model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_exports_and_merges_take_a_folder_holding_only_file_manager_metadata(tiny_model, tmp_path):
    # save_model and the job CLIs did; mtl.export and a Hugging Face merge output still refused it
    import merging
    from safetensors.torch import save_file

    out = tmp_path / "export"
    out.mkdir()
    (out / ".DS_Store").write_bytes(b"\0")
    mtl.export(tiny_model, "folder", out=out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    import torch

    for name, scale in (("base", 1.0), ("ft", 2.0)):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2, 2) * scale}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text('{"model_type": "llama"}')
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / ".DS_Store").write_bytes(b"\0")
    merging.merge_to_file("task_arithmetic", tmp_path / "base", [tmp_path / "ft"], merged, lam=1.0)
    assert (merged / "model.safetensors").is_file()


def test_a_multitask_model_takes_its_backbone_by_name():
    from mtl.models.multitask import MultiTaskModel
    from mtl.tasks import create_task

    assert MultiTaskModel([create_task("depth")], "test_resnet").config["backbone"]["name"] == "test_resnet"


def _snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("writer", ["save_model", "export", "atomic_path"])
def test_a_text_overwrite_is_refused_not_taken_as_true(tiny_model, tmp_path, writer):
    """bool("no") is True: overwrite="no" replaced the existing output."""
    from mtl.io import atomic_path

    source = mtl.save_model(tiny_model, tmp_path / "m")
    out = source if writer != "export" else mtl.export(source, "folder", out=tmp_path / "exported")
    before = _snapshot(out)
    with pytest.raises(ValueError, match="^overwrite must be true or false, got 'no'$"):
        if writer == "save_model":
            mtl.save_model(tiny_model, out, overwrite="no")
        elif writer == "export":
            mtl.export(source, "folder", out=out, overwrite="no")
        else:
            with atomic_path(out, overwrite="no"):
                pass
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m"] + (["exported"] if writer == "export" else []))
