"""Guards that stop a training run early, before a fault reaches the weights on disk."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from digit_lightning.cli import UserError


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the message says where, what is intact and what to change."""


class FiniteLossGuard(Callback):
    """Stop the run with NonFiniteLossError when the training loss is NaN or inf, before its backward pass.

    It raises rather than setting `trainer.should_stop`: a stop request waits for `min_epochs` and for the next
    validation, where ModelCheckpoint would overwrite `last.ckpt` with the broken weights. The exception ends `fit`
    at once, so the checkpoints on disk stay the last good ones. (EarlyStopping's `check_finite` only looks at the
    monitored metric after validation; `detect_anomaly` slows every step and does not catch an inf loss.)
    The check costs one host-device sync per step.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Raise `NonFiniteLossError` before a NaN/inf loss can update the weights."""
        if bool(torch.isfinite(loss).all()):
            return
        ckpt = trainer.checkpoint_callback
        saved = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ""
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        kept = f"the last good checkpoint {saved} is intact" if saved else "no checkpoint had been saved yet"
        raise NonFiniteLossError(
            f"train/loss is {loss.item()} at epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(lr {lr:g}); stopped before this update and {kept}; "
            "lower model.optimizer.lr or clip gradients with +trainer.gradient_clip_val=1.0"
        )
