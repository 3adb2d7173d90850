"""Summarize a multirun: `python -m digit_lightning.sweep_report <multirun dir>`.

Writes, into the multirun dir, `sweep_report.md` and `sweep_report.csv` (every job's swept overrides and final
metrics, best first by the optimized metric) and `sweep_report.png` (the metric against each swept parameter).
Each job's metrics come from the `metrics.json` that train.py leaves in its run dir; a job whose files are
unreadable is left out with a warning. Hydra runs this at the end of every multirun through the `SweepReport`
callback in conf/hydra/default.yaml.

An Optuna sweep (`optimization_results.yaml` names its study) adds each job's trial number and state (COMPLETE,
PRUNED, FAIL) and Optuna's views of the whole study: `optuna_history.png`, `optuna_importances.png`,
`optuna_parallel.png`. A k-fold multirun (`data.fold` swept) adds the mean ± sd over the folds of each setting.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from digit_lightning.atomic import atomic_open
from digit_lightning.cli import EXIT_USER_ERROR, UserError
from digit_lightning.names import run_name, short_value

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)
METRIC_ORDER = ["val/acc_best", "test/acc", "test/loss", "val/acc", "val/loss", "train/acc", "train/loss"]


def job_name(job_dir: Path, overrides: dict[str, str]) -> str | None:
    """A job's short name: its TensorBoard run's, or, without TensorBoard (logger=none), the same name built from
    the values its Optuna sweeper searched (`hydra.sweeper.params` in the job's .hydra/hydra.yaml)."""
    names = sorted(p.name for p in (job_dir / "tensorboard").glob("*") if p.is_dir())
    if names:
        return names[0]
    try:
        hydra = (yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text()) or {}).get("hydra") or {}
        searched = (hydra.get("sweeper") or {}).get("params") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return run_name((k, v) for k, v in overrides.items() if k in searched) or None


def read_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """One record per job dir: its number, overrides (`key -> value` strings) and metrics (empty if it failed).

    A job whose overrides.yaml or metrics.json cannot be read (a job killed mid-write, a file edited by hand) is
    left out with a warning: one broken job must not cost the report of the others.
    """
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        metrics_file = job_dir / "metrics.json"
        reading = overrides_file
        try:
            overrides = dict(o.lstrip("+~").split("=", 1) for o in yaml.safe_load(overrides_file.read_text()) or [])
            reading = metrics_file
            metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
            if not isinstance(metrics, dict):
                raise ValueError(f"a {type(metrics).__name__}, not a mapping of metric names to values")
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as e:
            log.warning(f"Sweep report: skipping job {job_dir.name}: {reading} cannot be read "
                        f"({' '.join(str(e).split())[:200]})")  # fmt: skip
            continue
        jobs.append(
            {"job": job_dir.name, "overrides": overrides, "metrics": metrics, "run": job_name(job_dir, overrides)}
        )
    jobs.sort(key=lambda j: (not j["job"].isdigit(), int(j["job"]) if j["job"].isdigit() else j["job"]))
    return jobs


def read_mapping(path: Path) -> dict[str, Any]:
    """A YAML file of the sweep dir as a mapping; {} when it is missing, not YAML or not a mapping (a report is
    written from whatever else is there)."""
    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, yaml.YAMLError):
        return {}
    return tree if isinstance(tree, dict) else {}


def objective(sweep_dir: Path, jobs: list[dict[str, Any]]) -> tuple[str, str]:
    """The optimized metric and its direction, from the multirun's config (Optuna's direction when it ran)."""
    config = read_mapping(sweep_dir / "multirun.yaml")
    metric = str(config.get("optimized_metric") or "val/acc_best")
    hydra = config.get("hydra") if isinstance(config.get("hydra"), dict) else {}
    direction = (hydra.get("sweeper") if isinstance(hydra.get("sweeper"), dict) else {}).get("direction")
    if not isinstance(direction, str):
        direction = "minimize" if "loss" in metric else "maximize"
    return metric, direction


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def build_table(
    jobs: list[dict[str, Any]], metric: str, direction: str
) -> tuple[list[str], list[str], list[list[Any]]]:
    """The swept keys (overrides that differ between jobs), the metric names, and rows best first.

    A row is the job, its TensorBoard run's name (if it has one), its trial number and state (Optuna sweeps only),
    the swept values, then the metrics."""
    keys = sorted({k for j in jobs for k in j["overrides"]})
    swept = [k for k in keys if len({j["overrides"].get(k) for j in jobs}) > 1]
    # Not results: the step counters, and LearningRateMonitor's last value of the schedule (`lr-Adam`, ~0 after
    # a one-cycle schedule); a metric no job has a number for would be an empty column.
    found = {m for j in jobs for m, v in j["metrics"].items() if isinstance(v, (int, float))}
    found -= {"epoch", "global_step", *(m for m in found if m.startswith("lr-"))}
    metrics = [metric] + [m for m in METRIC_ORDER if m in found and m != metric]
    metrics += sorted(found - set(metrics))
    sign = -1.0 if direction == "maximize" else 1.0

    def rank(job: dict[str, Any]) -> tuple[bool, float]:
        value = job["metrics"].get(metric)
        return value is None, sign * value if value is not None else 0.0

    trials = any("state" in j for j in jobs)  # an Optuna sweep: each job's trial number and state
    named = any(j.get("run") for j in jobs)  # the name of its TensorBoard run (lr=2.42e-4,bs=128)
    rows = [[j["job"], *([j.get("run")] if named else []), *([j.get("trial"), j.get("state")] if trials else []),
             *(j["overrides"].get(k, "") for k in swept), *(j["metrics"].get(m) for m in metrics)]
            for j in sorted(jobs, key=rank)]  # fmt: skip
    return swept, metrics, rows


def plot(path: Path, jobs: list[dict[str, Any]], swept: list[str], metric: str) -> Figure:
    """One panel per swept parameter: the metric of each job against that parameter's value. Numbers are on a
    numeric axis, logarithmic when they span more than a decade (learning rates), labelled with 3 significant
    digits; other values get one slot each. Drawn on a matplotlib `Figure` (no pyplot: the caller's backend stays),
    which it returns."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullLocator

    panels = max(len(swept), 1)
    fig = Figure(figsize=(4.5 * panels, 3.6), dpi=100)
    axes = fig.subplots(1, panels, squeeze=False)
    done = [j for j in jobs if j["metrics"].get(metric) is not None]
    ys = [j["metrics"][metric] for j in done]
    for ax, key in zip(axes[0], swept or ["job"], strict=False):
        raw = [j["job"] if key == "job" else j["overrides"].get(key, "") for j in done]
        numbers = [_number(r) for r in raw]
        if key != "job" and raw and all(n is not None for n in numbers):
            ax.scatter(numbers, ys)
            distinct = sorted(set(numbers))
            if distinct[0] > 0 and distinct[-1] / distinct[0] > 10:
                ax.set_xscale("log")
            if len(distinct) <= 6 and _well_apart(distinct, ax.get_xscale() == "log"):
                ax.set_xticks(distinct)  # a grid or a few trials: a tick at each value tried
                ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: short_value(x)))
        else:  # categories (or job numbers): one evenly spaced slot per value, labelled as typed
            labels = list(dict.fromkeys(raw))
            ax.scatter([labels.index(r) for r in raw], ys)
            ax.set_xticks(range(len(labels)), [short_value(v) for v in labels], rotation=20 if len(labels) > 4 else 0)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{metric} per job ({len(jobs)} jobs)")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def _well_apart(values: list[float], log: bool) -> bool:
    """Whether tick labels at `values` would not overlap: neighbours at least a tenth of the axis apart."""
    points = [math.log10(v) for v in values] if log else values
    span = points[-1] - points[0]
    return span == 0 or all(b - a > span / 10 for a, b in zip(points, points[1:], strict=False))


def _cell(value: Any) -> str:
    """A table cell: metrics (floats) to 4 decimals, swept values to 3 significant digits."""
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else short_value(value)


def load_study(sweep_dir: Path) -> Any | None:
    """The Optuna study named in the sweep's `optimization_results.yaml`; None if there is none or it is unreadable."""
    results = read_mapping(sweep_dir / "optimization_results.yaml")
    if not results.get("storage") or not results.get("study_name"):
        return None
    storage, name = str(results["storage"]), str(results["study_name"])
    try:
        import optuna

        # Read only: the storage is named by a file of the sweep dir, so nothing is created there (no file, dir or
        # table: a crafted one could name another program's database).
        if "://" not in storage or storage.startswith("sqlite:///"):
            file = Path(storage.removeprefix("sqlite:///")).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"no such file {file}")
        if "://" not in storage:
            opened = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(file)))
        else:
            opened = optuna.storages.RDBStorage(storage, skip_table_creation=True)
        return optuna.load_study(study_name=name, storage=opened)
    except Exception as e:  # the report still has the jobs' own files
        log.warning(f"Optuna study {name!r} in {storage} not read: {type(e).__name__}: {e}")
        return None


def attach_trials(study: Any, sweep_dir: Path, jobs: list[dict[str, Any]]) -> None:
    """Add each job's Optuna trial number and state (`PRUNED at epoch 1 (0.9531)`: its last reported value),
    matched by the sweep dir and job number the sweeper stored with the trial."""
    here = str(sweep_dir.resolve())
    trials = {str(t.user_attrs.get("job")): t for t in study.get_trials(deepcopy=False)
              if t.user_attrs.get("sweep_dir") == here}  # fmt: skip
    for job in jobs:
        trial = trials.get(job["job"])
        if trial is not None:
            state = trial.state.name
            if state == "PRUNED" and trial.last_step is not None:
                state += f" at epoch {trial.last_step} ({trial.intermediate_values[trial.last_step]:.4f})"
            job.update(trial=trial.number, state=state)


OPTUNA_VIEWS = {  # file -> optuna.visualization.matplotlib function
    "optuna_history.png": "plot_optimization_history",
    "optuna_intermediate.png": "plot_intermediate_values",  # val/acc per epoch of every trial: where pruning cut
    "optuna_importances.png": "plot_param_importances",
    "optuna_parallel.png": "plot_parallel_coordinate",
}


def plot_study(study: Any, sweep_dir: Path) -> list[str]:
    """Optuna's views of the whole study as PNGs in `sweep_dir`; returns the files written (a view that cannot be
    drawn yet, e.g. importances before two trials complete, is a warning). Optuna draws with pyplot: each figure is
    closed once saved, and the backend is left as it is (headless, matplotlib picks Agg by itself)."""
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as views

    written = []
    for name, function in OPTUNA_VIEWS.items():
        try:
            with warnings.catch_warnings(), matplotlib.rc_context():  # Optuna switches the style to ggplot
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                axes = getattr(views, function)(study)
            fig = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            save_figure(fig, sweep_dir / name)
            plt.close(fig)
            written.append(name)
        except Exception as e:
            log.warning(f"No {name}: {type(e).__name__}: {e}")
    return written


FOLD_METRICS = ["val/acc_best", "test/acc"]


def fold_summary(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A k-fold multirun's jobs grouped by setting (their overrides other than `data.fold`): the folds each ran and,
    per metric of FOLD_METRICS, (mean, sample sd, n) over the folds that have it. Empty unless `data.fold` varies."""
    if len({j["overrides"].get("data.fold") for j in jobs}) < 2:
        return []
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault(tuple(sorted((k, v) for k, v in job["overrides"].items() if k != "data.fold")), []).append(
            job
        )
    summary = []
    for setting, members in groups.items():
        row: dict[str, Any] = {
            "setting": dict(setting),
            "folds": [j["overrides"].get("data.fold", "") for j in members],
        }
        for metric in FOLD_METRICS:
            values = [j["metrics"][metric] for j in members if isinstance(j["metrics"].get(metric), (int, float))]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            row[metric] = (statistics.mean(values), sd, len(values)) if values else None
        summary.append(row)
    return summary


def _mean_sd(value: tuple[float, float, int] | None) -> str:
    return "" if value is None else f"{value[0]:.4f} ± {value[1]:.4f} (n={value[2]})"


def fold_lines(summary: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """The k-fold section of the markdown report; also writes `sweep_report_folds.csv`."""
    keys = sorted({k for row in summary for k in row["setting"]})
    varying = [k for k in keys if len({row["setting"].get(k) for row in summary}) > 1]
    header = [*varying, "folds", *(f"{m} mean ± sd" for m in FOLD_METRICS)]
    lines = ["", "## Cross-validation: mean ± sample sd over the folds", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    table = io.StringIO(newline="")
    out = csv.writer(table)
    out.writerow([*varying, "folds", *(f"{m} {s}" for m in FOLD_METRICS for s in ("mean", "sd", "n"))])
    for row in summary:
        folds = ",".join(sorted(row["folds"], key=lambda v: _number(v) or 0.0))
        cells = [row["setting"].get(k, "") for k in varying]
        lines.append("| " + " | ".join([*cells, folds, *(_mean_sd(row[m]) for m in FOLD_METRICS)]) + " |")
        out.writerow([*cells, folds, *(v for m in FOLD_METRICS for v in (row[m] or ("", "", 0)))])
    write_file(sweep_dir / "sweep_report_folds.csv", table.getvalue().encode())
    return lines


class ReportError(UserError):
    """A path that is not a multirun dir; one line saying what it is and what to pass."""


def check_sweep_dir(path: Path) -> None:
    """Raise a one-line ReportError unless `path` is a directory that could hold a multirun's job dirs."""
    hint = "pass a multirun dir, e.g. logs/train/multiruns/<time>"
    if not path.exists():
        raise ReportError(f"{path}: no such directory; {hint}")
    if not path.is_dir():
        raise ReportError(f"{path}: a file, not a directory; {hint}")
    if (path / ".hydra").is_dir():  # a run dir, or one job of a sweep (its parent is the multirun dir)
        in_sweep = (path.parent / "multirun.yaml").is_file() or path.parent.parent.name == "multiruns"
        parent = f"its multirun dir {path.parent}" if in_sweep else "a multirun dir"
        raise ReportError(f"{path}: one run's dir, not a multirun's; pass {parent}")


def write_file(path: Path, data: bytes) -> None:
    """Replace `path` atomically: a reader never sees half a report, and a planted link is replaced, not followed."""
    with atomic_open(path) as f:
        f.write(data)


def save_figure(fig: Any, path: Path) -> None:
    """`fig.savefig` as PNG, written like `write_file`."""
    image = io.BytesIO()
    fig.savefig(image, dpi=100, format="png")
    write_file(path, image.getvalue())


def write_report(sweep_dir: str | Path) -> Path:
    """Write sweep_report.{md,csv,png} (and the Optuna views, the fold summary) into `sweep_dir`; return the .md."""
    sweep_dir = Path(sweep_dir)
    check_sweep_dir(sweep_dir)
    jobs = read_jobs(sweep_dir)
    if not jobs:
        raise ReportError(f"{sweep_dir}: no job dirs (*/.hydra/overrides.yaml); pass a multirun dir")
    study = load_study(sweep_dir)
    if study is not None:
        attach_trials(study, sweep_dir, jobs)
    metric, direction = objective(sweep_dir, jobs)
    swept, metrics, rows = build_table(jobs, metric, direction)
    header = ["job", *(["run"] if any(j.get("run") for j in jobs) else []),
              *(["trial", "state"] if any("state" in j for j in jobs) else []), *swept, *metrics]  # fmt: skip
    table = io.StringIO(newline="")
    csv.writer(table).writerows([header, *rows])
    write_file(sweep_dir / "sweep_report.csv", table.getvalue().encode())
    plot(sweep_dir / "sweep_report.png", jobs, swept, metric)

    lines = [f"# Sweep {sweep_dir}", "", f"{len(jobs)} jobs, sorted by `{metric}` ({direction}).", ""]
    common = {k: v for k, v in jobs[0]["overrides"].items() if k not in swept}
    if common:
        lines += ["Common overrides: " + " ".join(f"`{k}={v}`" for k, v in common.items()), ""]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    failed = [j["job"] for j in jobs if not j["metrics"]]
    if failed:
        lines += ["", f"No metrics.json (failed or unfinished; pruned, in an Optuna sweep): jobs {', '.join(failed)}."]
    folds = fold_summary(jobs)
    if folds:
        lines += fold_lines(folds, sweep_dir)
    best_file = sweep_dir / "optimization_results.yaml"
    if best_file.is_file():
        best = read_mapping(best_file)
        lines += ["", f"Optuna's best parameters (`{best_file.name}`), value {best.get('best_value')}:", ""]
        params = best.get("best_params")
        lines += [f"- `{k}={v}`" for k, v in (params if isinstance(params, dict) else {}).items()]
    if study is not None:
        counts = {}
        for trial in study.get_trials(deepcopy=False):
            counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
        lines += ["", f"Study `{study.study_name}`, all {sum(counts.values())} trials of every command and worker "
                  f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))}); live: "
                  f"`optuna-dashboard {best.get('storage')}`", ""]  # fmt: skip
        lines += [f"![{name}]({name})" for name in plot_study(study, sweep_dir)]
    lines += ["", "![metric per parameter](sweep_report.png)", ""]
    report = sweep_dir / "sweep_report.md"
    write_file(report, "\n".join(lines).encode())
    return report


class SweepReport(Callback):
    """Hydra callback: write the sweep report when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write sweep_report.{md,csv,png} into the sweep dir; a failure is only a warning."""
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            log.info(f"Sweep report: {write_report(sweep_dir)}")
        except Exception as e:  # a report must never turn a finished sweep into a failed one
            log.warning(f"No sweep report for {sweep_dir}: {type(e).__name__}: {e}")


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad command line as one `error:` line (a ReportError) instead of usage and an error."""

    def error(self, message: str) -> NoReturn:
        """Raise the message as a ReportError, naming --help."""
        raise ReportError(f"{message}; see python -m digit_lightning.sweep_report --help")


def main(argv: list[str] | None = None) -> int:
    """`python -m digit_lightning.sweep_report <multirun dir>`: write the report and print where it is; 2 on a bad
    path (one `error:` line)."""
    parser = _Parser(prog="python -m digit_lightning.sweep_report", description=__doc__.split("\n\n", 1)[1],
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Exit status: 0 written; 2 not a multirun dir or a bad command line")  # fmt: skip
    parser.add_argument(
        "sweep_dir", metavar="<multirun dir>", help="a multirun's dir: logs/<task_name>/multiruns/<time>"
    )
    try:
        report = write_report(parser.parse_args(sys.argv[1:] if argv is None else argv).sweep_dir)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(report.read_text())
    print(f"Wrote {report}, {report.with_suffix('.csv')} and {report.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
