"""The notebooks run top to bottom on the real data (so they cannot rot) and are stored without outputs."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

pytestmark = pytest.mark.slow  # builds a wheel / executes notebooks: `make test-full`


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path):
    cells = json.loads(path.read_text())["cells"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c["cell_type"] == "code"), (
        f"{path.name} holds outputs: run `make format` (nbstripout) before committing"
    )


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
    import nbformat  # here, not at the top: its JSON-schema checks take 2 s to import, in every collection of tests
    from nbclient import NotebookClient

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


def test_make_notebook_serves_the_notebooks_in_jupyterlab(tmp_path: Path):
    """`make notebook`'s command (the [notebooks] extra, in [dev]) serves JupyterLab on 127.0.0.1 with the
    notebooks and a Python kernel."""
    recipe = subprocess.run(["make", "-n", "notebook"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in recipe.splitlines() if "jupyterlab" in line)
    args = shlex.split(line)
    assert args[:3] == [".venv/bin/python", "-m", "jupyterlab"] and "--ServerApp.ip=127.0.0.1" in args, line
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp_path / "config"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "rt")}
    root = ["--allow-root"] if os.geteuid() == 0 else []  # CI runs as root; Jupyter refuses it by default
    server = subprocess.Popen(
        [sys.executable, *args[1:], "--no-browser", f"--port={port}", "--IdentityProvider.token=", *root],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, contents = time.monotonic() + 120, None
        while time.monotonic() < deadline and contents is None:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/contents", timeout=5) as response:
                    contents = json.load(response)
            except OSError:
                time.sleep(1)
        assert contents is not None, "JupyterLab did not answer in 120 s"
        assert {p.name for p in NOTEBOOKS} <= {c["name"] for c in contents["content"]}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab", timeout=10) as response:
            assert "JupyterLab" in response.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernelspecs", timeout=10) as response:
            assert "python3" in json.load(response)["kernelspecs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
