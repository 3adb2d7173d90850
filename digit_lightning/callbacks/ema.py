"""`EMA`: an exponential moving average of the weights, which validation, checkpoints and the test use."""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import get_ema_multi_avg_fn

from digit_lightning.lightning_compat import holds_average, swap_weights


class EMA(WeightAveraging):
    """Lightning's `WeightAveraging` with torch's fused EMA update: after each optimizer step from `start_step` on,
    average <- decay * average + (1 - decay) * weights, for the parameters and the batch-norm statistics alike.

    Lightning swaps the average in for every validation epoch (so `val/acc` and the checkpoint chosen by it are the
    average's), saves it as the checkpoint's `state_dict` (the raw weights go to `current_model_state`, from which a
    resumed run continues), and copies it into the model when training ends. Eval, predict and export therefore load
    the averaged weights.
    """

    def __init__(self, decay: float = 0.999, start_step: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay} must be between 0 and 1")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.decay, self.start_step = decay, start_step
        self._swapped = False  # the model holds the average (during validation)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after every optimizer step from `start_step` on (never at epoch ends)."""
        return step_idx is not None and step_idx >= self.start_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Copy the model for the average when fitting starts."""
        with warnings.catch_warnings():
            # Lightning warns that a configure_model hook could shard the model; ours only compiles it in place.
            warnings.filterwarnings("ignore", ".*WeightAveraging doesn't support sharding.*")
            super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the average in."""
        super().on_validation_epoch_start(trainer, pl_module)
        self._swapped = holds_average(self)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Swap the raw weights back (unless a checkpoint saved mid-validation already did)."""
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
            self._swapped = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Average as `state_dict`, raw weights as `current_model_state`, also when saved mid-validation (SIGTERM),
        where Lightning's callback would store them the wrong way round: the resumed run would train the average."""
        if self._swapped:
            swap_weights(self, pl_module)
            self._swapped = False
            checkpoint["state_dict"] = pl_module.state_dict()
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit: restore the average and put the raw weights back (Lightning's behaviour). Testing or
        validating a checkpoint: keep its `state_dict`, the average. (Lightning's callback would load the raw weights
        whenever it still holds an average from fitting, so the test right after training would test those.)"""
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
