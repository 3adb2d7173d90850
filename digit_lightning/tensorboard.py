"""What a run tells TensorBoard besides its curves and images: the HParams entry, the Custom Scalars layout, the
net's graph, the name of a sweep job's run, and eval's per-class table.

HParams shows the same short, flat set of settings with readable names in every run (`run`, `lr`, `batch_size`, ...,
`overrides`: the other keys typed or swept), never Hydra's plumbing (`_target_`, `_partial_`, paths), and the same
metrics (METRICS). Importing this module registers the `${sweep_job_name:}` resolver of
conf/logger/tensorboard.yaml, which names a multirun job's TensorBoard run after what its sweep set (`lr=3e-3` for
`model.optimizer.lr=0.003`: digit_lightning.names).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch import loggers as lightning_loggers
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from digit_lightning import schema
from digit_lightning.names import run_name, short_value
from digit_lightning.runs import ResumeError, recorded_choices, resumed_config, run_dir_of

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
    and Lightning's `epoch` is left out (`metric_names`); so are the one-point `test/acc` and `test/loss`:
    `log_run_summary` writes them with the run's other end-of-run values under `whole_run/`, which sorts last. So the
    first screen shows curves, not a point per run."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Write `metrics` at `step` under `metric_names`, but `test/*` (one value per run: `log_run_summary`)."""
        super().log_metrics({k: v for k, v in metric_names(metrics).items() if not k.startswith("test/")}, step)


def metric_names(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """`metrics` under the names every dashboard shows (TensorBoard, MLflow, W&B): LearningRateMonitor's
    `lr-<Optimizer>[/pg<n>]` as `train/lr[/pg<n>]`, and without Lightning's `epoch` (a staircase against the step)."""
    return {re.sub(r"^lr-[^/]+", "train/lr", k): v for k, v in metrics.items() if k != "epoch"}


def logger_of(loggers: Iterable[Logger]) -> lightning_loggers.TensorBoardLogger | None:
    """The TensorBoard logger among `loggers` (`trainer.loggers`), if any (`logger=csv` or `none` has none)."""
    return next((lg for lg in loggers if isinstance(lg, lightning_loggers.TensorBoardLogger)), None)


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


# The HParams entry is the same set of keys in every run (train, sweep job, eval), so that TensorBoard's table and
# Parallel Coordinates draw every run of a logs/ together: a run lacking a column is left out of the plot. What a
# run does not have is NONE (a string) or MISSING (a metric).
# The metric columns are written once per run, at its end, in a Time Series group of their own that sorts after
# `train` and `val` (Time Series opens the first two groups): one point per run would otherwise crowd the curves.
NONE, MISSING = "none", -1.0
METRICS = {  # HParams metric column (as the table shows it) -> its tag
    "val/acc_best": "whole_run/val_acc_best",
    "test/acc": "whole_run/test_acc",
    "test/loss": "whole_run/test_loss",
}
SHOWN = ("run", "lr", "batch_size", "weight_decay", "fold")  # the columns the table and the plot show by default


def _fold(cfg: DictConfig) -> str:
    folds = cfg.data.get("num_folds")
    return f"{cfg.data.get('fold')} of {folds}" if folds else NONE


def _typed(overrides: Iterable[str], choices: dict[str, str]) -> list[tuple[str, str]]:
    """(key, value) of each setting `overrides` sets, a config group as its choice: what makes this run differ."""
    pairs = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or not _is_setting(key):
            continue
        value = choices.get(key) if key in choices else override.get_value_element_as_str()
        pairs.append((key, str(value)))
    return pairs


def hparams(
    cfg: DictConfig, overrides: Iterable[str] = (), choices: dict[str, str] | None = None, name: str | None = None
) -> dict[str, int | float | str]:
    """The flat HParams entry of a run, the same keys for every run: `run` (its short name, `name` or one built from
    `overrides`), the curated settings, `experiment` and `fold` (NONE where unused), and `overrides`: every other
    setting the command line or a sweep set, as one string (NONE if none). `choices`: the config groups' choices,
    by default Hydra's for this run."""
    if choices is None:
        choices = dict(HydraConfig.get().runtime.choices) if HydraConfig.initialized() else {}
    typed = _typed(overrides, choices)
    columns = schema.columns(cfg)  # the settings schema.py marks as HParams columns
    curated = [key for key, _ in columns.values()]
    known = [(k, v) for k, v in typed  # what the other columns show: these alone name a single run
             if k in ("experiment", "data.fold") or any(k == c or k.startswith(c + ".") for c in curated)]  # fmt: skip
    others = [f"{k}={v}" for k, v in typed if (k, v) not in known and k != "data.num_folds"]
    params: dict[str, int | float | str] = {"run": name or run_name(known) or "defaults"}
    params.update({name: _scalar(value) for name, (_, value) in columns.items()})
    params["experiment"] = str(choices.get("experiment") or NONE)
    params["fold"] = _fold(cfg)
    params["overrides"] = " ".join(others)[:300] or NONE
    return params


def checkpoint_hparams(ckpt_paths: list[Path], cfg: DictConfig) -> dict[str, int | float | str] | None:
    """The HParams entry of an eval (`cfg`: its config): its (first) checkpoint's run, named `eval <that run's
    name>`; None when the checkpoint is no run's (a file copied elsewhere) or the run's settings cannot be read. The
    run's settings are read as a resumed run reads them (runs.resumed_config: the package's own config for the run's
    recorded choices, the run's plain values on top), never code named by the run dir."""
    run_dir = run_dir_of(Path(ckpt_paths[0]).resolve())
    if run_dir is None:
        return None
    try:
        settings = resumed_config(cfg, run_dir, [])
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        choices = dict(choice.split("=", 1) for choice in recorded_choices(run_dir))
        params = hparams(settings, [str(o) for o in overrides], choices)
    except (ResumeError, OSError, yaml.YAMLError, TypeError, ValueError, HydraException, OmegaConfBaseException):
        return None
    named = sorted(p.name for p in (run_dir / "tensorboard").glob("*") if p.is_dir())  # a sweep job's run name
    name = named[0] if named else str(params["run"]) if params["run"] != "defaults" else run_dir.name
    members = f" +{len(ckpt_paths) - 1}" if len(ckpt_paths) > 1 else ""
    return {**params, "run": f"eval {name}{members}"}


@rank_zero_only  # other DDP ranks have no TensorBoard writer
def log_hparams(loggers: Iterable[Logger], params: dict[str, Any]) -> None:
    """Record `params` (an `hparams` entry) in every logger, and in TensorBoard as an HParams session of this run,
    with the experiment summary that names the table's columns: every run writes the same one (same keys, same
    METRICS), so whichever TensorBoard reads, it fits all runs. The SHOWN columns are marked as the ones that
    differ, which TensorBoard shows first; the others are a tick away."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    for logger in loggers:
        logger.log_hyperparams(params)
        if isinstance(logger, lightning_loggers.TensorBoardLogger):
            _, session_start, session_end = hparams_summary(params, {})
            infos = [api_pb2.HParamInfo(name=k, differs=k in SHOWN,
                                        type=api_pb2.DATA_TYPE_FLOAT64 if isinstance(v, (int, float)) else
                                        api_pb2.DATA_TYPE_STRING) for k, v in params.items()]  # fmt: skip
            metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag), display_name=name)
                       for name, tag in METRICS.items()]  # fmt: skip
            content = plugin_data_pb2.HParamsPluginData(
                experiment=api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)
            )
            experiment = Summary(
                value=[Summary.Value(tag=metadata.EXPERIMENT_TAG, metadata=metadata.create_summary_metadata(content))]
            )
            writer = logger.experiment.file_writer  # SummaryWriter's public writer
            for summary in (experiment, session_start, session_end):
                writer.add_summary(summary)


@rank_zero_only
def log_run_summary(loggers: Iterable[Logger], params: dict[str, Any], metrics: dict[str, float], step: int) -> None:
    """At the end of a run: its METRICS under their `whole_run/` tags, MISSING where the run has none (a sweep run
    with `test=false`, a pruned trial), so that every run has every HParams column; and a `summary` card in the Text
    tab: the run's name, its final metrics and its settings, one table."""
    tb = logger_of(loggers)
    if tb is None:
        return
    tb.log_metrics({tag: metrics.get(name, MISSING) for name, tag in METRICS.items()}, step)
    rows = ["| | |", "|---|---|"]
    rows += [f"| **{m}** | {metrics[m]:.4f} |" if m in metrics else f"| **{m}** | not measured |" for m in METRICS]
    rows += [f"| {k} | {short_value(v)} |" for k, v in params.items()]
    tb.experiment.add_text("summary", "\n".join(rows), global_step=step)
    tb.experiment.flush()


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
    with warnings.catch_warnings():  # here, not in cli.quiet(): joblib's worker processes trace too
        warnings.filterwarnings("ignore", r".*`torch\.jit\.trace(_method)?` is deprecated.*", FutureWarning)
        logger.experiment.add_graph(net, example)


def in_sweep_job() -> bool:
    """Whether this is a job of a multirun (where a sweep's jobs share what a single run would show once)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_job_name() -> str:
    """The `${sweep_job_name:}` resolver: what a multirun job's sweep gave it (`lr=3e-3,bs=128`: names.run_name),
    the name TensorBoard shows for its run; "" for a single run. A resumed sweep job keeps its name: it is read from the
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
    return run_name(pairs).replace("/", "_")[:120] or "job"


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
