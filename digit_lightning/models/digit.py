"""The seed tutorial's `Digit` CNN, kept exactly: two convolutions and two linear layers, returning log-probabilities
(1,007,590 parameters)."""

import torch
import torch.nn.functional as F
from torch import nn

from digit_lightning.models.registry import register


@register("digit")
class Digit(nn.Module):
    """conv 1->10 k5, ReLU, maxpool 2, conv 10->20 k3, ReLU, flatten (2000), linear 2000->500, ReLU, linear 500->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)  # 1x28x28 -> 10x24x24, pooled to 10x12x12
        self.conv2 = nn.Conv2d(10, 20, 3)  # -> 20x10x10
        self.fc1 = nn.Linear(20 * 10 * 10, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of normalized 1x28x28 images to log-probabilities over the 10 digits."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.relu(self.conv2(x))
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)
