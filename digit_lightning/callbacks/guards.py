"""Guards that stop a training run early, before a fault reaches the weights on disk."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from digit_lightning.errors import UserError


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite; the message says where, what is intact and what to change."""


class FiniteLossGuard(Callback):
    """Stop the run with NonFiniteLossError when a training loss is NaN or inf, before a checkpoint can store the
    weights it broke.

    Reading a value back from the device every step would stall a GPU's queue (a host sync per step), so each loss
    is only kept (a reference: no device op per step); the losses are checked on the steps that log (every
    `trainer.log_every_n_steps`, where the logger syncs anyway), at the start of validation, at the end of each
    training epoch, and as the last thing before any checkpoint is written (ModelCheckpoint's, `last.ckpt` on
    SIGTERM): a broken loss never reaches a checkpoint. It raises rather than setting `trainer.should_stop`: a stop
    request waits for `min_epochs` and for the next validation, where ModelCheckpoint would overwrite `last.ckpt`.
    (EarlyStopping's `check_finite` only looks at the monitored metric after validation; `detect_anomaly` slows
    every step and does not catch an inf loss.)
    """

    def __init__(self) -> None:
        self._reset(start_step=0)

    def _reset(self, start_step: int) -> None:
        self._start_step = start_step
        self._checked = 0  # batches that passed a check
        # Each batch's loss since the last check, on its device: one list append per step, no device op.
        self._losses: list[torch.Tensor] = []
        self._lrs: list[float] = []  # the lr of each batch since the last check, to report the first bad one's

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count from the step the run starts at (a resumed run starts past 0)."""
        self._reset(start_step=trainer.global_step)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Keep this loss for the next check: no device op, no host sync."""
        self._lrs.append(trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan"))
        self._losses.append(loss.detach())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Check on the steps that log."""
        every = trainer.log_every_n_steps
        if every and (batch_idx + 1) % every == 0:
            self.check(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check before a validation whose end may save a checkpoint."""
        if trainer.state.fn == TrainerFn.FITTING:
            self.check(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check at the end of each epoch (ModelCheckpoint runs after every other callback)."""
        self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """The last line of defence: no checkpoint is written while a loss since the last check was NaN/inf."""
        if trainer.state.fn == TrainerFn.FITTING:
            self.check(trainer)

    def check(self, trainer: L.Trainer) -> None:
        """Raise `NonFiniteLossError` if any loss so far (on any rank) was NaN or inf; one host sync."""
        finite = torch.isfinite(torch.stack(self._losses)) if self._losses else None
        bad = finite is not None and not bool(finite.all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: all ranks stop together
            self._checked += len(self._lrs)
            self._lrs.clear()
            self._losses.clear()
            return
        if not bad:  # another rank saw it
            raise NonFiniteLossError("train/loss became NaN or inf on another process; " + self._advice(trainer))
        first = int((~finite).nonzero()[0, 0])
        lr = self._lrs[first]
        step = self._start_step + (self._checked + first) // max(1, trainer.accumulate_grad_batches)
        raise NonFiniteLossError(
            f"train/loss is {self._losses[first].item()} at epoch {trainer.current_epoch}, step {step} (lr {lr:g}); "
            f"stopped at step {trainer.global_step}, before a checkpoint of the broken weights, and "
            + self._advice(trainer)
        )

    @staticmethod
    def _advice(trainer: L.Trainer) -> str:
        saved = ""  # the newest checkpoint: last.ckpt (conf/callbacks: the ModelCheckpoint without a monitor)
        for ckpt in sorted(trainer.checkpoint_callbacks, key=lambda c: c.monitor is not None):
            saved = saved or ckpt.last_model_path or ckpt.best_model_path
        kept = f"the last good checkpoint {saved} is intact" if saved else "no checkpoint had been saved yet"
        return f"{kept}; lower model.optimizer.lr or clip gradients with +trainer.gradient_clip_val=1.0"
