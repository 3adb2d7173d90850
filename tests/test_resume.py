"""Resume and reproducibility: checkpoint lookup, a run's saved config, atomic saves, exact resume, SIGTERM."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from composition import compose
from events import logged
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from synthetic import SYNTHETIC_OVERRIDES

from digit_lightning import checkpoint
from digit_lightning.checkpoint import AtomicCheckpointIO
from digit_lightning.cli import EXIT_USER_ERROR, compose_config
from digit_lightning.runs import Plan, ResumeError, find_checkpoint, lock_run_dir, plan_resume, resumed_config
from digit_lightning.train import command_line_plan, train

# A small real slice: 30 batches of 64 per epoch, validated on 640 images.
SLICE = ["trainer=cpu", "data.batch_size=64", "+trainer.limit_train_batches=30", "+trainer.limit_val_batches=10"]


def fake_run(root: Path, name: str, overrides: list[str]) -> Path:
    """A run dir as Hydra and Lightning leave it: .hydra/config.yaml and checkpoints/last.ckpt."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    cfg = compose_config(["paths.output_dir=${hydra:runtime.output_dir}", *overrides])
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    return run


def test_find_checkpoint_accepts_a_file_a_run_dir_and_last_of_any_task(tmp_path: Path):
    old = fake_run(tmp_path / "train" / "runs", "2026-01-01_00-00-00", [])
    new = fake_run(tmp_path / "fast" / "runs", "2026-01-02_00-00-00", [])
    os.utime(old / "checkpoints" / "last.ckpt", (1e9, 1e9))  # make `old` the older one by mtime
    assert find_checkpoint("last", tmp_path) == (new / "checkpoints" / "last.ckpt").resolve()
    assert find_checkpoint(old, tmp_path) == (old / "checkpoints" / "last.ckpt").resolve()
    assert find_checkpoint(old / "checkpoints" / "last.ckpt", tmp_path).parent.parent == old.resolve()
    with pytest.raises(ResumeError, match="no such checkpoint"):
        find_checkpoint(tmp_path / "nope.ckpt", tmp_path)
    with pytest.raises(ResumeError, match="train a run first"):
        find_checkpoint("last", tmp_path / "empty")


def test_one_plan_says_what_a_training_resumes_from_and_where(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run = fake_run(tmp_path, "r 1,x=y", []).resolve()  # Hydra's override grammar would split it unquoted
    last = run / "checkpoints" / "last.ckpt"
    assert plan_resume(str(run), tmp_path) == Plan(last, run)  # the CLI, before Hydra picks a dir: go on in place
    assert plan_resume(str(last), tmp_path, run) == Plan(last, run)  # running in that run dir already
    assert plan_resume(str(run), tmp_path, tmp_path / "new") == Plan(last)  # elsewhere: its weights, typed settings
    assert plan_resume(None, tmp_path, run) == Plan()
    hydra = compose_config(Plan(last, run).hydra_overrides(), return_hydra_config=True).hydra  # plain overrides
    assert hydra.run.dir == str(run) and hydra.output_subdir == ".hydra/resume"  # the run's .hydra/ stays its own
    with pytest.raises(ResumeError, match="cannot be continued in place; rename it"):
        Plan(last, tmp_path / "it's").hydra_overrides()

    # SLURM requeued the job: the newer of its last.ckpt and Lightning's hpc_ckpt_N.ckpt, in the job's own dir.
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    (run / "hpc_ckpt_1.ckpt").write_bytes(b"ckpt")
    os.utime(last, (1e9, 1e9))
    assert plan_resume(None, tmp_path, run) == Plan(run / "hpc_ckpt_1.ckpt", requeued=True)
    assert plan_resume(None, tmp_path, tmp_path / "fresh") == Plan()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")  # not requeued: Lightning would replay an hpc_ckpt by itself
    assert plan_resume(None, tmp_path, run) == Plan(run / "hpc_ckpt_1.ckpt")  # planned, so it is rebuilt instead
    (run / "hpc_ckpt_1.ckpt").unlink()
    assert plan_resume(None, tmp_path, run) == Plan()
    (run / "hpc_ckpt_notes.txt").write_text("")  # Lightning's scan would fail on int('') with a traceback
    with pytest.raises(ResumeError, match=r"hpc_ckpt_notes.txt: not a checkpoint Lightning can number"):
        plan_resume(None, tmp_path, run)


def test_a_resumed_run_takes_its_saved_settings_and_the_keys_typed_now(tmp_path: Path):
    run = fake_run(tmp_path, "r1", ["data.batch_size=64", "trainer.max_epochs=1", "data.augment={degrees:5}"])
    typed = ["ckpt_path=last", "trainer.max_epochs=3", "+trainer.limit_train_batches=5"]
    cfg = resumed_config(compose_config([*typed, "paths.output_dir=/elsewhere"]), run, typed)
    assert cfg.data.batch_size == 64 and cfg.data.augment.degrees == 5  # from the run
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.limit_train_batches == 5  # typed now
    assert cfg.paths.output_dir == str(run)
    with pytest.raises(ResumeError, match=r"^model.optimizer.lr=0.01: a resumed run keeps the model, optimizer state"):
        resumed_config(compose_config(["model.optimizer.lr=0.01"]), run, ["model.optimizer.lr=0.01"])


def test_a_second_training_in_the_same_run_dir_is_refused_and_stale_temp_files_go(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / ".tmp-last.ckptabc").write_bytes(b"half")
    lock = lock_run_dir(tmp_path)
    assert not (tmp_path / "checkpoints" / ".tmp-last.ckptabc").exists()
    with pytest.raises(ResumeError, match="another training is running in this run dir"):
        lock_run_dir(tmp_path)
    lock.release()
    lock_run_dir(tmp_path).release()


def test_a_missing_checkpoint_is_named_before_hydra_makes_a_run_dir(tmp_path: Path):
    with pytest.raises(ResumeError) as err:
        command_line_plan(["ckpt_path=last", f"paths.log_dir={tmp_path}"])  # what the CLI asks before Hydra starts
    assert str(err.value) == f"ckpt_path=last: no run under {tmp_path}/ has checkpoints/last.ckpt; train a run first"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # the CLI twin of the test above
def test_cli_names_a_missing_checkpoint_in_one_line(run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.train", "ckpt_path=last", f"paths.log_dir={tmp_path}", cwd=tmp_path, timeout=120)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path=last: no run under {tmp_path}/ has checkpoints/last.ckpt; train a run first"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before Hydra made a run dir for it


def test_atomic_save_keeps_the_old_checkpoint_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}

    def dies_halfway(obj, f) -> None:
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # as if killed mid-write

    monkeypatch.setattr(checkpoint.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temp file left behind


def run_in(out: Path, *overrides: str, data: list[str] = SLICE) -> dict[str, float]:
    return train(compose([f"paths.output_dir={out}", *data, "test=false", *overrides]))


@pytest.mark.slow
def test_resume_is_exact_and_runs_are_reproducible(mnist_dir: Path, tmp_path: Path):
    """2 epochs straight == 1 epoch + resume: weights, optimizer, OneCycle LR, val/acc_best; same seed, same run."""
    keep_all = ["trainer.max_epochs=2", "callbacks.model_checkpoint.save_top_k=-1"]
    straight = run_in(tmp_path / "a", *keep_all)
    again = run_in(tmp_path / "b", *keep_all)
    assert again == straight  # same seed, same metrics, to the last bit

    epoch_1 = tmp_path / "a" / "checkpoints" / "epoch_000.ckpt"
    resumed = run_in(tmp_path / "c", "trainer.max_epochs=2", f"ckpt_path={epoch_1}")
    for key in ("val/acc", "val/loss", "val/acc_best", "train/loss", "train/acc"):
        assert resumed[key] == straight[key], key
    best_after_1 = torch.load(epoch_1, weights_only=True)["state_dict"]["val_acc_best.max_value"].item()
    assert resumed["val/acc_best"] == pytest.approx(max(best_after_1, resumed["val/acc"]))  # the best survived

    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    c = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (a["epoch"], a["global_step"]) == (c["epoch"], c["global_step"]) == (1, 60)
    for name, tensor in a["state_dict"].items():
        assert torch.equal(tensor, c["state_dict"][name]), name
    assert a["lr_schedulers"][0]["_step_count"] == c["lr_schedulers"][0]["_step_count"]
    assert torch.equal(a["optimizer_states"][0]["state"][0]["exp_avg"], c["optimizer_states"][0]["state"][0]["exp_avg"])

    different = run_in(tmp_path / "d", *keep_all, "seed=7")
    assert different["train/loss"] != straight["train/loss"]  # the seed matters, so the equalities above mean something


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes_into_the_same_run(mnist_dir: Path, tmp_path: Path):
    """A real CLI run gets SIGTERM mid-training, saves last.ckpt, says how to resume; that command finishes the run."""
    run = tmp_path / "run"
    env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir), "PYTHONUNBUFFERED": "1"}
    overrides = [*SLICE[:2], "+trainer.limit_train_batches=150", *SLICE[3:], "trainer.max_epochs=2", "test=false"]
    cmd = [sys.executable, "-m", "digit_lightning.train", *overrides, f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():  # the first epoch's checkpoint: training is under way
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    hints = [line for line in out.splitlines() if "To resume:" in line]
    assert len(hints) == 1 and "Interrupted by SIGTERM" in hints[0], out[-3000:]
    assert "weights_only" not in out, out[-3000:]  # no alarming line about how the checkpoint was saved
    saved = torch.load(last, weights_only=True)
    assert 150 <= saved["global_step"] < 300  # saved at the interruption, after epoch 1's checkpoint (step 150)

    command = shlex.split(hints[0].split("To resume: ", 1)[1])
    assert command[:3] == ["python", "-m", "digit_lightning.train"]
    resumed = subprocess.run(
        [sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 300  # both epochs done, in the same dir

    assert torch.load(last, weights_only=True)["global_step"] == 300  # last.ckpt is the newest state
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]  # no last-v1.ckpt

    # Extending the finished run to 3 epochs, by its run dir: the one-cycle schedule is re-planned, and says so.
    extend = [sys.executable, "-m", "digit_lightning.train", f"ckpt_path={run}", "trainer.max_epochs=3"]
    extended = subprocess.run(extend,
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "Re-planned the one-cycle schedule from 300 to 450 steps" in (run / "train.log").read_text()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == 450
    assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.max_epochs == 3  # the next resume knows

    assert [e.step for e in logged(run, "val/acc")] == [149, 299, 449]  # one TensorBoard run, three processes
    writers = {p.name.split(".")[-2] for p in (run / "tensorboard").glob("events.out.tfevents.*")}  # by pid
    assert len(writers) == 3  # a finished process also writes its whole_run summary file


class SigtermMidValidation(L.Callback):
    """Sends its own process SIGTERM in the 2nd batch of epoch 1's validation, as a scheduler's requeue may."""

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 1 and batch_idx == 1 and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


def val_acc_events(run: Path) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in logged(run, "val/acc")]


def test_sigterm_mid_validation_resumes_into_that_validation(synthetic_dir: Path, tmp_path: Path):
    """SIGTERM in the middle of an epoch's validation: the resumed run runs that validation again, in full (Lightning
    counts a checkpoint saved between validation batches as validated and would skip it: no val/acc for that epoch),
    and then goes on exactly as an uninterrupted run, the EMA's average and raw weights the right way round."""
    data = ["trainer=cpu", f"paths.data_dir={synthetic_dir}", *SYNTHETIC_OVERRIDES, "data.batch_size=64",
            "data.eval_batch_size=64", "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=3"]  # fmt: skip
    overrides = ["trainer.max_epochs=3", "callbacks=ema", "callbacks.progress_bar=null", "callbacks.dashboards=null"]
    straight = run_in(tmp_path / "straight", *overrides, data=data)

    run = tmp_path / "run"
    with pytest.raises(SIGTERMException):
        run_in(run, *overrides, "+callbacks.sigterm._target_=test_resume.SigtermMidValidation", data=data)
    saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 16)  # epoch 1's training done, its validation cut off
    resumed = run_in(run, *overrides, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", data=data)

    assert [step for step, _ in val_acc_events(run)] == [7, 15, 23]  # each epoch validated once
    assert val_acc_events(run) == val_acc_events(tmp_path / "straight")
    for key in ("val/acc", "val/loss", "val/acc_best"):  # (train/loss: a window of steps that the resume cut short)
        assert resumed[key] == straight[key], key
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (tmp_path / "straight", run))
    for weights in ("state_dict", "current_model_state"):  # the EMA's average, and the raw weights trained
        for name, tensor in a[weights].items():
            assert torch.equal(tensor, b[weights][name]), (weights, name)


def test_a_finished_run_resumed_with_fewer_batches_an_epoch_replans_its_one_cycle(make_cfg, tmp_path: Path, caplog):
    """The attack review's traceback: a finished one-cycle run (8 steps planned, 8 done) resumed for a 2nd epoch of
    3 batches; Lightning's estimate (2 x 3 = 6) is below the steps done, and the schedule would be stepped past its
    end (torch's ValueError). It is re-planned over the steps this fit will take instead, and the run finishes."""
    short = ["+trainer.limit_val_batches=2", "data.eval_batch_size=100", "test=false", "logger=none"]
    train(make_cfg("trainer.max_epochs=1", "+trainer.limit_train_batches=8", *short))
    caplog.set_level("INFO", logger="digit_lightning.module")
    train(make_cfg(f"ckpt_path={tmp_path}", "trainer.max_epochs=2", "+trainer.limit_train_batches=3", *short))
    assert json.loads((tmp_path / "metrics.json").read_text())["global_step"] == 11
    assert "Re-planned the one-cycle schedule from 8 to 11 steps" in caplog.text
