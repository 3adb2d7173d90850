"""The model zoo: every `model=` option trains, checkpoints (batch-norm statistics included), loads safely, exports
and predicts; ensembles average their members' probabilities; the EMA's weights are what is validated and saved."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from synthetic import SYNTHETIC_OVERRIDES

from digit_lightning.callbacks import EMA
from digit_lightning.checkpoint import load_checkpoint, read_checkpoint
from digit_lightning.cli import CONFIG_DIR, compose_config
from digit_lightning.config import validate_config
from digit_lightning.data import MNISTDataModule
from digit_lightning.data.mnist import MNIST_MEAN, MNIST_STD, load_mnist
from digit_lightning.data.preprocess import preprocess_image
from digit_lightning.ensemble import Ensemble, ShiftTTA, load_model
from digit_lightning.export import export_onnx, export_torchscript, run_exported
from digit_lightning.models import MODELS, build_net, count_parameters
from digit_lightning.module import DigitClassifier
from digit_lightning.predict import predict_tensors
from digit_lightning.train import train

MODEL_CONFIGS = {p.stem: yaml.safe_load(p.read_text()) for p in sorted((Path(CONFIG_DIR) / "model").glob("*.yaml"))}


def test_every_model_has_a_config_and_its_parameter_count_in_its_docstring():
    names = {cfg["net"]["name"] for cfg in MODEL_CONFIGS.values()}
    assert names == set(MODELS), "each net in MODELS needs a conf/model/<name>.yaml naming it, and only those"
    for option, cfg in MODEL_CONFIGS.items():
        assert "_target_" not in cfg["net"], f"conf/model/{option}.yaml: nets are named by net.name, not _target_"
        net = build_net(**cfg["net"])  # the yaml's arguments are plain data that build_net accepts
        module_doc = ast.get_docstring(ast.parse(Path(type(net).__module__.replace(".", "/") + ".py").read_text()))
        assert f"{count_parameters(net):,} parameters" in module_doc, f"{option}: parameter count in its docstring"


def test_zoo_recipes_compose_and_validate(mnist_dir: Path, tmp_path: Path):
    for overrides in (["experiment=fast"], ["experiment=record"], ["model=strong", "trainer=ddp"]):
        cfg = compose_config([f"paths.output_dir={tmp_path}", *overrides])
        validate_config(cfg)
    record = compose_config([f"paths.output_dir={tmp_path}", "experiment=record"])
    assert record.model.net.name == "strong" and "ema" in record.callbacks
    assert record.callbacks.model_checkpoint.monitor.startswith("val/")  # checkpoints chosen on validation only
    assert compose_config([f"paths.output_dir={tmp_path}", "trainer=ddp"]).trainer.sync_batchnorm is True


@pytest.fixture(scope="module")
def trained(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Each `model=` option trained for a few batches of the synthetic digits (the strong one with the EMA callback,
    as its recipe)."""
    runs = {}
    for option in MODEL_CONFIGS:
        out = tmp_path_factory.mktemp(option)
        overrides = [
            f"paths.output_dir={out}", f"paths.data_dir={synthetic_dir}", *SYNTHETIC_OVERRIDES, "trainer=cpu",
            f"model={option}",
            "data.batch_size=32", "trainer.max_epochs=1", "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=2", "+trainer.limit_test_batches=2", "logger=none",
            "callbacks.progress_bar=null",
            *(["callbacks=ema", "callbacks.ema.decay=0.5"] if option == "strong" else []),
        ]  # fmt: skip
        metrics = train(compose_config(overrides))
        runs[option] = (next((out / "checkpoints").glob("epoch_*.ckpt")), metrics)
    return runs


@pytest.fixture(scope="module")
def test_images(synthetic_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 256 synthetic test images, normalized, and their labels."""
    x, y = load_mnist(synthetic_dir, train=False)
    return ((x[:256].float() / 255 - MNIST_MEAN) / MNIST_STD)[:, None], y[:256].long()


@pytest.mark.parametrize("option", sorted(MODEL_CONFIGS))
def test_model_trains_loads_exports_and_predicts(trained, test_images, tmp_path: Path, option: str):
    ckpt, metrics = trained[option]
    assert 0.0 <= metrics["test/acc"] <= 1.0 and np.isfinite(metrics["train/loss"])
    model = load_checkpoint(ckpt)
    state = read_checkpoint(ckpt)["state_dict"]
    assert type(model.net) is MODELS[MODEL_CONFIGS[option]["net"]["name"]]
    for name, tensor in model.state_dict().items():  # every parameter and buffer, BN running stats included
        assert torch.equal(tensor, state[name]), name
    running = [k for k in state if k.endswith("running_mean")]
    if any(isinstance(m, torch.nn.BatchNorm2d) for m in model.net.modules()):
        assert running and all(state[k].abs().sum() > 0 for k in running)  # trained statistics, not the zeros
    else:
        assert not running

    images, labels = test_images
    with torch.no_grad():
        expected = model(images).numpy()
    path = tmp_path / f"{option}.torchscript"
    export_torchscript(model.net.eval(), path)
    assert np.abs(run_exported(path, "torchscript", images) - expected).max() <= 1e-4

    top = predict_tensors(model, images, top_k=2)
    assert [t[0][0] for t in top] == expected.argmax(1).tolist()
    top2 = np.sort(np.exp(expected), axis=1)[:, ::-1][:, :2]
    assert np.allclose([[p for _, p in t] for t in top], top2, atol=1e-6)


@pytest.mark.slow  # torch's ONNX exporter takes seconds a model; test_export.py exports the default one fast
@pytest.mark.parametrize("option", sorted(MODEL_CONFIGS))
def test_model_exports_to_onnx(trained, test_images, tmp_path: Path, option: str):
    model = load_checkpoint(trained[option][0])
    images, _ = test_images
    with torch.no_grad():
        expected = model(images).numpy()
    export_onnx(model.net.eval(), tmp_path / f"{option}.onnx")
    assert np.abs(run_exported(tmp_path / f"{option}.onnx", "onnx", images) - expected).max() <= 1e-4


def test_ensemble_probabilities_are_the_mean_of_its_members(trained, test_images, tmp_path: Path):
    paths = [trained[name][0] for name in ("digit", "lenet5", "fast")]
    images, _ = test_images
    ensemble = load_model(paths)
    assert isinstance(ensemble.net, Ensemble) and len(ensemble.net.members) == 3
    with torch.no_grad():
        members = torch.stack([load_checkpoint(p)(images).exp() for p in paths])
        got = ensemble(images).exp()
    assert torch.allclose(got, members.mean(dim=0), atol=1e-6)
    assert torch.allclose(got.sum(dim=1), torch.ones(len(images)), atol=1e-5)

    path = tmp_path / "ensemble.torchscript"
    export_torchscript(ensemble.net, path)  # one file for the ensemble (its ONNX file: below)
    assert np.abs(run_exported(path, "torchscript", images) - got.log().numpy()).max() <= 1e-4

    tta = load_model(paths[:1], tta=True)
    assert isinstance(tta.net, ShiftTTA)
    single = load_checkpoint(paths[0])
    with torch.no_grad():
        views = [
            single(torch.roll(images, shift, dims=(2, 3))).exp() for shift in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
        ]
        assert torch.allclose(tta(images).exp(), torch.stack(views).mean(dim=0), atol=1e-6)


@pytest.mark.slow  # torch's ONNX exporter: seconds (the TorchScript file is checked above)
def test_an_ensemble_exports_to_one_onnx_file(trained, test_images, tmp_path: Path):
    ensemble = load_model([trained[name][0] for name in ("digit", "lenet5", "fast")])
    images, _ = test_images
    with torch.no_grad():
        expected = ensemble(images).numpy()
    export_onnx(ensemble.net, tmp_path / "ensemble.onnx")
    assert np.abs(run_exported(tmp_path / "ensemble.onnx", "onnx", images) - expected).max() <= 1e-4


@pytest.mark.slow  # the CLI twin of an in-process test above
def test_eval_and_predict_cli_take_a_list_of_checkpoints(trained, run_cli, tmp_path: Path, mnist_dir):
    paths = [trained[name][0] for name in ("digit", "lenet5")]
    result = run_cli(
        "digit_lightning.eval", f"ckpt_path=[{paths[0]},{paths[1]}]", f"hydra.run.dir={tmp_path / 'eval'}",
        "trainer.accelerator=cpu", "+trainer.limit_test_batches=1", "data.eval_batch_size=256", "logger=none",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "evaluated an ensemble of 2 checkpoints" in result.stdout
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["ckpt_path"] == [str(p) for p in paths] and report["num_images"] == 256
    raw, labels = load_mnist(mnist_dir, train=False)  # the CLI evaluates on the real MNIST
    images, labels = ((raw[:256].float() / 255 - MNIST_MEAN) / MNIST_STD)[:, None], labels[:256]  # its first batch
    with torch.no_grad():
        members = [load_checkpoint(p)(images) for p in paths]
        mean = torch.stack([m.exp() for m in members]).mean(dim=0)
    assert report["test/acc"] == pytest.approx((mean.argmax(1) == labels).float().mean().item(), abs=1e-6)
    for member, out in zip(report["ensemble"], members, strict=True):
        assert member["test/acc"] == pytest.approx((out.argmax(1) == labels).float().mean().item(), abs=1e-6)

    digits = tmp_path / "digits"
    digits.mkdir()
    raw, _ = load_mnist(mnist_dir, train=False)
    for i in range(3):
        Image.fromarray(raw[i].numpy()).save(digits / f"{i}.png")
    result = run_cli("digit_lightning.predict", f"ckpt_path=[{paths[0]},{paths[1]}]", f"inputs=[{digits}]",
                     "format=json", "top_k=10", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    predicted = sorted(json.loads(result.stdout), key=lambda r: r["file"])
    files = sorted(digits.glob("*.png"))
    with torch.no_grad():
        probs = torch.stack(
            [load_checkpoint(p)(torch.stack([preprocess_image(f) for f in files])).exp() for p in paths]
        )
    for r, mean in zip(predicted, probs.mean(dim=0), strict=True):
        assert r["digit"] == int(mean.argmax())
        assert [t["prob"] for t in r["top"]] == pytest.approx(mean.sort(descending=True).values.tolist(), abs=1e-6)


def test_ema_weights_are_what_is_validated_saved_and_tested(synthetic_data: dict, tmp_path: Path):
    """Two optimizer steps with decay 0.5: the average is w1/2 + w2/2 exactly, for weights and BN statistics."""

    class Record(L.Callback):
        def __init__(self) -> None:
            self.states: list[dict[str, torch.Tensor]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    L.seed_everything(0)
    model = DigitClassifier(net={"name": "fast"}, optimizer=lambda params: torch.optim.SGD(params, lr=0.5))
    record, ema = Record(), EMA(decay=0.5)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max")
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=4, limit_test_batches=4,
        callbacks=[record, ema, checkpoint], logger=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )  # fmt: skip
    datamodule = MNISTDataModule(**synthetic_data, batch_size=64)
    trainer.fit(model, datamodule=datamodule)
    val_acc = float(trainer.callback_metrics["val/acc"])

    saved = read_checkpoint(checkpoint.best_model_path)
    w1, w2 = record.states
    for name, value in saved["state_dict"].items():
        if value.is_floating_point() and name.startswith("net."):
            assert torch.allclose(value, (w1[name] + w2[name]) / 2, atol=1e-6), name
            assert torch.equal(saved["current_model_state"][name], w2[name]), name
    assert any(not torch.allclose(w1[k], w2[k]) for k in w1 if k.startswith("net.") and w1[k].is_floating_point())

    loaded = load_checkpoint(checkpoint.best_model_path)  # what eval, predict and export use: the average
    validated = L.Trainer(
        accelerator="cpu", limit_val_batches=4, limit_test_batches=4, logger=False, enable_progress_bar=False
    )
    assert validated.validate(loaded, datamodule=datamodule, verbose=False)[0]["val/acc"] == pytest.approx(val_acc)
    # The test after fit (train.py's: the same trainer, ckpt_path="best") tests the average too, not the raw weights
    # that Lightning's callback would load back from current_model_state. The loss tells them apart.
    tested = trainer.test(model, datamodule=datamodule, ckpt_path="best", verbose=False)[0]
    again = validated.test(loaded, datamodule=datamodule, verbose=False)[0]
    assert tested == pytest.approx(again, abs=1e-6)
