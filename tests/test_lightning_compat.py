"""Canaries for digit_lightning/lightning_compat.py: they fail the day Lightning changes what it reaches into, or
fixes the behaviour it works around (then delete the workaround); and what Lightning's own `OnExceptionCheckpoint`
and checkpoints lack, which `ResumableRun` adds. A tiny model on random tensors: seconds."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from digit_lightning.callbacks import EMA, ResumableRun
from digit_lightning.lightning_compat import VAL_PROGRESS, holds_average, restart_validation, swap_weights


class Tiny(L.LightningModule):
    """A linear model that counts the validation batches it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)
        self.val_batches: list[tuple[int, int]] = []  # (epoch, batch_idx)

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self.layer(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.val_batches.append((self.current_epoch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)), 4)


class SaveMidValidation(L.Callback):
    """Saves a checkpoint after the 2nd validation batch of epoch 0, between batches, as a SIGTERM handler would."""

    def __init__(self, path: Path, fix: bool) -> None:
        self.path, self.fix = path, fix

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if trainer.current_epoch == 0 and batch_idx == 1 and not trainer.sanity_checking:
            trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self.fix:
            restart_validation(checkpoint)


def trainer(tmp_path: Path, epochs: int, callbacks=(), checkpointing: bool = False) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, default_root_dir=tmp_path, logger=False, enable_checkpointing=checkpointing,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=list(callbacks))  # fmt: skip


@pytest.mark.parametrize("fix", [False, True])
def test_a_checkpoint_saved_between_validation_batches_resumes_into_that_validation_only_with_the_fix(
    tmp_path: Path, fix: bool
):
    ckpt = tmp_path / "mid.ckpt"
    trainer(tmp_path, 1, [SaveMidValidation(ckpt, fix)]).fit(Tiny(), loader(), loader())
    saved = torch.load(ckpt, weights_only=True)
    loop, key = VAL_PROGRESS
    progress = saved["loops"][loop][key]  # the structure restart_validation rewrites
    assert set(progress) >= {"total", "current", "is_last_batch"}
    assert set(progress["current"]) == {"ready", "started", "processed", "completed"}

    resumed = Tiny()
    trainer(tmp_path, 2).fit(resumed, loader(), loader(), ckpt_path=ckpt)
    epoch0 = [b for e, b in resumed.val_batches if e == 0]
    if fix:  # the whole validation of epoch 0 runs again
        assert epoch0 == [0, 1, 2, 3]
    else:  # Lightning counts it as done and skips it; when this fails, Lightning fixed it: drop restart_validation
        assert epoch0 == []


def test_weight_averaging_internals_that_ema_uses(tmp_path: Path):
    model, ema = Tiny(), EMA(decay=0.5)
    trainer(tmp_path, 1, [ema]).fit(model, loader(), loader())
    assert holds_average(ema)
    average = {k: v.clone() for k, v in model.state_dict().items()}  # fit's end copied the average into the model
    with torch.no_grad():
        model.layer.weight.add_(1.0)
    swap_weights(ema, model)  # the model gets the average back, the average gets the shifted weights
    assert all(torch.equal(average[k], v) for k, v in model.state_dict().items())
    swap_weights(ema, model)
    assert torch.equal(model.layer.weight, average["layer.weight"] + 1.0)


# --- Why `ResumableRun` is still ours: what Lightning's own pieces do not do ---


class RaiseAt(L.Callback):
    """Raises `error` in the training batch `batch_idx` of epoch 0, as a guard that stops a broken run does."""

    def __init__(self, error: BaseException, batch_idx: int = 2) -> None:
        self.error, self.batch_idx = error, batch_idx

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch_idx:
            raise self.error


def test_lightnings_on_exception_checkpoint_saves_on_any_error_resumable_run_only_on_a_stop(tmp_path: Path):
    """`OnExceptionCheckpoint` saves for every exception: a run stopped for a non-finite loss (a `UserError` of
    FiniteLossGuard) would overwrite `last.ckpt` with its broken state. ResumableRun saves on SIGTERM and Ctrl-C."""
    lightnings, ours = tmp_path / "lightning", tmp_path / "ours"
    for callback in (OnExceptionCheckpoint(dirpath=lightnings, filename="last"), ResumableRun(dirpath=str(ours))):
        with pytest.raises(ValueError, match="loss is nan"):
            stopped = trainer(tmp_path, 1, [callback, RaiseAt(ValueError("loss is nan"))], checkpointing=True)
            stopped.fit(Tiny(), loader(), loader())
    assert (lightnings / "last.ckpt").is_file()
    assert not ours.exists()


def test_lightning_checkpoints_hold_no_random_states_resumable_run_adds_them(tmp_path: Path):
    """A resumed run draws the same shuffles and augmentations as the uninterrupted one only if the global RNG states
    ride in the checkpoint; Lightning's `save_checkpoint` does not save them."""
    plain, ours = tmp_path / "plain.ckpt", tmp_path / "ours.ckpt"
    for callbacks, path in (([], plain), ([ResumableRun()], ours)):
        fit = trainer(tmp_path, 1, callbacks)
        fit.fit(Tiny(), loader(), loader())
        fit.save_checkpoint(path)
    flat = repr(torch.load(plain, weights_only=True)).lower()
    assert "rng" not in flat and "random" not in flat
    (state,) = [s for name, s in torch.load(ours, weights_only=True)["callbacks"].items() if "ResumableRun" in name]
    assert set(state["rng"]) == {"torch", "numpy", "python"}
