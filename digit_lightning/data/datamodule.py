"""`MNISTDataModule`: a seeded train/val split of the 60,000 training images and the official 10,000-image test set.

The images live in memory as uint8 tensors (on the GPU when training there) and a whole batch is cut, normalized
and augmented in a few tensor ops: no per-image Python, PIL or worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD, SOURCES, DataError, load_mnist, prepare_mnist

Batch = tuple[torch.Tensor, torch.Tensor]
AUGMENT_NONE = {"degrees": 0.0, "translate": 0.0, "scale": 0.0}  # `data.augment` keys; a key left out stays 0


def random_affine(x: torch.Tensor, degrees: float, translate: float, scale: float, fill: float) -> torch.Tensor:
    """Rotate, shift and scale each image of a batch by its own random amount (torchvision's RandomAffine, batched).

    `translate` is a fraction of the image size, `scale` the largest relative change; `fill` is the background value.
    """
    n = x.shape[0]
    angle = torch.empty(n, device=x.device).uniform_(-degrees, degrees).deg2rad_()
    factor = torch.empty(n, device=x.device).uniform_(1 - scale, 1 + scale)
    shift = torch.empty(n, 2, device=x.device).uniform_(-2 * translate, 2 * translate)  # grid coords span 2
    cos, sin = angle.cos() / factor, angle.sin() / factor
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - fill, grid, align_corners=False) + fill  # zero padding of (x - fill) is background


class MNISTTensors(Dataset):
    """MNIST as uint8 tensors: a batch is cut by index and normalized in one tensor op.

    `__getitems__` is what a DataLoader calls with a whole batch of indices; any sampler (shuffling, Lightning's
    DistributedSampler) still decides which indices a batch gets.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: dict | None = None) -> None:
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices, device=self.images.device)
        # The same float ops, in the same order, as torchvision's ToTensor + Normalize: identical values.
        x = self.images[index].unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        if self.augment:
            x = random_affine(x, **self.augment, fill=-MNIST_MEAN / MNIST_STD)
        return x, self.labels[index].long()


def keep_batch(batch: Batch) -> Batch:
    """Collate for `MNISTTensors`: `__getitems__` already returns the batched tensors."""
    return batch


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a seeded train/val split of the training images and the official test set.

    `augment` (`degrees`, `translate`, `scale`) randomly transforms each training batch. Validation and test come in
    batches of `eval_batch_size` (no gradients: the same results, far less per-batch overhead); None: `batch_size`.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        val_size: int = 5_000,
        split_seed: int = 42,
        sources: Sequence[str] = SOURCES,
        augment: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if augment is not None and set(augment) - set(AUGMENT_NONE):
            unknown = ", ".join(sorted(set(augment) - set(AUGMENT_NONE)))
            raise DataError(f"data.augment: unknown key(s) {unknown}; the keys are {', '.join(AUGMENT_NONE)}")
        self.augment = {**AUGMENT_NONE, **augment} if augment else None
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: MNISTTensors | None = None

    def prepare_data(self) -> None:
        """Fetch and verify the raw files once (Lightning calls this on one process per node)."""
        prepare_mnist(self.hparams.data_dir, self.hparams.sources)

    def setup(self, stage: str | None = None) -> None:
        """Load the images (onto the trainer's device: 55 MB never crosses the bus again) and split train/val."""
        if self.train_set is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        x, y = (t.to(device) for t in load_mnist(self.hparams.data_dir, train=True))
        self.test_set = MNISTTensors(*(t.to(device) for t in load_mnist(self.hparams.data_dir, train=False)))
        generator = torch.Generator().manual_seed(self.hparams.split_seed)
        train, self.val_set = random_split(MNISTTensors(x, y), [len(y) - self.hparams.val_size, self.hparams.val_size],
                                           generator=generator)  # fmt: skip
        self.train_set = Subset(MNISTTensors(x, y, self.augment), train.indices)

    @staticmethod
    def _loader(dataset: Dataset, batch_size: int, shuffle: bool = False) -> DataLoader:
        # No workers: the batch is a slice of a tensor in memory, and worker processes cannot share CUDA tensors.
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=keep_batch)

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split."""
        return self._loader(self.train_set, self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split in a fixed order, in batches of `eval_batch_size`."""
        return self._loader(self.val_set, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        """The official 10,000-image test set in a fixed order, in batches of `eval_batch_size`."""
        return self._loader(self.test_set, self.eval_batch_size)
