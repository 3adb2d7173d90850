"""The fast data path, the low-overhead options (compile, bf16) and the benchmark's smoke run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from digit_lightning.data import MNIST_MEAN, MNIST_STD, DataError, MNISTDataModule, MNISTTensors
from digit_lightning.train import train

AUGMENT = {"degrees": 10, "translate": 0.1, "scale": 0.1}


def datamodule(mnist_dir: Path, **kwargs) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(mnist_dir), **kwargs)
    dm.setup("fit")
    return dm


def one_by_one(dataset, picks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fetch images one at a time, as a DataLoader does for a Dataset without `__getitems__`."""
    return torch.stack([dataset[i][0] for i in picks]), torch.tensor([dataset[i][1] for i in picks])


@pytest.fixture(scope="module")
def both(mnist_dir: Path) -> tuple[MNISTDataModule, MNISTDataModule]:
    return datamodule(mnist_dir, fast=True), datamodule(mnist_dir, fast=False)


def test_fast_path_gives_the_torchvision_tensors_and_split(both):
    fast, slow = both
    assert isinstance(fast.test_set, MNISTTensors) and not isinstance(slow.test_set, MNISTTensors)
    assert fast.train_set.indices == slow.train_set.indices and fast.val_set.indices == slow.val_set.indices
    for name in ("train_set", "val_set", "test_set"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert len(a) == len(b)
        picks = torch.randint(len(a), (200,), generator=torch.Generator().manual_seed(0)).tolist()
        x, y = a.__getitems__(picks)  # one batched fetch, as the DataLoader does
        xb, yb = one_by_one(b, picks)
        assert torch.equal(x, xb) and torch.equal(y, yb), name  # bit-identical floats
    for stage in ("val", "test"):
        (xa, ya), (xb, yb) = (next(iter(getattr(dm, f"{stage}_dataloader")())) for dm in (fast, slow))
        assert xa.shape == (16, 1, 28, 28) and ya.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(fast.train_dataloader()) == len(slow.train_dataloader()) == 3438


def test_fast_loader_shards_like_ddp(both):
    """Lightning's DistributedSampler injection on the fast loader: each of 2 ranks gets its own half."""
    fast, _ = both
    loader = fast.val_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(fast.val_set, num_replicas=2, rank=rank, shuffle=False)
        sharded = _update_dataloader(loader, sampler)  # what the Trainer does under DDP
        indices = list(sampler)
        labels = torch.cat([y for _, y in sharded])
        assert len(labels) == 2_500
        assert torch.equal(labels, fast.val_set.__getitems__(indices)[1])
        seen.append(set(indices))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5_000))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "torchvision"])
def test_augment_changes_training_images_only(mnist_dir: Path, fast: bool):
    plain, augmented = datamodule(mnist_dir, fast=fast), datamodule(mnist_dir, fast=fast, augment=AUGMENT)
    picks = list(range(64))
    x, y = one_by_one(augmented.train_set, picks)
    x0, y0 = one_by_one(plain.train_set, picks)
    assert x.shape == x0.shape and torch.equal(y, y0)
    assert (x - x0).abs().mean() > 0.05  # moved
    background = -MNIST_MEAN / MNIST_STD
    assert (x - background).abs().lt(1e-4).float().mean() > 0.5  # still digits on the normalized background
    assert (x - x0).abs().sum(dim=(1, 2, 3)).gt(0).all()  # every image, not just some
    assert torch.equal(augmented.val_set[0][0], plain.val_set[0][0])  # validation is never augmented


def test_torchvision_path_and_bf16_train_end_to_end(make_cfg):
    augment = "data.augment={degrees:10,translate:0.1,scale:0.1}"
    for override in ("data.fast=false", "trainer.precision=bf16-mixed", augment, f"{augment} data.fast=false"):
        metrics = train(make_cfg("debug=fdr", *override.split()))
        assert torch.isfinite(torch.tensor(metrics["train/loss"])), override


@pytest.mark.slow
def test_compile_trains_and_checkpoints_keep_plain_keys(make_cfg, tmp_path: Path):
    """torch.compile on the CPU (minutes: inductor builds C++ kernels for train and eval graphs)."""
    limits = ["+trainer.limit_train_batches=30", "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2"]
    cfg = make_cfg("model.compile=true", "trainer.max_epochs=1", "data.batch_size=64", *limits)
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.5, metrics
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert "net.conv1.weight" in state and not any("_orig_mod" in k for k in state)


def test_augment_keys_are_checked_and_default_to_zero(mnist_dir: Path):
    with pytest.raises(DataError, match="unknown key.s. rotate; the keys are degrees, translate, scale"):
        MNISTDataModule(data_dir=str(mnist_dir), augment={"rotate": 5})
    assert MNISTDataModule(augment={"degrees": 5}).augment == {"degrees": 5, "translate": 0.0, "scale": 0.0}
