"""Checkpoints load safely: weights_only, nets by name, and a one-line error for every bad file (tests/test_trust.py
has the crafted ones)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from digit_lightning.checkpoint import CheckpointError, load_checkpoint
from digit_lightning.module import DigitClassifier


class WritesMarker:
    """A pickle payload that creates a file when it is unpickled: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loads_the_trained_model_in_eval_mode(small_checkpoint):
    path, _ = small_checkpoint
    model = load_checkpoint(path)
    assert isinstance(model, DigitClassifier) and not model.training
    saved = torch.load(path, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    # Lightning users' habit is safe too: the hyperparameters are a model name and a flag.
    same = DigitClassifier.load_from_checkpoint(path).eval()
    assert torch.equal(same.net.fc2.weight, model.net.fc2.weight) and not same.training


def bad_files(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Bad checkpoints of every kind, each with a phrase its error must contain."""
    data = good.read_bytes()
    checkpoint = torch.load(good, weights_only=True)
    files = {
        "missing": (tmp / "nope.ckpt", "no such checkpoint file"),
        "directory": (tmp / "run", "is a directory; pass one of its checkpoints: checkpoints/last.ckpt"),
        "empty": (tmp / "empty.ckpt", "empty file"),
        "truncated": (tmp / "truncated.ckpt", "truncated, corrupt or not a PyTorch checkpoint"),
        "png": (tmp / "digit.png", "not a PyTorch checkpoint"),
        "state_dict": (tmp / "weights.pt", "plain state_dict, not a Lightning checkpoint"),
        "other_model": (tmp / "other.ckpt", "not a digit_lightning checkpoint"),
        "other_weights": (tmp / "resnet.ckpt", "weights do not fit"),
        "code_target": (tmp / "target.ckpt", "not a digit_lightning checkpoint"),
        "text": (tmp / "notes.txt", "not a PyTorch checkpoint"),
        "five_bytes": (tmp / "five.ckpt", "not a PyTorch checkpoint"),
    }
    (tmp / "run" / "checkpoints").mkdir(parents=True)
    (tmp / "run" / "checkpoints" / "last.ckpt").write_bytes(data)
    files["empty"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(data[: len(data) // 2])
    files["png"][0].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    torch.save(checkpoint["state_dict"], files["state_dict"][0])
    torch.save({**checkpoint, "hyper_parameters": {"lr": 0.1}}, files["other_model"][0])
    other = {"layer1.0.weight": torch.zeros(64, 3, 7, 7), **checkpoint["state_dict"]}
    other["net.fc2.weight"] = torch.zeros(1000, 500)
    torch.save({**checkpoint, "state_dict": other}, files["other_weights"][0])
    torch.save({**checkpoint, "hyper_parameters": {"net": {"_target_": "os.system", "command": "true"}}},
               files["code_target"][0])  # fmt: skip
    files["text"][0].write_text("these are my notes, not a checkpoint\n" * 20)
    files["five_bytes"][0].write_bytes(b"PK\x03\x04x")
    return files


@pytest.mark.parametrize(
    "kind",
    [
        "missing",
        "directory",
        "empty",
        "truncated",
        "png",
        "state_dict",
        "other_model",
        "other_weights",
        "code_target",
        "text",
        "five_bytes",
    ],
)
def test_bad_file_is_one_line_error(small_checkpoint, tmp_path: Path, kind: str):
    path, phrase = bad_files(tmp_path, small_checkpoint[0])[kind]
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and phrase in message, message


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_pickle_that_would_run_code_is_refused_and_does_not_run(small_checkpoint, tmp_path: Path, how: str):
    checkpoint = torch.load(small_checkpoint[0], weights_only=True)
    marker, path = tmp_path / "marker", tmp_path / "evil.ckpt"
    if how == "torch.save":
        torch.save({**checkpoint, "extra": WritesMarker(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(WritesMarker(marker), protocol=2))

    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)
    assert not marker.exists(), "loading the checkpoint ran the pickled code"

    if how == "torch.save":  # the payload is real: an unsafe load does run it
        assert "refused to load, it would run code" in str(error.value)
        torch.load(path, weights_only=False)
        assert marker.exists()


# CLI twins of test_bad_file_is_one_line_error (eval's one-line CLI path runs fast in tests/test_eval.py)
@pytest.mark.slow
@pytest.mark.parametrize("entry_point", ["eval", "train"])
def test_cli_reports_a_bad_checkpoint_in_one_line(run_cli, tmp_path: Path, entry_point: str):
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    result = run_cli(f"digit_lightning.{entry_point}", f"ckpt_path={tmp_path / 'bad.ckpt'}", "hydra.run.dir=run",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {tmp_path / 'bad.ckpt'}: ")


def test_train_refuses_a_checkpoint_of_other_weights_in_one_line(small_checkpoint, make_cfg, tmp_path: Path):
    """The resume path itself (train's, before fit): each bad file is one line naming it; the good one resumes."""
    from digit_lightning.train import train

    files = bad_files(tmp_path, small_checkpoint[0])
    quick = ["data.batch_size=64", "+trainer.limit_train_batches=150", "+trainer.limit_val_batches=2",
             "trainer.max_epochs=1", "test=false", "logger=none", "callbacks.progress_bar=null"]  # fmt: skip
    for kind in ("state_dict", "other_model", "other_weights", "truncated", "text"):
        path, phrase = files[kind]
        with pytest.raises(CheckpointError) as error:
            train(make_cfg(f"ckpt_path={path}", *quick))
        assert "\n" not in str(error.value) and str(path) in str(error.value) and phrase in str(error.value)
    train(make_cfg(f"ckpt_path={small_checkpoint[0]}", *quick))  # its one epoch is done: nothing left to fit
