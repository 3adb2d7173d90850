"""The scale-out paths run for real: sweeps and requeues on a SLURM cluster, and torchrun with 2 CPU ranks.

The SLURM tests need a running cluster: `make slurm-up` starts a one-node one on this machine (scripts/slurm.sh);
without one they skip, saying so. All of them are slow (`make test-full`), each on a small real slice of MNIST.
The helpers above the tests (a cluster check, job ids, sacct states, TensorBoard scalars) are for any SLURM test.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from events import logged

pytestmark = pytest.mark.slow

# 2 epochs of 20 training batches, a few val/test batches, no progress bar in the logs
SLICE = [
    "+trainer.limit_train_batches=20", "+trainer.limit_val_batches=5", "+trainer.limit_test_batches=5",
    "data.batch_size=64", "trainer.max_epochs=2", "callbacks.progress_bar=null",
]  # fmt: skip


def slurm_unavailable() -> str | None:
    """Why no SLURM job can run here, or None when a node is up to take one."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (no sinfo); `make slurm-up` installs and starts a one-node cluster on this machine"
    try:  # without a slurm.conf sinfo retries for a minute
        result = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "SLURM does not answer (sinfo timed out); `make slurm-up` starts a one-node cluster on this machine"
    if result.returncode != 0:
        return f"SLURM is down ({' '.join(result.stderr.split())}); `make slurm-up` starts it"
    if not {"idle", "mixed", "allocated"} & set(result.stdout.split()):
        return f"no SLURM node is up (sinfo: {' '.join(result.stdout.split()) or 'none'}); `make slurm-up` starts one"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Skip the test, with the reason, unless SLURM can run jobs (asked once a session)."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)


def wait_for(condition: Callable[[], object], what: str, timeout: float = 300, every: float = 0.5) -> object:
    """Poll `condition` until it returns something true; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(every)
    raise AssertionError(f"no {what} after {timeout:.0f}s")


def slurm_job_ids(sweep_dir: Path) -> list[str]:
    """The SLURM job ids of a hydra/launcher=slurm sweep (`<array job>_<task>`), from submitit's folders."""
    return sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if any(p.glob("*_submitted.pkl")))


def sacct_states(job_id: str, attempts: bool = False) -> list[str]:
    """The job's state in SLURM's accounting (one per run of it with `attempts`: a requeued job has several)."""
    command = ["sacct", "-X", "-n", "-P", "-o", "State", "-j", job_id] + (["--duplicates"] if attempts else [])
    return subprocess.run(command, capture_output=True, text=True, check=True, timeout=60).stdout.split()


ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED", "RESIZING"}


def final_states(job_id: str, attempts: bool = False, timeout: float = 120) -> list[str]:
    """`sacct_states` once the job's last run has ended: a multirun returns when the jobs' results are written, a
    moment before SLURM records their end."""
    return wait_for(
        lambda: (states := sacct_states(job_id, attempts)) and states[-1] not in ACTIVE and states,
        f"end of job {job_id} in sacct", timeout=timeout,
    )  # fmt: skip


def job_state(job_id: str) -> str:
    """The job's state while SLURM's controller knows it (PENDING, RUNNING, ...)."""
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def tb_run(run: Path) -> Path:
    """The run's one TensorBoard run dir (a sweep job's is named by its overrides, inside `tensorboard/`): all the
    event files of the run, resumed parts included, must be in one dir."""
    dirs = {p.parent for p in (run / "tensorboard").rglob("events.out.tfevents.*")}
    assert len(dirs) == 1, dirs
    return dirs.pop()


def epochs_logged(run: Path, tag: str, steps_per_epoch: int) -> list[int]:
    """The epoch (from 1) of each `tag` event of the run, as logged, from its step (an epoch's end is logged at its
    last step or the next)."""
    return [round(e.step / steps_per_epoch) for e in logged(run, tag)]


def cli_env(mnist_dir: Path) -> dict[str, str]:
    return {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir), "PYTHONUNBUFFERED": "1"}


@pytest.mark.slurm
def test_slurm_sweep_runs_one_job_per_setting(slurm_cluster, run_cli, tmp_path: Path):
    """`-m hydra/launcher=slurm` with 2 learning rates: 2 SLURM jobs, each a complete run in its own dir."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "digit_lightning.train", "-m", "hydra/launcher=slurm", "model.optimizer.lr=1e-3,3e-3", *SLICE,
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for num, lr in enumerate([1e-3, 3e-3]):
        run = sweep / str(num)
        assert yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["model"]["optimizer"]["lr"] == lr
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["epoch"], metrics["global_step"]) == (2, 40)
        assert metrics["test/acc"] > 0.5  # 40 steps of Adam learn the digits well past chance (0.1)
        tb_run(run)  # one TensorBoard run
        assert epochs_logged(run, "val/acc", 20) == [1, 2]
        assert (run / "checkpoints" / "last.ckpt").is_file()
    jobs = slurm_job_ids(sweep)
    assert len(jobs) == 2, jobs
    for job in jobs:
        assert final_states(job) == ["COMPLETED"]
    assert (sweep / "sweep_report.md").is_file()


@pytest.mark.slurm
@pytest.mark.parametrize("preemption", ["scontrol requeue", "SIGUSR1"])
def test_requeued_job_resumes_where_it_stopped(slurm_cluster, mnist_dir: Path, tmp_path: Path, preemption: str):
    """A job requeued in its 2nd epoch (by `scontrol requeue`, as on preemption; or by Lightning on the SIGUSR1 that
    SLURM sends before the time limit) runs again in the same run dir and goes on from its checkpoint: 3 epochs in all,
    each once in one TensorBoard run, and sacct shows the first run REQUEUED and the second COMPLETED."""
    sweep = tmp_path / "sweep"
    # 3 epochs of 50 batches: time to requeue the job in its 2nd epoch
    overrides = [o for o in SLICE if not o.startswith(("+trainer.limit_train_batches=", "trainer.max_epochs="))]
    overrides += ["+trainer.limit_train_batches=50", "trainer.max_epochs=3", f"hydra.sweep.dir={sweep}"]
    command = [sys.executable, "-m", "digit_lightning.train", "-m", "hydra/launcher=slurm", *overrides]
    log = tmp_path / "sweep.log"
    with open(log, "w") as out:
        sweep_process = subprocess.Popen(command, cwd=tmp_path, env=cli_env(mnist_dir), stdout=out, stderr=out)
    try:
        run = sweep / "0"
        # Epoch 0 is over when ModelCheckpoint has written last.ckpt; the job is training epoch 1 now
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file() or sweep_process.poll() is not None, "epoch 0")
        assert sweep_process.poll() is None, log.read_text()[-3000:]
        (job,) = slurm_job_ids(sweep)
        if preemption == "SIGUSR1":  # Lightning saves hpc_ckpt_1.ckpt and runs `scontrol requeue` itself
            subprocess.run(["scancel", "--signal=USR1", job], check=True)
        else:  # SLURM sends SIGTERM: ResumableRun saves last.ckpt
            subprocess.run(["scontrol", "requeue", job], check=True)
        # SLURM holds a requeued job back for 2 minutes before it may start again; a test need not wait for that
        wait_for(lambda: job_state(job) == "PENDING", "requeued job", timeout=60)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        assert sweep_process.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if sweep_process.poll() is None:
            sweep_process.kill()

    assert final_states(job, attempts=True) == ["REQUEUED", "COMPLETED"]
    assert "SLURM requeued this job: resuming from" in (run / "train.log").read_text()
    assert (run / "hpc_ckpt_1.ckpt").is_file() == (preemption == "SIGUSR1")
    metrics = json.loads((run / "metrics.json").read_text())
    assert (metrics["epoch"], metrics["global_step"]) == (3, 150)  # the planned 3 epochs of 50 steps, not more
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 150
    assert not list((run / "checkpoints").glob("last-v*.ckpt"))  # the resumed run wrote last.ckpt, not last-v1.ckpt
    # One TensorBoard run: event files from both runs of the job in one dir, each epoch's validation in it once
    tensorboard = tb_run(run)  # one TensorBoard run
    assert len(list(tensorboard.glob("events.out.tfevents.*"))) >= 2
    assert epochs_logged(run, "val/acc", 50) == [1, 2, 3]
    assert epochs_logged(run, "train/loss", 50) == [1, 2, 3]


def test_torchrun_two_cpu_ranks_share_one_run_dir(run_cli, tmp_path: Path):
    """torchrun starts 2 processes that each run Hydra; they train as 2 gloo ranks and leave one run dir, written
    by rank 0: one .hydra/, one metrics.json, one TensorBoard run."""
    result = run_cli(
        "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "digit_lightning.train",
        "trainer=ddp", "trainer.accelerator=cpu", *SLICE, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output  # 2 ranks in one process group
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    metrics = json.loads((run / "metrics.json").read_text())
    # DistributedSampler: each rank takes its 20 batches a epoch from its own half of the training set
    assert (metrics["epoch"], metrics["global_step"]) == (2, 40)
    assert metrics["test/acc"] > 0.5
    tb_run(run)  # one TensorBoard run, not one per rank
    assert epochs_logged(run, "val/acc", 20) == [1, 2]


@pytest.mark.slurm
def test_optuna_trials_run_as_slurm_jobs_of_one_stored_study(slurm_cluster, run_cli, tmp_path: Path):
    """`hparams_search=mnist_optuna hydra/launcher=slurm` with a storage every job reaches: 2 trials, each a SLURM
    job that reports to the study (its pruning callback finds the trial there), both COMPLETE in the study."""
    optuna = pytest.importorskip("optuna")
    storage, sweep = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "sweep"
    result = run_cli(
        "digit_lightning.train", "hparams_search=mnist_optuna", "hydra/launcher=slurm", "hydra.sweeper.n_trials=2",
        f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=on_slurm", "logger=none", *SLICE,
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = slurm_job_ids(sweep)
    assert len(jobs) == 2 and all(final_states(job) == ["COMPLETED"] for job in jobs), jobs
    study = optuna.load_study(study_name="on_slurm", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    for trial in study.trials:  # val/acc of both epochs went from the SLURM job to the study
        assert sorted(trial.intermediate_values) == [0, 1] and 0.1 < trial.value <= 1.0
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["val/acc_best"] == pytest.approx(trial.value)


# The MariaDB that `make slurm-up` runs for SLURM's accounting, reached through its socket with the account that
# scripts/slurm.sh creates for studies and MLflow stores (it owns every database named digit_lightning*).
MARIADB_SOCKET = "/run/mysqld/mysqld.sock"
MARIADB_USER = "digit_lightning"


@pytest.fixture
def mariadb(slurm_cluster) -> Callable[[str], str]:
    """A function that creates a fresh database on the cluster's MariaDB and returns its SQLAlchemy URL, quoted for a
    Hydra override; the databases are dropped after the test."""
    pymysql = pytest.importorskip("pymysql", reason="the `tracking` extra is not installed")
    if not Path(MARIADB_SOCKET).exists():
        pytest.skip(f"no MariaDB socket at {MARIADB_SOCKET}; `make slurm-up` starts MariaDB")
    connection = pymysql.connect(user=MARIADB_USER, password=MARIADB_USER, unix_socket=MARIADB_SOCKET, autocommit=True)
    created: list[str] = []

    def create(purpose: str) -> str:
        name = f"digit_lightning_{purpose}_{os.getpid()}_{len(created)}_{int(time.time())}"
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        created.append(name)
        # quoted for Hydra's override parser, which takes no `=` in a bare value
        return f"'mysql+pymysql://{MARIADB_USER}:{MARIADB_USER}@localhost/{name}?unix_socket={MARIADB_SOCKET}'"

    yield create
    with connection.cursor() as cursor:
        for name in created:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
    connection.close()


def sbatch_worker(name: str, overrides: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Submit one Optuna worker (`python -m digit_lightning.train hparams_search=mnist_optuna ...`) as a SLURM batch
    job, as one would on each of several machines; return its job id. Its output goes to `<cwd>/<name>.out`."""
    command = shlex.join([sys.executable, "-m", "digit_lightning.train", "hparams_search=mnist_optuna", *overrides])
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", "--cpus-per-task=1", "--mem=2G", f"--chdir={cwd}",
         f"--output={cwd}/{name}.out", "--wrap", command],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


@pytest.mark.slurm
def test_two_slurm_workers_share_a_study_and_an_mlflow_store_on_mariadb(mariadb, mnist_dir: Path, tmp_path: Path):
    """Two SLURM jobs, each a worker running one trial of one study stored in MariaDB (`mysql+pymysql://`), both
    logging to an MLflow store in the same server: one trial completes, the other's strict pruner prunes it; the
    study has both, and MLflow has one experiment for the study with a run per trial, tagged with its state."""
    optuna = pytest.importorskip("optuna")
    mlflow = pytest.importorskip("mlflow", reason="the `tracking` extra is not installed")
    storage, store = mariadb("optuna"), mariadb("mlflow")
    storage_url, store_url = storage.strip("'"), store.strip("'")
    mlflow.MlflowClient(store_url).search_experiments()  # its tables, created once before the workers start together
    common = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=shared", "hydra.sweeper.n_trials=1",
              "logger=mlflow", f"logger.mlflow.tracking_uri={store}",
              f"logger.mlflow.artifact_location={tmp_path}/artifacts", *SLICE]  # fmt: skip
    workers = {
        "complete": [*common, "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}/complete"],
        "pruned": [
            *common,
            "hydra/sweeper/pruner=threshold",
            "hydra.sweeper.pruner.lower=0.999",
            f"hydra.sweep.dir={tmp_path}/pruned",
        ],  # below 99.9% after epoch 0: pruned  # fmt: skip
    }
    jobs = {name: sbatch_worker(name, overrides, tmp_path, cli_env(mnist_dir)) for name, overrides in workers.items()}
    for name, job in jobs.items():
        assert final_states(job, timeout=600) == ["COMPLETED"], (tmp_path / f"{name}.out").read_text()[-3000:]

    study = optuna.load_study(study_name="shared", storage=storage_url)
    states = {Path(t.user_attrs["sweep_dir"]).name: t for t in study.trials}
    assert sorted(t.number for t in study.trials) == [0, 1]
    assert states["complete"].state.name == "COMPLETE" and list(states["complete"].intermediate_values) == [0]
    assert states["pruned"].state.name == "PRUNED" and list(states["pruned"].intermediate_values) == [0]
    metrics = json.loads((tmp_path / "complete" / "0" / "metrics.json").read_text())
    assert states["complete"].value == pytest.approx(metrics["val/acc_best"])

    client = mlflow.MlflowClient(store_url)
    experiment = client.get_experiment_by_name("optuna/shared")  # one experiment for the study, both workers in it
    runs = {run.data.tags["optuna.trial"]: run for run in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(str(t.number) for t in study.trials)
    for trial in study.trials:
        run = runs[str(trial.number)]
        assert run.data.tags["optuna.study"] == "shared" and run.data.tags["optuna.state"] == trial.state.name
        assert run.info.status == {"COMPLETE": "FINISHED", "PRUNED": "KILLED"}[trial.state.name]
        assert run.data.params["lr"] == str(trial.params["model.optimizer.lr"])
    assert "val/acc" in runs[str(states["pruned"].number)].data.metrics  # its epoch 0 was logged before the cut


@pytest.mark.slurm
def test_a_killed_slurm_worker_s_trial_is_retried_from_mariadb(mariadb, mnist_dir: Path, tmp_path: Path):
    """A worker's SLURM job killed mid-trial leaves its trial RUNNING in MariaDB; its heartbeat stops, so the next
    worker marks it failed and runs its parameters again (`hydra.sweeper.retries`)."""
    optuna = pytest.importorskip("optuna")
    storage = mariadb("optuna")
    common = [f"hydra.sweeper.storage={storage}", "hydra.sweeper.study_name=retry", "logger=none", *SLICE,
              "hydra.sweeper.heartbeat_interval=1", "trainer.max_epochs=1"]  # fmt: skip
    first = sbatch_worker("first", [*common, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}/first"],
                          tmp_path, cli_env(mnist_dir))  # fmt: skip
    wait_for(lambda: (tmp_path / "first/0/metrics.json").is_file() and (tmp_path / "first/1").is_dir(),
             "trial 1 started", timeout=600, every=0.05)  # fmt: skip
    subprocess.run(["scancel", "--full", "--signal=KILL", first], check=True, timeout=60)  # no SIGTERM: no cleanup
    final_states(first)
    study = optuna.load_study(study_name="retry", storage=storage.strip("'"))
    killed = study.trials
    assert [t.state.name for t in killed] == ["COMPLETE", "RUNNING"], (tmp_path / "first.out").read_text()[-3000:]
    time.sleep(3)  # past the grace period (2 heartbeat intervals)

    again = sbatch_worker("again", [*common, "hydra.sweeper.n_trials=1", f"hydra.sweep.dir={tmp_path}/again"],
                          tmp_path, cli_env(mnist_dir))  # fmt: skip
    assert final_states(again, timeout=600) == ["COMPLETED"], (tmp_path / "again.out").read_text()[-3000:]
    assert "Trials [1] were interrupted" in (tmp_path / "again.out").read_text()
    trials = optuna.load_study(study_name="retry", storage=storage.strip("'")).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].params == killed[1].params and trials[2].system_attrs["failed_trial"] == 1
