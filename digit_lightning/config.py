"""Where the Hydra configs live, and composing them from Python (tests, notebooks) the way the CLI does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

# A wheel ships the configs inside the package; a source checkout keeps them at the top level.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "conf")


def compose_config(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
    """Compose `conf/<config_name>.yaml` with command-line style overrides, outside of a Hydra run.

    `paths.output_dir` comes from the Hydra run directory on the command line; pass it as an override here.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=list(overrides))
