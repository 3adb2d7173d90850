"""Screenshots of real TensorBoard pages for the docs: `python docs/screenshots.py [--logs DIR] [--out DIR] [--quick]`.

Without `--logs` it first makes what a new user makes, in a temporary `logs/`: a training run
(`experiment=fast`), a 2-job learning-rate sweep and an eval of the run. Then it starts a real `tensorboard`
on a free localhost port and renders its Time Series, Custom Scalars, HParams, PR Curves and Graphs pages in
headless Chromium (Debian's `chromium` package) to PNGs in `docs/images/`. Where Chromium is missing it says so and
exits 0 without touching the images. `--quick` trains on slices (a minute) instead of the full data (several).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
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
# TensorBoard URL fragment, the tab to click there (or None), file in docs/images/, window height; all 1600 px wide
PAGES = [
    ("timeseries", None, "tensorboard_time_series.png", 1400),
    ("custom_scalars", None, "tensorboard_custom_scalars.png", 700),
    ("hparams", None, "tensorboard_hparams.png", 800),
    ("hparams", "Parallel Coordinates View", "tensorboard_parallel_coordinates.png", 800),
    ("text", None, "tensorboard_summary.png", 900),
    ("pr_curves", None, "tensorboard_pr_curves.png", 1000),
    ("graphs", None, "tensorboard_graph.png", 950),
]
WIDTH = 1600
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def run(*args: str, logs: Path) -> None:
    """`python -m digit_lightning.<args>` with runs under `logs`; stop on failure with its last lines."""
    cmd = [sys.executable, "-m", *args, f"paths.log_dir={logs}"]
    print("$", " ".join(cmd[1:]), file=sys.stderr)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} failed:\n{result.stderr[-3000:]}")


TINY = ["+trainer.limit_train_batches=20", "+trainer.limit_val_batches=3", "+trainer.limit_test_batches=3",
        "trainer.log_every_n_steps=5", "callbacks.progress_bar=null"]  # fmt: skip


def make_runs(logs: Path, quick: bool) -> None:
    """What one `logs/` holds after a new user's first day: a training run, a 2-job lr grid, a 3-trial Optuna search,
    a 3-fold cross-validation and an eval of the run (`quick`: each on a slice, a minute or two in all)."""
    slice_ = TINY if quick else ["+trainer.limit_train_batches=200", "trainer.log_every_n_steps=10"]
    run("digit_lightning.train", "experiment=fast", *(TINY if quick else []), logs=logs)
    trained = next(logs.glob("fast/runs/*"))
    run("digit_lightning.train", "-m", "experiment=fast", "model.optimizer.lr=1e-3,1e-2", "trainer.max_epochs=1",
        *slice_, logs=logs)  # fmt: skip
    run("digit_lightning.train", "hparams_search=mnist_optuna", "hydra.sweeper.n_trials=3", "trainer.max_epochs=2",
        *slice_, logs=logs)  # fmt: skip
    run("digit_lightning.train", "-m", "experiment=fast", "data.num_folds=3", "data.fold=0,1,2", "trainer.max_epochs=1",
        *slice_, logs=logs)  # fmt: skip
    run("digit_lightning.eval", f"ckpt_path={trained}", *(["+trainer.limit_test_batches=3"] if quick else []),
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


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON messages
    ending in a NUL byte on file descriptors 3 and 4), so that a page can be clicked before its screenshot."""

    def __init__(self, executable: str, width: int, height: int) -> None:
        self.profile = tempfile.TemporaryDirectory()
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        os.set_inheritable(to_chrome_r, True)
        os.set_inheritable(from_chrome_w, True)

        def fds() -> None:  # in the child: the pipe ends on descriptors 3 (commands) and 4 (replies)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w)]  # clear of 3 and 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
             f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.buffer, self.next_id = b"", 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: object) -> dict:
        """Send one command (to the page once attached) and return its result."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if getattr(self, "session", None):
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                chunk = os.read(self.from_chrome, 1 << 20)
                if not chunk:
                    raise SystemExit("error: Chromium closed its DevTools pipe")
                self.buffer += chunk
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise SystemExit(f"error: Chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, script: str) -> object:
        """Run JavaScript in the page; its value."""
        return self.call("Runtime.evaluate", expression=script, returnByValue=True).get("result", {}).get("value")

    def open(self, url: str, settle: float = 8.0) -> None:
        """Load `url` and give the page `settle` seconds to fetch and draw."""
        self.call("Page.navigate", url=url)
        time.sleep(settle)

    def click(self, text: str, settle: float = 4.0) -> bool:
        """Click the first element (shadow DOMs included) whose own text is `text`; whether there was one."""
        found = self.evaluate(DEEP_FIND % json.dumps(text) + "; if (el) el.click(); !!el")
        time.sleep(settle)
        return bool(found)

    def screenshot(self, out: Path) -> None:
        """The page as it is now, to `out` (a PNG)."""
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", file=sys.stderr)

    def close(self) -> None:
        """Stop Chromium and remove its profile."""
        self.process.terminate()
        self.process.wait(timeout=30)
        os.close(self.to_chrome)
        os.close(self.from_chrome)
        self.profile.cleanup()


# Every text on the page, shadow DOMs included (TensorBoard's HParams tab is made of them), as one string.
DEEP_TEXT = """
(function text(root) {
  let out = root.body ? root.body.innerText : Array.from(root.children).map(c => c.innerText || '').join(' ');
  for (const e of root.querySelectorAll('*')) { if (e.shadowRoot) out += ' ' + text(e.shadowRoot); }
  return out;
})(document)
"""

# The deepest element, across shadow roots, whose text is exactly the one asked for (a tab, a button).
DEEP_FIND = """
const want = %s;
const all = [];
(function walk(root) {
  for (const e of root.querySelectorAll('*')) { all.push(e); if (e.shadowRoot) walk(e.shadowRoot); }
})(document);
const el = all.filter(e => (e.innerText || e.textContent || '').trim().toUpperCase() === want.toUpperCase()).pop()
"""


def take_screenshots(executable: str, url: str, out: Path, pages: list[tuple] = PAGES) -> list[Path]:
    """Each page of `pages` (fragment, tab to click, file, height) at WIDTH pixels, into `out`; the files written."""
    written = []
    for fragment, tab, name, height in pages:
        browser = Browser(executable, WIDTH, height)
        try:
            browser.open(f"{url}/#{fragment}")
            if tab is not None and not browser.click(tab):
                raise SystemExit(f"error: no {tab!r} on TensorBoard's #{fragment} page")
            browser.screenshot(out / name)
            written.append(out / name)
        finally:
            browser.close()
    return written


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
        take_screenshots(browser, url, args.out)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if args.keep or args.logs:
            print(f"runs: {logs}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
