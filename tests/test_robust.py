"""Bad input and bad luck, in every entry point: one `error:` line with exit status 2, or it works; no work lost.

Disk full and read-only directories are real: a 2 MB tmpfs, and a tmpfs mounted read-only (root ignores file modes).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf

from digit_lightning import cli
from digit_lightning.checkpoint import CheckpointError, load_checkpoint
from digit_lightning.cli import EXIT_USER_ERROR, compose_config
from digit_lightning.config import ConfigError, validate_config
from digit_lightning.data.__main__ import main as data_main
from digit_lightning.export import ExportError, export, export_onnx
from digit_lightning.models import ModelError, build_net
from digit_lightning.module import DigitClassifier
from digit_lightning.predict import predict
from digit_lightning.study import StorageError, open_storage
from digit_lightning.sweep_report import main as report_main
from digit_lightning.train import summary, train

ROOT = Path(__file__).resolve().parent.parent
TINY = ["trainer=cpu", "data.batch_size=64", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
        "+trainer.limit_test_batches=3", "trainer.max_epochs=1", "callbacks.progress_bar=null"]  # fmt: skip


def one_line(result: subprocess.CompletedProcess) -> str:
    """The `error:` line of a failed CLI run, after checking it is the only thing on stderr and the status is 2."""
    assert result.returncode == EXIT_USER_ERROR, (result.returncode, result.stderr[-3000:])
    assert len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stdout, result.stderr
    return result.stderr.strip()


def tiny_checkpoint(path: Path, net: dict) -> Path:
    """A checkpoint file as load_checkpoint reads it (a Digit net's untrained weights), naming `net`."""
    model = DigitClassifier(net={"name": "digit"})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"net": net}}, path)
    return path


# --- item 7: tracebacks where one line belongs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5: must be a whole number >= 0 (-1: no limit), or null"),
        ("trainer.max_epochs=abc", "trainer.max_epochs=abc: must be a whole number >= 0 (-1: no limit), or null"),
        ("ckpt_path=[a.ckpt,b.ckpt]", "ckpt_path=[a.ckpt,b.ckpt]: a training resumes one run; pass one checkpoint"),
        ("data.fold=7", "data.fold=7: folds need data.num_folds (e.g. data.num_folds=10)"),  # item 8: was ignored
    ],
)
def test_more_bad_train_settings_are_one_config_error(override: str, message: str):
    with pytest.raises(ConfigError) as err:
        validate_config(compose_config([override]))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_list_of_checkpoints_does_not_break_the_run_dir_of_a_training():
    """`'ckpt_path=[a.ckpt,b.ckpt]'` reached the resolver of hydra.run.dir, a TypeError before any check of ours;
    the resume plan made before Hydra starts plans nothing for it (validate_config refuses it in one line)."""
    from digit_lightning.runs import Plan, plan_resume

    listed = OmegaConf.create({"c": ["a.ckpt", "b.ckpt"]}).c
    assert plan_resume(listed, "logs") == Plan() and Plan().hydra_overrides() == []


@pytest.mark.parametrize(
    ("net", "message"),
    [
        ({"name": "fast", "hidden": 10**13}, "model.net.hidden=10000000000000: out of range for fast"),
        ({"name": "fast", "channels1": -3}, "model.net.channels1=-3: out of range for fast"),
        ({"name": "strong", "dropout": float("nan")}, "model.net.dropout=nan: out of range for strong"),
        ({"name": "strong", "dropout": 2.0}, "model.net of strong: dropout probability has to be between 0 and 1"),
    ],
)
def test_net_arguments_are_bounded_in_configs_and_checkpoints(tmp_path: Path, net: dict, message: str):
    """hidden=10**13 in a checkpoint tried to allocate 32 PB; negative sizes gave torch's traceback."""
    with pytest.raises(ModelError) as err:
        build_net(**net)
    assert str(err.value).startswith(message), err.value
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tiny_checkpoint(tmp_path / "crafted.ckpt", net))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_export_to_an_impossible_path_is_one_line(tmp_path: Path):
    ckpt = tiny_checkpoint(tmp_path / "digit.ckpt", {"name": "digit"})
    cfg = compose_config([f"ckpt_path={ckpt}", "output=/proc/nope/x.onnx"], "export")
    with pytest.raises(ExportError, match=r"^output=/proc/nope/x.onnx: cannot write it \(.*\); pass a writable path$"):
        export(cfg)


def test_a_corrupt_optuna_database_is_one_line(tmp_path: Path):
    """Random bytes, and an SQLite header followed by zeros: both were SQLAlchemy tracebacks."""
    pytest.importorskip("optuna")
    noise, header = tmp_path / "noise.db", tmp_path / "header.db"
    noise.write_bytes(os.urandom(8192))
    header.write_bytes(b"SQLite format 3\x00" + bytes(8176))
    for db in (noise, header):
        with pytest.raises(StorageError) as err:
            open_storage(f"sqlite:///{db}")
        assert str(err.value) == (f"hydra.sweeper.storage=sqlite:///{db}: not an Optuna database (file is not a "
                                  "database); move that file away or name another storage")  # fmt: skip


def test_lightning_configuration_errors_are_one_config_error(make_cfg):
    """Issue 26.2: 0.1 of 5 validation batches is no batch; Lightning's MisconfigurationException was a traceback."""
    cfg = make_cfg(*TINY[1:3], "+trainer.limit_val_batches=0.1", "logger=none")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    line = str(err.value)
    assert line.startswith("trainer: You requested to check 0.1 of the `val_dataloader` but 0.1 * 5 < 1"), line
    assert line.endswith("or pass a whole number of batches instead, e.g. +trainer.limit_val_batches=1"), line


def test_the_documented_20_trial_search_limits_work(make_cfg):
    """docs/sweeps.md's measured search: its limit_* fractions (and eval batch size) make at least one batch each."""
    text = (ROOT / "docs" / "sweeps.md").read_text()
    command = text[text.index("## Measured: a 20-trial search") :].split("```bash", 1)[1].split("```", 1)[0]
    wanted = [
        a for a in shlex.split(command.replace("\\\n", " ")) if re.match(r"\+trainer\.limit_|data\.eval_batch", a)
    ]
    assert len(wanted) == 4, wanted
    overrides = [a for a in wanted if "limit_train" not in a]  # 3% of the training split: 52 steps; 2 are enough
    metrics = train(make_cfg("+trainer.limit_train_batches=2", "trainer.max_epochs=1", "logger=none", *overrides))
    assert {"val/acc_best", "test/acc"} <= set(metrics)


# --- disk full, read-only dirs (real mounts: root ignores file modes) --------------------------------------------


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A small tmpfs at `path` (`options`: e.g. size=2m, or size=2m,ro), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_names_the_file_it_could_not_write(synthetic_cfg, tmp_path: Path):
    """torch's zip writer turned ENOSPC into `RuntimeError: unexpected pos`; now it is the OSError, with the file."""
    with tmpfs(tmp_path / "full", "size=2m") as full:
        with pytest.raises(OSError) as err:
            train(synthetic_cfg(*TINY, "logger=none", f"paths.output_dir={full}/run"))
        assert err.value.errno == errno.ENOSPC and err.value.filename.startswith(f"{full}/run/checkpoints/")
        assert not list((full / "run" / "checkpoints").iterdir())  # no half-written checkpoint, no temp file
    line = cli.disk_error(err.value)
    assert line.startswith(f"{err.value.filename}: No space left on device; free some space or write elsewhere")


def test_a_file_where_a_run_makes_a_dir_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture):
    """The third attack review: a sweep dir whose job dir `0` is a file made Hydra's mkdir raise FileExistsError."""
    (tmp_path / "0").write_text("x")
    for make in (lambda: (tmp_path / "0").mkdir(), lambda: (tmp_path / "0" / "run").mkdir(parents=True)):
        with pytest.raises(SystemExit) as stop, cli.exit_on_user_error():
            make()
        assert stop.value.code == EXIT_USER_ERROR
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {tmp_path / '0'}") and "a file is where a directory must go; remove it" in line


@pytest.mark.slow
def test_cli_on_a_full_or_read_only_disk_is_one_line(run_cli, tmp_path: Path, mnist_dir: Path):
    """train into a 2 MB tmpfs; train and eval into a read-only mount, as a run dir and as the log dir."""
    ckpt = tiny_checkpoint(tmp_path / "digit.ckpt", {"name": "digit"})
    with tmpfs(tmp_path / "full", "size=2m") as full, tmpfs(tmp_path / "ro", "size=1m,ro") as ro:
        commands = {
            "full": ["digit_lightning.train", *TINY, f"hydra.run.dir={full}/run"],
            "ro run dir": ["digit_lightning.train", *TINY, f"hydra.run.dir={ro}/run"],
            "ro log dir": ["digit_lightning.train", *TINY, f"paths.log_dir={ro}/logs"],
            "eval ro": ["digit_lightning.eval", f"ckpt_path={ckpt}", f"paths.log_dir={ro}/logs"],
        }
        with ThreadPoolExecutor(max_workers=2) as pool:
            runs = pool.map(lambda c: run_cli(*c, cwd=tmp_path), commands.values())
            results = dict(zip(commands, runs, strict=True))
    assert one_line(results["full"]).startswith(f"error: {full}/run/checkpoints/")
    assert "No space left on device; free some space or write elsewhere" in results["full"].stderr
    for name in ("ro run dir", "ro log dir", "eval ro"):
        assert "Read-only file system; write to a writable directory" in one_line(results[name]), name


# --- item 8: silently wrong ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "override", "message"),
    [
        ("predict", "+topk=5", "topk=5: no such setting; did you mean top_k?"),
        ("predict", "+foo=1", "foo=1: no such setting; the top-level keys are: "),
        ("export", "+chek=false", "chek=false: no such setting; did you mean check?"),
    ],
)
def test_predict_and_export_refuse_misspelt_keys(tmp_path: Path, config: str, override: str, message: str):
    ckpt = tiny_checkpoint(tmp_path / "digit.ckpt", {"name": "digit"})
    cfg = compose_config([f"ckpt_path={ckpt}", "inputs=[x.png]", override] if config == "predict" else
                         [f"ckpt_path={ckpt}", override], config)  # fmt: skip
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        (predict if config == "predict" else export)(cfg)
    assert not list(tmp_path.glob("*.onnx"))


def test_export_refuses_an_opset_it_cannot_write(tmp_path: Path):
    """opset=99 printed a converter traceback, exited 0 and wrote opset 18."""
    pytest.importorskip("onnx")
    import onnx

    newest = onnx.defs.onnx_opset_version()
    with pytest.raises(
        ExportError, match=rf"^opset=99: newer than the installed onnx knows; pass opset=18 to {newest}$"
    ):
        export_onnx(build_net("digit").eval(), tmp_path / "x.onnx", 99)
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("opset", ["5", "abc"])
def test_export_refuses_an_opset_below_18_before_loading_anything(tmp_path: Path, opset: str):
    """The in-process twin of the export lines of tests/test_config_errors.py (CLI runs, `-m slow`)."""
    cfg = compose_config(["ckpt_path=missing.ckpt", f"opset={opset}", f"output={tmp_path}/x.onnx"], "export")
    with pytest.raises(ExportError) as err:
        export(cfg)
    assert str(err.value) == f"opset={opset} must be a whole number >= 18 (torch's ONNX exporter's oldest)"
    assert list(tmp_path.iterdir()) == []


def test_data_refuses_an_override_as_its_directory(tmp_path: Path, monkeypatch, capsys):
    """`python -m digit_lightning.data paths.data_dir=/x` made a folder named `paths.data_dir=` and downloaded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["digit_lightning.data", "paths.data_dir=/x"])
    with pytest.raises(SystemExit) as exit_:
        data_main()
    assert exit_.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == ("error: paths.data_dir=/x: this command takes a directory, not a key=value "
                                       "override; write python -m digit_lightning.data /x\n")  # fmt: skip
    assert not list(tmp_path.iterdir())


def test_a_study_name_that_would_break_its_storage_url_is_refused():
    """`?` and `#` cut the SQLite URL: the study went to a file named after what came before them."""
    pytest.importorskip("optuna")
    from hydra_plugins.digit_lightning_optuna.optuna_sweeper import OptunaSweeper, UserError

    args = dict(sampler={}, pruner={}, direction="maximize", storage="sqlite:///x.db", n_trials=1, n_jobs=1,
                params=None, heartbeat_interval=60, retries=1)  # fmt: skip
    with pytest.raises(UserError, match=r"^hydra.sweeper.study_name=we ird\?x#1: use letters, digits"):
        OptunaSweeper(study_name="we ird?x#1", **args)
    OptunaSweeper(study_name="mnist_optuna-2.b", **args)


# --- item 9: lost work ---------------------------------------------------------------------------------------------


class SigtermInTest(L.Callback):
    """Sends its own process SIGTERM in the final test's first batch, as a scheduler's time limit may."""

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_the_final_test_says_so_and_resumes_to_the_full_metrics(synthetic_cfg, tmp_path, caplog):
    run = tmp_path / "run"
    # Test batches of 100: the synthetic test set's 300 images are 3 batches, so the test goes on after the signal.
    overrides = [*TINY, "logger=none", f"paths.output_dir={run}", "data.eval_batch_size=100"]
    with caplog.at_level("WARNING"), pytest.raises(SIGTERMException):
        train(synthetic_cfg(*overrides, "+callbacks.sigterm._target_=test_robust.SigtermInTest"))
    hints = [r.getMessage() for r in caplog.records if "during the final test" in r.getMessage()]
    assert hints == [f"Interrupted by SIGTERM during the final test; the training itself had finished. To test it: "
                     f"python -m digit_lightning.train ckpt_path={run}"]  # fmt: skip
    fitted = json.loads((run / "metrics.json").read_text())
    assert "val/acc_best" in fitted and not any(k.startswith("test/") for k in fitted)

    resumed = train(synthetic_cfg(*overrides, f"ckpt_path={run}"))
    final = json.loads((run / "metrics.json").read_text())
    assert final["val/acc_best"] == fitted["val/acc_best"] == resumed["val/acc_best"]  # the sweep's metric
    assert {"test/acc", "test/loss"} <= set(final) and final["global_step"] == fitted["global_step"] == 3


def test_sweep_report_follows_the_cli_rules(tmp_path: Path, capsys):
    """Missing, a file, a run dir, an empty dir: one line, status 2 (was 1 or a traceback); a real --help."""
    file, empty, run = tmp_path / "file.txt", tmp_path / "empty", tmp_path / "multiruns" / "t" / "0"
    file.write_text("x")
    empty.mkdir()
    (run / ".hydra").mkdir(parents=True)
    cases = {
        tmp_path / "nope": "no such directory; pass a multirun dir, e.g. logs/train/multiruns/<time>",
        file: "a file, not a directory; pass a multirun dir, e.g. logs/train/multiruns/<time>",
        run: f"one run's dir, not a multirun's; pass its multirun dir {run.parent}",
        empty: "no job dirs (*/.hydra/overrides.yaml); pass a multirun dir",
    }
    for path, message in cases.items():
        assert report_main([str(path)]) == EXIT_USER_ERROR
        assert capsys.readouterr().err == f"error: {path}: {message}\n"
    assert report_main([]) == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: the following arguments are required: <multirun dir>; see ")
    with pytest.raises(SystemExit) as exit_:
        report_main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "sweep_report.md" in help_text and "<multirun dir>" in help_text and "Exit status" in help_text


# --- issue 26.10: the run's summary line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.max_epochs=1"], "with Adam lr=0.001 (OneCycleLR), batch size 16, 1 epoch, seed 42"),
        (["model.optimizer.lr=0.001014299778430435"], "lr=0.00101 (OneCycleLR), batch size 16, 10 epochs,"),
        (["debug=fdr"], "batch size 16, fast_dev_run: 1 batch of train, val and test, seed 42"),
    ],
)
def test_the_run_summary_reads_well(tmp_path: Path, overrides: list[str], expected: str):
    line = summary(compose_config([f"paths.output_dir={tmp_path}", *overrides]))
    assert expected in line, line


# --- the same through the real CLI: one line on stderr, status 2 -------------------------------------------------

CLI_CASES = {
    "train list": (["digit_lightning.train", "ckpt_path=[a.ckpt,b.ckpt]"], "error: ckpt_path=[a.ckpt,b.ckpt]: a "),
    "train 1.5": (["digit_lightning.train", "trainer.max_epochs=1.5"], "error: trainer.max_epochs=1.5: must be a "),
    "train fraction": (["digit_lightning.train", *TINY[:3], "+trainer.limit_val_batches=0.1", "logger=none"],
                       "error: trainer: You requested to check 0.1 of the `val_dataloader`"),
    "predict +topk": (["digit_lightning.predict", "ckpt_path=x.ckpt", "inputs=[x.png]", "+topk=5"],
                      "error: topk=5: no such setting; did you mean top_k?"),
    "export opset": (["digit_lightning.export", "ckpt_path=digit.ckpt", "opset=99"], "error: opset=99: newer than"),
    "data override": (["digit_lightning.data", "paths.data_dir=/x"], "error: paths.data_dir=/x: this command takes"),
}  # fmt: skip


@pytest.mark.slow  # every case through the real CLI (`python -m` starts take seconds each)
def test_cli_says_each_in_one_line(run_cli, tmp_path: Path):
    cases = list(CLI_CASES)
    tiny_checkpoint(tmp_path / "digit.ckpt", {"name": "digit"})
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda name: run_cli(*CLI_CASES[name][0], cwd=tmp_path), cases))
    for name, result in zip(cases, results, strict=True):
        assert one_line(result).startswith(CLI_CASES[name][1]), (name, result.stderr)


# --- Optuna workers: distinct dirs, no trial left RUNNING ----------------------------------------------------------

SEARCH = ["digit_lightning.train", "hparams_search=mnist_optuna", *TINY, "logger=none", "hydra.sweeper.n_trials=1"]


def stored_trials(cwd: Path) -> list:
    """The default study of the sweeps run in `cwd`."""
    import optuna

    return optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{cwd}/logs/optuna/mnist_optuna.db").trials


@pytest.mark.slow
def test_two_sweeps_started_in_the_same_second_get_distinct_dirs(run_cli, tmp_path: Path):
    """Two workers of one study whose sweep dirs come out the same (its name has seconds): both run, each in a dir of
    its own; before, one stopped with "another training is running in this run dir" and left its trial RUNNING."""
    pytest.importorskip("optuna")
    same = tmp_path / "multiruns" / "2026-01-01_00-00-00"
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: run_cli(*SEARCH, f"hydra.sweep.dir={same}", cwd=tmp_path), range(2)))
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    trials = stored_trials(tmp_path)
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE"]
    assert sorted(t.user_attrs["sweep_dir"] for t in trials) == [str(same), f"{same}_2"]
    for sweep in (same, Path(f"{same}_2")):
        assert (sweep / "0" / "metrics.json").is_file() and (sweep / "sweep_report.md").is_file()


@pytest.mark.slow
def test_a_sweep_stopped_by_a_user_error_leaves_no_trial_running(run_cli, tmp_path: Path):
    """A job's one-line error ends the sweep (every job would fail the same way); its trial is told FAIL."""
    pytest.importorskip("optuna")
    result = run_cli(*SEARCH, "model.optimizer.lr=choice(-1.0)", f"hydra.sweep.dir={tmp_path}/s", cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == ["error: model.optimizer.lr=-1.0: must be a finite number > 0"], result.stderr[-3000:]
    assert [t.state.name for t in stored_trials(tmp_path)] == ["FAIL"]


def test_a_single_value_or_a_later_sweep_of_a_key_is_not_searched_twice():
    """`choice(-1.0)` (one value) crashed Optuna's first trial with a KeyError; a plain `key=v` before a sweep of the
    same key stayed in every job's overrides after the sampled value, and won."""
    pytest.importorskip("optuna")
    from hydra_plugins.digit_lightning_optuna.optuna_sweeper import search_space

    space, fixed = search_space(
        ["data.batch_size=64", "data.batch_size=choice(32,64)", "model.optimizer.lr=choice(-1.0)"]
    )
    assert list(space) == ["data.batch_size"] and fixed == ["model.optimizer.lr=-1.0"]
