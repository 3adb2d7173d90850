"""NaN/inf losses: the run stops with one clear line, the last good checkpoint survives, and the guard checks
without a host sync on the steps in between."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import lightning as L
import pytest
import torch

from digit_lightning.callbacks import FiniteLossGuard, NonFiniteLossError
from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.cli import EXIT_USER_ERROR
from digit_lightning.data import MNISTDataModule
from digit_lightning.module import DigitClassifier

# Epoch 0 trains well with SGD at lr 0.05; ExponentialLR then multiplies the lr by 1e8 (5e6 in epoch 1).
EXPLODE = [
    "trainer=cpu",
    "logger=csv",
    "data.batch_size=64",
    "trainer.max_epochs=3",
    "+trainer.limit_train_batches=20",
    "+trainer.limit_val_batches=3",
    "model.optimizer._target_=torch.optim.SGD",
    "model.optimizer.lr=0.05",
    "model.scheduler._target_=torch.optim.lr_scheduler.ExponentialLR",
    "~model.scheduler.max_lr",
    "+model.scheduler.gamma=1e8",
]


@pytest.mark.slow  # the CLI's end to end: the guard itself is tested in-process below (fit, Poison)
def test_exploding_lr_stops_with_one_line_and_keeps_the_last_good_checkpoint(run_cli, mnist_dir: Path, tmp_path):
    run = tmp_path / "run"
    result = run_cli("digit_lightning.train", *EXPLODE, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    last = run / "checkpoints" / "last.ckpt"
    assert re.match(r"error: train/loss is (nan|inf) at epoch 1, step 2\d ", last_line), last_line
    assert "(lr 5e+06); stopped at step 40, before a checkpoint of the broken weights, and the last good " in last_line
    assert f"checkpoint {last} is intact" in last_line
    assert "lower model.optimizer.lr" in last_line and "Traceback" not in result.stderr + result.stdout
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [last_line]  # one line
    assert "Test on the official test set" not in result.stdout + result.stderr  # no testing of broken weights

    # Nothing lost: the checkpoints are epoch 0's, load without pickled code, hold finite weights that still work.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch_000.ckpt", "last.ckpt"]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in checkpoint["state_dict"].values() if t.is_floating_point())
    model = load_checkpoint(last)  # rebuilt by name, weights checked to fit
    dm = MNISTDataModule(data_dir=str(mnist_dir), batch_size=500)
    dm.setup("test")
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.5, accuracy  # chance is 0.1; epoch 0 reached ~0.78 on validation


def test_the_per_step_check_reads_nothing_back_from_the_device():
    """Meta tensors have no values: any host read (`bool()`, `.item()`, `if tensor`) of one raises."""
    guard, trainer = FiniteLossGuard(), L.Trainer(logger=False)
    for _ in range(3):
        guard.on_before_backward(trainer, None, torch.empty((), device="meta"))  # type: ignore[arg-type]
    with pytest.raises((RuntimeError, NotImplementedError)):  # the check, on the logging steps, is where it reads
        guard.check(trainer)


class Poison(L.Callback):
    """Make the loss NaN from step `at` on (the weights turn NaN), and optionally save a checkpoint at step
    `save_at`, as ResumableRun does on SIGTERM."""

    def __init__(self, at: int, save_at: int | None = None, path: Path | None = None) -> None:
        self.at, self.save_at, self.path = at, save_at, path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                pl_module.net.fc2.bias.fill_(float("nan"))
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def fit(synthetic_data: dict, tmp_path: Path, poison: Poison, log_every_n_steps: int) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=20, limit_val_batches=2, logger=False,
        log_every_n_steps=log_every_n_steps, callbacks=[FiniteLossGuard(), poison], default_root_dir=tmp_path,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    model = DigitClassifier(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    trainer.fit(model, datamodule=MNISTDataModule(**synthetic_data, batch_size=32))
    return trainer


def checkpoints(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.rglob("*.ckpt"))


def test_a_nan_is_caught_on_the_next_logging_step(synthetic_data: dict, tmp_path: Path):
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 0, step 7 .*; stopped at step 10, before a "):
        fit(synthetic_data, tmp_path, Poison(at=7), log_every_n_steps=5)
    assert checkpoints(tmp_path) == []


def test_without_logging_steps_a_nan_is_caught_before_validation_saves(synthetic_data: dict, tmp_path: Path):
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 1, step 23 .*; stopped at step 40, .* the last "):
        fit(synthetic_data, tmp_path, Poison(at=23), log_every_n_steps=0)
    assert [p.name for p in checkpoints(tmp_path)] == ["epoch=0-step=20.ckpt"]  # epoch 0's, from before the NaN


def test_no_checkpoint_is_written_after_a_nan_even_between_checks(synthetic_data: dict, tmp_path: Path):
    path = tmp_path / "interrupted.ckpt"
    with pytest.raises(NonFiniteLossError, match=r"is nan at epoch 0, step 7 .*; stopped at step 9, "):
        fit(synthetic_data, tmp_path, Poison(at=7, save_at=9, path=path), log_every_n_steps=0)
    assert checkpoints(tmp_path) == []
