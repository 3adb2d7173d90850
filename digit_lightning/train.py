"""Train the digit classifier, then test the run's model (`run_model`): `python -m digit_lightning.train [overrides]`.

Hydra composes conf/train.yaml; `-m` runs a sweep, one run dir per job; `ckpt_path=last|<run dir>|<file>` resumes.
"""

from __future__ import annotations

from digit_lightning import cli

cli.answer_help(__name__, "train")  # before torch and Lightning: help needs neither

import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from digit_lightning import resume, runs, schema
from digit_lightning.atomic import atomic_open
from digit_lightning.config import trainer_error, validate_config
from digit_lightning.errors import UserError
from digit_lightning.rank import global_rank
from digit_lightning.tensorboard import (  # also registers ${sweep_job_name:} (conf/logger)
    hparams,
    log_hparams,
    log_run_summary,
    sweep_job_name,
    typed_overrides,
)
from digit_lightning.tracking import log_outputs  # also registers ${run_name:}, ${sweep_group:} (conf/logger)

log = logging.getLogger(__name__)


def set_cpu_threads(setting: int | str | None, processes: int) -> None:
    """torch's intra-op CPU threads for this process. `auto`: this process's share of the cores it may run on (its
    CPU affinity, e.g. a SLURM allocation, split among the DDP processes), unless OMP_NUM_THREADS says otherwise (as
    joblib sets it for parallel sweep jobs). More threads than free cores stall every op on the slowest thread:
    on a machine busy with other work, set a smaller number."""
    if setting is None or (setting == "auto" and "OMP_NUM_THREADS" in os.environ):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // max(1, processes)) if setting == "auto" else int(setting))


def train(cfg: DictConfig, plan: runs.Plan | None = None) -> dict[str, float]:
    """Fit (if `cfg.train`) and test (if `cfg.test`); return every logged metric as a float. `plan`: what fit resumes
    from (`runs.plan_resume`); by default, `cfg.ckpt_path` (or a SLURM requeue) resumed in `cfg.paths.output_dir`."""
    if plan is None:  # called from Python; `run` checked the config before it planned
        validate_config(cfg)
        plan = runs.plan_resume(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.paths.output_dir)
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
    torch.set_flush_denormal(bool(cfg.get("flush_denormal", False)))
    params = hparams(cfg, typed_overrides(), name=sweep_job_name() or None)
    log_hparams(trainer.loggers, params)

    ckpt_path = plan.checkpoint
    start_step = None  # the step a resumed fit starts at
    if ckpt_path is not None:  # Lightning gets a checkpoint rebuilt from the file's validated pieces, not the file
        log.info(f"{'SLURM requeued this job: resuming' if plan.requeued else 'Resuming'} from {ckpt_path}")
        checkpoint = resume.for_fit(ckpt_path, model, trainer)
        start_step = checkpoint["global_step"]
        ckpt_path = resume.hand_over(trainer, ckpt_path, checkpoint)
    if cfg.get("train"):
        log.info(summary(cfg))
        with warnings.catch_warnings():
            own_dir = (Path(cfg.paths.output_dir) / "checkpoints").resolve()
            if start_step is not None and Path(ckpt_path).parent == own_dir:
                # A resumed run's checkpoint dir holds its own checkpoints, by design; Lightning warns about any
                # non-empty one, for fear of mixing two runs' files.
                warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
            try:
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
            except MisconfigurationException as e:
                raise trainer_error(e, cfg) from e
            except Exception:  # e.g. a pruned Optuna trial: it still gets every HParams column (docs/dashboards.md)
                so_far = {k: float(v) for k, v in trainer.callback_metrics.items()}
                log_run_summary(trainer.loggers, params, so_far, trainer.global_step)
                raise
        if start_step is not None and trainer.global_step == start_step and not trainer.interrupted:
            log.warning(finished(cfg, Path(ckpt_path), trainer))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    best_so_far = float(model.val_acc_best.max_value)  # restored from the checkpoint when fit had nothing left to do
    if "val/acc_best" not in metrics and math.isfinite(best_so_far):
        metrics["val/acc_best"] = best_so_far

    if cfg.get("test"):
        if trainer.is_global_zero and cfg.get("train"):  # what fit reached, should the test be interrupted
            write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics, trainer)
        chosen = resume.tested_checkpoint(trainer, final=runs.final_weights_are_the_model(cfg))
        if chosen:
            resume.hand_over(trainer, chosen, resume.for_test(chosen, model))
        else:
            log.warning("No checkpoint was saved; testing the current weights.")
        try:
            trainer.test(model, datamodule=datamodule, ckpt_path=chosen or None, verbose=False)
        except MisconfigurationException as e:
            raise trainer_error(e, cfg) from e
        except SIGTERMException:
            log.warning(f"Interrupted by SIGTERM during the final test; the training itself had finished. To test "
                        f"it: {runs.resume_command(Path(cfg.paths.output_dir))}")  # fmt: skip
            raise
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        log.info(
            "Test on the official test set: "
            + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k.startswith("test/"))
        )
        if chosen:
            log.info(f"The run's model (tested): {chosen}")
    log_run_summary(trainer.loggers, params, metrics, trainer.global_step)
    if trainer.is_global_zero:
        write_metrics(Path(cfg.paths.output_dir) / "metrics.json", metrics, trainer)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        log_outputs(trainer.loggers, cfg.paths.output_dir, best or None)  # MLflow, W&B: artifacts, the model
    return metrics


def finished(cfg: DictConfig, ckpt_path: Path, trainer: L.Trainer) -> str:
    """What a resume of a run that had already finished says: nothing trained, and the command that extends it."""
    run = (
        ckpt_path.parent.parent if ckpt_path.name == runs.LAST and ckpt_path.parent.name == "checkpoints" else ckpt_path
    )
    t = cfg.trainer
    if t.get("max_steps", -1) not in (-1, None) and trainer.global_step >= t.max_steps:
        limit, more = f"trainer.max_steps={t.max_steps}", f"trainer.max_steps={2 * t.max_steps}"
    else:
        limit, more = f"trainer.max_epochs={t.max_epochs}", f"trainer.max_epochs={2 * t.max_epochs}"
    return (
        f"{run} is finished: it reached {limit} (trained {trainer.current_epoch} epochs, {trainer.global_step} steps); "
        f"nothing left to train. To train it longer: {runs.resume_command(run)} {more}"
    )


def write_metrics(path: Path, metrics: dict[str, float], trainer: L.Trainer) -> None:
    """Leave the run's final metrics in its run dir (atomically), where `digit_lightning.sweep_report` reads them."""
    record = {**metrics, "epoch": trainer.current_epoch, "global_step": trainer.global_step}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        f.write((json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def summary(cfg: DictConfig) -> str:
    """One line that says what this run trains, and where its files go: the run's HParams columns (schema.py)."""
    c = {name: value for name, (_, value) in schema.columns(cfg).items()}
    schedule = "constant lr" if c["schedule"] == "constant" else c["schedule"]
    return (
        f"Training {c['model']} with {c['optimizer']} lr={c['lr']:.3g} ({schedule}), batch size {c['batch_size']}, "
        f"{length(cfg.trainer)}, seed {c['seed']} -> {cfg.paths.output_dir}"
    )


def length(trainer: DictConfig) -> str:
    """How long the run trains, the way Lightning will: `fast_dev_run` wins over `max_epochs`."""
    fast = trainer.get("fast_dev_run")
    if fast:
        batches = 1 if fast is True else int(fast)
        return f"fast_dev_run: {batches} batch{'es' if batches > 1 else ''} of train, val and test"
    epochs = trainer.get("max_epochs")
    if epochs is None or epochs == -1:
        return "no epoch limit" + (f", {trainer.max_steps} steps" if trainer.get("max_steps", -1) != -1 else "")
    return f"{epochs} epoch{'' if epochs == 1 else 's'}"


def run(cfg: DictConfig, plan: runs.Plan | None = None) -> float | None:
    """The Hydra task: check the config, take the resume plan's settings, lock the run dir, train; return the
    optimized metric. `plan` comes from `main`, made before Hydra picked the run dir; without one (a sweep's job, a
    command line with Hydra flags) the job plans for the run dir Hydra gave it."""
    cli.route_lightning_logs()
    validate_config(cfg)  # before anything else, so that a bad value is not buried under other output
    if plan is None:
        plan = runs.plan_resume(cfg.get("ckpt_path"), cfg.paths.log_dir, cfg.paths.output_dir)
    if plan.run_dir is not None:
        cfg = plan.config(cfg, list(HydraConfig.get().overrides.task))
        validate_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if global_rank() == 0:  # DDP ranks > 0 share rank 0's dir
        lock = runs.lock_run_dir(output_dir)  # noqa: F841  (held until the process ends)
        if plan.run_dir is not None:  # its settings, for the next resume (.hydra/resume holds this command's own)
            with atomic_open(output_dir / ".hydra" / "config.yaml") as f:  # replaces, never writes through a link
                f.write(OmegaConf.to_yaml(cfg).encode())
    if cfg.get("extras", {}).get("print_config"):
        import rich
        from rich.syntax import Syntax

        rich.print(Syntax(OmegaConf.to_yaml(cfg, resolve=True), "yaml", theme="ansi_dark"))
    try:
        metrics = train(cfg, plan)
    except SIGTERMException:  # the checkpoint and the resume command are already out (ResumableRun)
        sys.exit(cli.EXIT_SIGTERM)
    return metrics.get(cfg.get("optimized_metric"))


def command_line_plan(args: list[str]) -> runs.Plan | None:
    """The resume plan of a single run typed as `key=value` overrides with a `ckpt_path`, made before Hydra picks
    (and writes into) a run dir; None for a sweep, a command line with Hydra flags (`--cfg`, `-cd`, ...) or
    overrides that do not compose (Hydra reports those): then the task plans for the run dir Hydra gives it."""
    if any(a.startswith("-") for a in args) or not any(a.split("=", 1)[0].lstrip("+") == "ckpt_path" for a in args):
        return None
    try:
        cfg = cli.compose_config(args, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, UserError):  # Hydra's own composition reports it, in its run
        return None
    if cfg.hydra.mode == RunMode.MULTIRUN:
        return None
    typed_dir = any(a.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for a in args)
    try:
        here = cfg.hydra.run.dir if typed_dir else None
    except OmegaConfBaseException:  # e.g. ${hydra:runtime.cwd}/new: known once Hydra runs; the task plans there
        return None
    return runs.plan_resume(cfg.ckpt_path, cfg.paths.log_dir, here)


def main() -> None:
    """CLI entry point: the resume plan first, then Hydra in the run dir it names; Hydra's errors and ours are one
    `error:` line, exit status 2 (see digit_lightning.cli)."""

    def start() -> None:
        plan = command_line_plan(sys.argv[1:])
        sys.argv += plan.hydra_overrides() if plan else []

        @hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="train")
        def task(cfg: DictConfig) -> float | None:
            with cli.exit_on_user_error():
                return run(cfg, plan)

        task()

    cli.run(start)


if __name__ == "__main__":
    main()
