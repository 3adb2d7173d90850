"""The seed tutorial's training script, kept as written, as the baseline of `bench/bench.py`.

Changes from the tutorial, none of which touch its speed: it reads the prepared data (`--data`, no download),
seeds torch, trains `--epochs` epochs or `--images` images, and tests on the official test set (the tutorial's
`test_loader` was built from its training set).
`python bench/tutorial.py --epochs 1` is the tutorial's whole script for one epoch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

BATCH_SIZE = 16
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])


class Digit(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 3)
        self.fc1 = nn.Linear(20 * 10 * 10, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        input_size = x.size(0)
        x = self.conv1(x)
        x = F.relu(x)
        x = F.max_pool2d(x, 2, 2)
        x = self.conv2(x)
        x = F.relu(x)
        x = x.view(input_size, -1)
        x = self.fc1(x)
        x = F.relu(x)
        x = self.fc2(x)
        output = F.log_softmax(x, dim=1)
        return output


def train_model(model, device, train_loader, optimizer, epoch, max_batches=None):
    model.train()
    for batch_index, (data, target) in enumerate(train_loader):
        if max_batches is not None and batch_index >= max_batches:
            break
        data, target = data.to(device), target.to(device)
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target)
        pred = output.max(1, keepdim=True)  # noqa: F841 (computed and unused, as in the tutorial)
        loss.backward()
        optimizer.step()
        if batch_index % 3000 == 0:
            print(f"Train Epoch : {epoch} \t Loss:{loss.item():.6f}")


def test_model(model, device, test_loader):
    model.eval()
    correct = 0.0
    test_loss = 0.0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            output = model(data)
            test_loss += F.cross_entropy(output, target).item()
            pred = output.max(1, keepdim=True)[1]
            correct += pred.eq(target.view_as(pred)).sum().item()
        test_loss /= len(test_loader.dataset)
        print(f"Test-Average loss:{test_loss:.4f},Accuracy:{100.0 * correct / len(test_loader.dataset):.3f}\n")
    return correct / len(test_loader.dataset)


def run(data_dir: str, epochs: int = 1, images: int | None = None, test: bool = True, seed: int = 0) -> float | None:
    """The tutorial's script from data loading on; trains `images` images if given (else whole epochs)."""
    torch.manual_seed(seed)
    train_set = datasets.MNIST(data_dir, train=True, download=False, transform=pipeline)
    test_set = datasets.MNIST(data_dir, train=False, download=False, transform=pipeline)
    train_loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True)
    test_loader = DataLoader(test_set, batch_size=BATCH_SIZE, shuffle=True)
    model = Digit().to(DEVICE)
    optimizer = optim.Adam(model.parameters())
    max_batches = None if images is None else images // BATCH_SIZE
    for epoch in range(1, epochs + 1):
        train_model(model, DEVICE, train_loader, optimizer, epoch, max_batches)
        accuracy = test_model(model, DEVICE, test_loader) if test else None
    return accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DIGIT_LIGHTNING_DATA", "data"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--images", type=int, default=None, help="stop each epoch after this many images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    acc = run(args.data, args.epochs, args.images, seed=args.seed)
    print(f"tutorial: test accuracy {acc:.4f}, {time.perf_counter() - start:.1f} s after imports")
