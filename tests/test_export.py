"""Exported models (ONNX, TorchScript) give the PyTorch model's outputs on real test images, without this package."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.cli import compose_config
from digit_lightning.data import MNIST_MEAN, MNIST_STD, load_mnist
from digit_lightning.ensemble import load_model
from digit_lightning.errors import UserError
from digit_lightning.export import export

# Runs the exported file in a fresh interpreter where importing digit_lightning fails.
STANDALONE = """
import sys
sys.modules["digit_lightning"] = None
import numpy as np
fmt, model, images, out = sys.argv[1:]
x = np.load(images)
if fmt == "onnx":
    import onnxruntime as ort
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    y = np.concatenate([session.run(None, {name: x[i : i + n]})[0] for i, n in ((0, 1), (1, 63), (64, 136))])
else:
    import torch
    scripted = torch.jit.load(model)
    with torch.no_grad():
        y = np.concatenate([scripted(torch.from_numpy(x[i : i + n])).numpy() for i, n in ((0, 1), (1, 63), (64, 136))])
np.save(out, y)
"""


@pytest.mark.parametrize(("fmt", "tta"), [("onnx", False), ("torchscript", False), ("onnx", True)])
def test_export_matches_pytorch_on_real_test_images(small_checkpoint, mnist_dir: Path, tmp_path: Path, fmt, tta):
    """tta=true: the third attack review found its ONNX graph fixed to the example's batch of 2."""
    path = small_checkpoint[0]
    output = tmp_path / f"digit.{fmt}"
    overrides = [f"ckpt_path={path}", f"format={fmt}", f"output={output}", f"tta={str(tta).lower()}"]
    cfg = compose_config(overrides, config_name="export")
    assert export(cfg) == output and output.is_file()
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # what a plain open() gives, not the temp file's 0600

    images = ((load_mnist(mnist_dir, train=False)[0][:200].float() / 255 - MNIST_MEAN) / MNIST_STD)[:, None]
    np.save(tmp_path / "images.npy", images.numpy())
    run = [sys.executable, "-c", STANDALONE, fmt, str(output), str(tmp_path / "images.npy"), str(tmp_path / "y.npy")]
    result = subprocess.run(run, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    exported = np.load(tmp_path / "y.npy")

    with torch.no_grad():
        expected = (load_model([path], tta=True) if tta else load_checkpoint(path))(images).numpy()
    assert exported.shape == expected.shape == (200, 10)  # batches of 1, 63 and 136: the batch axis is dynamic
    assert np.abs(exported - expected).max() <= 1e-4
    assert (exported.argmax(1) == expected.argmax(1)).all()


def test_bad_format_is_refused_before_the_checkpoint_is_read(tmp_path: Path):
    with pytest.raises(UserError, match=r"^format=tflite is not one of onnx, torchscript$"):
        export(compose_config([f"ckpt_path={tmp_path / 'missing.ckpt'}", "format=tflite"], config_name="export"))


@pytest.mark.slow  # the CLI twin of the test above
def test_bad_format_is_a_one_line_error(small_checkpoint, run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.export", f"ckpt_path={small_checkpoint[0]}", "format=tflite", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: format=tflite is not one of onnx, torchscript"
