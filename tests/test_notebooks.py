"""The notebooks run top to bottom on the real data (so they cannot rot) and are stored without outputs."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.slow  # builds a wheel / executes notebooks: `make test-full`


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    assert all(
        not c.get("outputs") and not c.get("execution_count") for c in notebook.cells if c.cell_type == "code"
    ), f"{path.name} holds outputs: run `make format` (nbstripout) before committing"


# A cell that draws: it shows a pyplot figure, or its value is a figure of ours, or it displays a PNG.
PLOTS = re.compile(r"plt\.show\(\)|^(confusion_figure|image_grid)\(|display\(Image\(", re.MULTILINE)
# What the command line filters (digit_lightning.cli.quiet) and a notebook must not print either.
NOISE = ("💡", "Tip:", "srun", "Warning", "deprecated")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_every_figure(
    path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Executed as Jupyter does, with the backend it picks (no MPLBACKEND): every plotting cell has a PNG output,
    also those after `train()` (library code must not switch the backend), and nothing prints third-party noise."""
    monkeypatch.setenv("DIGIT_LIGHTNING_DATA", str(mnist_dir))
    monkeypatch.setenv("DIGIT_LIGHTNING_NOTEBOOK_OUT", str(tmp_path))  # where notebooks write their runs
    monkeypatch.delenv("MPLBACKEND", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    ).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    plotting = [c for c in notebook.cells if c.cell_type == "code" and PLOTS.search(c.source)]
    assert plotting, f"{path.name}: no plotting cell found"
    for cell in plotting:
        pngs = [o for o in cell.outputs if "image/png" in o.get("data", {})]
        assert pngs, f"{path.name}: this cell draws nothing:\n{cell.source}"
    stderr = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", [])
                     if o.get("name") == "stderr")  # fmt: skip
    assert not [n for n in NOISE if n in stderr], stderr[-3000:]
