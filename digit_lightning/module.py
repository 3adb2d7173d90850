"""`DigitClassifier`: the LightningModule that trains, validates and tests a digit net with torchmetrics."""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import OneCycleLR
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from digit_lightning.models import ModelError, build_net

Batch = tuple[torch.Tensor, torch.Tensor]
log = logging.getLogger(__name__)


class DigitClassifier(L.LightningModule):
    """Trains a net from `digit_lightning.models` (named by `net`, which returns log-probabilities); the optimizer
    and the optional LR scheduler are factories from the config.

    `label_smoothing` (epsilon) trains on (1 - epsilon) * NLL + epsilon * the mean of -log p over the 10 classes;
    train/loss logs that objective, val/loss and test/loss the plain NLL, so they compare across settings.

    Logged: train/loss and train/acc every `trainer.log_every_n_steps` steps (means over the steps since the last
    point), val/loss, val/acc, val/acc_best, test/loss, test/acc (epoch means), all against the global step.
    The hyperparameters a checkpoint stores are plain data (the net's name and arguments), so
    `DigitClassifier.load_from_checkpoint` rebuilds the net by name and runs no code from the file.
    """

    def __init__(
        self,
        net: Mapping[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        compile: bool = False,
        label_smoothing: float = 0.0,
        channels_last: bool | str = "auto",
    ) -> None:
        super().__init__()
        net = dict(net or {"name": "digit"})
        if not isinstance(compile, bool):
            raise ModelError(f"model.compile={compile!r}: must be true or false")
        # logger=False: every logger gets the curated settings of digit_lightning.tensorboard.hparams instead
        self.save_hyperparameters({"net": net, "compile": bool(compile)}, logger=False)
        self.net = build_net(**net)
        self.compile_net = compile
        if channels_last not in (True, False, "auto"):
            raise ModelError(f"model.channels_last={channels_last!r}: must be auto, true or false")
        self.channels_last = channels_last
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = float(label_smoothing)
        self.compile_mode: str | None = None
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        # One metric object per stage: they keep separate running states. Their input checks are off: each one
        # reads a value back from the device (a host sync per step), and the inputs here are always valid.
        self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes=10, average="micro", validate_args=False) for _ in range(2)
        )
        self.val_loss, self.test_loss = (MeanMetric(nan_strategy="disable") for _ in range(2))
        # train/loss and train/acc: sums over the steps since the last logging point (loss, correct, images), kept
        # on the device. Two torchmetrics updates per step cost ~0.4 ms at batch 16 on a CPU, 10% of a step.
        self._train_window: torch.Tensor | None = None
        self._train_images = 0
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run keeps its best
        self.example_input_array = torch.zeros(1, 1, 28, 28)  # what callbacks.Dashboards traces for the Graphs tab
        self._last_step: float = float("inf")  # the run's number of optimizer steps, known at train start

    def configure_model(self) -> None:
        """Store the net's 4-D weights channels-last (NHWC) when `channels_last` says so (`auto`: on CPUs, where
        oneDNN's convolutions and pooling run faster in that layout; the values, and so checkpoints, are the same).
        Compile the net when `compile=True` (in place: state_dict keys, so checkpoints, stay the plain net's).

        On a GPU the mode is "reduce-overhead": CUDA graphs replay a whole forward and backward as one launch,
        which is what a small net at a small batch is bound by. On a CPU, inductor's default mode.
        """
        # Lightning's load_from_checkpoint calls this too, with no trainer: then the module's own device (the CPU).
        device = self.device if self._trainer is None else self.trainer.strategy.root_device
        if self.channels_last is True or (self.channels_last == "auto" and device.type == "cpu"):
            self.net.to(memory_format=torch.channels_last)
        if self.compile_net:
            self.compile_mode = compile_mode(device)
            self.net.compile(mode=self.compile_mode)
            self.example_input_array = None  # a compiled net cannot be traced for TensorBoard's graph

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        """Under CUDA graphs, mark each training step as a new one (the previous step's outputs may be reused)."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities over the 10 digits for a batch of normalized 1x28x28 images."""
        return self.net(x)

    def _losses(self, batch: Batch, smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image losses and the log-probabilities of a batch."""
        x, y = batch
        log_probs = self(x)
        losses = F.nll_loss(log_probs, y, reduction="none")  # the net already applies log-softmax
        if smoothing:  # cross-entropy with the target (1 - eps) on the label and eps spread evenly over all classes
            losses = (1 - smoothing) * losses - smoothing * log_probs.mean(dim=1)
        return losses, log_probs

    def _step(self, batch: Batch, loss_metric: MeanMetric, acc_metric: MulticlassAccuracy) -> torch.Tensor:
        """Update a stage's metrics with a batch; return its log-probabilities."""
        losses, log_probs = self._losses(batch)
        # Per-image losses, so the epoch mean is a per-image mean whatever the batch sizes. (A batch mean with
        # `weight=` would do too, but MeanMetric ignores scalar weights when its NaN check is disabled.)
        loss_metric.update(losses)
        acc_metric.update(log_probs.argmax(dim=1), batch[1])
        return log_probs

    def _log_epoch(self, stage: str, loss: MeanMetric, acc: MulticlassAccuracy) -> None:
        """Log a stage's epoch means, then reset them: once per epoch, as `self.log` costs ~1 ms per call."""
        if loss.update_count:  # compute() syncs across ranks; sync_dist tells Lightning so
            self.log(f"{stage}/loss", loss.compute(), prog_bar=stage != "test", sync_dist=True)
            self.log(f"{stage}/acc", acc.compute(), prog_bar=stage != "test", sync_dist=True)
        loss.reset()
        acc.reset()

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Loss on a training batch; every `trainer.log_every_n_steps` steps, and at the last step of the run,
        logs `train/loss` and `train/acc` over the steps since the previous point."""
        losses, log_probs = self._losses(batch, self.label_smoothing)
        correct = (log_probs.detach().argmax(dim=1) == batch[1]).sum()
        sums = torch.stack((losses.detach().sum(), correct.to(losses.dtype)))
        self._train_window = sums if self._train_window is None else self._train_window + sums
        self._train_images += len(losses)
        if self._is_logging_step():
            self._log_train_window()
        return losses.mean()

    def _is_logging_step(self) -> bool:
        """Lightning writes step metrics when `(global_step + 1) % log_every_n_steps == 0` (one optimizer, no
        gradient accumulation); the run's last step is added so that `train/loss` is among the final metrics."""
        step, every = self.global_step + 1, self.trainer.log_every_n_steps
        return (every > 0 and step % every == 0) or step == self._last_step

    def _log_train_window(self) -> None:
        """Log train/loss and train/acc over the window, on the progress bar too, then start a new window. The
        training step's only host-device sync happens here, once for both values."""
        loss, acc = (self._train_window / self._train_images).tolist()
        # on_step only: an epoch mean under the same names would interleave with these points. Plain floats: the
        # progress bar then reads no tensor back from the device between logging steps.
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self._train_window, self._train_images = None, 0

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Return the batch's log-probabilities, which callbacks (dashboards, eval) get as `outputs`."""
        return self._step(batch, self.val_loss, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        """Track the best validation accuracy so far and log it as `val/acc_best`."""
        if not self.trainer.sanity_checking:  # the sanity check's few batches must not set the best
            self.val_acc_best.update(self.val_acc.compute())
        if self.val_acc_best.update_count:
            # compute() already syncs across ranks; sync_dist says so to Lightning (and averages equal values)
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)
        self._log_epoch("val", self.val_loss, self.val_acc)

    def test_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """Log `test/loss` and `test/acc`; return the batch's log-probabilities for callbacks."""
        return self._step(batch, self.test_loss, self.test_acc)

    def on_test_epoch_end(self) -> None:
        """Log test/loss and test/acc over the whole test set."""
        self._log_epoch("test", self.test_loss, self.test_acc)

    def configure_optimizers(self) -> Any:
        """The configured optimizer and LR scheduler (a whole-run schedule like OneCycle steps every batch)."""
        if self.optimizer_factory is None:
            raise ValueError("DigitClassifier was built without an optimizer (inference only); pass optimizer=...")
        # torch checks the values (betas, pct_start, ...) only here: a bad one is the user's setting, in one line
        with refused_as("model.optimizer"):
            optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        with refused_as("model.scheduler"):
            if "total_steps" in inspect.signature(self.scheduler_factory).parameters:
                # A whole-run schedule (OneCycleLR): give it the run's length and step it every batch.
                steps = self.trainer.estimated_stepping_batches
                scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=steps)
                return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
            scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_train_start(self) -> None:
        """Note the run's length; a run resumed with more epochs than it was planned for: re-plan its one-cycle
        schedule over the new length, from the step it reached."""
        trainer = self.trainer
        self._last_step = trainer.estimated_stepping_batches
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, OneCycleLR):
                continue
            steps = int(trainer.estimated_stepping_batches)
            if scheduler.last_epoch >= scheduler.total_steps and trainer.max_epochs:
                # A finished plan resumed at its end with fewer batches an epoch than it had (the estimate above is
                # then below the steps already done): what is left is whole epochs of this fit's batches.
                per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
                steps = max(steps, scheduler.last_epoch + per_epoch * (trainer.max_epochs - trainer.current_epoch))
            # Only a longer run: a resume with the planned length must continue the exact schedule it had.
            if scheduler.total_steps < steps:
                log.info(
                    f"Re-planned the one-cycle schedule from {scheduler.total_steps} to {steps} steps "
                    f"(trainer.max_epochs={trainer.max_epochs}); it continues from step {scheduler.last_epoch}"
                )
                # The configured schedule, built for the new length as if resumed at this step (torch's public
                # `last_epoch` argument: the optimizer keeps its restored state, the lr is the new plan's).
                config.scheduler = self.scheduler_factory(
                    optimizer=scheduler.optimizer, total_steps=steps, last_epoch=scheduler.last_epoch - 1
                )


@contextmanager
def refused_as(key: str) -> Iterator[None]:
    """A ValueError or TypeError that torch raises for a configured value, as a one-line ModelError naming `key`."""
    try:
        yield
    except (ValueError, TypeError) as e:
        raise ModelError(f"{key}: {' '.join(str(e).split())[:200]}; fix this setting") from None


def compile_mode(device: torch.device) -> str | None:
    """torch.compile's mode for a net trained on `device`: CUDA graphs on a GPU, the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None
