"""MLflow and W&B beside TensorBoard, read back from real stores: a SQLite MLflow store through MlflowClient, W&B's
offline run files, and TensorBoard's events for `logger=many` (digit_lightning/tracking.py, docs/tracking.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
import numpy as np
import pytest
import torch
from composition import compose
from synthetic import SYNTHETIC_OVERRIDES
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digit_lightning.tensorboard import METRICS, hparams
from digit_lightning.train import train

if TYPE_CHECKING:
    import mlflow
    from mlflow import MlflowClient


def mlflow_client(uri: str) -> MlflowClient:
    """MLflow's client of the store at `uri` (MLflow imported here, not at collection: it takes 1.5 s)."""
    mlflow = pytest.importorskip("mlflow", reason="the `tracking` extra is not installed")
    return mlflow.MlflowClient(uri)


# 2 epochs of 12 steps, a point every 4 steps; 3 test batches of 32
TINY = ["data.batch_size=32", "+trainer.limit_train_batches=12", "+trainer.limit_val_batches=3",
        "+trainer.limit_test_batches=3", "callbacks.progress_bar=null", "trainer.max_epochs=2",
        "trainer.log_every_n_steps=4"]  # fmt: skip
TRAIN_STEPS, VAL_STEPS = list(range(3, 24, 4)), [11, 23]  # Lightning logs at step 3, 7, ...; validation per epoch


def mlflow_store(tmp_path: Path) -> list[str]:
    return [f"logger.mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"logger.mlflow.artifact_location={tmp_path}/artifacts"]  # fmt: skip


def only_run(client: MlflowClient) -> mlflow.entities.Run:
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(experiments)
    return run


def artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    """Every artifact file of the run, recursively."""
    found = []
    for item in client.list_artifacts(run_id, path):
        found += artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return found


@pytest.fixture(scope="module")
def many_run(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One run with `logger=many` (TensorBoard and MLflow) into a SQLite MLflow store, read back by the tests below:
    its config, metrics, MLflow client and run, and its dir."""
    pytest.importorskip("mlflow", reason="the `tracking` extra is not installed")
    tmp_path = tmp_path_factory.mktemp("many")
    cfg = compose([f"paths.output_dir={tmp_path}", f"paths.data_dir={synthetic_dir}", "trainer=cpu",
                   *SYNTHETIC_OVERRIDES, *TINY, "logger=many", *mlflow_store(tmp_path),
                   "logger.mlflow.register_as=digits"])  # fmt: skip
    metrics = train(cfg)
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    return cfg, metrics, client, only_run(client), tmp_path


@pytest.mark.slow  # MLflow's store and W&B's service start take seconds; test_configs composes their options fast
def test_mlflow_run_reads_back_with_curves_params_artifacts_and_a_model(many_run):
    cfg, metrics, client, run, tmp_path = many_run
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params == {k: str(v) for k, v in hparams(cfg, choices={}).items()}  # curated, as in HParams

    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}  # fmt: skip
    assert set(history) == {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/acc_best",
                            "test/loss", "test/acc"}  # TensorBoard's names: no lr-Adam, no epoch  # fmt: skip
    for key in ("train/loss", "train/acc", "train/lr"):
        assert [step for step, _ in history[key]] == TRAIN_STEPS, key
    for key in ("val/loss", "val/acc", "val/acc_best"):
        assert [step for step, _ in history[key]] == VAL_STEPS, key
    assert history["test/acc"][-1][1] == pytest.approx(metrics["test/acc"])

    files = artifacts(client, run.info.run_id)
    assert "metrics.json" in files and "test/confusion_matrix.png" in files
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))).read_text())[
        "test/acc"
    ] == pytest.approx(metrics["test/acc"])
    (checkpoint,) = [f for f in files if f.startswith("checkpoints/")]
    assert checkpoint.endswith(".ckpt") and Path(checkpoint).name in {p.name for p in tmp_path.rglob("*.ckpt")}
    images = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    assert sum("val~confusion_matrix" in f for f in images) == 2 and any("train_inputs~samples" in f for f in images)

    # The logged model predicts digits of the test images, as accurately as the best checkpoint tested.
    model_uri = run.data.tags["model_uri"]
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri)
    assert model.metadata.get_input_schema().inputs[0].shape == (-1, 1, 28, 28)
    data = hydra.utils.instantiate(cfg.data)  # the 3 test batches the run was tested on
    data.prepare_data()
    data.setup("test")
    images, labels = zip(*[batch for _, batch in zip(range(3), data.test_dataloader(), strict=False)], strict=True)
    digits = model.predict(torch.cat(images).numpy())
    assert digits.dtype == np.int64 and digits.shape == (len(torch.cat(labels)),)
    assert (digits == torch.cat(labels).numpy()).mean() == pytest.approx(metrics["test/acc"], abs=1e-6)
    (version,) = client.search_model_versions("name='digits'")  # registered: version 1 of `digits`
    assert int(version.version) == 1 and version.run_id == run.info.run_id


def scalar_tags(run_dir: Path) -> set[str]:
    (events_dir,) = {p.parent for p in run_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir))
    events.Reload()
    return set(events.Tags()["scalars"])


@pytest.mark.slow  # MLflow's store and W&B's service start take seconds; test_configs composes their options fast
def test_many_logs_to_tensorboard_and_mlflow_under_the_same_names(many_run):
    _, _, client, run, tmp_path = many_run
    tensorboard = scalar_tags(tmp_path / "tensorboard")
    # The same names, but a run's one-off values: MLflow keeps test/*, TensorBoard the HParams columns (whole_run/)
    assert set(run.data.metrics) - {"test/acc", "test/loss"} == tensorboard - set(METRICS.values())
    assert {"train/lr", "val/acc", "test/acc"} <= set(run.data.metrics) and set(METRICS.values()) <= tensorboard
    for key in ("train/loss", "val/acc"):  # the same points in both
        points = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert points == (TRAIN_STEPS if key == "train/loss" else VAL_STEPS)


def wandb_file_records(path: Path) -> list[bytes]:
    """The records of a `.wandb` run file: a 7-byte header (`:W&B`, magic, version), then LevelDB's log format,
    32 KiB blocks of records each with a 7-byte header (CRC, length, type: full, first, middle or last part)."""
    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room left in this block for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            records.append(pending)
    return records


def wandb_records(run_dir: Path) -> tuple[list[dict], dict, dict]:
    """The history rows, the config and the summary of the one offline W&B run under `run_dir`, from its file."""
    from wandb.proto import wandb_internal_pb2

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history, config, summary = [], {}, {}
    for data in wandb_file_records(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.history.item})  # fmt: skip
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                            for item in record.summary.update})  # fmt: skip
        elif kind == "run":
            config["_run"] = {"name": record.run.display_name, "group": record.run.run_group}
    return history, config, summary


@pytest.mark.slow  # MLflow's store and W&B's service start take seconds; test_configs composes their options fast
def test_wandb_offline_run_reads_back_from_its_files(synthetic_cfg, tmp_path: Path):
    pytest.importorskip("wandb", reason="the `tracking` extra is not installed")
    cfg = synthetic_cfg(*TINY, "logger=wandb")
    metrics = train(cfg)
    history, config, summary = wandb_records(tmp_path)
    assert config["_run"] == {"name": "run", "group": "train"}
    params = hparams(cfg, choices={})
    assert {k: config[k] for k in params} == params  # the curated settings, as in HParams
    steps = {key: [row["trainer/global_step"] for row in history if key in row] for key in ("train/loss", "val/acc")}
    assert steps == {"train/loss": TRAIN_STEPS, "val/acc": VAL_STEPS}
    assert not any(key.startswith("lr-") or key == "epoch" for row in history for key in row)  # TensorBoard's names
    assert sum("val/confusion_matrix/_type" in row for row in history) == 2  # an image per validation
    (test_image,) = [row[key][0] for row in history for key in row if key == "test/confusion_matrix/filenames"]
    assert next(tmp_path.glob("wandb/offline-run-*/files")).joinpath(test_image).stat().st_size > 1000
    assert summary["test/acc"] == pytest.approx(metrics["test/acc"])


@pytest.mark.slow
def test_a_sweep_is_one_experiment_and_one_group_with_jobs_named_as_in_tensorboard(run_cli, tmp_path: Path):
    """`-m` with 2 learning rates and TensorBoard, MLflow and W&B at once: one MLflow experiment and one W&B group for
    the sweep, each job a run named as its TensorBoard run, with its config among the MLflow artifacts."""
    pytest.importorskip("wandb", reason="the `tracking` extra is not installed")
    pytest.importorskip("mlflow", reason="the `tracking` extra is not installed")
    sweep = tmp_path / "logs/train/multiruns/sweep"
    result = run_cli(
        "digit_lightning.train", "-m", "logger=[many,wandb]", "model.optimizer.lr=1e-3,3e-3", *TINY,
        "trainer.max_epochs=1", "test=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    names = {"lr=1e-3", "lr=3e-3"}  # names.short_value: 3 significant digits
    tensorboard = [p.name for job in ("0", "1") for p in (sweep / job / "tensorboard").iterdir()]
    assert sorted(tensorboard) == sorted(names)  # TensorBoard's run of each job: <job dir>/tensorboard/<name>/

    client = mlflow_client(f"sqlite:///{tmp_path}/logs/mlflow/mlflow.db")
    experiment = client.get_experiment_by_name("train/sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert {run.info.run_name for run in runs} == names
    for run in runs:
        files = set(artifacts(client, run.info.run_id))
        assert {"config/config.yaml", "config/overrides.yaml", "metrics.json"} <= files
        assert float(run.data.params["lr"]) == float(run.info.run_name.removeprefix("lr="))  # full value, short name

    groups = {}
    for job in ("0", "1"):
        _, config, _ = wandb_records(sweep / job)
        groups[config["_run"]["name"]] = config["_run"]["group"]
    assert groups == dict.fromkeys(names, "train/sweep")  # a run of its own per job, one group
