"""`MNISTDataModule`: a seeded train/val split of the 60,000 training images and the official 10,000-image test set.

The images live in memory, normalized once, as float32 tensors (on the GPU when training there), and a whole batch
is cut (and augmented) in a few tensor ops: no per-image Python, PIL or worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset, random_split

from digit_lightning.data.mnist import (
    MNIST_MEAN,
    MNIST_STD,
    RAW_FILES,
    SOURCES,
    DataError,
    load_mnist,
    prepare_mnist,
)
from digit_lightning.schema import fold_problem

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
    """MNIST as tensors in their final form: normalized float32 Nx1x28x28 images and int64 labels, so that a batch
    is two index ops (and the augmentation, if any). uint8 images are normalized once, here; float images are taken
    as already normalized (another `MNISTTensors`' `images`, shared).

    `__getitems__` is what a DataLoader calls with a whole batch of indices; any sampler (shuffling, Lightning's
    DistributedSampler) still decides which indices a batch gets.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: dict | None = None) -> None:
        if not images.is_floating_point():
            # The same float ops, in the same order, as torchvision's ToTensor + Normalize: identical values.
            images = images.unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        self.images, self.labels, self.augment = images, labels.long(), augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x, y = self.__getitems__([index])
        return x[0], int(y[0])

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        index = torch.as_tensor(indices, device=self.images.device)
        x = self.images[index]
        if self.augment:
            x = random_affine(x, **self.augment, fill=-MNIST_MEAN / MNIST_STD)
        return x, self.labels[index]


def stratified_folds(labels: torch.Tensor, num_folds: int, seed: int) -> torch.Tensor:
    """The fold (0 to `num_folds`-1) of each image: every class is dealt out evenly over the folds, in a seeded
    random order, so each fold has the class balance of the whole set and fold sizes differ by at most one."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[torch.argsort(labels.cpu()[order], stable=True)]  # grouped by class, shuffled within each
    folds = torch.empty(len(labels), dtype=torch.long)
    folds[order] = torch.arange(len(labels)) % num_folds
    return folds


def keep_batch(batch: Batch) -> Batch:
    """Collate for `MNISTTensors`: `__getitems__` already returns the batched tensors."""
    return batch


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a seeded train/val split of the training images and the official test set.

    `augment` (`degrees`, `translate`, `scale`) randomly transforms each training batch. With `num_folds` K,
    the 60,000 training images are dealt into K stratified folds (seeded by `split_seed`): fold `fold` validates
    and the other K-1 train (`val_size` is then unused). The test set is the official one either way.
    Validation and test come in batches of `eval_batch_size` (no gradients: the same results, far less per-batch
    overhead); None: `batch_size`. `verify=False` reads the raw files in `data_dir` as they are, without checking
    them against MNIST's md5s or fetching any: another 28x28 set written in MNIST's IDX layout (e.g. the tests'
    synthetic digits).
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
        num_folds: int | None = None,
        fold: int = 0,
        verify: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if augment is not None and set(augment) - set(AUGMENT_NONE):
            unknown = ", ".join(sorted(set(augment) - set(AUGMENT_NONE)))
            raise DataError(f"data.augment: unknown key(s) {unknown}; the keys are {', '.join(AUGMENT_NONE)}")
        if problem := fold_problem(num_folds, fold):
            raise DataError(problem)
        self.augment = {**AUGMENT_NONE, **augment} if augment else None
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: MNISTTensors | None = None

    def prepare_data(self) -> None:
        """Fetch and verify the raw files once (Lightning calls this on one process per node); with `verify=False`,
        only check that they are there."""
        if self.hparams.verify:
            prepare_mnist(self.hparams.data_dir, self.hparams.sources)
            return
        raw_dir = Path(self.hparams.data_dir).expanduser().resolve() / "MNIST" / "raw"
        if missing := [name for name in RAW_FILES if not (raw_dir / name).is_file()]:
            raise DataError(
                f"data.verify=false reads the raw files as they are, but {raw_dir} lacks {', '.join(missing)}; "
                "write them there (IDX, MNIST's names) or set data.verify=true to fetch and verify MNIST"
            )

    def setup(self, stage: str | None = None) -> None:
        """Load the images (onto the trainer's device: 55 MB never crosses the bus again) and split train/val."""
        if self.train_set is not None:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        x, y = (t.to(device) for t in load_mnist(self.hparams.data_dir, train=True))
        self.test_set = MNISTTensors(*(t.to(device) for t in load_mnist(self.hparams.data_dir, train=False)))
        if self.hparams.num_folds:
            folds = stratified_folds(y, self.hparams.num_folds, self.hparams.split_seed)
            val = (folds == self.hparams.fold).nonzero().squeeze(1).tolist()
            train = (folds != self.hparams.fold).nonzero().squeeze(1).tolist()
        else:
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            n_val = self.hparams.val_size
            train, val = (s.indices for s in random_split(range(len(y)), [len(y) - n_val, n_val], generator=generator))
        images = MNISTTensors(x, y)  # normalized once; the train split shares its tensors
        self.val_set = Subset(images, val)
        self.train_set = Subset(MNISTTensors(images.images, images.labels, self.augment), train)

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
