"""Shared fixtures: the real MNIST (prepared once per session) and composed configs pointing at tmp dirs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from digit_lightning.config import compose_config
from digit_lightning.data import prepare_mnist

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DIGIT_LIGHTNING_DATA", ROOT / "data")).resolve()


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST raw files, fetched and verified once (the `make data` copy when it exists)."""
    prepare_mnist(DATA_DIR)
    return DATA_DIR


@pytest.fixture
def make_cfg(mnist_dir: Path, tmp_path: Path):
    """Compose conf/train.yaml for an in-process run on the CPU, writing into tmp_path."""

    def make(*overrides: str) -> DictConfig:
        base = [f"paths.output_dir={tmp_path}", f"paths.data_dir={mnist_dir}", "trainer=cpu"]
        return compose_config([*base, *overrides])

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
