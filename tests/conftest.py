import logging
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # generated data goes to a per-session cache unless CI points MTL_DATA_CACHE somewhere
    if not os.environ.get("MTL_DATA_CACHE"):  # set but empty counts as unset, as in mtl.data.default_cache_dir
        os.environ["MTL_DATA_CACHE"] = str(tmp_path_factory.mktemp("data_cache"))
    yield


ALL_TASKS = ["semseg", "depth", "normals", "edges", "classification", "regression"]


@pytest.fixture
def tiny_model():
    from mtl.models import create_model

    return create_model(ALL_TASKS, backbone={"name": "test_resnet", "out_indices": [1, 2, 3]},
                        decoder={"name": "hps", "channels": 16})


@pytest.fixture
def home_and_cwd(monkeypatch, tmp_path):
    """(home, cwd): ``$HOME`` and the working directory set to two fresh folders, for the tests of a leading ``~``
    (read as ``$HOME``, never written to a literal ``./~`` in the working directory)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(), cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return home, cwd


@pytest.fixture
def console(monkeypatch, tmp_path):
    """A console script's entry in-process: ``console("mtl.cli.export", "model=...")`` runs it with its run folders
    under ``tmp_path/outputs`` and returns (exit status, that output root)."""
    import importlib

    out = tmp_path / "outputs"
    monkeypatch.setenv("MTL_OUTPUT_DIR", str(out))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")

    def run(cli: str, *args: str):
        monkeypatch.setattr(sys, "argv", [cli, *args])
        # console handlers made by an earlier in-process run keep that test's (closed) stderr
        for name in [None, *logging.root.manager.loggerDict]:
            for h in getattr(logging.getLogger(name), "handlers", []):
                if type(h) is logging.StreamHandler:
                    monkeypatch.setattr(h, "stream", sys.stderr)
        try:
            with pytest.raises(SystemExit) as exc:
                importlib.import_module(cli).main()
        finally:
            # Hydra's job-log handler stays on the root logger after main() (a real CLI's process ends there);
            # one whose folder a refused run removed would fail the next in-process test's first log line
            for name in [None, *logging.root.manager.loggerDict]:
                logger = logging.getLogger(name)
                for h in list(getattr(logger, "handlers", [])):
                    if isinstance(h, logging.FileHandler) and not Path(h.baseFilename).parent.is_dir():
                        logger.removeHandler(h)
                        h.close()
        return exc.value.code, out

    return run
