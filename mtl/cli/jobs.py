"""What the job CLIs (mtl-merge, mtl-prune, mtl-export, mtl-extract) share: the run folder and its
output, and the model a job reads (``model=``, or a tiny trained one under ``debug=smoke``)."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from mtl.atomic import OutputExists, cannot_replace, user_path
from mtl.cli.common import write_hydra_record


def start_run(cfg, run_dir: str | os.PathLike, default_output: str = "model",
              inputs: list[Path] = (), model_output: bool = False, any_weights: bool = False,
              replaceable: Callable[[Path], None] | None = None) -> tuple[Path, Path]:
    """Check the input folders (`check_input_folders`; ``any_weights``: see there), create the run folder, store the resolved config in it and resolve ``cfg.output`` (default
    ``<run_dir>/<default_output>``); an existing output is refused unless ``overwrite=true`` (and, for a job writing a model folder
    (``model_output``), unless it is one; ``replaceable(output)``, the job's own checks on its output, refuses any
    other existing output the job would not replace, e.g. mtl-export's `check_replaceable`, and any output path it
    could not write, e.g. mtl-merge's .safetensors file where it writes a folder), and an
    output that is, lies inside or holds an input model folder (``model``, ``pretrained``, ``models``,
    and the job's other `inputs`, e.g. a pool manifest's folders) is refused before anything is written, as is a
    run folder holding anything but a failed run (`check_run_folder`, the rule mtl-train's folders follow too)."""
    from omegaconf import OmegaConf

    from mtl.cli.failures import FAILED, FINISHED_RECORDS, RunFolderTaken, check_run_folder
    from mtl.io import (atomic_path, check_not_a_file, check_output_apart, holds_user_files, is_model_folder,
                        stale_records)

    run_dir = Path(run_dir)
    output = job_output(cfg, run_dir, default_output)
    named = input_folders(cfg, inputs)
    check_output_apart(output, [p for _, p in named])  # the graver mistake first: a result written over an input
    check_input_folders(named, any_weights)
    if output.resolve() == run_dir.resolve() or output.resolve() in run_dir.resolve().parents:
        raise ValueError(f"output={output} is or holds this run's folder {run_dir}; write the result elsewhere")
    # every check on the output before anything is written: a refused rerun leaves the earlier run's
    # config.yaml, records and (when it finished) its folder exactly as they were
    if model_output:  # overwrite=true would not replace it either: said before the work, not by save_model after it
        check_not_a_file(output, "output")
    elif replaceable is not None and output.exists() and not output.is_dir():
        try:
            replaceable(output)  # a file the job would not replace (mtl-export's): not 'pass overwrite=true', which would not help
        except OutputExists:
            pass  # overwrite=true would replace it: the check below says so, as the command line spells it
    if os.path.ismount(output):  # not 'pass overwrite=true': it could not be replaced either
        raise cannot_replace(output)
    if output.exists() and not cfg.get("overwrite"):
        message = f"{output} exists; pass overwrite=true to replace it"
        raise RunFolderTaken(message, run_dir) if finished_run(run_dir) else FileExistsError(message)
    parent = next((p for p in output.resolve().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():  # said now, not as a bare OS error after the work
        raise NotADirectoryError(f"output={output}: {parent} is a file, not a folder; choose another output path")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output={output}: {parent} is not writable; choose another output path")
    if model_output and output.is_dir() and holds_user_files(output) and not is_model_folder(output):
        # save_model refuses it at the end; a job writing a model folder says so before its work
        raise FileExistsError(f"output={output} exists and is not a model folder (no config.json + model.safetensors); "
                              "overwrite=true replaces only an earlier model folder: choose another path")
    if replaceable is not None:  # the job's own rule (overwrite=true; an output it cannot write), before its work
        replaceable(output)
    if model_output and cfg.get("overwrite") and is_model_folder(output):
        stale_records(output, caller="output")  # files save_model would delete are named before the work
    # overwrite=true may rerun an earlier run of this same job CLI in its folder (its config.yaml names the job:
    # `name: merge`, ...), never take over another tool's run (a training run's model/ and metrics.json)
    check_run_folder(run_dir, rerun=bool(cfg.get("overwrite")) and recorded_job(run_dir) == cfg.get("name"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / FAILED).unlink(missing_ok=True)  # an earlier failed attempt here: this run replaces its verdict
    for record in FINISHED_RECORDS:  # an overwrite rerun killed later must not pass for the run it replaces
        (run_dir / record).unlink(missing_ok=True)
    write_hydra_record(cfg, run_dir)
    with atomic_path(run_dir / "config.yaml") as tmp:
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir, output


def job_output(cfg, run_dir: str | os.PathLike, default_output: str = "model") -> Path:
    """The path `start_run` resolves ``cfg.output`` to (see there), for a check that runs before it."""
    return user_path(str(cfg.output)) if cfg.get("output") else Path(run_dir) / default_output


def input_folders(cfg, inputs: list[Path] = ()) -> list[tuple[str, Path]]:
    """(key, path) of every input the command names: ``model=``, ``pretrained=``, each of ``models=``, and the job's
    other `inputs` (key ``""``: a pool manifest's or a mergekit recipe's folders)."""
    models = cfg.get("models") or []
    models = [models] if isinstance(models, str) else models  # a bare string is refused by the job, named
    named = [("model", cfg.get("model")), ("pretrained", cfg.get("pretrained")), *(("models", m) for m in models),
             *(("", p) for p in inputs)]
    return [(key, user_path(str(p))) for key, p in named if p]


def check_input_folders(named: list[tuple[str, Path]], any_weights: bool = False) -> None:
    """Each input exists and is a model folder (config.json readable and matching its weights file's header, the
    loader's own first checks; no tensor is read), before the run folder is made. ``any_weights``: the job reads
    any weights (a state-dict merge of Hugging Face folders or files), so the path only has to exist."""
    from mtl.folder_checks import ModelFolderError
    from mtl.io import read_checked_config, run_folder_refusal

    for key, path in named:
        given = f"{key}={path}" if key else str(path)
        if any_weights:
            if not path.exists():
                raise FileNotFoundError(f"{given}: no such file or folder")
            if refusal := run_folder_refusal(path):  # mtl-train's run folder for its model/: said now, as for model folders
                raise ModelFolderError(f"{key}: {refusal}" if key else refusal)
            continue
        try:
            read_checked_config(path)
        except ModelFolderError as e:
            raise ModelFolderError(f"{key}: {e}" if key else str(e)) from None


def input_model_config(cfg) -> dict | None:
    """``model=``'s config.json (no tensor read; a missing or corrupt folder refused as `start_run` refuses it),
    for a job to judge its settings against the model before its run folder; None without ``model=``."""
    from mtl.io import read_model_config

    if not cfg.get("model"):
        return None
    check_input_folders(input_folders(cfg))
    return read_model_config(user_path(str(cfg.model)))


def input_task_names(cfg) -> list[str] | None:
    """The task names ``model=``'s config.json lists (`input_model_config`), for a job to judge ``tasks=`` before
    its run folder; None without ``model=``."""
    config = input_model_config(cfg)
    return None if config is None else [t["name"] for t in config["model"]["tasks"]]


def check_model_given(cfg, verb: str) -> None:
    """``model=`` or ``smoke_model`` (``debug=smoke``) is set: the one-line refusal of a bare command, said before
    the run folder is made."""
    if not cfg.get("model") and not cfg.get("smoke_model"):
        raise ValueError(f"nothing to {verb}: pass model=<model folder> (or debug=smoke to build a tiny one)")


def recorded_job(run_dir: Path) -> str | None:
    """The ``name`` an earlier run recorded in ``run_dir/config.yaml`` (the job CLIs': merge, prune, export,
    extract), or None (no record, or one that does not read)."""
    from omegaconf import OmegaConf

    try:
        name = OmegaConf.load(run_dir / "config.yaml").get("name")
    except Exception:  # noqa: BLE001  (no readable record: not a run of this job)
        return None
    return name if isinstance(name, str) else None


def finished_run(run_dir: Path) -> bool:
    """``run_dir`` holds a finished run of any CLI: the record it writes last (metrics.json; mtl-extract's and
    mtl-export's report), and no FAILED marker."""
    from mtl.cli.failures import holds_finished_run

    return holds_finished_run(run_dir)


def finished_model(run_dir: Path) -> Path | None:
    """The model folder of a finished training run in ``run_dir``, else None."""
    from mtl.io import is_model_folder

    model = Path(run_dir) / "model"
    return model if finished_run(run_dir) and is_model_folder(model) else None


def smoke_model(root: str | os.PathLike, experiment: str = "scenes_hps",
                tasks: str = "[semseg,depth,classification]") -> Path:
    """A seconds-long real model folder (a ``debug=smoke`` training run) for the job CLIs' smoke runs."""
    return smoke_training([f"experiment={experiment}", "debug=smoke", "viz.num_samples=0", "logger=none",
                           "log_weights_every=0", f"task={tasks}"], Path(root))[0]


def smoke_training(overrides: list[str], folder: Path, reuse: bool = True) -> tuple[Path, bool]:
    """(the model folder of a training run with ``overrides`` in ``folder``, whether an earlier one was reused). A smoke
    job retried in its folder reuses the run its first attempt finished there when that run's config.yaml is the
    config ``overrides`` compose now (and ``reuse``: False when its input was trained again); a finished run of any
    other config (the slimmable model an earlier ``widths=`` request trained, where ``tasks=`` now needs a task-MoE
    one) is replaced, said on the console: the folder is the job's own, inside its run folder."""
    import shutil

    from mtl.progress_log import emit
    from mtl.train import run

    if finished_model(folder) is not None:
        differs = config_difference(overrides, folder) if reuse else "its input model was trained again"
        if differs is None:
            return folder / "model", True
        emit(f"[smoke] {folder} holds a model trained for another request ({differs}): training it again there")
        shutil.rmtree(folder)
    return run(overrides, run_dir=folder) / "model", False


def config_difference(overrides: list[str], run_dir: Path) -> str | None:
    """The first setting in which ``run_dir/config.yaml`` differs from the training config ``overrides`` compose
    (``key: recorded -> now``), or None when they are the same."""
    from omegaconf import OmegaConf

    from mtl.cli.in_process import compose_in_process
    from mtl.folder_checks import first_difference

    cfg, _ = compose_in_process("mtl.configs", "train", overrides, run_dir)
    now = OmegaConf.to_container(cfg, resolve=True)
    try:
        then = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except Exception as e:  # noqa: BLE001  (an unreadable record is no proof of the same config)
        return f"its config.yaml does not read: {e}"
    found = first_difference(then, now)  # as JSON: a recorded true and a composed 1 are different settings
    return None if found is None else f"{found[0] or 'config'}: {found[1]!r} -> {found[2]!r}"


def input_model(cfg, run_dir: Path, verb: str, experiment: str = "scenes_hps") -> Path:
    """``cfg.model``, or with ``smoke_model=true`` (``debug=smoke``) a tiny model trained first."""
    if cfg.get("model"):
        return user_path(str(cfg.model))  # as start_run's checks read it: a leading ~ expanded
    check_model_given(cfg, verb)
    return smoke_model(run_dir / "smoke_model", experiment)
