"""Train the digit classifier, then test its best checkpoint: `python -m digit_lightning.train [overrides]`.

Hydra composes conf/train.yaml; `-m` runs a sweep, one run dir per job; `ckpt_path=last|<run dir>|<file>` resumes.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from digit_lightning import cli, runs
from digit_lightning.atomic import atomic_open
from digit_lightning.checkpoint import check_resumable
from digit_lightning.config import validate_config

log = logging.getLogger(__name__)
OmegaConf.register_new_resolver("resume_dir", runs.resume_dir, replace=True)  # hydra.run.dir, conf/hydra/default.yaml
OmegaConf.register_new_resolver("resume_subdir", runs.resume_subdir, replace=True)  # hydra.output_subdir


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
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = flat_hparams(cfg)
    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, TensorBoardLogger):
            # Written by hand: Lightning would also log a placeholder value for each metric at step 0.
            writer = logger.experiment._get_file_writer()
            for summary in hparams_summary(params, {m: 0.0 for m in metrics}):
                writer.add_summary(summary)


def set_cpu_threads(setting: int | str | None, processes: int) -> None:
    """torch's intra-op CPU threads for this process. `auto`: one core fewer than this process's share of the
    machine (at least 1), unless OMP_NUM_THREADS says otherwise: an op split over every core waits for the slowest
    thread, and a core lost to anything else (the training loop's own Python, another process) stalls every op."""
    if setting is None or (setting == "auto" and "OMP_NUM_THREADS" in os.environ):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, processes) - 1) if setting == "auto" else int(setting))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (if `cfg.train`) and test (if `cfg.test`); return every logged metric as a float."""
    validate_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model, _convert_="all")
    loggers = cli.instantiate_group(cfg.get("logger"))
    callbacks = cli.instantiate_group(cfg.get("callbacks"))
    if not loggers:  # logger=none: the LR monitor would have nowhere to write (and Lightning refuses to run it)
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    set_cpu_threads(cfg.get("cpu_threads"), trainer.num_devices)
    log_hyperparameters(trainer.loggers, cfg, [cfg.optimized_metric, "test/acc"])

    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path = runs.find_checkpoint(cfg.ckpt_path, cfg.paths.log_dir)
        check_resumable(ckpt_path, model)  # its weights must fit before Lightning restores anything
        log.info(f"Resuming from {ckpt_path}")
    if cfg.get("train"):
        log.info(summary(cfg))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if not best:
            log.warning("No best checkpoint was saved; testing the current weights.")
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
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
    """Leave the run's final metrics in its run dir (atomically), where `digit_lightning.sweep_report` reads them."""
    record = {**metrics, "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def summary(cfg: DictConfig) -> str:
    """One line that says what this run trains, and where its files go."""
    m, d, t = cfg.model, cfg.data, cfg.trainer
    scheduler = m.get("scheduler")
    schedule = scheduler._target_.rsplit(".", 1)[-1] if scheduler else "constant lr"
    return (
        f"Training {m.net.name} with {m.optimizer._target_.rsplit('.', 1)[-1]} lr={m.optimizer.lr} ({schedule}), "
        f"batch {d.batch_size}, {t.max_epochs} epochs, seed {cfg.seed} -> {cfg.paths.output_dir}"
    )


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """The Hydra task: `run(cfg)`, with a user error as one line."""
    with cli.exit_on_user_error():
        return run(cfg)


def run(cfg: DictConfig) -> float | None:
    """Check the config, (re)load a resumed run's settings, lock the run dir, train; return the optimized metric."""
    cli.route_lightning_logs()
    validate_config(cfg)  # before anything else, so that a bad value is not buried under other output
    hydra_cfg = HydraConfig.get()
    single = hydra_cfg.mode is None or hydra_cfg.mode.name == "RUN"
    resumed = False
    if cfg.get("ckpt_path") and single:
        run_dir = runs.run_dir_of(runs.find_checkpoint(cfg.ckpt_path, cfg.paths.log_dir))
        if run_dir is not None and Path(hydra_cfg.runtime.output_dir).resolve() == run_dir.resolve():
            cfg = runs.resumed_config(cfg, run_dir, list(hydra_cfg.overrides.task))
            validate_config(cfg)
            resumed = True
    output_dir = Path(cfg.paths.output_dir)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0:  # DDP ranks > 0 share rank 0's dir
        lock = runs.lock_run_dir(output_dir)  # noqa: F841  (held until the process ends)
        if resumed:  # the settings the run continues with, for the next resume (this command's are in .hydra/resume)
            (output_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    if cfg.get("extras", {}).get("print_config"):
        import rich
        from rich.syntax import Syntax

        rich.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    try:
        metrics = train(cfg)
    except SIGTERMException:  # the checkpoint and the resume command are already out (ResumableRun)
        sys.exit(cli.EXIT_SIGTERM)
    return metrics.get(cfg.get("optimized_metric"))


def main() -> None:
    """CLI entry point: Hydra's errors and ours are one `error:` line, exit status 2 (see digit_lightning.cli)."""
    cli.run(hydra_main)


if __name__ == "__main__":
    main()
