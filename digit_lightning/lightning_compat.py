"""The one place that reaches into Lightning's internals, for what exact resume and EMA need and Lightning lacks.

Each function names the Lightning behaviour it works around; tests/test_lightning_compat.py is its canary and fails
the day Lightning changes the structures used here (or fixes the behaviour, so that the workaround can go).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.core import LightningModule

VAL_PROGRESS = ("fit_loop", "epoch_loop.val_loop.batch_progress")  # where a checkpoint keeps fit's validation count


def restart_validation(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint saved between two validation batches of fit resume into that validation, in full.

    Lightning goes back into a validation only when the checkpoint was saved inside a validation batch (started, not
    yet processed); one saved between batches, as on SIGTERM, counts as done, and the resumed run skips it: that
    epoch's val/acc would never be logged nor checked (Lightning-AI/pytorch-lightning#19549, the same progress
    bookkeeping). Mark it as cut off in its first batch instead.
    """
    loop, key = VAL_PROGRESS
    progress = checkpoint["loops"][loop][key]
    done = progress["current"]["completed"]  # batches of the cut-off validation
    for counts in (progress["total"], progress["current"]):
        before = counts["completed"] - done
        counts.update(ready=before + 1, started=before + 1, processed=before, completed=before)
    progress["is_last_batch"] = False


def holds_average(callback: WeightAveraging) -> bool:
    """Whether Lightning's `WeightAveraging` has built its averaged copy of the model (it does at fit's setup)."""
    return callback._average_model is not None


def swap_weights(callback: WeightAveraging, pl_module: LightningModule) -> None:
    """Exchange the model's weights with the average, as `WeightAveraging` does around each validation (it has no
    public method for it; EMA needs it to save a checkpoint taken mid-validation the right way round)."""
    callback._swap_models(pl_module)
