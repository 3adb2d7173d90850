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
    is only folded into flags on the device; they are read back on the steps that log (every
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
        # On the loss's device, made from the first loss: all losses finite so far; how many batches were all
        # finite; the first non-finite loss.
        self._finite: torch.Tensor | None = None
        self._good: torch.Tensor | None = None
        self._first_bad: torch.Tensor | None = None
        self._lrs: list[float] = []  # the lr of each batch since the last check, to report the first bad one's

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count from the step the run starts at (a resumed run starts past 0)."""
        self._reset(start_step=trainer.global_step)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        """Fold this loss into the device-side flags: no host sync."""
        self._lrs.append(trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan"))
        loss = loss.detach()
        finite = torch.isfinite(loss).all()
        if self._finite is None:
            self._finite = torch.ones((), dtype=torch.bool, device=loss.device)
            self._good = torch.zeros((), dtype=torch.long, device=loss.device)
            self._first_bad = torch.zeros_like(loss)
        self._first_bad = torch.where(self._finite & ~finite, loss, self._first_bad)
        self._finite &= finite
        self._good += self._finite

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
        bad = self._finite is not None and not bool(self._finite)
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):  # any rank: all ranks stop together
            self._checked += len(self._lrs)
            self._lrs.clear()
            return
        if not bad:  # another rank saw it
            raise NonFiniteLossError("train/loss became NaN or inf on another process; " + self._advice(trainer))
        good = int(self._good)
        lr = self._lrs[good - self._checked]
        step = self._start_step + good // max(1, trainer.accumulate_grad_batches)
        raise NonFiniteLossError(
            f"train/loss is {self._first_bad.item()} at epoch {trainer.current_epoch}, step {step} (lr {lr:g}); "
            f"stopped at step {trainer.global_step}, before a checkpoint of the broken weights, and "
            + self._advice(trainer)
        )

    @staticmethod
    def _advice(trainer: L.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        saved = (ckpt.last_model_path or ckpt.best_model_path) if ckpt else ""
        kept = f"the last good checkpoint {saved} is intact" if saved else "no checkpoint had been saved yet"
        return f"{kept}; lower model.optimizer.lr or clip gradients with +trainer.gradient_clip_val=1.0"
