"""Training end to end: in process on small slices of real MNIST, and through the CLI as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.models.digit import Digit
from digit_lightning.train import train

SCALARS = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "whole_run/test_loss",
           "whole_run/test_acc"}  # fmt: skip
# One epoch on the synthetic digits: 50 batches of 16, validated on 200 and tested on 300 images.
SYNTHETIC_EPOCH = ["data.batch_size=16", "trainer.max_epochs=1"]
# A small real slice: 150 batches of 64 for one epoch, validated and tested on 1,280 images each.
SLICE = [
    "data.batch_size=64",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=150",
    "+trainer.limit_val_batches=20",
    "+trainer.limit_test_batches=20",
]


def test_fast_dev_run_on_cpu(synthetic_cfg):
    metrics = train(synthetic_cfg("debug=fdr"))
    assert {"train/loss", "val/acc", "test/acc"} <= set(metrics)


def test_small_slice_learns_and_logs_to_tensorboard(synthetic_cfg, tmp_path: Path):
    metrics = train(synthetic_cfg(*SYNTHETIC_EPOCH))
    assert metrics["test/acc"] > 0.85, metrics  # chance is 0.10
    assert metrics["val/acc_best"] == pytest.approx(metrics["val/acc"])  # one epoch: the best is the last

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) >= SCALARS
    assert events.Scalars("whole_run/test_acc")[-1].value == pytest.approx(metrics["test/acc"])
    assert len(events.Scalars("val/acc_best")) == 1  # the sanity check did not log a best
    session = events.PluginTagToContent("hparams")["_hparams_/session_start_info"]  # tests/test_dashboards.py: more
    assert b"batch_size" in session and b"lr" in session

    # The checkpoint names its net as plain data (no pickled code, no `_target_`) and is rebuilt from that name.
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"] == {"net": {"name": "digit"}, "compile": False}
    model = load_checkpoint(last)
    assert isinstance(model.net, Digit) and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in checkpoint["state_dict"].items())


@pytest.mark.slow  # the CLI twin of the two in-process tests above (a `python -m` start costs seconds of imports)
def test_cli_trains_and_prints_test_metrics(run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.train", "debug=fdr", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Test on the official test set: test/loss=" in result.stdout + result.stderr
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()
    # The planned end of fit goes to the run's log only: on the console it landed inside the progress bar.
    assert "`Trainer.fit` stopped" not in result.stdout + result.stderr
    assert "`Trainer.fit` stopped: `max_steps=1` reached." in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow  # a real multirun: two CLI trainings
def test_two_job_multirun_gives_each_job_its_own_run(run_cli, tmp_path: Path):
    sweep = tmp_path / "sweep"
    result = run_cli(
        "digit_lightning.train", "-m", "model.optimizer.lr=0.001,0.0003", "trainer=cpu", "test=false",
        *SLICE[:2], "+trainer.limit_train_batches=5", "+trainer.limit_val_batches=2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.0003")):
        assert f"model.optimizer.lr={lr}" in (sweep / job / ".hydra" / "overrides.yaml").read_text()
        assert list((sweep / job / "tensorboard").rglob("events.out.tfevents.*")), f"job {job} has no TensorBoard run"


@pytest.mark.slow
def test_one_epoch_reaches_98_5_percent(run_cli, tmp_path: Path):
    """The core issue's bar: `python -m digit_lightning.train trainer.max_epochs=1` on CPU, official test set."""
    result = run_cli(
        "digit_lightning.train", "trainer.max_epochs=1", "trainer=cpu", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert events.Scalars("whole_run/test_acc")[-1].value >= 0.985
