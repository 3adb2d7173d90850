"""Recognizing digits in image files people make: preprocessing, accuracy on photo-like images, bad files, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.cli import EXIT_SOME_FAILED, compose_config
from digit_lightning.data import MNIST_MEAN, MNIST_STD, load_mnist
from digit_lightning.data.preprocess import PreprocessError, preprocess_image
from digit_lightning.predict import UsageError, check_settings, predict, predict_files, render

EXAMPLES = Path(__file__).resolve().parent.parent / "docs" / "examples"


@pytest.fixture(scope="module")
def test_digits(mnist_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 300 official test images (uint8, 28x28) and their labels."""
    images, labels = load_mnist(mnist_dir, train=False)
    return images[:300], labels[:300]


def test_preprocessing_an_mnist_digit_gives_it_back(test_digits):
    """MNIST digits are already in MNIST form, so preprocessing must change them little."""
    images, _ = test_digits
    diffs = []
    for digit in images[:100]:
        out = preprocess_image(Image.fromarray(digit.numpy()))
        assert out.shape == (1, 28, 28) and out.dtype == torch.float32
        diffs.append(((out[0] * MNIST_STD + MNIST_MEAN) - digit.float() / 255).abs().mean().item())
    # Mean absolute pixel change: ~0.02 on average (resampling, a pixel of shift); never a different picture.
    assert np.mean(diffs) < 0.03 and max(diffs) < 0.15, (np.mean(diffs), max(diffs))


def test_photos_of_test_digits_are_recognized_at_the_models_accuracy(
    small_checkpoint, test_digits, make_photo, tmp_path
):
    """Large, inverted (dark ink on light paper), off-centre RGB PNGs and JPEGs of test digits."""
    images, labels = test_digits
    rng = np.random.default_rng(0)
    for i, digit in enumerate(images.numpy()):
        photo = make_photo(digit, rng, side=int(rng.integers(80, 400)))
        # compress_level=0: zlib's default level made writing these PNGs most of the test's time (level 1: half)
        photo.save(tmp_path / f"{i:03d}.{'jpg' if i % 5 == 0 else 'png'}", compress_level=0)
    model = load_checkpoint(small_checkpoint[0])

    results, errors = predict_files(model, [tmp_path])
    assert errors == [] and len(results) == len(images)
    predicted = torch.tensor([r["digit"] for r in results])
    on_photos = (predicted == labels).float().mean().item()
    with torch.no_grad():
        on_originals = model(((images.float() / 255 - MNIST_MEAN) / MNIST_STD)[:, None]).argmax(1) == labels
    on_originals = on_originals.float().mean().item()
    assert on_originals > 0.85  # the slice-trained model is a real one
    assert on_photos >= on_originals - 0.03, (on_photos, on_originals)
    top = results[0]["top"]
    assert len(top) == 3 and top[0]["prob"] >= top[1]["prob"] >= top[2]["prob"]
    assert sum(t["prob"] for t in top) <= 1 + 1e-6


def test_16_bit_dark_on_light_digits_are_scaled_not_clipped(small_checkpoint, test_digits, make_photo, tmp_path):
    """A 16-bit gray PNG (PIL mode I;16) of a photo is the same picture as its 8-bit version, and predicted alike."""
    images, labels = test_digits
    rng = np.random.default_rng(1)
    for i, digit in enumerate(images[:20].numpy()):
        gray = np.asarray(make_photo(digit, rng).convert("L"))  # dark ink on light paper
        Image.fromarray(gray).save(tmp_path / f"{i:02d}_8bit.png", compress_level=1)
        sixteen = Image.fromarray(gray.astype(np.uint16) * 257)  # 255 -> 65535
        sixteen.save(tmp_path / f"{i:02d}_16bit.png", compress_level=1)
    assert Image.open(tmp_path / "00_16bit.png").mode == "I;16"
    for i in range(20):
        eight, sixteen = (preprocess_image(tmp_path / f"{i:02d}_{bits}.png") for bits in ("8bit", "16bit"))
        assert torch.allclose(eight, sixteen, atol=1e-4), i

    results, errors = predict_files(load_checkpoint(small_checkpoint[0]), [tmp_path])
    assert errors == [] and len(results) == 40
    digits = {Path(r["file"]).name: r["digit"] for r in results}
    assert all(digits[f"{i:02d}_16bit.png"] == digits[f"{i:02d}_8bit.png"] for i in range(20)), digits
    correct = sum(digits[f"{i:02d}_16bit.png"] == labels[i] for i in range(20))
    assert correct >= 16, digits  # the model's accuracy, not a blank (clipped to white) page


def write_bad_files(folder: Path) -> dict[str, str]:
    """Files predict must refuse, each with a phrase its error must contain."""
    folder.mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    Image.new("RGB", (300, 200), (235, 235, 230)).save(folder / "blank.png")
    data = (EXAMPLES / "seven.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 3])
    return {"empty.png": "empty file", "notes.png": "not an image", "blank.png": "no ink",
            "truncated.png": "cannot decode"}  # fmt: skip


def test_bad_files_are_one_line_each_and_the_rest_is_predicted(small_checkpoint, tmp_path, monkeypatch, capsys):
    expected = write_bad_files(tmp_path / "scans")
    monkeypatch.chdir(tmp_path)
    inputs = f"inputs=[{EXAMPLES / 'seven.png'},scans/,missing.png]"
    status = predict(compose_config([f"ckpt_path={small_checkpoint[0]}", inputs], config_name="predict"))
    out, err = capsys.readouterr()
    assert status == EXIT_SOME_FAILED
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected) + 1
    for name, phrase in expected.items():
        assert any(f"scans/{name}: " in line and phrase in line for line in errors), (name, errors)
    assert any("missing.png: no such file" in line for line in errors)
    assert "seven.png" in out and "5 of 6 inputs failed" in err


@pytest.mark.slow  # the CLI twin of the test above: exit status, no traceback, nothing written
def test_cli_bad_files_are_one_line_each_and_the_rest_is_predicted(small_checkpoint, run_cli, tmp_path: Path):
    expected = write_bad_files(tmp_path / "scans")
    result = run_cli(
        "digit_lightning.predict", f"ckpt_path={small_checkpoint[0]}",
        f"inputs=[{EXAMPLES / 'seven.png'},scans/,missing.png]", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(expected) + 1
    for name, phrase in expected.items():
        assert any(f"scans/{name}: " in line and phrase in line for line in errors), (name, errors)
    assert any("missing.png: no such file" in line for line in errors)
    assert "seven.png" in result.stdout and "5 of 6 inputs failed" in result.stderr
    assert not (tmp_path / "outputs").exists() and not list(tmp_path.glob("*.log"))  # predict writes nothing


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    for side in (40, 100):  # over the limit (PIL warns) and over twice the limit (PIL raises): both refused
        path = tmp_path / f"bomb{side}.png"
        Image.new("L", (side, side), 255).save(path)
        with pytest.raises(PreprocessError, match="decompression bomb") as error:
            preprocess_image(path)
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_example_images_are_recognized_and_output_formats_render(small_checkpoint):
    """The README's example images, light-on-dark BMP included; CSV and table render (the CLI twin is below)."""
    results, errors = predict_files(load_checkpoint(small_checkpoint[0]), [EXAMPLES])
    assert errors == [] and {Path(r["file"]).name: r["digit"] for r in results} == {"one_dark.bmp": 1, "seven.png": 7,
                                                                                   "two.jpg": 2}  # fmt: skip
    results = [{"file": "a.png", "digit": 7, "top": [{"digit": 7, "prob": 0.9}, {"digit": 1, "prob": 0.05}]}]
    assert render(results, "csv").splitlines() == ["file,digit,top1,prob1,top2,prob2", "a.png,7,7,0.900000,1,0.050000"]
    assert "a.png" in render(results, "table") and "7: 0.900" in render(results, "table")


@pytest.mark.slow  # the CLI twin of the test above (the README's predict commands run through the CLI fast)
def test_example_images_and_output_formats(small_checkpoint, run_cli, tmp_path: Path):
    """The README's example images, light-on-dark BMP included, through the CLI as JSON; CSV and table render."""
    result = run_cli(
        "digit_lightning.predict",
        f"ckpt_path={small_checkpoint[0]}",
        f"inputs=[{EXAMPLES}]",
        "format=json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    digits = {Path(r["file"]).name: r["digit"] for r in json.loads(result.stdout)}
    assert digits == {"one_dark.bmp": 1, "seven.png": 7, "two.jpg": 2}

    results = [{"file": "a.png", "digit": 7, "top": [{"digit": 7, "prob": 0.9}, {"digit": 1, "prob": 0.05}]}]
    assert render(results, "csv").splitlines() == ["file,digit,top1,prob1,top2,prob2", "a.png,7,7,0.900000,1,0.050000"]
    assert "a.png" in render(results, "table") and "7: 0.900" in render(results, "table")


@pytest.mark.parametrize(
    ("override", "message"),
    [("format=xml", "format=xml is not one of table, json, csv"), ("inputs=[]", "no inputs; pass inputs="),
     ("top_k=0", "top_k=0 must be a whole number from 1 to 10"), ("ckpt_path=null", "ckpt_path is not set"),
     ("batch_size=-1", "batch_size=-1 must be a whole number >= 1"),
     ("batch_size=abc", "batch_size=abc must be a whole number >= 1")],
)  # fmt: skip
def test_bad_settings_are_refused(override: str, message: str):
    cfg = compose_config(["ckpt_path=model.ckpt", "inputs=[a.png]", override], config_name="predict")
    with pytest.raises(UsageError, match=message.replace("[", r"\[")) as err:
        check_settings(cfg)
    assert "\n" not in str(err.value)  # the CLI prints it as one `error:` line (see the test below)


@pytest.mark.slow  # predict's one-line CLI path runs fast in tests/test_config_errors.py (logger=csv)
def test_cli_bad_setting_is_one_line_and_status_2(run_cli, tmp_path: Path):
    result = run_cli("digit_lightning.predict", "ckpt_path=model.ckpt", "inputs=[a.png]", "format=xml", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr == "error: format=xml is not one of table, json, csv\n"
