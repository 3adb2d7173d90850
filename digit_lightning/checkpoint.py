"""Checkpoints: loaded as data (never as code), written atomically.

A checkpoint is read with `torch.load(weights_only=True)`, which refuses any pickle that would call code. The net
is rebuilt by *name* from `digit_lightning.models.MODELS` with plain-data arguments checked by type; no `_target_`
read from a file is ever instantiated. The weights must fit that net before anything else happens.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from digit_lightning.atomic import atomic_open
from digit_lightning.errors import UserError
from digit_lightning.module import DigitClassifier


class CheckpointError(UserError):
    """A checkpoint that cannot be used; its message is one line naming the file and the problem."""


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`torch.load(path, weights_only=True)`, with each way it can fail turned into a one-line `CheckpointError`."""
    path = Path(path)
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.ckpt"))[:5]
        hint = f"pass one of its checkpoints: {', '.join(found)}" if found else "it holds no .ckpt files"
        raise CheckpointError(f"{path}: is a directory; {hint}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; pass ckpt_path=<run dir>/checkpoints/<name>.ckpt")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, not a checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4": the error below says it better
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused:  # a pickled callable: loading it without weights_only would run code
            raise CheckpointError(f"{path}: refused to load, it would run code when unpickled ({refused})") from None
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({reason[:200]})") from None
    except Exception as e:  # torch raises many types for a truncated or foreign file (IndexError, KeyError, ...)
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0] or type(e).__name__
        raise CheckpointError(f"{path}: truncated, corrupt or not a PyTorch checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = "a plain state_dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise CheckpointError(f"{path}: holds {kind}, not a Lightning checkpoint (no 'state_dict' entry)")
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its 'state_dict' is not a mapping of names to tensors")
    return checkpoint


def check_fit(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Raise a one-line CheckpointError unless `state` has exactly `expected`'s names and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        )
        raise CheckpointError(f"{path}: its weights do not fit the model it names ({detail})")


def net_spec(checkpoint: dict[str, Any], path: Path) -> dict[str, Any]:
    """The net's name and arguments a digit_lightning checkpoint stores, checked to be plain data."""
    hparams = checkpoint.get("hyper_parameters")
    spec = hparams.get("net") if isinstance(hparams, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise CheckpointError(f"{path}: not a digit_lightning checkpoint (no model name in its hyper_parameters)")
    return spec


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """The trained model of a digit_lightning checkpoint, in eval mode, rebuilt by name without running its code."""
    path = Path(path)
    checkpoint = read_checkpoint(path, map_location)
    spec = net_spec(checkpoint, path)
    try:
        model = DigitClassifier(net=spec)  # build_net checks the name and each argument; no optimizer: inference
    except (UserError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its model cannot be built ({' '.join(str(e).split())[:200]})") from None
    check_fit(path, checkpoint["state_dict"], model.state_dict())
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(map_location).eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` to a temp file in the checkpoint's directory, fsync, then rename it into place; loads only what
    `hand_over` prepared (digit_lightning/resume.py); removes only regular files.

    Lightning's own save goes through an fsspec transaction whose temp file lives in the system temp dir; across
    filesystems its final move is a copy, and a kill during it leaves a truncated `last.ckpt`. Its own load and remove
    follow any fsspec URL (a download, a recursive delete).
    """

    def __init__(self) -> None:
        super().__init__()
        self.prepared: dict[str, dict[str, Any]] = {}

    def hand_over(self, path: str, checkpoint: dict[str, Any]) -> None:
        """Make the next `load_checkpoint(path)` return `checkpoint` (a rebuilt, validated one) instead of the file."""
        self.prepared[str(path)] = checkpoint

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint handed over for `path`; any other is refused: Lightning also loads checkpoints it finds by
        itself (under SLURM, the newest `hpc_ckpt_N.ckpt` in `trainer.default_root_dir`), which nothing validated."""
        if str(path) in self.prepared:
            return self.prepared.pop(str(path))
        raise CheckpointError(f"{path}: Lightning found this checkpoint by itself (e.g. a SLURM hpc_ckpt_N.ckpt in "
                              "trainer.default_root_dir), and only checked ones are loaded; pass it as "
                              "ckpt_path=<file> to resume from it, or remove it")  # fmt: skip

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint file `path`: a regular file or a link (never what it points to), never a directory."""
        path = Path(str(path))
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return
        if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
            path.unlink(missing_ok=True)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write to a temp file beside `path`, then rename it into place (remote paths: Lightning's own way)."""
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(str(path).removeprefix("file://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()  # torch's zip writer turns a failed write (a full disk) into an unrelated RuntimeError
        torch.save(checkpoint, buffer)
        with atomic_open(path) as f:
            f.write(buffer.getbuffer())
