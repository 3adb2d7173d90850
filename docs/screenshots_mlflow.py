"""Screenshots of the real MLflow UI for docs/tracking.md: `python docs/screenshots_mlflow.py [--out DIR]`.

Runs a 2-job learning-rate sweep with `logger=mlflow` on slices (a minute or two) in a temporary `logs/`, serves its
SQLite store with `mlflow ui` on a free localhost port, and renders the sweep's experiment in headless Chromium:
the runs table (`mlflow_runs.png`) and the chart view with val/acc of both jobs (`mlflow_chart.png`). Where
Chromium or MLflow is missing it says so and exits 0 without touching the images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from screenshots import CHROMIUM, ROOT, free_port, run, screenshot

PAGES = {  # file -> (URL fragment after the experiment, window size)
    "mlflow_runs.png": ("", "2400,600"),
    "mlflow_chart.png": ("?compareRunsMode=CHART", "1600,1650"),
}


def wait_for_server(url: str, timeout: float = 300) -> None:
    """Wait until the MLflow server answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: mlflow ui at {url} did not answer in {timeout:.0f} s")


def main() -> None:
    """Make the sweep, serve its store with `mlflow ui`, screenshot the runs table and the chart view."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--logs", type=Path, help="the logs/ dir of an earlier --keep, instead of new runs")
    parser.add_argument("--keep", action="store_true", help="keep the runs made (their dir is printed)")
    args = parser.parse_args()
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    try:
        from mlflow import MlflowClient
    except ImportError:
        browser = None
    if browser is None:
        print("skipped: needs Chromium (Debian: apt-get install chromium) and the tracking extra", file=sys.stderr)
        return

    workdir = Path(tempfile.mkdtemp(prefix="digit-mlflow-screenshots-"))
    logs = args.logs or workdir / "logs"
    if args.logs is None:
        run("digit_lightning.train", "-m", "experiment=fast", "logger=mlflow", "model.optimizer.lr=1e-3,1e-2",
            "trainer.max_epochs=3", "+trainer.limit_train_batches=60", "+trainer.limit_val_batches=10",
            "+trainer.limit_test_batches=10", "trainer.log_every_n_steps=5", logs=logs)  # fmt: skip
    store = f"sqlite:///{logs}/mlflow/mlflow.db"
    (experiment,) = [e for e in MlflowClient(store).search_experiments() if e.name.startswith("fast/")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `mlflow ui` is `mlflow server` with 4 workers and a job runner: one worker and no jobs start faster
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_server(url)
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (query, size) in PAGES.items():
            screenshot(browser, f"{url}/#/experiments/{experiment.experiment_id}/runs{query}", args.out / name, size)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        server.wait(timeout=60)
        if args.keep or args.logs:
            print(f"runs: {logs}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
