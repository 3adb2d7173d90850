"""Exported models (ONNX, TorchScript) give the PyTorch model's outputs on real test images, without this package."""

from __future__ import annotations

import json
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

# Runs each exported file of a list in one fresh interpreter where importing digit_lightning fails.
STANDALONE = """
import json, sys
sys.modules["digit_lightning"] = None
import numpy as np
x = np.load(sys.argv[1])
batches = ((0, 1), (1, 63), (64, 136))  # (start, size)
for fmt, model, out in json.loads(sys.argv[2]):
    if fmt == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        y = np.concatenate([session.run(None, {name: x[i : i + n]})[0] for i, n in batches])
    else:
        import torch
        scripted = torch.jit.load(model)
        with torch.no_grad():
            y = np.concatenate([scripted(torch.from_numpy(x[i : i + n])).numpy() for i, n in batches])
    np.save(out, y)
"""


def export_and_run(cases: list[tuple[str, bool]], ckpt: Path, images: torch.Tensor, tmp: Path) -> dict:
    """Each (format, tta) case exported in process, then all run on `images` in one fresh interpreter without this
    package (a start costs seconds): {case: (the file export wrote, its outputs)}."""
    np.save(tmp / "images.npy", images.numpy())
    files = {}
    for fmt, tta in cases:
        output = tmp / f"digit{'_tta' if tta else ''}.{fmt}"
        overrides = [f"ckpt_path={ckpt}", f"format={fmt}", f"output={output}", f"tta={str(tta).lower()}"]
        assert export(compose_config(overrides, config_name="export")) == output and output.is_file()
        files[fmt, tta] = output
    jobs = [[fmt, str(path), f"{path}.npy"] for (fmt, _), path in files.items()]
    run = [sys.executable, "-c", STANDALONE, str(tmp / "images.npy"), json.dumps(jobs)]
    result = subprocess.run(run, capture_output=True, text=True, cwd=tmp, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {case: (path, np.load(f"{path}.npy")) for case, path in files.items()}


def assert_matches_pytorch(output: Path, standalone: np.ndarray, ckpt: Path, images: torch.Tensor, tta: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    assert output.stat().st_mode & 0o777 == 0o666 & ~umask  # what a plain open() gives, not the temp file's 0600
    with torch.no_grad():
        expected = (load_model([ckpt], tta=True) if tta else load_checkpoint(ckpt))(images).numpy()
    assert standalone.shape == expected.shape == (200, 10)  # batches of 1, 63 and 136: the batch axis is dynamic
    assert np.abs(standalone - expected).max() <= 1e-4
    assert (standalone.argmax(1) == expected.argmax(1)).all()


@pytest.fixture(scope="module")
def test_images(mnist_dir: Path) -> torch.Tensor:
    """The first 200 images of the official test set, normalized."""
    return ((load_mnist(mnist_dir, train=False)[0][:200].float() / 255 - MNIST_MEAN) / MNIST_STD)[:, None]


def test_a_torchscript_export_matches_pytorch_on_real_test_images(small_checkpoint, test_images, tmp_path: Path):
    ((output, standalone),) = export_and_run(
        [("torchscript", False)], small_checkpoint[0], test_images, tmp_path
    ).values()
    assert_matches_pytorch(output, standalone, small_checkpoint[0], test_images, tta=False)


@pytest.mark.slow  # torch's ONNX exporter takes seconds an export; the fast suite exports TorchScript
def test_onnx_exports_match_pytorch_on_real_test_images(small_checkpoint, test_images, tmp_path: Path):
    """tta=true: the third attack review found its ONNX graph fixed to the example's batch of 2."""
    cases = [("onnx", False), ("onnx", True)]
    for (_, tta), (output, standalone) in export_and_run(cases, small_checkpoint[0], test_images, tmp_path).items():
        assert_matches_pytorch(output, standalone, small_checkpoint[0], test_images, tta)


def test_bad_format_is_refused_before_the_checkpoint_is_read(tmp_path: Path):
    with pytest.raises(UserError, match=r"^format=tflite is not one of onnx, torchscript$"):
        export(compose_config([f"ckpt_path={tmp_path / 'missing.ckpt'}", "format=tflite"], config_name="export"))


@pytest.mark.slow  # the CLI twin of the test above
def test_bad_format_is_a_one_line_error(small_checkpoint, run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.export", f"ckpt_path={small_checkpoint[0]}", "format=tflite", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip() == "error: format=tflite is not one of onnx, torchscript"
