"""Screenshots of real TensorBoard pages for the docs: `python docs/screenshots.py [--logs DIR] [--out DIR] [--quick]`.

Without `--logs` it first makes what a new user makes, in a temporary `logs/`: a training run
(`experiment=fast`), a 2-job learning-rate sweep and an eval of the run. Then it starts a real `tensorboard`
on a free localhost port and renders its Time Series, Custom Scalars, HParams, PR Curves and Graphs pages in
headless Chromium (Debian's `chromium` package) to PNGs in `docs/images/`. Where Chromium is missing it says so and
exits 0 without touching the images. `--quick` trains on slices (a minute) instead of the full data (several).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# page (TensorBoard URL fragment) -> file in docs/images/, browser window size (tall enough for the test and train
# groups that Time Series opens, wide enough for HParams' metric columns)
PAGES = {
    "timeseries": ("tensorboard_time_series.png", "1600,1750"),
    "custom_scalars": ("tensorboard_custom_scalars.png", "1600,700"),
    "hparams": ("tensorboard_hparams.png", "2000,650"),
    "pr_curves": ("tensorboard_pr_curves.png", "1600,1000"),
    "graphs": ("tensorboard_graph.png", "1100,950"),
}
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def run(*args: str, logs: Path) -> None:
    """`python -m digit_lightning.<args>` with runs under `logs`; stop on failure with its last lines."""
    cmd = [sys.executable, "-m", *args, f"paths.log_dir={logs}"]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{result.stderr[-3000:]}")


def make_runs(logs: Path, quick: bool) -> None:
    """A training run, a 2-job lr sweep (on a slice: it is there to be compared) and an eval of the run."""
    slice_ = ["+trainer.limit_train_batches=60", "+trainer.limit_val_batches=10", "trainer.log_every_n_steps=5"]
    run("digit_lightning.train", "experiment=fast", *(slice_ if quick else []), logs=logs)
    trained = next(logs.glob("fast/runs/*"))
    run("digit_lightning.train", "-m", "experiment=fast", "model.optimizer.lr=1e-3,1e-2", "trainer.max_epochs=1",
        "test=false", *(slice_ if quick else ["+trainer.limit_train_batches=200", "trainer.log_every_n_steps=10"]),
        logs=logs)  # fmt: skip
    run("digit_lightning.eval", f"ckpt_path={trained}", *(["+trainer.limit_test_batches=10"] if quick else []),
        logs=logs)  # fmt: skip


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(url: str, logs: Path, timeout: float = 120) -> None:
    """Wait until TensorBoard serves every run under `logs` (it loads them in the background)."""
    expected = {str(p.parent.relative_to(logs)) for p in logs.rglob("events.out.tfevents.*")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as response:
                if expected <= set(json.load(response)):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"error: TensorBoard at {url} did not load all runs of {logs} in {timeout:.0f} s")


def screenshot(browser: str, url: str, out: Path, size: str = "1600,1200") -> None:
    """Render `url` in headless Chromium to `out` (a PNG), after 15 s of page time for TensorBoard to draw."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
             f"--screenshot={out}", f"--window-size={size}", "--virtual-time-budget=15000", url],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", file=sys.stderr)


def main() -> None:
    """Make the runs (unless --logs), serve them with TensorBoard, screenshot each page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logs", type=Path, help="a logs/ dir to show instead of making new runs")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--quick", action="store_true", help="train on slices: a minute instead of several")
    parser.add_argument("--keep", action="store_true", help="keep the runs made (their dir is printed)")
    args = parser.parse_args()
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    if browser is None:
        print("skipped: no Chromium found (Debian: apt-get install chromium)", file=sys.stderr)
        return

    workdir = Path(tempfile.mkdtemp(prefix="digit-screenshots-"))
    logs = args.logs or workdir / "logs"
    if args.logs is None:
        make_runs(logs, args.quick)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logs), "--host", "127.0.0.1", "--port", str(port),
         "--reload_interval", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )  # fmt: skip
    try:
        wait_for_runs(url, logs)
        args.out.mkdir(parents=True, exist_ok=True)
        for page, (name, size) in PAGES.items():
            screenshot(browser, f"{url}/#{page}", args.out / name, size)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.keep or args.logs:
            print(f"runs: {logs}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
