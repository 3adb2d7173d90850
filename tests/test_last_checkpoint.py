"""last.ckpt is the newest state whatever val/acc does; resumes go on from it; `ckpt_path=last` and finished runs."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from composition import compose
from events import logged
from omegaconf import OmegaConf
from synthetic import SYNTHETIC_OVERRIDES
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digit_lightning.cli import compose_config
from digit_lightning.runs import ResumeError, find_checkpoint, run_model
from digit_lightning.train import train

# 3 batches of 64 per epoch, validated on 2 batches of 1000; lr 1e-12: val/acc never improves after epoch 0.
FLAT = ["trainer=cpu", "data.batch_size=64", "+trainer.limit_train_batches=3", "+trainer.limit_val_batches=2",
        "model.optimizer.lr=1e-12", "callbacks.progress_bar=null", "callbacks.dashboards=null",
        "test=false"]  # fmt: skip


@pytest.fixture
def run_in(synthetic_dir: Path):
    """`run_in(out, *overrides)`: FLAT's in-process training into `out`, on the synthetic digits (what is checked
    is which state each checkpoint holds, not what the model learned: one validation batch of 200 images)."""

    def run(out: Path, *overrides: str) -> dict[str, float]:
        data = [f"paths.data_dir={synthetic_dir}", *SYNTHETIC_OVERRIDES]
        return train(compose([f"paths.output_dir={out}", *data, *FLAT, *overrides]))

    return run


def saved_at(ckpt: Path) -> tuple[int, int]:
    saved = torch.load(ckpt, weights_only=True)
    return saved["epoch"], saved["global_step"]


def scalar_steps(run: Path, tag: str) -> list[int]:
    """The steps of `tag` in the run's one TensorBoard run, in the order they were logged."""
    return [e.step for e in logged(run, tag)]


def test_last_ckpt_is_the_final_epoch_when_val_acc_never_improves(
    run_in, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    with caplog.at_level(logging.INFO, logger="digit_lightning.train"):
        run_in(tmp_path, "trainer.max_epochs=3", "test=true", "+trainer.limit_test_batches=1")
    # One cycle: the run's model is its final weights (docs/resume.md), tested after fit.
    assert f"The run's model (tested): {tmp_path / 'checkpoints' / 'last.ckpt'}" in caplog.messages
    ckpts = tmp_path / "checkpoints"
    assert saved_at(ckpts / "last.ckpt") == (2, 9)  # Lightning's save_last alone left epoch 0, step 3 here
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch_000.ckpt", "last.ckpt"]  # the best is kept beside it
    assert saved_at(ckpts / "epoch_000.ckpt") == (0, 3)

    run_in(tmp_path / "steps", "trainer.max_epochs=3", "+trainer.max_steps=7")  # fit ends inside epoch 2
    assert saved_at(tmp_path / "steps" / "checkpoints" / "last.ckpt") == (2, 7)


def test_extending_a_finished_run_starts_from_its_final_step(
    run_in, tmp_path: Path, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
):
    run_in(tmp_path, "trainer.max_epochs=2")
    run_in(tmp_path, f"ckpt_path={tmp_path}", "trainer.max_epochs=3")  # as the docs' command, in-process
    assert saved_at(tmp_path / "checkpoints" / "last.ckpt") == (2, 9)
    assert scalar_steps(tmp_path, "val/acc") == [2, 5, 8]  # each epoch trained and validated once
    assert not [w for w in recwarn if "exists and is not empty" in str(w.message)]  # its own dir, resumed

    with caplog.at_level(logging.WARNING, logger="digit_lightning.train"):
        run_in(tmp_path, f"ckpt_path={tmp_path}", "trainer.max_epochs=3")
    (said,) = [r.getMessage() for r in caplog.records if "is finished" in r.getMessage()]
    assert said.startswith(f"{tmp_path.resolve()} is finished: it reached trainer.max_epochs=3 (trained 3 epochs, 9 ")
    command = shlex.split(said.split("To train it longer: ", 1)[1])
    assert command[:3] == ["python", "-m", "digit_lightning.train"] and command[-1] == "trainer.max_epochs=6"
    run_in(tmp_path, *command[3:])  # the command it prints, in-process
    assert saved_at(tmp_path / "checkpoints" / "last.ckpt") == (5, 18)


@pytest.mark.slow
def test_sigkill_after_an_epoch_that_did_not_improve_resumes_from_that_epoch(mnist_dir: Path, tmp_path: Path):
    """A real CLI run is killed (SIGKILL: nothing runs) once an epoch that did not improve val/acc has ended;
    `ckpt_path=<run>` goes on from that epoch's end: no step is trained twice, each epoch validated once."""
    run, per_epoch = tmp_path / "run", 20
    env = {**os.environ, "DIGIT_LIGHTNING_DATA": str(mnist_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    flat = [o for o in FLAT if "limit_train" not in o] + [f"+trainer.limit_train_batches={per_epoch}"]
    flat.append("trainer.log_every_n_steps=1")
    cmd = [sys.executable, "-m", "digit_lightning.train", *flat, "trainer.max_epochs=6", f"hydra.run.dir={run}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last, deadline, seen = run / "checkpoints" / "last.ckpt", time.monotonic() + 300, 0.0
    while True:  # until last.ckpt holds epoch 1 or later (epoch 0 is the best; later ones tie, never improve)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint of epoch 1 after 300 s"
        if last.exists() and last.stat().st_mtime != seen:
            seen = last.stat().st_mtime
            if saved_at(last)[0] >= 1:
                break
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=60)
    epoch, step = saved_at(last)
    assert epoch >= 1 and step == (epoch + 1) * per_epoch, (epoch, step)
    assert epoch < 5, "the run finished before the kill; nothing was tested"
    assert saved_at(run / "checkpoints" / "epoch_000.ckpt") == (0, per_epoch)  # the best, not what resumes

    resumed = subprocess.run([sys.executable, "-m", "digit_lightning.train", f"ckpt_path={run}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "exists and is not empty" not in resumed.stdout + resumed.stderr
    assert saved_at(last) == (5, 6 * per_epoch)
    ends = [(e + 1) * per_epoch - 1 for e in range(6)]
    assert scalar_steps(run, "val/acc") == ends  # each epoch validated once, at its own step
    trained_again = []  # train/loss steps in the event files the resumed process wrote (their names end .<pid>.<n>)
    for path in (run / "tensorboard").rglob("events.out.tfevents.*"):
        if path.name.split(".")[-2] != str(proc.pid):
            events = EventAccumulator(str(path), size_guidance={"scalars": 0})
            events.Reload()
            if "train/loss" in events.Tags()["scalars"]:
                trained_again += [e.step for e in events.Scalars("train/loss")]
    assert trained_again and min(trained_again) >= step  # nothing before the kill trained again


def test_ckpt_path_last_is_the_newest_single_run_and_a_sweep_dir_its_newest_job(tmp_path: Path):
    def fake(path: Path, mtime: float) -> Path:
        ckpt = path / "checkpoints" / "last.ckpt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"ckpt")
        os.utime(ckpt, (mtime, mtime))
        return ckpt.resolve()

    sweep = tmp_path / "train" / "multiruns" / "2026-01-03_00-00-00"
    jobs = [fake(sweep / "0", 3e9), fake(sweep / "1", 4e9)]
    with pytest.raises(
        ResumeError, match=f"train a run first; for a sweep's job, name its sweep dir: ckpt_path={sweep}"
    ):
        find_checkpoint("last", tmp_path)
    run = fake(tmp_path / "train" / "runs" / "2026-01-01_00-00-00", 1e9)  # older than both jobs
    assert find_checkpoint("last", tmp_path) == run
    assert find_checkpoint(sweep, tmp_path) == jobs[1]
    assert find_checkpoint(sweep / "0", tmp_path) == jobs[0]


@pytest.mark.parametrize(
    ("overrides", "model"),
    [
        ([], "last.ckpt"),  # one cycle: the final weights
        (["callbacks=ema", "model.scheduler=null"], "last.ckpt"),  # an EMA of the weights
        (["model.scheduler=null"], "epoch_003.ckpt"),  # a constant lr: the best val/acc epoch
        (["experiment=tutorial"], "epoch_003.ckpt"),
        (["run_model=best"], "epoch_003.ckpt"),
        (["model.scheduler=null", "run_model=last"], "last.ckpt"),
    ],
)
def test_eval_predict_export_take_the_run_model_of_a_run(tmp_path: Path, overrides: list[str], model: str):
    run = tmp_path / "train" / "runs" / "2026-01-01_00-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose_config(overrides)))
    (run / "checkpoints").mkdir()
    for name in ("epoch_003.ckpt", "last.ckpt"):
        (run / "checkpoints" / name).write_bytes(b"ckpt")
    for spec in (run, "last", run.parent):  # a run dir, the newest run, a dir of runs (as a sweep dir)
        assert run_model(spec, tmp_path) == (run / "checkpoints" / model).resolve()
    assert run_model(run / "checkpoints" / "last.ckpt", tmp_path).name == "last.ckpt"  # a file is taken as given
