"""The plain-PyTorch reference for time to 99%: the published "99% on MNIST in under a second" recipe, written out.

No Lightning, no Hydra, no logging: the 60,000 training images as one normalized tensor on the device, shuffled
batches of 256 cut from it, a CNN a little wider than the tutorial's (conv 1->24 k5, conv 24->32 k3, each max-pooled,
linear 800->256->10), Adam at lr 0.01 with betas (0.7, 0.9) under a one-cycle schedule, 1 epoch, then the official
10,000-image test set. `python bench/reference.py --data DIR` prints `reference: test accuracy 0.99xx, ...`;
`bench/bench.py` times it as a whole process against `python -m digit_lightning.train experiment=fast`.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.datasets import MNIST

MEAN, STD = 0.1307, 0.3081
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class WiderNet(nn.Module):
    """The recipe's CNN: max-pool before ReLU (the same function, less work)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 24, 5)  # -> 24x24x24, pooled to 12x12
        self.conv2 = nn.Conv2d(24, 32, 3)  # -> 32x10x10, pooled to 5x5
        self.fc1 = nn.Linear(32 * 5 * 5, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the 10 digits."""
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def tensors(data_dir: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split, normalized, on the device."""
    ds = MNIST(data_dir, train=train)
    x = ds.data.to(DEVICE).unsqueeze(1).float().div_(255).sub_(MEAN).div_(STD)
    return x, ds.targets.to(DEVICE)


def run(
    data_dir: str, batch_size: int = 256, epochs: int = 1, seed: int = 0, images: int | None = None
) -> tuple[float, float]:
    """Train (on the first `images` training images if given) and test; returns the test accuracy and the seconds
    spent in the training loop."""
    torch.manual_seed(seed)
    x, y = tensors(data_dir, train=True)
    x, y = x[:images], y[:images]
    x_test, y_test = tensors(data_dir, train=False)
    model = WiderNet().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.7, 0.9))
    steps = epochs * -(-len(y) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.01, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), device=DEVICE)
        for i in range(0, len(y), batch_size):
            index = order[i : i + batch_size]
            loss = F.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    fit = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        batches = zip(x_test.split(1000), y_test.split(1000), strict=True)
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in batches)
    return correct / len(y_test), fit


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DIGIT_LIGHTNING_DATA", "data"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, help="train on only this many images (a quick check)")
    parser.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    acc, fit = run(args.data, epochs=args.epochs, seed=args.seed, images=args.images)
    print(f"reference: test accuracy {acc:.4f}, {fit:.1f} s in the training loop on {DEVICE.type}")
