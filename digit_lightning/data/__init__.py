"""MNIST: the raw files (`mnist`), the DataModule that serves them (`datamodule`), and images of your own
prepared the way MNIST was made (`preprocess`). `python -m digit_lightning.data [data_dir]` fetches and verifies."""

from typing import Any

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD, DataError, load_mnist, prepare_mnist

__all__ = ["MNIST_MEAN", "MNIST_STD", "DataError", "MNISTDataModule", "MNISTTensors", "load_mnist", "prepare_mnist"]


def __getattr__(name: str) -> Any:
    """The DataModule on first use: it imports Lightning (seconds), which fetching the data does not need."""
    if name in ("MNISTDataModule", "MNISTTensors"):
        from digit_lightning.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
