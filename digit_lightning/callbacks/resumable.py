"""`ResumableRun`: RNG states in every checkpoint (an exact resume), and a checkpoint on SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from digit_lightning.lightning_compat import restart_validation
from digit_lightning.runs import LAST, resume_command

log = logging.getLogger(__name__)


def _rng_states() -> dict[str, Any]:
    """The global RNG states as plain data (lists, tensors), so checkpoints still load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumableRun(L.Callback):
    """Makes fit resumable: RNG states ride in every checkpoint (the data order after a resume is the same),
    SIGTERM or Ctrl-C during fit saves `<dirpath>/last.ckpt` and prints the command that resumes it, and so does a
    fit that ends between epoch ends (the epoch-end `last.ckpt` comes from a ModelCheckpoint without a monitor).

    Not Lightning's `OnExceptionCheckpoint`: that saves on any exception (a run stopped for a non-finite loss would
    put its broken state in `last.ckpt`), and Lightning's checkpoints hold no RNG states; tests/test_lightning_compat.py
    shows both. Lightning's SLURM requeue and `hpc_ckpt` are used as they are (runs.plan_resume finds them).
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: Path | None = None
        self._validation_cut_off = False
        self._rng_after_validation: dict[str, Any] | None = None
        self._saved_step: int | None = None  # the global step of the newest checkpoint written

    def state_dict(self) -> dict[str, Any]:
        """The random-number generators' states, saved in every checkpoint."""
        return {"rng": _rng_states(), "validation_cut_off": self._validation_cut_off}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the random-number generators' states from a checkpoint."""
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])
            if state_dict.get("validation_cut_off"):  # set them again once that validation has run again
                self._rng_after_validation = state_dict["rng"]

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the validation a resume ran again: the RNG states as they were when it was cut off, which the
        resumed run's data loader has drawn from meanwhile; the next epoch's shuffle is the uninterrupted run's."""
        if self._rng_after_validation is not None and not trainer.sanity_checking:
            _set_rng_states(self._rng_after_validation)
            self._rng_after_validation = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A checkpoint saved in the middle of fit's validation makes the resumed run validate again, in full."""
        if self._validation_cut_off:
            restart_validation(checkpoint)
        self._saved_step = trainer.global_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A resumed fit starts at a step its checkpoint holds."""
        self._saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit that ended between epoch ends (`trainer.max_steps`): save `last.ckpt`, the newest state."""
        if self._saved_step != trainer.global_step and not trainer.fast_dev_run:
            trainer.save_checkpoint(self._last_path(trainer), weights_only=False)

    def _last_path(self, trainer: L.Trainer) -> Path:
        return (Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints") / LAST).resolve()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM or Ctrl-C during fit: save `last.ckpt` and log the command that resumes the run."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        self.saved = self._last_path(trainer)
        self._validation_cut_off = trainer.validating  # fit's validation (Lightning stops it between batches)
        # every rank calls it (it synchronizes); rank 0 writes. weights_only=False said outright, else Lightning logs
        # "`weights_only` was not set, defaulting to `False`" (about what it saves, not how anything is loaded)
        trainer.save_checkpoint(self.saved, weights_only=False)
        self._validation_cut_off = False
        what = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        self._report(what, trainer.current_epoch, trainer.global_step)

    @rank_zero_only
    def _report(self, what: str, epoch: int, step: int) -> None:
        log.warning(
            f"Interrupted by {what} in epoch {epoch} at step {step}; saved {self.saved}. "
            f"To resume: {resume_command(self.saved)}"
        )
