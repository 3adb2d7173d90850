"""`StrongCNN`: the well-known small Keras MNIST CNN with batch norm and dropout,
32C3-32C3-32C5S2-64C3-64C3-64C5S2-128C4 (325,994 parameters with the defaults).

Published with augmentation at 30 epochs: 99.64% mean test accuracy over many seeds (max 99.81%). Each convolution
is followed by batch norm and ReLU; the strided 5x5 convolutions take the place of pooling.
"""

import torch
import torch.nn.functional as F
from torch import nn

from digit_lightning.models.registry import register


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Convolution (no bias: the batch norm after it has one), batch norm, ReLU; strided ones keep 'same' padding."""
    padding = kernel // 2 if stride > 1 else 0
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


@register("strong")
class StrongCNN(nn.Module):
    """28 -> 26 -> 24 -> 12 (stride 2), dropout, -> 10 -> 8 -> 4 (stride 2), dropout, 4x4 conv -> 1, dropout, linear.

    `width` scales every layer's channels (32, 64, 128 at the default 32).
    """

    def __init__(self, width: int = 32, dropout: float = 0.4) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(1, w, 3), conv_bn(w, w, 3), conv_bn(w, w, 5, stride=2), nn.Dropout(dropout),
            conv_bn(w, 2 * w, 3), conv_bn(2 * w, 2 * w, 3), conv_bn(2 * w, 2 * w, 5, stride=2), nn.Dropout(dropout),
            conv_bn(2 * w, 4 * w, 4), nn.Flatten(), nn.Dropout(dropout),
        )  # fmt: skip
        self.classifier = nn.Linear(4 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of normalized 1x28x28 images to log-probabilities over the 10 digits."""
        return F.log_softmax(self.classifier(self.features(x)), dim=1)
