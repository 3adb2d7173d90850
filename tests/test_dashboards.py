"""TensorBoard dashboards: the image tags and the graph land in the event file; other loggers and no callbacks work."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from digit_lightning.callbacks.dashboards import Dashboards
from digit_lightning.train import train

TINY = ["data.batch_size=32", "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=3", "test=false",
        "callbacks.progress_bar=null"]  # fmt: skip


def test_event_file_holds_the_dashboards(make_cfg, tmp_path: Path):
    train(make_cfg(*TINY, "trainer.max_epochs=2"))
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = set(events.Tags()["images"])
    assert {"val/confusion_matrix", "val/misclassified", "data/samples"} <= images, images
    assert len(events.Images("val/confusion_matrix")) == 2  # once per validation epoch, not for the sanity check
    assert len(events.Images("data/samples")) == 1  # once per run
    figure = events.Images("val/confusion_matrix")[-1]
    assert figure.width > 300 and figure.height > 300 and figure.encoded_image_string.startswith(b"\x89PNG")
    assert events.Tags()["graph"]  # the model graph, traced from DigitClassifier.example_input_array


@pytest.mark.parametrize("overrides", [["logger=csv"], ["logger=none"], ["callbacks=none"]])
def test_runs_without_tensorboard_or_callbacks(make_cfg, tmp_path: Path, overrides: list[str]):
    metrics = train(make_cfg(*TINY[:-1], "trainer.max_epochs=1", *overrides))
    assert "val/acc" in metrics


def test_keeps_the_first_mistakes_in_a_fixed_size_buffer():
    callback = Dashboards(max_misclassified=4)
    trainer = SimpleNamespace(sanity_checking=False)
    callback.on_validation_epoch_start(trainer, SimpleNamespace(device=torch.device("cpu")))
    for batch in range(3):  # each batch: images tagged by index, true label 0, predictions 0 (right) or 1 (wrong)
        x = torch.arange(5.0).add(5 * batch).view(5, 1, 1, 1).expand(5, 1, 28, 28)
        preds = torch.tensor([0, 1, 0, 1, 1]) if batch != 1 else torch.zeros(5, dtype=torch.long)
        log_probs = torch.nn.functional.one_hot(preds, 10).float().log()
        callback.on_validation_batch_end(trainer, None, log_probs, (x, torch.zeros(5, dtype=torch.long)), batch)
    kept = callback.wrong
    assert kept["x"].shape == (4, 1, 28, 28)  # never more than max_misclassified
    assert kept["wrong"].all() and kept["x"][:, 0, 0, 0].tolist() == [1.0, 3.0, 4.0, 11.0]  # the first four, in order
    assert callback.confusion.compute()[0].tolist() == [9, 6] + [0] * 8
