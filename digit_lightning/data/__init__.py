"""MNIST: the raw files (`mnist`), the DataModule that serves them (`datamodule`), and images of your own
prepared the way MNIST was made (`preprocess`). `python -m digit_lightning.data [data_dir]` fetches and verifies."""

from digit_lightning.data.datamodule import MNISTDataModule, MNISTTensors
from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD, DataError, load_mnist, prepare_mnist

__all__ = ["MNIST_MEAN", "MNIST_STD", "DataError", "MNISTDataModule", "MNISTTensors", "load_mnist", "prepare_mnist"]
