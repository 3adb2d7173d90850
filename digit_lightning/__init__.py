"""digit_lightning: the seed tutorial's Digit CNN on MNIST, with PyTorch Lightning, Hydra and TensorBoard."""

__version__ = "0.1.0"
