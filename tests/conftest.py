"""Shared fixtures: the real MNIST (prepared once per session), the synthetic digits of tests/synthetic.py, and
composed configs pointing at tmp dirs."""

from __future__ import annotations

import collections
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs a worker per core: one torch thread each, CLI runs too
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from composition import compose
from filelock import FileLock
from omegaconf import DictConfig
from PIL import Image
from synthetic import SYNTHETIC_DATA, SYNTHETIC_OVERRIDES, write_synthetic_mnist

from digit_lightning.cli import compose_config
from digit_lightning.data import prepare_mnist

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DIGIT_LIGHTNING_DATA", ROOT / "data")).resolve()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST raw files, fetched and verified once (the `make data` copy when it exists)."""
    prepare_mnist(DATA_DIR)
    return DATA_DIR


def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's temp dir that every `pytest -n` worker shares (things built once go there, under a lock)."""
    shared = tmp_path_factory.getbasetemp()
    return shared.parent if os.environ.get("PYTEST_XDIST_WORKER") else shared


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir of synthetic digits in MNIST's raw layout (read with `data.verify=false`), written once."""
    out = shared_dir(tmp_path_factory) / "synthetic_mnist"
    with FileLock(f"{out}.lock"):
        if not (out / "done").exists():
            write_synthetic_mnist(out)
            (out / "done").touch()
    return out


@pytest.fixture(scope="session")
def synthetic_data(synthetic_dir: Path) -> dict:
    """`MNISTDataModule(**synthetic_data, batch_size=...)` reads the synthetic digits."""
    return {"data_dir": str(synthetic_dir), **SYNTHETIC_DATA}


@pytest.fixture
def synthetic_cfg(synthetic_dir: Path, tmp_path: Path):
    """Compose conf/train.yaml for an in-process run on the CPU on the synthetic digits, writing into tmp_path."""

    def make(*overrides: str) -> DictConfig:
        base = [f"paths.output_dir={tmp_path}", f"paths.data_dir={synthetic_dir}", "trainer=cpu", *SYNTHETIC_OVERRIDES]
        return compose([*base, *overrides])

    return make


@pytest.fixture
def make_cfg(mnist_dir: Path, tmp_path: Path):
    """Compose conf/train.yaml for an in-process run on the CPU, writing into tmp_path."""

    def make(*overrides: str) -> DictConfig:
        base = [f"paths.output_dir={tmp_path}", f"paths.data_dir={mnist_dir}", "trainer=cpu"]
        return compose([*base, *overrides])

    return make


@pytest.fixture
def run_cli(mnist_dir: Path):
    """Run `python -m <args>` as a user would, with the real data dir, capturing its output."""

    def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir), "PYTHONUNBUFFERED": "1"}
        return subprocess.run(
            [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
        )

    return run


def paper_photo(digit: np.ndarray, rng: np.random.Generator, side: int = 160) -> Image.Image:
    """An MNIST digit (28x28, white ink on black) as a person's photo of it: enlarged to `side` pixels, dark ink on
    slightly noisy, tinted light paper, at a random place in a larger RGB image."""
    ink = 1.0 - np.asarray(Image.fromarray(digit).resize((side, side), Image.BICUBIC), dtype=np.float32) / 255.0
    h, w = side + int(rng.integers(40, 300)), side + int(rng.integers(40, 300))
    paper = np.clip(rng.normal(225.0, 6.0, (h, w)), 0, 255)
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    paper[top : top + side, left : left + side] *= ink  # ink darkens the paper where the digit is
    rgb = np.stack([paper, paper * 0.97, paper * 0.9], axis=-1)  # a warm tint: colour must not matter
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="session")
def small_checkpoint(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, float]]:
    """A checkpoint trained briefly on a real slice (and tested on the full test set), shared by the use-a-model tests.

    Returns the best checkpoint's path and the metrics training reported for it. Trained once per session: the
    workers of `pytest -n` share it through their common temp dir, under a lock.
    """
    shared = shared_dir(tmp_path_factory)
    out, reported = shared / "small_checkpoint", shared / "small_checkpoint.json"
    with FileLock(f"{out}.lock"):
        if not reported.exists():
            from digit_lightning.train import train

            overrides = [
                f"paths.output_dir={out}", f"paths.data_dir={mnist_dir}", "trainer=cpu", "data.batch_size=64",
                "trainer.max_epochs=1", "+trainer.limit_train_batches=150", "+trainer.limit_val_batches=2",
                "callbacks.progress_bar=null",
            ]  # fmt: skip
            reported.write_text(json.dumps(train(compose_config(overrides))))
    return next((out / "checkpoints").glob("epoch_*.ckpt")), json.loads(reported.read_text())


@pytest.fixture(scope="session")
def make_photo():
    """`paper_photo` for tests: turn an MNIST digit into a large, off-centre, dark-on-light RGB picture."""
    return paper_photo


# --- The order files run in: the longest first, so that `pytest -n` workers finish together ---
# pytest-xdist's `--dist loadfile` hands out whole files, by default those with the most tests first; a file of few
# but long tests then started last and kept one worker busy ~3 s after the other had finished. `make test` turns that
# order off (`--no-loadscope-reorder`) and the workers collect in this one instead: the longest files of the last run
# of the same `-m` first (their seconds kept in pytest's cache, .pytest_cache/), files not timed yet before them.
file_seconds: collections.Counter[str] = collections.Counter()  # this run's, from every test's reports


def _seconds_key(config: pytest.Config) -> str:
    return "digit_lightning/file_seconds/" + (config.option.markexpr or "all").replace(" ", "_")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache = getattr(config, "cache", None)  # none with `-p no:cacheprovider`
    if not hasattr(config, "workerinput") or not cache:  # only a pytest-xdist worker's collection is scheduled
        return
    seconds = cache.get(_seconds_key(config), {})
    tests = collections.Counter(item.nodeid.split("::")[0] for item in items)

    def longest_first(item: pytest.Item) -> tuple:
        file = item.nodeid.split("::")[0]
        return file in seconds, -seconds.get(file, 0.0), -tests[file]

    items.sort(key=longest_first)  # stable: a file's tests keep their order, and every worker collects the same


def pytest_collection_finish(session: pytest.Session) -> None:
    # What the imports built (torch, Lightning, Hydra, the tests: ~750,000 objects) lives as long as the session; out of
    # the collector's sight, its full collections (a dozen a worker) stop walking all of it each time: 2-3 s a worker
    gc.freeze()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    file_seconds[report.nodeid.split("::")[0]] += report.duration  # the workers' reports reach the main process too


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)
    if cache and file_seconds and not hasattr(session.config, "workerinput"):  # the main process writes them
        key = _seconds_key(session.config)
        cache.set(key, {**cache.get(key, {}), **file_seconds})
