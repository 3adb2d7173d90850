"""digit_lightning: the seed tutorial's Digit CNN on MNIST, with PyTorch Lightning, Hydra and TensorBoard."""

from pathlib import Path

__version__ = "0.1.0"

# Hydra's config dir: a wheel ships the configs inside the package; a source checkout keeps them at the top level.
_PACKAGED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = str(_PACKAGED if _PACKAGED.is_dir() else _PACKAGED.parent.parent / "conf")
