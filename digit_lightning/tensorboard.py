"""What a run tells TensorBoard besides its curves and images: the HParams entry, the Custom Scalars layout, the
net's graph, the name of a sweep job's run, and eval's per-class table.

HParams shows a short, flat set of settings with readable names (`lr`, `batch_size`, ...) plus every key typed on
the command line or swept, never Hydra's plumbing (`_target_`, `_partial_`, paths). Importing this module registers
the `${sweep_job_name:}` resolver of conf/logger/tensorboard.yaml, which names a multirun job's TensorBoard run
after what its sweep set (`lr=0.003` for `model.optimizer.lr=0.003`).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import get_class
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

# TensorBoard's Custom Scalars page: one chart per entry, each overlaying the tags its regexes match.
LAYOUT = {
    "train vs val": {
        "loss: train vs val": ["Multiline", ["^train/loss$", "^val/loss$"]],
        "accuracy: train vs val": ["Multiline", ["^train/acc$", "^val/acc$", "^val/acc_best$"]],
        "learning rate": ["Multiline", ["^train/lr"]],
    }
}
PLUMBING = ("_target_", "_partial_", "_convert_", "_recursive_", "_args_")
NOT_SETTINGS = ("hydra", "paths", "ckpt_path")  # where files go, not how a model is trained


class TensorBoardLogger(lightning_loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger with its tags grouped for TensorBoard's Time Series page, which sorts groups
    (the part of a tag before its first "/") by name and opens only the first two: `lr-Adam` becomes `train/lr`,
    and Lightning's `epoch` is left out (`metric_names`). So `test` and `train` open, and nothing sorts before
    them."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write `metrics` at `step` under `metric_names`."""
        super().log_metrics(metric_names(metrics), step)


def metric_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` under the names every dashboard shows (TensorBoard, MLflow, W&B): LearningRateMonitor's
    `lr-<Optimizer>[/pg<n>]` as `train/lr[/pg<n>]`, and without Lightning's `epoch` (a staircase against the step)."""
    return {re.sub(r"^lr-[^/]+", "train/lr", k): v for k, v in metrics.items() if k != "epoch"}


def logger_of(loggers: Iterable[Logger]) -> lightning_loggers.TensorBoardLogger | None:
    """The TensorBoard logger among `loggers` (`trainer.loggers`), if any (`logger=csv` or `none` has none)."""
    return next((lg for lg in loggers if isinstance(lg, lightning_loggers.TensorBoardLogger)), None)


def _class_name(node: Any) -> str:
    return str(node["_target_"]).rsplit(".", 1)[-1] if node and node.get("_target_") else "none"


def _weight_decay(optimizer: DictConfig) -> float:
    """The optimizer's weight decay: the config's, else its class default (AdamW's is 0.01, Adam's 0)."""
    if "weight_decay" in optimizer:
        return float(optimizer.weight_decay)
    try:
        default = inspect.signature(get_class(optimizer._target_)).parameters["weight_decay"].default
    except (ImportError, KeyError, ValueError, AttributeError):
        return 0.0
    return float(default) if isinstance(default, (int, float)) else 0.0


def _augmentation(augment: Any) -> str:
    return " ".join(f"{k}={v}" for k, v in augment.items()) if augment else "none"


# name in HParams -> (the config key it shows, how to read it)
CURATED: dict[str, tuple[str, Callable[[DictConfig], Any]]] = {
    "model": ("model.net", lambda c: c.model.net.name),
    "optimizer": ("model.optimizer._target_", lambda c: _class_name(c.model.optimizer)),
    "lr": ("model.optimizer.lr", lambda c: float(c.model.optimizer.lr)),
    "weight_decay": ("model.optimizer.weight_decay", lambda c: _weight_decay(c.model.optimizer)),
    "batch_size": ("data.batch_size", lambda c: int(c.data.batch_size)),
    "epochs": ("trainer.max_epochs", lambda c: int(c.trainer.max_epochs)),
    "schedule": ("model.scheduler", lambda c: _class_name(c.model.get("scheduler")).replace("none", "constant")),
    "augmentation": ("data.augment", lambda c: _augmentation(c.data.get("augment"))),
    "precision": ("trainer.precision", lambda c: str(c.trainer.precision)),
    "seed": ("seed", lambda c: c.seed if c.get("seed") is not None else "random"),
}


def _scalar(value: Any) -> int | float | str:
    """A value the HParams tab can show (numbers and strings), others as one would type them, plumbing left out."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if _is_setting(str(k))}
    if isinstance(value, bool) or value is None:
        return str(value).lower().replace("none", "null")
    if isinstance(value, (int, float, str)):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def typed_overrides() -> list[str]:
    """The overrides of this run (what was typed, or what a sweep gave this job): `hydra.overrides.task`; none
    outside a Hydra run (a notebook composing the config itself)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _is_setting(key: str) -> bool:
    parts = re.split(r"[./]", key)  # a dotted key, or a config group such as hydra/launcher
    return parts[0] not in NOT_SETTINGS and parts[-1] not in PLUMBING and not parts[-1].endswith(("_dir", "_path"))


def hparams(
    cfg: DictConfig, overrides: Iterable[str] = (), choices: dict[str, str] | None = None
) -> dict[str, int | float | str]:
    """The flat HParams entry of a run: the curated settings, and each key set by `overrides` under its dotted name
    (or its curated name: `model.optimizer.lr=...` is `lr`; a config group as its choice: `trainer=cpu` is `cpu`).
    Typed keys come first: the HParams tab shows the first five columns until others are ticked. `choices`: the
    config groups' choices, by default Hydra's for this run."""
    curated = {name: _scalar(read(cfg)) for name, (_, read) in CURATED.items()}
    if choices is None:
        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    typed: dict[str, Any] = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        name = next((n for n, (path, _) in CURATED.items() if key == path or key.startswith(path + ".")), None)
        if override.is_delete() or not (name or _is_setting(key)):
            continue
        if name is not None or key in curated:  # a curated setting (`model=digit` too): under its curated name
            typed[name or key] = curated[name or key]
        elif key in choices:  # a config group: experiment=fast, trainer=cpu
            typed[key] = _scalar(choices[key])
        else:
            typed[key] = _scalar(OmegaConf.select(cfg, key, default=None))
    return {**typed, **{k: v for k, v in curated.items() if k not in typed}}


@rank_zero_only  # other DDP ranks have no TensorBoard writer
def log_hparams(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    """Record the run's `hparams` in every logger, and in TensorBoard as an HParams session of this run.

    No experiment summary is written: without one, TensorBoard builds the table from every run's session, so its
    columns are the union of all runs' settings, those that differ between runs shown first (a summary would be
    taken from one arbitrary run, and say nothing of what differs). Its metric columns are then the runs' scalars
    (val/acc_best, test/acc and test/loss among them)."""
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = hparams(cfg, typed_overrides())
    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, lightning_loggers.TensorBoardLogger):
            _, session_start, session_end = hparams_summary(params, {})
            writer = logger.experiment.file_writer  # SummaryWriter's public writer
            writer.add_summary(session_start)
            writer.add_summary(session_end)


def write_layout(logger: lightning_loggers.TensorBoardLogger) -> None:
    """Write the Custom Scalars page's LAYOUT into the run."""
    logger.experiment.add_custom_scalars(LAYOUT)


def _swept_keys(hydra: dict[str, Any]) -> set[str]:
    """The keys a multirun varies: its sweeper's `params` (Optuna's search space) and the command line's sweeps
    (`lr=1e-3,3e-3`), which Hydra's basic sweeper records in `<sweep dir>/multirun.yaml`."""
    keys = set((hydra.get("sweeper") or {}).get("params") or {})
    multirun = Path(hydra["runtime"]["output_dir"]).parent / "multirun.yaml"  # a job dir is <sweep dir>/<job num>
    if multirun.is_file():
        task = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {}).get("overrides", {}).get("task") or []
        keys |= {o.key_or_group for o in OverridesParser.create().parse_overrides(task) if o.is_sweep_override()}
    return keys


def add_net_graph(logger: lightning_loggers.TensorBoardLogger, net: torch.nn.Module, example: torch.Tensor) -> None:
    """The Graphs tab: the net (not the LightningModule around it) traced on `example`; its layers are one click
    away, inside the node named after the net's class."""
    logger.experiment.add_graph(net, example)


def in_sweep_job() -> bool:
    """Whether this is a job of a multirun (where a sweep's jobs share what a single run would show once)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job_name() -> str:
    """The `${sweep_job_name:}` resolver: what a multirun job's sweep gave it (`lr=0.003`), the name
    TensorBoard shows for its run; "" for a single run. A resumed sweep job keeps its name: it is read from the
    `.hydra/hydra.yaml` of the job's first start (a resumed run records its own command in `.hydra/resume/`)."""
    if not HydraConfig.initialized():
        return ""
    live = HydraConfig.get()
    first_start = Path(live.runtime.output_dir) / ".hydra" / "hydra.yaml"
    if first_start.is_file():
        hydra = (yaml.safe_load(first_start.read_text()) or {}).get("hydra", {})
    else:
        hydra = OmegaConf.to_container(live)
    if getattr(hydra.get("mode"), "name", hydra.get("mode")) != "MULTIRUN":
        return ""
    task = [o.lstrip("+~").split("=", 1) for o in hydra["overrides"]["task"] if "=" in o]
    task = [(k, v) for k, v in task if _is_setting(k)]
    swept = _swept_keys(hydra)
    pairs = [(k, v) for k, v in task if k in swept] or task
    # By the last part of each key (lr=0.003) when that is unambiguous: TensorBoard cuts long run names short.
    short = [k.rsplit(".", 1)[-1] for k, _ in pairs]
    keys = short if len(set(short)) == len(short) else [k for k, _ in pairs]
    return ",".join(f"{k}={v}" for k, (_, v) in zip(keys, pairs, strict=True)).replace("/", "_")[:200] or "job"


OmegaConf.register_new_resolver("sweep_job_name", sweep_job_name, replace=True)


def log_class_table(logger: lightning_loggers.TensorBoardLogger, result: dict[str, Any], step: int = 0) -> None:
    """Eval's per-class precision, recall and F1 (an `eval.report`) as one Markdown table in the Text tab
    (`test_per_class`), rather than 33 one-point scalar cards burying test/acc and test/loss."""
    rows = ["| digit | precision | recall | F1 | support |", "|---:|---:|---:|---:|---:|"]
    for digit, m in result["per_class"].items():
        rows.append(f"| {digit} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |")
    macro = result["macro"]
    rows.append(f"| **macro** | {macro['precision']:.4f} | {macro['recall']:.4f} | {macro['f1']:.4f} | |")
    logger.experiment.add_text("test_per_class", "\n".join(rows), global_step=step)
