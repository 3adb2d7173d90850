"""Atomic file writes: a temp file beside the target, fsynced, then renamed over it.

A crash at any point leaves either the old file or the complete new one, never half a file. Used for the MNIST raw
files and for checkpoints.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".tmp-"  # leftovers of an interrupted write carry it; they are never valid data


def temp_beside(path: Path, suffix: str = "") -> tuple[int, str]:
    """A new temp file beside `path` (its open fd and name) with the permissions a plain open() would give it, not
    mkstemp's 0600: renamed over `path`, it is a file others can read as they could before."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name, suffix=suffix, dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
    except BaseException:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, tmp


@contextmanager
def atomic_open(path: Path) -> Iterator[BinaryIO]:
    """Yield a binary file to write `path`'s new content to; it replaces `path` only if the block completes."""
    fd, tmp = temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write (a full disk) names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
