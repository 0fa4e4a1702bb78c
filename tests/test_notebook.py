"""examples/quickstart.ipynb runs from top to bottom (so it cannot rot), with 20 training steps
instead of its 200: every cell runs as written, only the run is shorter."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHORTER = {"train.steps=200": "train.steps=20", "train.eval_every=100": "train.eval_every=10",
           "psr.start_step=40": "psr.start_step=4", "psr.end_step=120": "psr.end_step=12"}


@pytest.mark.e2e
def test_quickstart_notebook_runs():
    notebook = nbformat.read(ROOT / "examples" / "quickstart.ipynb", as_version=4)
    (config_cell,) = [cell for cell in notebook.cells if "train.steps=200" in cell.source]
    for long, short in SHORTER.items():
        assert long in config_cell.source, f"the notebook no longer sets {long}: update SHORTER"
        config_cell.source = config_cell.source.replace(long, short)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "examples")}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "held-out perplexity after 20 steps" in outputs
    assert "'acc':" in outputs and "picks of the other layer's experts" in outputs
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
