"""A wheel install (not only the editable one) finds its Hydra configs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # builds a wheel / executes notebooks: `make test-full`


def test_wheel_ships_and_uses_its_configs(tmp_path: Path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)], check=True)
    wheel = next((tmp_path / "dist").glob("digit_lightning-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "digit_lightning/conf/train.yaml" in names
    assert {"digit_lightning/conf/serve.yaml", "digit_lightning/draw.html"} <= set(names)  # serve and its page
    assert "hydra_plugins/digit_lightning_optuna/optuna_sweeper.py" in names  # hydra/sweeper=optuna
    assert "hydra_plugins/__init__.py" not in names  # a namespace package, shared with other Hydra plugins

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    code = "from digit_lightning.cli import CONFIG_DIR, compose_config; compose_config(); print(CONFIG_DIR)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == site / "digit_lightning" / "conf"
