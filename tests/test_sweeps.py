"""Sweeps: the sweep report, and a real joblib multirun on a small slice (Optuna: test_optuna.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from digit_lightning.cli import CONFIG_DIR
from digit_lightning.sweep_report import main as report_main
from digit_lightning.sweep_report import read_jobs, write_report

# A tiny real slice per job: 20 batches of training, 5 of validation, no test.
TINY = ["trainer=cpu", "test=false", "trainer.max_epochs=1", "+trainer.limit_train_batches=20",
        "+trainer.limit_val_batches=5"]  # fmt: skip


def compose_with_hydra(*overrides: str):
    """Compose conf/train.yaml including the `hydra` node, as the CLI sees it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_joblib_launcher_composes():
    cfg = compose_with_hydra("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


def fake_sweep(root: Path, jobs: list[tuple[list[str], dict | None]], direction: str | None = None) -> Path:
    """A multirun dir as Hydra and train.py leave it: multirun.yaml, then per job overrides and metrics.json."""
    root.mkdir(parents=True)
    hydra = {"sweeper": {"direction": direction}} if direction else {}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/acc_best", "hydra": hydra}))
    for number, (overrides, metrics) in enumerate(jobs):
        (root / str(number) / ".hydra").mkdir(parents=True)
        (root / str(number) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
        if metrics is not None:
            (root / str(number) / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_report_ranks_jobs_by_the_optimized_metric(tmp_path: Path):
    sweep = fake_sweep(
        tmp_path / "sweep",
        [
            (
                ["model.optimizer.lr=0.001", "data.batch_size=16", "trainer=cpu"],
                {"val/acc_best": 0.91, "val/loss": 0.3},
            ),
            (["model.optimizer.lr=0.01", "data.batch_size=16", "trainer=cpu"], {"val/acc_best": 0.95, "val/loss": 0.2}),
            (["model.optimizer.lr=0.0001", "data.batch_size=128", "trainer=cpu"], None),  # a failed job
            (["model.optimizer.lr=0.0003", "data.batch_size=128", "trainer=cpu"], {"val/acc_best": 0.93}),
        ],
    )
    report = write_report(sweep)
    rows = list(csv.reader((sweep / "sweep_report.csv").open()))
    assert rows[0] == ["job", "data.batch_size", "model.optimizer.lr", "val/acc_best", "val/loss"]
    assert [r[0] for r in rows[1:]] == ["1", "3", "0", "2"]  # best first, the failed job last
    assert rows[1][1:4] == ["16", "0.01", "0.95"]
    text = report.read_text()
    assert "sorted by `val/acc_best` (maximize)" in text and "`trainer=cpu`" in text  # a common override
    assert "failed or unfinished; pruned, in an Optuna sweep): jobs 2" in text
    assert (sweep / "sweep_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_follows_the_sweepers_direction(tmp_path: Path):
    sweep = fake_sweep(
        tmp_path / "sweep", [(["seed=1"], {"val/acc_best": 0.9}), (["seed=2"], {"val/acc_best": 0.8})], "minimize"
    )
    write_report(sweep)
    assert [r[0] for r in list(csv.reader((sweep / "sweep_report.csv").open()))[1:]] == ["1", "0"]


def test_report_of_a_small_search_is_readable(tmp_path: Path):
    """3 Optuna-like trials: lr (a decade and more apart) on a log axis with a tick per value, 3 significant digits
    in the table and on the axis, no `lr-Adam` column (the schedule's last value, ~0), no column without values."""
    lrs = ["0.00024156772025296256", "0.0082466717327", "0.001014299778430435"]
    sweep = fake_sweep(tmp_path / "sweep", [
        ([f"model.optimizer.lr={lr}", f"data.batch_size={bs}"], {"val/acc_best": acc, "lr-Adam": 4e-9, "train/x": None})
        for lr, bs, acc in zip(lrs, ["128", "32", "128"], [0.91, 0.95, 0.93], strict=True)
    ])  # fmt: skip
    text = write_report(sweep).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| job"))
    assert header == "| job | data.batch_size | model.optimizer.lr | val/acc_best |", header
    assert "| 1 | 32 | 8.25e-3 | 0.9500 |" in text and "| 0 | 128 | 2.42e-4 | 0.9100 |" in text
    assert "0.000241" not in text
    rows = list(csv.reader((sweep / "sweep_report.csv").open()))  # the CSV keeps the values as typed
    assert rows[1][2] == lrs[1]

    from digit_lightning.sweep_report import build_table, plot

    swept, _, _ = build_table(read_jobs(sweep), "val/acc_best", "maximize")
    fig = plot(tmp_path / "p.png", read_jobs(sweep), swept, "val/acc_best")
    bs_axis, lr_axis = fig.axes
    assert lr_axis.get_xscale() == "log" and bs_axis.get_xscale() == "linear"  # 32..128: under a decade
    assert sorted(lr_axis.get_xticks()) == sorted(float(v) for v in lrs)
    fig.canvas.draw()
    assert [t.get_text() for t in lr_axis.get_xticklabels()] == ["2.42e-4", "1.01e-3", "8.25e-3"]


def test_report_leaves_the_matplotlib_backend_alone(tmp_path: Path):
    """A notebook's backend (here: svg) is the same after a report: no matplotlib.use() in library code."""
    import matplotlib

    sweep = fake_sweep(tmp_path / "sweep", [(["seed=1"], {"val/acc_best": 0.9}), (["seed=2"], {"val/acc_best": 0.8})])
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        write_report(sweep)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


@pytest.mark.parametrize(
    ("broken", "content"),
    [("0/.hydra/overrides.yaml", "- model.optimizer.lr=0.01\n- [unclosed\n"),
     ("0/.hydra/overrides.yaml", "just a string\n"),
     ("0/metrics.json", '{"val/acc_best": 0.97, "val/lo'),
     ("0/metrics.json", "[0.97]")],
    ids=["overrides not yaml", "overrides not a list", "metrics truncated", "metrics not a mapping"],
)  # fmt: skip
def test_report_skips_a_job_it_cannot_read_with_a_warning(tmp_path: Path, caplog, broken: str, content: str):
    jobs = [(["seed=1"], {"val/acc_best": 0.9}), (["seed=2"], {"val/acc_best": 0.8}), (["seed=3"], None)]
    sweep = fake_sweep(tmp_path / "sweep", jobs)
    (sweep / broken).write_text(content)  # e.g. a job killed while its file was written by hand or a tool
    with caplog.at_level("WARNING", logger="digit_lightning.sweep_report"):
        report = write_report(sweep)
    rows = list(csv.reader((sweep / "sweep_report.csv").open()))
    assert [r[0] for r in rows[1:]] == ["1", "2"]  # the others, the failed job 2 included, are still reported
    assert "jobs 2" in report.read_text() and "2 jobs" in report.read_text()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"Sweep report: skipping job 0: {sweep / broken} cannot be read ("), warnings


def test_report_cli_rejects_a_dir_without_jobs(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert report_main([str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path}: no job dirs (*/.hydra/overrides.yaml); pass a multirun dir"
    )


@pytest.mark.slow
def test_joblib_multirun_runs_jobs_in_parallel_and_reports(run_cli, tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "digit_lightning.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "task_name=lr_sweep",
        "model.optimizer.lr=0.003,0.0001", "data.batch_size=64", *TINY, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert 0.1 < metrics["val/acc_best"] <= 1.0
        assert list((sweep / job / "tensorboard").rglob("events.out.tfevents.*"))  # in a dir named by the job
    rows = list(csv.reader((sweep / "sweep_report.csv").open()))
    assert rows[0][:4] == ["job", "run", "model.optimizer.lr", "val/acc_best"]  # run: the job's TensorBoard run
    assert sorted(r[1] for r in rows[1:]) == ["lr=1e-4", "lr=3e-3"]
    assert [float(r[3]) for r in rows[1:]] == sorted((float(r[3]) for r in rows[1:]), reverse=True)
    assert (sweep / "sweep_report.png").is_file()
