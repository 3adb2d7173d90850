"""The progress bar: the run's name in full, train/loss and train/acc shown, drawn on refresh batches only, and no
"`Trainer.fit` stopped" line printed into it."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import lightning as L
import torch

from digit_lightning.callbacks import ProgressBar
from digit_lightning.cli import NoPlannedEnd
from digit_lightning.data import MNISTDataModule
from digit_lightning.module import DigitClassifier
from digit_lightning.tensorboard import TensorBoardLogger

JOB = "lr=0.00024156772025296256,batch_size=128"  # an Optuna job's name: Lightning's bar showed "=128"


class CountingBar(ProgressBar):
    """Records the global step at each read of the bar's metrics during training."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.read_at: list[int] = []

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        if trainer.training:
            self.read_at.append(trainer.global_step)
        return super().get_metrics(trainer, pl_module)


def test_bar_names_the_run_shows_train_metrics_and_redraws_on_refresh_batches(synthetic_data: dict, tmp_path: Path):
    bar = CountingBar(refresh_rate=3)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=6, limit_val_batches=1, log_every_n_steps=3,
        num_sanity_val_steps=0, callbacks=[bar], logger=TensorBoardLogger(tmp_path, name="", version=JOB),
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    model = DigitClassifier(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    trainer.fit(model, datamodule=MNISTDataModule(**synthetic_data, batch_size=16, eval_batch_size=100))

    shown = bar.get_metrics(trainer, model)
    assert shown["run"] == JOB and "v_num" not in shown, shown
    assert {"train/loss", "train/acc", "val/acc"} <= set(shown), shown
    assert 0.0 <= shown["train/acc"] <= 1.0 and shown["train/loss"] > 0
    assert sorted(set(bar.read_at)) == [3, 6], bar.read_at  # Lightning's bar read them after every batch: 1..6


def test_a_single_run_has_no_name_on_the_bar(tmp_path: Path):
    trainer = L.Trainer(logger=TensorBoardLogger(tmp_path, name="", version=""), callbacks=[ProgressBar()])
    assert "run" not in ProgressBar().get_metrics(trainer, DigitClassifier())


def test_the_planned_end_of_fit_stays_off_the_console():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("lightning.pytorch", logging.INFO, "", 0, message, None, None)

    keep = NoPlannedEnd().filter
    assert not keep(record("`Trainer.fit` stopped: `max_epochs=1` reached."))
    assert not keep(record("`Trainer.fit` stopped: `max_steps=1` reached."))
    assert keep(record("`Trainer.fit` stopped: No training batches."))  # a problem: it still prints
    assert keep(record("Test on the official test set: test/loss=0.0412  test/acc=0.9871"))
