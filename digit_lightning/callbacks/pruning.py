"""`OptunaPruning`: report the monitored metric of each validation epoch to an Optuna trial, and stop the run when
the study's pruner says so. Needs the `sweeps` extra, so it is not imported by `digit_lightning.callbacks`.

The trial is found in the study's storage by its number (the sweeper passes `hydra.sweeper.trial=<number>` to each
job, and the job's Hydra config has the storage and study), so the callback works wherever Hydra's launcher runs
the job: in the sweeper's process, a joblib worker or a SLURM job. conf/hparams_search/mnist_optuna.yaml adds it.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from optuna_integration import PyTorchLightningPruningCallback

from digit_lightning.study import load_trial
from digit_lightning.tracking import mark_pruned


class OptunaPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, for a trial named by storage, study and number.

    Left out, `storage`, `study_name`, `trial` and `pruner` are the Optuna sweeper's (`hydra.sweeper.*`) in a job
    it launched. A pruned run raises `optuna.TrialPruned` (the sweeper records the trial as PRUNED); under DDP, the
    ranks stop together and raise it at the end of fit. Outside an Optuna sweep it does nothing.
    """

    def __init__(self, storage: str | None = None, study_name: str | None = None, trial: int | None = None,
                 pruner: Any = None, monitor: str = "val/acc") -> None:  # fmt: skip
        if trial is None and HydraConfig.initialized():
            sweeper = HydraConfig.get().sweeper
            storage, study_name, trial = sweeper.get("storage"), sweeper.get("study_name"), sweeper.get("trial")
            pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else None
        self.active = trial is not None
        super().__init__(load_trial(storage, study_name, trial, pruner) if self.active else None, monitor)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check the DDP requirements (a database storage) before the first epoch."""
        if self.active:
            super().on_fit_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Report this epoch's value; raise optuna.TrialPruned (or, under DDP, stop all ranks) if pruned. MLflow and
        W&B runs record the trial as pruned (digit_lightning.tracking)."""
        if not self.active:
            return
        try:
            super().on_validation_end(trainer, pl_module)
        except optuna.TrialPruned:
            mark_pruned(trainer.loggers)
            raise

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Under DDP, every rank raises optuna.TrialPruned once rank 0 has recorded the trial as pruned."""
        if self.active and self.is_ddp_backend:
            trainer.strategy.barrier()
            self.check_pruned()
