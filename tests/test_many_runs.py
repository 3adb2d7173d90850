"""Many runs, one picture: a `logs/` as a new user fills it on a first day (a short run, a 2-job lr grid, a 3-trial
Optuna search, a 3-fold cross-validation and an eval, all on tiny slices: `docs/screenshots.py`'s `make_runs`), read
back as TensorBoard reads it, then shown by a real `tensorboard` in headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_dashboards import hparams_tab

from digit_lightning.tensorboard import METRICS

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ten CLI runs: a few minutes on 2 cores

spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
screenshots = importlib.util.module_from_spec(spec)
spec.loader.exec_module(screenshots)


@pytest.fixture(scope="module")
def mixed_logs(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs of `make_runs(quick=True)` in a fresh logs/."""
    os.environ["DIGIT_LIGHTNING_DATA"] = str(mnist_dir)  # the CLI runs it starts find the shared data
    logs = tmp_path_factory.mktemp("mixed") / "logs"
    screenshots.make_runs(logs, quick=True)
    return logs


def test_every_run_has_a_short_unique_name_and_the_same_hparams_and_metrics(mixed_logs: Path):
    table, sessions = hparams_tab(mixed_logs)
    assert len(sessions) == 1 + 2 + 3 + 3 + 1, sorted(sessions)  # run, grid, Optuna, folds, eval
    assert len({frozenset(s) for s in sessions.values()}) == 1, "runs with different HParams keys"
    names = {run: s["run"].string_value for run, s in sessions.items()}
    assert len(set(names.values())) == len(names), names
    assert all(len(n) <= 40 and not re.search(r"\d{5}", n) for n in names.values()), names  # no 20-digit floats
    assert {n for n in names.values() if n.startswith("fold=")} == {"fold=0", "fold=1", "fold=2"}, names
    assert sum(n.startswith("eval ") for n in names.values()) == 1, names
    for run, name in names.items():  # a sweep job's TensorBoard run ends in its name
        if "/multiruns/" in run:
            assert run.endswith(f"/tensorboard/{name}"), (run, name)

    assert [m.display_name for m in table.metric_infos] == list(METRICS)
    assert "val/acc_best" in METRICS
    for run in sessions:  # every metric column has a value in every run: Parallel Coordinates draws them all
        events = EventAccumulator(str(mixed_logs / run), size_guidance={"scalars": 0})
        events.Reload()
        assert set(METRICS.values()) <= set(events.Tags()["scalars"]), run
        assert not [t for t in events.Tags()["scalars"] if t.startswith("test/")], run  # one point per run: whole_run/


def test_tensorboard_shows_them_in_headless_chromium(mixed_logs: Path, tmp_path: Path):
    """Time Series, the HParams table and Parallel Coordinates at 1600 px, and the table names every run."""
    browser = next((shutil.which(b) for b in screenshots.CHROMIUM if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium; .ci/run installs it)")
    port = screenshots.free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(mixed_logs), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        screenshots.wait_for_runs(url, mixed_logs)
        pages = [p for p in screenshots.PAGES if p[0] in ("timeseries", "hparams")]
        for path in screenshots.take_screenshots(browser, url, tmp_path, pages):
            with Image.open(path) as image:
                assert image.width == screenshots.WIDTH and image.getextrema() != ((255, 255),) * 3, path
        _, sessions = hparams_tab(mixed_logs)
        page = screenshots.Browser(browser, screenshots.WIDTH, 900)
        try:
            page.open(f"{url}/#hparams")
            text = page.evaluate(screenshots.DEEP_TEXT)
        finally:
            page.close()
        missing = [s["run"].string_value for s in sessions.values() if s["run"].string_value not in text]
        assert not missing, f"the HParams table does not show the runs {missing}"
    finally:
        server.terminate()
        server.wait(timeout=30)
