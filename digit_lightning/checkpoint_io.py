"""Checkpoints written atomically on local disks, so a kill mid-save never leaves half a `last.ckpt`.

Lightning's own save goes through an fsspec transaction whose temp file lives in the system temp dir; when that is
another filesystem (node-local /tmp, checkpoints on a shared disk) the final move is a copy, and a kill during it
leaves a truncated checkpoint. Here the temp file sits beside the target and is renamed over it with os.replace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from digit_lightning.atomic import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temp file in the checkpoint's directory, fsync, then rename it into place."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write to a temp file beside `path`, then rename it into place (remote paths: Lightning's own way)."""
        if "://" in str(path) and not str(path).startswith("file://"):  # remote storage: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path) as f:
            torch.save(checkpoint, f)
