"""Evaluation of a checkpoint: the same test/acc as training reported, per-class metrics, JSON and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digit_lightning.cli import compose_config
from digit_lightning.config import ConfigError
from digit_lightning.errors import UserError
from digit_lightning.eval import evaluate


def test_eval_reports_what_training_reported(small_checkpoint, mnist_dir: Path, tmp_path: Path):
    path, trained = small_checkpoint  # training tested this (best) checkpoint on the full test set, batch size 64
    cfg = compose_config(
        [f"ckpt_path={path}", f"paths.output_dir={tmp_path}", f"paths.data_dir={mnist_dir}", "trainer=cpu"],
        config_name="eval",
    )  # eval uses batch size 256: the metrics must not depend on it
    result = evaluate(cfg)

    assert result["test/acc"] == pytest.approx(trained["test/acc"], abs=1e-6)
    assert result["test/loss"] == pytest.approx(trained["test/loss"], rel=1e-4)
    counts = result["confusion_matrix"]["counts"]
    assert result["num_images"] == sum(map(sum, counts)) == 10_000
    assert sum(counts[d][d] for d in range(10)) / 10_000 == pytest.approx(result["test/acc"], abs=1e-6)
    for d in range(10):  # torchmetrics' per-class numbers agree with the confusion matrix
        row, column = counts[d], [counts[t][d] for t in range(10)]
        assert result["per_class"][str(d)]["recall"] == pytest.approx(counts[d][d] / sum(row), abs=1e-6)
        assert result["per_class"][str(d)]["precision"] == pytest.approx(counts[d][d] / sum(column), abs=1e-6)
        assert result["per_class"][str(d)]["support"] == sum(row)

    assert json.loads((tmp_path / "eval.json").read_text()) == result
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    # per-class numbers: one table, not 33 cards; the test metrics (one value) beside the other runs' (whole_run/)
    assert set(events.Tags()["scalars"]) == {"whole_run/test_acc", "whole_run/test_loss", "whole_run/val_acc_best"}
    assert events.Scalars("whole_run/test_acc")[-1].value == pytest.approx(result["test/acc"])
    assert "whole_run/test_confusion_matrix" in events.Tags()["images"]
    tensors = events.Tags()["tensors"]
    assert {f"test_pr_curve/{d}" for d in range(10)} <= set(tensors)
    table = events.Tensors("test_per_class/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| 3 | {result['per_class']['3']['precision']:.4f} |" in table


@pytest.mark.slow  # the CLI twin of test_eval_reports_what_training_reported: eval.json in its Hydra run dir
def test_eval_cli_prints_the_table_and_writes_json_in_its_run_dir(small_checkpoint, run_cli, tmp_path: Path):
    result = run_cli(
        "digit_lightning.eval", f"ckpt_path={small_checkpoint[0]}", "trainer=cpu", "+trainer.limit_test_batches=4",
        "data.eval_batch_size=256",
        "hydra.run.dir=run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["num_images"] == 4 * 256
    assert f"test/acc={report['test/acc']:.4f}" in result.stdout
    assert "per-class metrics on 1024 test images" in result.stdout and "confusion matrix" in result.stdout


def test_eval_without_a_checkpoint_says_what_to_pass(tmp_path: Path):
    with pytest.raises(UserError) as err:
        evaluate(compose_config([f"paths.output_dir={tmp_path}"], config_name="eval"))
    assert str(err.value) == "ckpt_path is not set; pass ckpt_path=last, a run dir or a .ckpt file"


@pytest.mark.slow  # the CLI twin of the test above
def test_eval_cli_without_a_checkpoint_says_what_to_pass(run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.eval", "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path is not set; pass ckpt_path=last, a run dir or a .ckpt file"
    )


@pytest.mark.parametrize("value", ["abc", "-3", "2.5", "0"])
def test_eval_refuses_a_bad_batch_size_before_loading_anything(tmp_path: Path, value: str):
    """`data.batch_size=abc` and friends: one line naming the key (`data.batch_size=0` also runs through the CLI in
    test_config_errors.py, with `-m slow`), raised before the checkpoint or the data is looked at."""
    overrides = [f"data.batch_size={value}", "ckpt_path=missing.ckpt", f"paths.output_dir={tmp_path}",
                 f"paths.data_dir={tmp_path}/data"]  # fmt: skip
    with pytest.raises(ConfigError) as err:  # a wrong type already while composing (schema.Data), a range in evaluate
        evaluate(compose_config(overrides, config_name="eval"))
    assert str(err.value) == f"data.batch_size={value}: must be an integer >= 1"
    assert list(tmp_path.iterdir()) == []
