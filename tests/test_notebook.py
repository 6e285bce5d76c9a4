"""notebooks/quickstart.ipynb runs top to bottom, headless, in under two minutes; it is kept without outputs."""

from __future__ import annotations

import os
import pathlib
import time

import nbformat
import pytest
from nbclient import NotebookClient

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "notebooks" / "quickstart.ipynb"
BUDGET_SECONDS = 120


# Slow (CI runs it): what it calls - train_and_evaluate, plots, export, load_model, predict, explain - each has its own
# fast tests (test_train, test_plots, test_export); this one checks the notebook file itself runs.
@pytest.mark.slow
def test_quickstart_notebook_runs_headless_within_two_minutes_and_leaves_no_files(tmp_path, monkeypatch):
    notebook = nbformat.read(QUICKSTART, as_version=4)
    # The kernel is this interpreter's ipykernel, importing this checkout, working in a scratch directory,
    # with its own temporary directory: the notebook's run must not be left there.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    kernel_tmp = tmp_path / "tmp"
    kernel_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(kernel_tmp))
    client = NotebookClient(notebook, timeout=BUDGET_SECONDS, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on the first error
    seconds = time.perf_counter() - start
    assert seconds < BUDGET_SECONDS, f"the quickstart took {seconds:.0f} s"
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook showed no plot"
    assert not [p.name for p in kernel_tmp.iterdir() if p.name.startswith("din_quickstart_")]


def test_quickstart_notebook_is_kept_without_outputs():
    notebook = nbformat.read(QUICKSTART, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
