"""The notebooks under examples/ run top to bottom (nbclient) from a fresh folder; any cell error fails."""
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
SLOW = {"01_train_multitask.ipynb", "02_merge_pool.ipynb"}  # several training runs each


def test_notebooks_are_stored_without_outputs():
    assert len(NOTEBOOKS) >= 3
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"


def _py_cells(text):
    """(cell type, source) of a jupytext percent-format script, its header skipped."""
    text = re.sub(r"\A# ---\n(?:#.*\n)*?# ---\n", "", text)
    cells = []
    for block in re.split(r"^# %%", text, flags=re.M)[1:]:
        head, _, body = block.partition("\n")
        if "[markdown]" in head:
            body = "\n".join(re.sub(r"^# ?", "", ln) for ln in body.strip("\n").splitlines())
        cells.append(("markdown" if "[markdown]" in head else "code", body.strip()))
    return cells


def test_notebooks_match_their_paired_scripts():
    """Each .ipynb and its jupytext .py hold the same cells (an edit to one form only would fail)."""
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cells = [(c.cell_type, c.source.strip()) for c in nb.cells]
        assert cells == _py_cells(path.with_suffix(".py").read_text()), f"{path.name} differs from its .py pair"


@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else [])
                                  for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("MTL_OUTPUT_DIR", raising=False)
    # the fast ones run twice into the same folder (a re-run once failed on its own earlier run folders),
    # the second time from another folder through MTL_OUTPUT_DIR, which the notebooks honour as the CLIs do
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for i in range(1 if path.name in SLOW else 2):
        if i:
            monkeypatch.setenv("MTL_OUTPUT_DIR", str(tmp_path / "outputs"))
        nb = nbformat.read(path, as_version=4)
        client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                         resources={"metadata": {"path": str(tmp_path if i == 0 else elsewhere)}})
        client.execute()  # raises CellExecutionError naming the cell on any error
    assert list(elsewhere.iterdir()) == []
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # every cell that draws a figure shows it (a bare Figure once came out as '<Figure size ...>' text)
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code" and ("Figure(" in c.source or "plt." in c.source or "display(Image" in c.source):
            assert any("image/png" in o.get("data", {}) for o in c.outputs), f"{path.name} cell {i}: no image shown"
    assert (tmp_path / "outputs" / "notebooks").is_dir()
