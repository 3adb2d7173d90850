"""A learning rate that explodes mid-run: the run stops with one clear line and the last good checkpoint survives."""

from __future__ import annotations

from pathlib import Path

import torch

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.cli import EXIT_USER_ERROR
from digit_lightning.data import MNISTDataModule

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


def test_exploding_lr_stops_with_one_line_and_keeps_the_last_good_checkpoint(run_cli, mnist_dir: Path, tmp_path):
    run = tmp_path / "run"
    result = run_cli("digit_lightning.train", *EXPLODE, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == EXIT_USER_ERROR
    last_line = result.stderr.strip().splitlines()[-1]
    last = run / "checkpoints" / "last.ckpt"
    assert last_line.startswith("error: train/loss is nan at epoch 1, step ") or last_line.startswith(
        "error: train/loss is inf at epoch 1, step "
    ), result.stderr[-3000:]
    assert f"(lr 5e+06); stopped before this update and the last good checkpoint {last} is intact" in last_line
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
