"""K-fold cross-validation: the stratified folds of the 60,000 training images, their config checks, and the
report's mean ± sd over the folds (on the datamodule directly, fake job dirs, and one real 3-fold multirun)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from digit_lightning.cli import compose_config
from digit_lightning.config import ConfigError, validate_config
from digit_lightning.data import DataError, MNISTDataModule, load_mnist
from digit_lightning.sweep_report import write_report

TINY = ["trainer=cpu", "trainer.max_epochs=1", "data.batch_size=64", "+trainer.limit_train_batches=10",
        "+trainer.limit_val_batches=3", "+trainer.limit_test_batches=3", "callbacks.progress_bar=null",
        "logger=none"]  # fmt: skip


def fold_split(mnist_dir: Path, fold: int, num_folds: int = 3, seed: int = 42) -> MNISTDataModule:
    dm = MNISTDataModule(data_dir=str(mnist_dir), num_folds=num_folds, fold=fold, split_seed=seed)
    dm.setup("fit")
    return dm


def test_three_folds_are_disjoint_stratified_and_cover_the_training_images_once(mnist_dir: Path):
    folds = [fold_split(mnist_dir, i) for i in range(3)]
    vals = [set(dm.val_set.indices) for dm in folds]
    assert all(len(v) == 20_000 for v in vals)
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])  # disjoint
    assert vals[0] | vals[1] | vals[2] == set(range(60_000))  # every training image validates exactly once
    for dm, val in zip(folds, vals, strict=True):
        assert set(dm.train_set.indices) == set(range(60_000)) - val  # trains on the other K-1 folds
        assert len(dm.test_set) == 10_000  # the official test set, untouched
    _, labels = load_mnist(str(mnist_dir), train=True)
    share = torch.bincount(labels, minlength=10) / 3
    for val in vals:  # stratified: each class's count in a fold is within one of a third of its total
        counts = torch.bincount(labels[sorted(val)], minlength=10)
        assert (counts - share).abs().max() <= 1
    assert fold_split(mnist_dir, 0).val_set.indices == folds[0].val_set.indices  # seeded by split_seed
    assert fold_split(mnist_dir, 0, seed=7).val_set.indices != folds[0].val_set.indices


def test_a_fold_outside_the_folds_is_one_line(mnist_dir: Path):
    with pytest.raises(ConfigError, match=r"^data\.fold=3: must be from 0 to 2 \(data\.num_folds=3\)$"):
        validate_config(compose_config(["data.num_folds=3", "data.fold=3"]))
    with pytest.raises(ConfigError, match=r"^data\.num_folds=1: must be null \(no folds\) or an integer >= 2$"):
        validate_config(compose_config(["data.num_folds=1"]))
    with pytest.raises(DataError, match="data.fold=-1: must be from 0 to 4"):
        MNISTDataModule(data_dir=str(mnist_dir), num_folds=5, fold=-1)
    with pytest.raises(DataError, match=r"^data\.fold=2: folds need data\.num_folds"):  # one rule for both
        MNISTDataModule(data_dir=str(mnist_dir), fold=2)
    validate_config(compose_config(["data.num_folds=5", "data.fold=4"]))


def fake_job(root: Path, number: int, overrides: list[str], metrics: dict | None) -> None:
    (root / str(number) / ".hydra").mkdir(parents=True)
    (root / str(number) / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (root / str(number) / "metrics.json").write_text(json.dumps(metrics))


def test_report_gives_mean_and_sd_over_the_folds_of_each_setting(tmp_path: Path):
    values = {"0.001": [0.95, 0.96, 0.97], "0.003": [0.98, 0.99, None]}  # the last fold of 0.003 failed
    number = 0
    for lr, accs in values.items():
        for fold, acc in enumerate(accs):
            metrics = None if acc is None else {"val/acc_best": acc, "test/acc": acc - 0.01}
            fake_job(tmp_path, number, [f"model.optimizer.lr={lr}", "data.num_folds=3", f"data.fold={fold}"], metrics)
            number += 1
    text = write_report(tmp_path).read_text()
    assert "## Cross-validation: mean ± sample sd over the folds" in text
    assert f"| 0.001 | 0,1,2 | 0.9600 ± {statistics.stdev([0.95, 0.96, 0.97]):.4f} (n=3) |" in text
    assert f"| 0.003 | 0,1,2 | 0.9850 ± {statistics.stdev([0.98, 0.99]):.4f} (n=2) |" in text
    rows = list(csv.reader((tmp_path / "sweep_report_folds.csv").open()))
    assert rows[0][:5] == ["model.optimizer.lr", "folds", "val/acc_best mean", "val/acc_best sd", "val/acc_best n"]
    assert float(rows[1][2]) == pytest.approx(0.96) and rows[2][4] == "2"


@pytest.mark.slow
def test_three_fold_multirun_reports_mean_and_sd(run_cli, tmp_path: Path):
    sweep = tmp_path / "folds"
    result = run_cli("digit_lightning.train", "-m", "data.num_folds=3", "data.fold=0,1,2", *TINY,
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(3)]
    val, test = [m["val/acc_best"] for m in metrics], [m["test/acc"] for m in metrics]
    text = (sweep / "sweep_report.md").read_text()
    assert f"| 0,1,2 | {statistics.mean(val):.4f} ± {statistics.stdev(val):.4f} (n=3) |" in text
    assert f"{statistics.mean(test):.4f} ± {statistics.stdev(test):.4f} (n=3) |" in text
