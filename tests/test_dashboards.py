"""TensorBoard dashboards, read back the way TensorBoard reads them (its event loader and its HParams backend):
per-step curves, the Custom Scalars layout, HParams without plumbing, named sweep jobs, images, PR curves, graph."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import backend_context, metadata

from digit_lightning.callbacks.dashboards import Dashboards
from digit_lightning.cli import compose_config
from digit_lightning.names import run_name, short_value
from digit_lightning.tensorboard import METRICS, MISSING, NONE, PLUMBING, SHOWN, TensorBoardLogger, hparams
from digit_lightning.train import train

EVERYTHING = dict.fromkeys(("scalars", "images", "tensors", "histograms", "distributions", "audio", "graph"), 0)
TINY = ["data.batch_size=32", "+trainer.limit_train_batches=12", "+trainer.limit_val_batches=3",
        "+trainer.limit_test_batches=3", "callbacks.progress_bar=null"]  # fmt: skip


def events_of(run: Path) -> EventAccumulator:
    """One run's event files, loaded as TensorBoard loads them, keeping every point (size guidance 0)."""
    events = EventAccumulator(str(run), size_guidance=EVERYTHING)
    events.Reload()
    return events


def steps(events: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in events.Scalars(tag)]


def test_a_run_reads_as_tensorboard_shows_it(synthetic_cfg, tmp_path: Path):
    """2 epochs of 12 steps, logging every 4: curves on one step axis, layout, HParams, images, PR curves, graph."""
    metrics = train(synthetic_cfg(*TINY, "trainer.max_epochs=2", "trainer.log_every_n_steps=4"))
    events = events_of(tmp_path / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    assert scalars == {
        "train/loss",
        "train/acc",
        "train/lr",
        "val/loss",
        "val/acc",
        "val/acc_best",
        "whole_run/val_acc_best",
        "whole_run/test_acc",
        "whole_run/test_loss",
    }, scalars  # fmt: skip  (lr-Adam is train/lr; Lightning's `epoch` is left out; test/* is a whole-run value)
    for name, tag in METRICS.items():  # one point per run, at its end (24 steps)
        assert [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] == [(24, round(metrics[name], 6))], tag

    # A point every log_every_n_steps steps: the mean over the 4 steps up to it, at Lightning's global step.
    assert steps(events, "train/loss") == steps(events, "train/acc") == [3, 7, 11, 15, 19, 23]
    assert steps(events, "train/lr") == [3, 7, 11, 15, 19, 23]  # per step: the one-cycle schedule has a shape
    lrs = [e.value for e in events.Scalars("train/lr")]
    assert lrs[0] < max(lrs) and lrs[-1] < max(lrs) / 10, lrs  # up, then down
    assert steps(events, "val/loss") == steps(events, "val/acc_best") == [11, 23]  # each epoch's last step
    assert all(0 < e.value < 3 for e in events.Scalars("train/loss"))
    assert "train/loss" in metrics  # the last step logs too (the final window), so the run's metrics have it

    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for category in layout.category for c in category.chart}
    assert list(charts) == ["loss: train vs val", "accuracy: train vs val", "learning rate"]
    for title, patterns in charts.items():  # every chart draws something, each of its regexes a tag of the run
        assert all(any(re.search(p, tag) for tag in scalars) for p in patterns), title

    content = events.PluginTagToContent("hparams")
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    assert [(m.display_name, m.name.tag) for m in experiment.metric_infos] == list(METRICS.items())
    session = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    params = {k: getattr(v, v.WhichOneof("kind")) for k, v in session.hparams.items()}
    assert sorted(params) == sorted(i.name for i in experiment.hparam_infos)  # a map: no order
    # after "run": the columns schema.py declares, in its order
    assert [i.name for i in experiment.hparam_infos] == [
        "run", "model", "schedule", "optimizer", "lr", "weight_decay", "batch_size", "augmentation", "epochs",
        "precision", "seed", "experiment", "fold", "overrides",
    ]  # fmt: skip
    assert sorted(i.name for i in experiment.hparam_infos if i.differs) == sorted(SHOWN)  # shown first
    assert (params["run"], params["experiment"], params["fold"], params["overrides"]) == ("defaults", NONE, NONE, NONE)
    assert (params["lr"], params["batch_size"], params["optimizer"]) == (1e-3, 32, "Adam")
    assert not [k for k in params if any(p in k for p in PLUMBING) or "dir" in k or "path" in k], params
    assert not [v for v in params.values() if str(tmp_path) in str(v)], params

    images = events.Tags()["images"]
    assert sorted(images) == ["train_inputs/samples", "val/confusion_matrix", "val/misclassified",
                              "whole_run/test_confusion_matrix"]  # fmt: skip
    assert len(events.Images("val/confusion_matrix")) == 2 and len(events.Images("train_inputs/samples")) == 1
    for tag in images:  # small enough that TensorBoard's ~370-pixel card shrinks it by half at most
        image = events.Images(tag)[-1]
        assert 300 < image.width <= 720 and image.encoded_image_string.startswith(b"\x89PNG"), (tag, image.width)
    pr_curves = sorted(t for t in events.Tags()["tensors"] if t.startswith("test_pr_curve/"))
    assert pr_curves == [f"test_pr_curve/{d}" for d in range(10)]
    graph = events.Graph()
    assert any(n.name.startswith("Digit/Conv2d[conv1]/") for n in graph.node)  # the net's layers, inside its node


def test_hparams_are_the_same_keys_for_every_run_named_by_what_was_typed():
    typed = ["model.optimizer.lr=0.00024156772025296256", "trainer=cpu", "data.val_size=1000",
             "data.augment={degrees:10}", "model.optimizer._target_=torch.optim.AdamW",
             "+trainer.limit_train_batches=5", "data.data_dir=/x", "paths.log_dir=/y", "hydra/launcher=joblib",
             "experiment=fast", "ckpt_path=/z/last.ckpt", "data.num_folds=3", "data.fold=2"]  # fmt: skip
    cfg = compose_config([o for o in typed if not o.startswith(("hydra/", "ckpt_path"))])
    params = hparams(cfg, typed, {"trainer": "cpu", "experiment": "fast", "hydra/launcher": "joblib"})
    plain = hparams(compose_config([]), [], {})
    assert list(params) == list(plain)  # the same columns, whatever the run set
    assert params["run"] == "lr=2.42e-4,augment={degrees:10},experiment=fast,fold=2"  # 3 significant digits
    assert params["lr"] == 0.00024156772025296256  # the full value stays in HParams
    assert params["optimizer"] == "AdamW" and params["weight_decay"] == 0.01  # AdamW's default
    assert params["experiment"] == "fast" and params["augmentation"] == "degrees=10" and params["fold"] == "2 of 3"
    assert params["overrides"] == "trainer=cpu data.val_size=1000 trainer.limit_train_batches=5"
    assert params["schedule"] == "OneCycleLR" and params["seed"] == 42
    assert (plain["run"], plain["experiment"], plain["fold"], plain["overrides"]) == ("defaults", NONE, NONE, NONE)
    assert not [v for v in params.values() if any(p in str(v) for p in ("/x", "/y", "/z", "joblib"))], params


def test_short_names_and_values():
    assert [short_value(v) for v in ("0.00024156772025296256", "1e-3", "0.05", "128", "0.0", "12345.6", "fast")] == [
        "2.42e-4", "1e-3", "0.05", "128", "0", "1.23e4", "fast"
    ]  # fmt: skip
    pairs = [("model.optimizer.lr", "0.0082466"), ("data.batch_size", "32"), ("model.optimizer.weight_decay", "1e-05")]
    assert run_name(pairs) == "lr=8.25e-3,bs=32,wd=1e-5"
    assert run_name([("data.fold", "3")]) == "fold=3"
    assert run_name([("a.lr", "1"), ("b.lr", "2")]) == "a.lr=1,b.lr=2"  # the same short key twice: full keys


def hparams_tab(logdir: Path):
    """The HParams tab's table as TensorBoard's hparams backend computes it for `logdir`, with its sessions."""
    mux = plugin_event_multiplexer.EventMultiplexer(size_guidance=EVERYTHING)
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=mux,
                               data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)))  # fmt: skip
    backend, ctx = backend_context.Context(tb), context.RequestContext()
    content = backend.hparams_metadata(ctx, "")
    table = backend.experiment_from_metadata(ctx, "", True, content, backend.hparams_from_data_provider(ctx, "", 0))
    sessions = {run: metadata.parse_session_start_info_plugin_data(tags[metadata.SESSION_START_INFO_TAG]).hparams
                for run, tags in content.items() if metadata.SESSION_START_INFO_TAG in tags}  # fmt: skip
    return table, sessions


@pytest.mark.slow
def test_sweep_jobs_are_named_by_their_overrides_and_the_swept_key_is_a_column(run_cli, tmp_path: Path):
    """A real 2-job multirun through the CLI (tens of seconds)."""
    result = run_cli(
        "digit_lightning.train", "-m", "model.optimizer.lr=1e-3,3e-3", "trainer=cpu", "test=false",
        "trainer.max_epochs=1", "data.batch_size=64", "+trainer.limit_train_batches=8", "+trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=2", "callbacks.progress_bar=null", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    table, sessions = hparams_tab(tmp_path / "sweep")
    assert set(sessions) == {"0/tensorboard/lr=1e-3", "1/tensorboard/lr=3e-3"}
    assert sorted(s["lr"].number_value for s in sessions.values()) == [0.001, 0.003]
    assert sorted(s["run"].string_value for s in sessions.values()) == ["lr=1e-3", "lr=3e-3"]
    columns = [h.name for h in table.hparam_infos]
    assert columns[:5] == sorted(SHOWN)  # the tab shows the first five columns: the run's name, lr, batch size, ...
    assert not [name for name in columns if any(p in name for p in PLUMBING) or name.startswith("paths")]
    assert [m.display_name for m in table.metric_infos] == ["val/acc_best", "test/acc", "test/loss"]
    for job in ("0/tensorboard/lr=1e-3", "1/tensorboard/lr=3e-3"):  # test=false: the placeholder, so still drawn
        events = events_of(tmp_path / "sweep" / job)
        assert [e.value for e in events.Scalars(METRICS["test/acc"])] == [MISSING]
        assert events.Scalars(METRICS["val/acc_best"])[0].value > 0.1

    log = (tmp_path / "sweep" / "0" / "train.log").read_text()  # Lightning's messages reach the run's log file
    assert "lightning" in log and "`Trainer.fit` stopped: `max_epochs=1` reached." in log, log
    assert not list((tmp_path / "sweep").rglob("train_inputs*"))


@pytest.mark.parametrize("overrides", [["logger=csv"], ["logger=none"], ["callbacks=none"]])
def test_runs_without_tensorboard_or_callbacks(synthetic_cfg, overrides: list[str]):
    metrics = train(synthetic_cfg(*TINY[:-1], "test=false", "trainer.max_epochs=1", *overrides))
    assert "val/acc" in metrics and "train/loss" in metrics


class SyncCounter(L.Callback):
    """Counts the host-device synchronizations torch reports (its sync debug mode) within each training step."""

    def __init__(self) -> None:
        self.per_step: list[int] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        torch.cuda.synchronize()
        self._catching = warnings.catch_warnings(record=True)
        self._caught = self._catching.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catching.__exit__(None, None, None)
        self.per_step.append(sum("synchroniz" in str(w.message) for w in self._caught))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist on a GPU only")
def test_no_host_device_sync_on_steps_that_do_not_log(make_cfg, tmp_path: Path):
    """On a GPU, the training steps that do not log (3 of every 4 here) make no host-device sync."""
    cfg = make_cfg("data.batch_size=64")
    counter = SyncCounter()
    trainer = L.Trainer(accelerator="gpu", devices=1, max_epochs=1, limit_train_batches=16, limit_val_batches=0,
                        log_every_n_steps=4, logger=TensorBoardLogger(tmp_path), enable_progress_bar=False,
                        enable_checkpointing=False, callbacks=[counter, LearningRateMonitor("step")])  # fmt: skip
    trainer.fit(hydra.utils.instantiate(cfg.model, _convert_="all"), datamodule=hydra.utils.instantiate(cfg.data))
    logging_steps = {3, 7, 11, 15}
    quiet = [n for step, n in enumerate(counter.per_step) if step not in logging_steps]
    assert len(counter.per_step) == 16 and not any(quiet), counter.per_step


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


def test_figures_leave_the_plotting_state_alone_in_process(tmp_path: Path):
    """As below, in this process: the backend switched to svg stays svg, pyplot's figure list stays empty."""
    import matplotlib
    import matplotlib.pyplot as plt
    from torch.utils.tensorboard import SummaryWriter

    from digit_lightning.callbacks.dashboards import add_figure, confusion_figure, image_grid

    before, figures_before = matplotlib.get_backend(), plt.get_fignums()
    matplotlib.use("svg")
    try:
        writer = SummaryWriter(str(tmp_path))
        logger = type("Logger", (), {"experiment": writer})()
        figures = [confusion_figure(torch.eye(10, dtype=torch.long) * 5 + 1),
                   image_grid(torch.zeros(4, 1, 28, 28), list("1234"), "t")]  # fmt: skip
        assert plt.get_fignums() == figures_before  # not pyplot's: a notebook shows them only when asked
        for tag, fig in zip(("cm", "grid"), figures, strict=True):
            add_figure(logger, tag, fig, 0)
        writer.close()
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)


@pytest.mark.slow  # the fresh-interpreter twin of the test above (svg chosen before pyplot is first imported)
def test_figures_leave_the_plotting_state_alone():
    """A notebook's backend (here svg) and pyplot's figure list are the same after the dashboards draw and log
    figures: library code uses matplotlib's Figure, never pyplot or matplotlib.use()."""
    script = """
import sys, matplotlib, torch
matplotlib.use("svg")
from torch.utils.tensorboard import SummaryWriter
from digit_lightning.callbacks.dashboards import add_figure, confusion_figure, image_grid
class Logger:
    experiment = SummaryWriter(sys.argv[1])
import matplotlib.pyplot as plt  # torchmetrics imports it anyway
figures = [confusion_figure(torch.eye(10, dtype=torch.long) * 5 + 1),
           image_grid(torch.zeros(4, 1, 28, 28), list("1234"), "t")]
assert plt.get_fignums() == [], plt.get_fignums()  # not pyplot's: a notebook shows them only when asked
for tag, fig in zip(("cm", "grid"), figures):
    add_figure(Logger(), tag, fig, 0)
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
"""
    result = subprocess.run([sys.executable, "-c", script, str(Path(tempfile.mkdtemp()))], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
