"""MLflow and Weights & Biases beside TensorBoard: the loggers of conf/logger/mlflow.yaml and wandb.yaml
(docs/tracking.md). Needs the `tracking` extra; mlflow and wandb are imported only when such a logger is used.

Every logger of a run shows the same things under the same names: the curated settings of the HParams dashboard
(`digit_lightning.tensorboard.hparams`), the metrics under TensorBoard's names (`train/lr`, not `lr-Adam`), the
figures of `callbacks.dashboards`. A run is named as TensorBoard names it (`lr=0.003` for a sweep job, else its run
dir's name); the jobs of a sweep are grouped (one MLflow experiment, one W&B group per sweep, per study for Optuna),
and an Optuna trial's run carries its study, number and final state (COMPLETE, PRUNED or FAIL).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from digit_lightning.errors import UserError
from digit_lightning.tensorboard import in_sweep_job, metric_names, sweep_job_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

EXTRA = "pip install 'digit-lightning[tracking]'"


def run_name() -> str:
    """The `${run_name:}` resolver: a sweep job's TensorBoard name (`lr=0.003`), else the run dir's name."""
    if not HydraConfig.initialized():
        return "run"
    return sweep_job_name() or Path(HydraConfig.get().runtime.output_dir).name


def sweep_group(default: str) -> str:
    """The `${sweep_group:X}` resolver: X (the task name) for a single run; for a sweep job, `X/<study name>` in an
    Optuna sweep (all workers and commands of one study together), else `X/<sweep dir name>`."""
    if not in_sweep_job():
        return default
    sweeper = HydraConfig.get().sweeper
    if sweeper.get("trial") is not None and sweeper.get("study_name"):
        return f"{default}/{sweeper.study_name}"
    return f"{default}/{Path(HydraConfig.get().sweep.dir).name}"


def trial_tags() -> dict[str, str]:
    """`optuna.study` and `optuna.trial` of an Optuna sweep job (the sweeper's `hydra.sweeper.trial`), else none."""
    if not HydraConfig.initialized() or HydraConfig.get().sweeper.get("trial") is None:
        return {}
    sweeper = HydraConfig.get().sweeper
    return {"optuna.study": str(sweeper.study_name), "optuna.trial": str(sweeper.trial)}


OmegaConf.register_new_resolver("run_name", run_name, replace=True)
OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)


def _absolute(uri: str) -> str:
    """A relative `sqlite:///` database or local artifact path made absolute, so that a run's records do not depend
    on the directory a later reader starts in."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    return uri


class MLFlowLogger(lightning_loggers.MLFlowLogger):
    """Lightning's MLflow logger, with TensorBoard's metric names, Optuna trial tags, figures as images, and the run's
    outputs (config, metrics.json, best checkpoint, the model as an MLflow model) logged by `log_outputs`.

    `tracking_uri`: any MLflow tracking URI; a relative `sqlite:///` path is made absolute. `artifact_location`:
    where a new experiment keeps its files (a local path or a URI). `register_as`: also register the logged model in
    the model registry under this name (a new version per run)."""

    def __init__(self, experiment_name: str = "train", run_name: str | None = None,
                 tracking_uri: str = "sqlite:///logs/mlflow/mlflow.db", tags: dict[str, Any] | None = None,
                 artifact_location: str | None = None, register_as: str | None = None,
                 synchronous: bool | None = None) -> None:  # fmt: skip
        try:
            super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=_absolute(tracking_uri),
                             tags={**trial_tags(), **(tags or {})},
                             artifact_location=_absolute(artifact_location) if artifact_location else None,
                             synchronous=synchronous)  # fmt: skip
        except ModuleNotFoundError:
            raise UserError(f"logger=mlflow needs MLflow: {EXTRA}") from None
        self.register_as = register_as
        self.trial_state: str | None = None  # PRUNED, set by the pruning callback; COMPLETE by log_outputs

    @property
    def experiment(self) -> Any:
        """The MlflowClient, with this run's experiment created first if needed: by whichever of several jobs
        started together gets there first (the others find it)."""
        if self._experiment_id is None and self._run_id is None:
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            if self._tracking_uri.startswith("sqlite:///"):  # SQLite creates the file, not its directory
                Path(self._tracking_uri.removeprefix("sqlite://")).parent.mkdir(parents=True, exist_ok=True)
            client = MlflowClient(self._tracking_uri)
            for _ in range(3):
                found = client.get_experiment_by_name(self._experiment_name)
                if found is not None and found.lifecycle_stage != "deleted":
                    self._experiment_id = found.experiment_id
                    break
                try:
                    self._experiment_id = client.create_experiment(self._experiment_name, self._artifact_location)
                    break
                except MlflowException:  # created by another job meanwhile
                    continue
        return super().experiment

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log `metrics` at `step` under TensorBoard's names."""
        super().log_metrics(metric_names(metrics), step)

    @rank_zero_only
    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:
        """An RGB image: a validation figure under `tag` at `step` (the run page shows a slider per tag); a test
        figure, made once, as the artifact `<tag>.png` (`test/confusion_matrix.png`)."""
        if tag.startswith("test/"):
            self.experiment.log_image(self.run_id, image, artifact_file=f"{tag}.png")
        else:
            self.experiment.log_image(self.run_id, image, key=tag, step=step)

    @rank_zero_only
    def log_outputs(self, run_dir: Path, best: str | None) -> None:
        """The run's config (`.hydra/`), metrics.json and best checkpoint as artifacts, and the best checkpoint as an
        MLflow model (`model`) that predicts digits, registered if `register_as`."""
        client = self.experiment
        if (run_dir / ".hydra").is_dir():
            client.log_artifacts(self.run_id, str(run_dir / ".hydra"), "config")
        if (run_dir / "metrics.json").is_file():
            client.log_artifact(self.run_id, str(run_dir / "metrics.json"))
        if best:
            client.log_artifact(self.run_id, best, "checkpoints")
            from digit_lightning.mlflow_model import log_model

            info = log_model(self.run_id, best, self.register_as)
            client.set_tag(self.run_id, "model_uri", info.model_uri)
        if "optuna.trial" in self.tags:
            self.trial_state = self.trial_state or "COMPLETE"
            client.set_tag(self.run_id, "optuna.state", self.trial_state)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """End the run; a pruned trial's run ends KILLED (not FAILED), a failed trial's is tagged FAIL."""
        if not self._initialized:
            return
        if "optuna.trial" in self.tags and self.trial_state is None and status == "failed":
            self.trial_state = "FAIL"
        if self.trial_state in ("PRUNED", "FAIL"):
            self.experiment.set_tag(self.run_id, "optuna.state", self.trial_state)
        super().finalize("KILLED" if self.trial_state == "PRUNED" else status)


class WandbLogger(lightning_loggers.WandbLogger):
    """Lightning's W&B logger with TensorBoard's metric names, figures as images and Optuna trials in the run's
    config; offline by default (`mode`), so a run needs no account: `wandb sync <run dir>/wandb/offline-run-*`
    uploads it later. Other keyword arguments go to `wandb.init` (`entity`, `notes`, ...)."""

    def __init__(self, name: str | None = None, save_dir: str = ".", project: str = "digit_lightning",
                 group: str | None = None, mode: str | None = None, **kwargs: Any) -> None:  # fmt: skip
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        trial = trial_tags()
        config = {**kwargs.pop("config", {}), **trial}
        tags = [*kwargs.pop("tags", []), *(f"{k}={v}" for k, v in trial.items())]
        try:
            super().__init__(name=name, save_dir=save_dir, project=project, group=group, mode=mode, config=config,
                             tags=tags or None, **kwargs)  # fmt: skip
        except ModuleNotFoundError:
            raise UserError(f"logger=wandb needs wandb: {EXTRA}") from None
        self.trial = bool(trial)
        self.trial_state: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log `metrics` at `step` under TensorBoard's names."""
        super().log_metrics(metric_names(metrics), step)

    @rank_zero_only
    def log_image(self, tag: str, image: np.ndarray, step: int) -> None:  # type: ignore[override]
        """An RGB image under `tag` at `step`."""
        super().log_image(key=tag, images=[image], step=step)

    @rank_zero_only
    def log_outputs(self, run_dir: Path, best: str | None) -> None:
        """Finish the run (metrics and images are in it already), a trial's final state in its summary. Finished, so
        that the next job of a sweep in this process starts a run of its own rather than joining this one."""
        if self._experiment is None:
            return
        if self.trial:
            self.trial_state = self.trial_state or "COMPLETE"
            self.experiment.summary["optuna.state"] = self.trial_state
        self.experiment.finish()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """A failed (or pruned) run ends here, with a trial's final state in its summary."""
        super().finalize(status)
        if status == "failed" and self._experiment is not None:
            if self.trial:
                self.trial_state = self.trial_state or "FAIL"
                self.experiment.summary["optuna.state"] = self.trial_state
            self.experiment.finish(exit_code=1)


def figure_pixels(fig: Figure) -> np.ndarray:
    """A matplotlib figure as an HxWx3 uint8 array, drawn by an Agg canvas of its own (the library's figures are
    plain `Figure`s with no pyplot backend behind them)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


TRACKERS = (MLFlowLogger, WandbLogger)


def trackers(loggers: Iterable[Logger]) -> list[MLFlowLogger | WandbLogger]:
    """The MLflow and W&B loggers among `loggers`."""
    return [lg for lg in loggers if isinstance(lg, TRACKERS)]


def log_figure(loggers: Iterable[Logger], tag: str, fig: Figure, step: int) -> None:
    """`fig` as an image under `tag` at `step` in every MLflow and W&B logger of `loggers` (rendered once)."""
    found = trackers(loggers)
    if found:
        image = figure_pixels(fig)
        for logger in found:
            logger.log_image(tag, image, step)


def log_outputs(loggers: Iterable[Logger], run_dir: str | os.PathLike, best: str | None) -> None:
    """Hand the finished run's outputs to every MLflow and W&B logger (see their `log_outputs`)."""
    for logger in trackers(loggers):
        logger.log_outputs(Path(run_dir), best)


def mark_pruned(loggers: Iterable[Logger]) -> None:
    """Record in every MLflow and W&B logger that the run's Optuna trial was pruned."""
    for logger in trackers(loggers):
        logger.trial_state = "PRUNED"
