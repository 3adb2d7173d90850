"""LeNet-5 (LeCun et al., 1998) as it is usually rebuilt today, with ReLU and max pooling (61,706 parameters)."""

import torch
import torch.nn.functional as F
from torch import nn

from digit_lightning.models.registry import register


@register("lenet5")
class LeNet5(nn.Module):
    """conv 1->6 k5 (padded to keep 28x28), pool, conv 6->16 k5, pool, linear 400->120->84->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)  # the original took 32x32 inputs: padding keeps its 28x28 maps
        self.conv2 = nn.Conv2d(6, 16, 5)  # 6x14x14 -> 16x10x10, pooled to 16x5x5
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch of normalized 1x28x28 images to log-probabilities over the 10 digits."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)
