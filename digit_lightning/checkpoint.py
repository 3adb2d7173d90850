"""Load a trained `DigitClassifier` from a Lightning checkpoint safely: no pickled code runs, errors are one line.

The checkpoint is read with `torch.load(weights_only=True)`, which refuses any pickle that would call code, and the
model is rebuilt from the plain-data `model_config` that `build_model` stored, whose `_target_`s must come from an
allow-list.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from digit_lightning.module import DigitClassifier, build_model

# Only these may be instantiated from a checkpoint's model config: our modules and torch's layers and optimizers.
ALLOWED_TARGET_PREFIXES = ("digit_lightning.", "torch.nn.", "torch.optim.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; its message is one line naming the file and the problem."""


def _targets(node: Any) -> list[str]:
    """Every `_target_` string in a nested config of dicts and lists."""
    if isinstance(node, dict):
        found = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return found + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


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
        # torch's message is a paragraph; the line that names what the unpickler refused is the useful one.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        refused = next((line for line in lines if "GLOBAL" in line), None)
        if refused:  # a pickled callable: loading it without weights_only would run code
            raise CheckpointError(f"{path}: refused to load, it would run code when unpickled ({refused})") from None
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise CheckpointError(f"{path}: corrupt or not a PyTorch checkpoint ({reason[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise CheckpointError(f"{path}: truncated, corrupt or not a PyTorch checkpoint ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        kind = "a plain state_dict" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise CheckpointError(f"{path}: holds {kind}, not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """Rebuild the trained model of a digit_lightning checkpoint, in eval mode, without unpickling any code."""
    checkpoint = read_checkpoint(path, map_location)
    hparams = checkpoint.get("hyper_parameters")
    config = hparams.get("model_config") if isinstance(hparams, dict) else None
    if not isinstance(config, dict) or config.get("_target_") != "digit_lightning.module.DigitClassifier":
        raise CheckpointError(
            f"{path}: not a digit_lightning checkpoint (no DigitClassifier 'model_config' in its hyper_parameters)"
        )
    refused = [t for t in _targets(config) if not t.startswith(ALLOWED_TARGET_PREFIXES)]
    if refused:
        raise CheckpointError(f"{path}: refused to build {', '.join(refused)}; a checkpoint may only name classes "
                              f"from {', '.join(ALLOWED_TARGET_PREFIXES)}")  # fmt: skip
    try:
        model = build_model(config)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path}: its model_config does not build a model ({reason[:200]})") from None
    state = checkpoint["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: its 'state_dict' is not a mapping of names to tensors")
    expected = model.state_dict()
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
    model.load_state_dict(state)
    return model.to(map_location).eval()
