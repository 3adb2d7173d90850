"""The DataModule's in-memory batches (the same tensors as torchvision's MNIST + ToTensor + Normalize), DDP
sharding, augmentation and the low-overhead options (compile, bf16); the benchmark's smoke run is in test_speed.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler
from torchvision import datasets, transforms

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
def dm(mnist_dir: Path) -> MNISTDataModule:
    return datamodule(mnist_dir)


def test_batches_are_torchvisions_tensors(dm: MNISTDataModule, mnist_dir: Path):
    """Batches cut from the uint8 tensors equal torchvision's own MNIST through ToTensor + Normalize, bit for bit."""
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    reference = {split: datasets.MNIST(mnist_dir, train=split, transform=to_tensor) for split in (True, False)}
    assert isinstance(dm.test_set, MNISTTensors)
    for name, is_train in (("train_set", True), ("val_set", True), ("test_set", False)):
        subset = getattr(dm, name)
        picks = torch.randint(len(subset), (32,), generator=torch.Generator().manual_seed(0)).tolist()
        x, y = subset.__getitems__(picks)  # one batched fetch, as the DataLoader does
        # train and val are Subsets of the 60,000 training images: torchvision's index of each picked image
        index = [subset.indices[i] for i in picks] if hasattr(subset, "indices") else picks
        xb, yb = one_by_one(reference[is_train], index)
        assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal(x, xb) and torch.equal(y, yb), name  # bit-identical floats
    for stage in ("val", "test"):
        x, y = next(iter(getattr(dm, f"{stage}_dataloader")()))
        dataset = dm.val_set.dataset if stage == "val" else dm.test_set
        first = dm.val_set.indices[:16] if stage == "val" else list(range(16))  # fixed order, no shuffle
        assert x.shape == (16, 1, 28, 28) and torch.equal(y, dataset.labels[first].long())
        assert torch.equal(x, one_by_one(reference[stage == "val"], first)[0])
    assert len(dm.train_dataloader()) == 3438  # 55,000 / 16, the last batch short


def test_loader_shards_like_ddp(dm: MNISTDataModule):
    """Lightning's DistributedSampler injection on the loader: each of 2 ranks gets its own half."""
    loader = dm.val_dataloader()
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(dm.val_set, num_replicas=2, rank=rank, shuffle=False)
        sharded = _update_dataloader(loader, sampler)  # what the Trainer does under DDP
        indices = list(sampler)
        labels = torch.cat([y for _, y in sharded])
        assert len(labels) == 2_500
        assert torch.equal(labels, dm.val_set.__getitems__(indices)[1])
        seen.append(set(indices))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(5_000))


def test_augment_changes_training_images_only(dm: MNISTDataModule, mnist_dir: Path):
    plain, augmented = dm, datamodule(mnist_dir, augment=AUGMENT)
    picks = list(range(64))
    x, y = one_by_one(augmented.train_set, picks)
    x0, y0 = one_by_one(plain.train_set, picks)
    assert x.shape == x0.shape and torch.equal(y, y0)
    assert (x - x0).abs().mean() > 0.05  # moved
    background = -MNIST_MEAN / MNIST_STD
    assert (x - background).abs().lt(1e-4).float().mean() > 0.5  # still digits on the normalized background
    assert (x - x0).abs().sum(dim=(1, 2, 3)).gt(0).all()  # every image, not just some
    batch, _ = augmented.train_set.__getitems__(picks)  # the batched path the DataLoader takes augments too
    assert (batch - x0).abs().sum(dim=(1, 2, 3)).gt(0).all()
    assert torch.equal(augmented.val_set[0][0], plain.val_set[0][0])  # validation is never augmented
    assert torch.equal(augmented.test_set[0][0], plain.test_set[0][0])  # nor is the test set


@pytest.mark.parametrize("override", ["trainer.precision=bf16-mixed", "data.augment={degrees:10,translate:0.1}"])
def test_bf16_and_augment_train_end_to_end(synthetic_cfg, override: str):
    metrics = train(synthetic_cfg("debug=fdr", override))
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


def test_synthetic_digits_load_only_without_verification(synthetic_dir: Path, tmp_path: Path):
    """The fast tests' digits (tests/synthetic.py) are read as they are with `verify=False`; the default checks them
    against MNIST's md5s and refuses them, and `verify=False` still needs all four files."""
    dm = MNISTDataModule(data_dir=str(synthetic_dir), val_size=200, verify=False)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (800, 200, 300)
    assert torch.equal(dm.test_set.labels.bincount(), torch.full((10,), 30))  # balanced classes

    copy = tmp_path / "copy"
    shutil.copytree(synthetic_dir / "MNIST", copy / "MNIST")
    with pytest.raises(DataError, match="missing or corrupt .* after trying no source"):
        MNISTDataModule(data_dir=str(copy), sources=[]).prepare_data()  # (and it removed them: not MNIST's bytes)
    with pytest.raises(DataError) as error:
        MNISTDataModule(data_dir=str(copy), verify=False).prepare_data()
    assert str(error.value).startswith(f"data.verify=false reads the raw files as they are, but {copy}/MNIST/raw lacks")
    assert "\n" not in str(error.value) and "set data.verify=true" in str(error.value)
