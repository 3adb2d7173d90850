"""The Optuna sweeper (hydra_plugins/digit_lightning_optuna) and its pruning callback, on Optuna >= 4.9.

Fast tests: the config, the search space, the callback reporting to a stored trial, the report of a stored study.
Slow tests: real `python -m digit_lightning.train hparams_search=mnist_optuna` commands on small slices, with the
default storage (logs/optuna/mnist_optuna.db under the command's directory): a second command extends the study and
a strict pruner prunes; a sweep killed mid-trial resumes; two commands at once are two workers of one study.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from digit_lightning.callbacks.pruning import OptunaPruning
from digit_lightning.cli import CONFIG_DIR
from digit_lightning.sweep_report import write_report
from hydra_plugins.digit_lightning_optuna.optuna_sweeper import distribution, search_space

# The brief's small real slice: 10 training batches of 64, 3 validation and 3 test batches, 2 epochs.
TINY = ["trainer=cpu", "+trainer.limit_train_batches=10", "+trainer.limit_val_batches=3",
        "+trainer.limit_test_batches=3", "data.batch_size=64", "trainer.max_epochs=2", "callbacks.progress_bar=null",
        "logger=none"]  # fmt: skip
SEARCH = ["digit_lightning.train", "hparams_search=mnist_optuna", *TINY]


def compose_with_hydra(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_optuna_search_composes():
    cfg = compose_with_hydra("hparams_search=mnist_optuna")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.digit_lightning_optuna.optuna_sweeper.OptunaSweeper"
    assert sweeper.storage == "sqlite:///./logs/optuna/mnist_optuna.db"  # persistent by default, under logs/
    assert (sweeper.study_name, sweeper.direction, sweeper.n_trials, sweeper.n_jobs) == (
        "mnist_optuna",
        "maximize",
        20,
        1,
    )
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 1234
    assert sweeper.pruner._target_ == "optuna.pruners.MedianPruner"
    assert set(sweeper.params) == {"model.optimizer.lr", "data.batch_size", "model.optimizer.weight_decay"}
    assert cfg.callbacks.optuna_pruning._target_ == "digit_lightning.callbacks.pruning.OptunaPruning"
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.task_name == "optuna"
    other = compose_with_hydra("hparams_search=mnist_optuna", "hydra/sweeper/pruner=hyperband",
                               "hydra/sweeper/sampler=random")  # fmt: skip
    assert other.hydra.sweeper.pruner == {"_target_": "optuna.pruners.HyperbandPruner"}  # no median-only keys
    assert other.hydra.sweeper.sampler == {"_target_": "optuna.samplers.RandomSampler", "seed": 1234}


def test_sweep_syntax_becomes_optuna_distributions():
    space, fixed = search_space([
        "model.optimizer.lr=tag(log, interval(0.0001, 0.01))", "data.batch_size=choice(32, 64, 128)",
        "trainer.max_epochs=range(1, 10, 4)", "model.optimizer.weight_decay=interval(0.0, 0.1)",
        "seed=7", "+trainer.limit_train_batches=5", "data.batch_size=64",  # a later plain value wins
    ])  # fmt: skip
    assert space == {
        "model.optimizer.lr": FloatDistribution(0.0001, 0.01, log=True),
        "trainer.max_epochs": IntDistribution(1, 9, step=4),  # range's stop is excluded: 1, 5, 9
        "model.optimizer.weight_decay": FloatDistribution(0.0, 0.1),
    }
    assert fixed == ["seed=7", "+trainer.limit_train_batches=5", "data.batch_size=64"]
    (choice,) = OverridesParser.create().parse_overrides(["data.batch_size=choice(32, 64, 128)"])
    assert distribution(choice) == CategoricalDistribution([32, 64, 128])


def test_pruning_callback_reports_to_a_stored_trial_and_prunes(tmp_path: Path):
    """The callback finds its trial by number in the storage, as a job in another process does."""
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.tell(study.ask(), 0.9)
    number = study.ask().number
    callback = OptunaPruning(storage, "s", number, optuna.pruners.ThresholdPruner(lower=0.5), monitor="val/acc")
    callback.on_fit_start(SimpleNamespace(_accelerator_connector=SimpleNamespace(is_distributed=False)), None)

    def epoch(value: float, step: int) -> None:
        trainer = SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": torch.tensor(value)}, loggers=[])
        callback.on_validation_end(trainer, SimpleNamespace(current_epoch=step))

    epoch(0.7, 0)  # above the threshold: reported, not pruned
    with pytest.raises(optuna.TrialPruned, match="epoch 1"):
        epoch(0.3, 1)
    stored = optuna.load_study(study_name="s", storage=storage).trials[number]
    assert stored.intermediate_values == pytest.approx({0: 0.7, 1: 0.3}) and stored.state == TrialState.RUNNING
    idle = instantiate(compose_with_hydra("hparams_search=mnist_optuna").callbacks.optuna_pruning)
    assert not idle.active  # not in a job of an Optuna sweep: nothing happens
    idle.on_validation_end(SimpleNamespace(sanity_checking=False, callback_metrics={"val/acc": torch.tensor(0.1)}),
                           SimpleNamespace(current_epoch=0))  # fmt: skip


OPEN_AT = """
import sys, time
import optuna
from digit_lightning.study import open_storage
while time.time() < float(sys.argv[2]):
    pass
storage = open_storage(sys.argv[1], heartbeat_interval=60)
print(optuna.create_study(storage=storage, study_name="s", load_if_exists=True).ask().number)
"""


@pytest.mark.slow  # seconds of imports per worker
def test_workers_starting_together_on_a_new_database_share_it(tmp_path: Path):
    """Without the retry in open_storage, 3 workers creating one SQLite file at once fail ("table already exists")."""
    for round in range(2):
        url, start = f"sqlite:///{tmp_path}/{round}.db", time.time() + 4
        workers = [subprocess.Popen([sys.executable, "-c", OPEN_AT, url, str(start)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(3)]  # fmt: skip
        results = [w.communicate(timeout=120) for w in workers]
        assert all(w.returncode == 0 for w in workers), [err[-1500:] for _, err in results]
        assert sorted(int(out) for out, _ in results) == [0, 1, 2]


def test_report_shows_trial_states_and_optuna_views(tmp_path: Path):
    sweep = tmp_path / "sweep"
    storage = f"sqlite:///{tmp_path}/study.db"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for job, (lr, outcome) in enumerate([(0.001, 0.95), (0.01, 0.97), (0.0001, "pruned"), (0.1, "failed")]):
        trial = study.ask({"model.optimizer.lr": FloatDistribution(1e-5, 1.0, log=True)})
        trial.set_user_attr("sweep_dir", str(sweep.resolve()))
        trial.set_user_attr("job", job)
        (sweep / str(job) / ".hydra").mkdir(parents=True)
        (sweep / str(job) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"model.optimizer.lr={lr}"]))
        trial.report(0.5, 0)
        if isinstance(outcome, float):
            trial.report(outcome, 1)
            study.tell(trial, outcome)
            (sweep / str(job) / "metrics.json").write_text(json.dumps({"val/acc_best": outcome}))
        else:
            study.tell(trial, state=TrialState.PRUNED if outcome == "pruned" else TrialState.FAIL)
    best = {"study_name": "s", "storage": storage, "best_value": 0.97, "best_params": {"model.optimizer.lr": 0.01}}
    (sweep / "optimization_results.yaml").write_text(yaml.safe_dump(best))
    text = write_report(sweep).read_text()
    rows = list(csv.reader((sweep / "sweep_report.csv").open()))
    assert rows[0] == ["job", "trial", "state", "model.optimizer.lr", "val/acc_best"]
    assert rows[1][:3] == ["1", "1", "COMPLETE"] and rows[2][:3] == ["0", "0", "COMPLETE"]
    assert {tuple(r[:3]) for r in rows[3:]} == {("2", "2", "PRUNED at epoch 0 (0.5000)"), ("3", "3", "FAIL")}
    assert "(2 complete, 1 fail, 1 pruned)" in text and f"`optuna-dashboard {storage}`" in text
    for name in ("optuna_history.png", "optuna_intermediate.png", "optuna_importances.png", "optuna_parallel.png"):
        assert (sweep / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"![{name}]({name})" in text


def stored_trials(cwd: Path) -> list[optuna.trial.FrozenTrial]:
    """The default study of the commands run in `cwd`."""
    return optuna.load_study(study_name="mnist_optuna", storage=f"sqlite:///{cwd}/logs/optuna/mnist_optuna.db").trials


@pytest.mark.slow
def test_a_second_command_extends_the_study_and_a_strict_pruner_prunes(run_cli, tmp_path: Path):
    first = run_cli(*SEARCH, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/first", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = stored_trials(tmp_path)
    assert [t.state for t in before] == [TrialState.COMPLETE] * 2
    assert all(set(t.intermediate_values) == {0, 1} for t in before)  # val/acc of each epoch, from the callback
    for trial in before:
        metrics = json.loads((tmp_path / "first" / str(trial.number) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/acc_best"])
    best = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(t.value for t in before)) and best["trials"] == {"complete": 2}

    strict = ["hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=0.999"]  # below 99.9%: pruned
    second = run_cli(*SEARCH, "hydra.sweeper.n_trials=1", *strict, f"hydra.sweep.dir={tmp_path}/second", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = stored_trials(tmp_path)
    assert [(t.number, t.state, t.value, t.params) for t in after[:2]] == [
        (t.number, t.state, t.value, t.params) for t in before
    ]  # the first command's trials are kept as they were
    assert after[2].state == TrialState.PRUNED and list(after[2].intermediate_values) == [0]  # cut after epoch 0
    assert after[2].params != after[0].params and after[2].params != after[1].params
    rows = list(csv.reader((tmp_path / "second" / "sweep_report.csv").open()))
    assert rows[0][:4] == ["job", "run", "trial", "state"]  # run: the job's TensorBoard run, named by its values
    assert rows[1][0] == "0" and rows[1][2:4] == ["2", f"PRUNED at epoch 0 ({after[2].value:.4f})"]
    assert rows[1][1].startswith("lr=") and len(rows[1][1]) < 40, rows[1][1]
    assert "(2 complete, 1 pruned)" in (tmp_path / "second" / "sweep_report.md").read_text()


@pytest.mark.slow
def test_a_sweep_killed_mid_trial_resumes_without_losing_finished_trials(mnist_dir: Path, tmp_path: Path):
    env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir)}
    command = [sys.executable, "-m", *SEARCH, "hydra.sweeper.heartbeat_interval=1"]
    with open(tmp_path / "killed.log", "w") as out:
        sweep = subprocess.Popen([*command, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}/killed"],
                                 cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 400
        while not ((tmp_path / "killed" / "0" / "metrics.json").is_file() and (tmp_path / "killed" / "1").is_dir()):
            assert sweep.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "trial 1 never started"
            time.sleep(0.05)
        # Kill at once: trial 1 is RUNNING, with a heartbeat, from before its run dir exists, and a tiny trial takes
        # only a second or two (a wait here let it finish on a quiet machine).
        sweep.send_signal(signal.SIGKILL)
        sweep.wait()
    killed = stored_trials(tmp_path)
    assert [t.state for t in killed] == [TrialState.COMPLETE, TrialState.RUNNING]
    time.sleep(3)  # past the grace period (2 heartbeat intervals): trial 1's process is known dead

    again = subprocess.run([*command, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/again"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Trials [1] were interrupted" in again.stdout + again.stderr
    trials = stored_trials(tmp_path)
    assert (trials[0].state, trials[0].value, trials[0].params) == (TrialState.COMPLETE, killed[0].value,
                                                                    killed[0].params)  # fmt: skip
    assert trials[1].state == TrialState.FAIL
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == killed[1].params  # retried
    assert trials[2].system_attrs["failed_trial"] == 1 and len(trials) == 3


@pytest.mark.slow
def test_two_commands_at_once_are_two_workers_of_one_study(mnist_dir: Path, tmp_path: Path):
    """One worker runs its 2 trials at once in joblib processes, the other runs 2 one after the other."""
    env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir)}
    workers = {
        "a": [sys.executable, "-m", *SEARCH, "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2"],
        "b": [sys.executable, "-m", *SEARCH],
    }
    procs = {
        name: subprocess.Popen([*cmd, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path}/{name}"], cwd=tmp_path,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in workers.items()
    }  # fmt: skip
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in procs.items()}
    for name, proc in procs.items():
        assert proc.returncode == 0, outputs[name][-3000:]
    assert "Joblib.Parallel(n_jobs=" in outputs["a"]
    trials = stored_trials(tmp_path)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE and set(t.intermediate_values) == {0, 1} for t in trials)
    by_worker = sorted(Path(t.user_attrs["sweep_dir"]).name for t in trials)
    assert by_worker == ["a", "a", "b", "b"]
    assert len({t.params["model.optimizer.lr"] for t in trials}) == 4  # each worker's sampler has its own seed
