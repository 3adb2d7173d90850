"""Train the digit classifier, then test its best checkpoint: `python -m digit_lightning.train [overrides]`.

Hydra composes conf/train.yaml (see README for the groups); `-m` runs a sweep, one run dir per job.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import rich
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf
from rich.syntax import Syntax
from torch.utils.tensorboard.summary import hparams as hparams_summary

from digit_lightning.config import CONFIG_DIR, ConfigError, run_cli, validate_config
from digit_lightning.data import DataError
from digit_lightning.guards import NonFiniteLossError
from digit_lightning.module import build_model
from digit_lightning.resume import EXIT_SIGTERM, ResumeError, find_checkpoint, requeued_checkpoint, resume_argv

log = logging.getLogger(__name__)
# num_workers=0 is deliberate: the data is in memory and worker processes cost more than they save.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Errors the user can fix from the message alone: the CLI prints them as one line, without a traceback.
USER_ERRORS = (
    ConfigError,
    DataError,
    ResumeError,
    NonFiniteLossError,
    InstantiationException,
    MisconfigurationException,
)
SHOW_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1"  # read before main() sets it for its own use


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's settings as flat `group/key` scalars, the form TensorBoard's HParams tab shows."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    tree = {k: resolved[k] for k in ("data", "model", "trainer") if k in resolved}
    tree.update(seed=cfg.get("seed"), task_name=cfg.get("task_name"), tags=cfg.get("tags"))
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}/{key}" if prefix else str(key))
        else:
            flat[prefix] = node if isinstance(node, (bool, int, float, str)) else str(node)

    walk(tree, "")
    return flat


@rank_zero_only  # other DDP ranks have no TensorBoard writer
def log_hyperparameters(loggers: list[Logger], cfg: DictConfig, metrics: list[str]) -> None:
    """Record the settings in every logger; in TensorBoard, tie them to `metrics` for the HParams tab."""
    params = flat_hparams(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, TensorBoardLogger):
            # Written by hand: Lightning would also log a placeholder value for each metric at step 0.
            writer = logger.experiment._get_file_writer()
            for summary in hparams_summary(params, {m: 0.0 for m in metrics}):
                writer.add_summary(summary)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (if `cfg.train`) and test (if `cfg.test`); return every logged metric as a float."""
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model = build_model(cfg.model)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = instantiate_group(cfg.get("callbacks"))
    if not loggers:  # logger=none: the LR monitor would have nowhere to write (and Lightning refuses to run it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    log_hyperparameters(trainer.loggers, cfg, [cfg.optimized_metric, "test/acc"])

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        ckpt_path = find_checkpoint(ckpt_path, Path(cfg.paths.log_dir) / cfg.task_name / "runs")
        log.info(f"Resuming from {ckpt_path}")
    elif ckpt_path := requeued_checkpoint(cfg.paths.output_dir):
        log.info(f"SLURM requeued this job: resuming from {ckpt_path}")
    if cfg.get("train"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        log.info(
            "Test on the official test set: "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/"))
        )
        if best:
            log.info(f"Best checkpoint: {best}")
    if trainer.is_global_zero:
        write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics, trainer)
    return metrics


def write_metrics(path: Path, metrics: dict[str, float], trainer: L.Trainer) -> None:
    """Leave the run's final metrics in its run dir, where `digit_lightning.sweep_report` reads them."""
    record = {**metrics, "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task: check the config, print it, train; returns `cfg.optimized_metric` for sweepers."""
    try:
        validate_config(cfg)  # before printing, so that a bad value is not buried under the config
        rich.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
        metrics = train(cfg)
    except SIGTERMException:  # the checkpoint and the resume command are already out (resume.ResumableRun)
        sys.exit(EXIT_SIGTERM)
    except USER_ERRORS as e:
        if SHOW_TRACEBACKS:
            raise
        # SystemExit passes through Hydra's job runner, which would print a line of its own for an Exception.
        raise SystemExit(f"error: {' '.join(str(e).split())}") from None
    return metrics.get(cfg.get("optimized_metric"))


def main() -> None:
    """CLI entry point: a `ckpt_path=...` command line first becomes its original run's (see resume.py); Hydra's
    errors are one line (`config.run_cli`)."""

    def task() -> None:
        sys.argv = resume_argv(sys.argv)
        hydra_main()

    try:
        run_cli(task)
    except ResumeError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
