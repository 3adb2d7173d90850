"""Recognize handwritten digits in images: `python -m digit_lightning.predict ckpt_path=<ckpt> inputs=[a.png,dir/]`.

Each image is preprocessed the way MNIST was made (digit_lightning.preprocess), then classified; the output is
the predicted digit and the top-k probabilities per file (of an ensemble's mean probabilities when `ckpt_path` is a
list of checkpoints), as a table, JSON or CSV on stdout. A file that cannot be
read or holds no ink is one line on stderr; the others are still predicted; the exit status is 1 if any failed.
"""

from __future__ import annotations

from digit_lightning import cli

cli.answer_help(__name__, "predict")  # before torch and Lightning: help needs neither

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from digit_lightning.config import validate_config
from digit_lightning.data.preprocess import IMAGE_SUFFIXES, PreprocessError, find_images, preprocess_image
from digit_lightning.ensemble import checkpoint_paths, load_model

FORMATS = ("table", "json", "csv")


class UsageError(cli.UserError):
    """A bad setting on the command line; one line saying which and what to pass instead."""


@torch.no_grad()
def predict_tensors(model: torch.nn.Module, images: torch.Tensor, top_k: int = 3, batch_size: int = 256) -> list:
    """Top-k (digit, probability) pairs for each image of a normalized Nx1x28x28 batch."""
    device = next(model.parameters()).device
    results = []
    for chunk in images.split(batch_size):
        probs = model(chunk.to(device)).exp()  # the net returns log-probabilities
        top = probs.topk(top_k, dim=1)
        results += [
            list(zip(i.tolist(), p.tolist(), strict=True)) for i, p in zip(top.indices, top.values, strict=True)
        ]
    return results


def predict_files(
    model: torch.nn.Module, inputs: Sequence[str | Path], top_k: int = 3, batch_size: int = 256
) -> tuple[list[dict[str, Any]], list[str]]:
    """Predict every image among `inputs` (files and directories); return the results and one error line per failure."""
    errors: list[str] = []
    files: list[Path] = []
    for item in inputs:
        found = find_images([item])
        if not found:
            errors.append(f"{item}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this directory")
        files += found
    names, tensors = [], []
    for path in files:
        try:
            tensors.append(preprocess_image(path))
            names.append(str(path))
        except PreprocessError as e:
            errors.append(str(e))
    results = []
    if tensors:
        for name, top in zip(names, predict_tensors(model, torch.stack(tensors), top_k, batch_size), strict=True):
            results.append({"file": name, "digit": top[0][0], "top": [{"digit": d, "prob": p} for d, p in top]})
    return results, errors


def render(results: list[dict[str, Any]], fmt: str) -> str:
    """The results as a rich table, JSON or CSV text."""
    if fmt == "json":
        return json.dumps(results, indent=2)
    if fmt == "csv":
        out = io.StringIO()
        k = max((len(r["top"]) for r in results), default=0)
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "digit"] + [c for i in range(1, k + 1) for c in (f"top{i}", f"prob{i}")])
        for r in results:
            writer.writerow([r["file"], r["digit"]] + [v for t in r["top"] for v in (t["digit"], f"{t['prob']:.6f}")])
        return out.getvalue().rstrip("\n")
    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("digit", justify="right", style="bold")
    table.add_column(f"top {max((len(r['top']) for r in results), default=0)} (digit: probability)")
    for r in results:
        table.add_row(r["file"], str(r["digit"]), "   ".join(f"{t['digit']}: {t['prob']:.3f}" for t in r["top"]))
    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    console.print(table)
    return console.file.getvalue().rstrip("\n")


def check_settings(cfg: DictConfig) -> list[str]:
    """Validate the command line; return the inputs as a list of strings."""
    validate_config(cfg, "predict")  # a misspelt key (`+topk=5`) is refused, not ignored
    if not cfg.get("ckpt_path"):
        raise UsageError("ckpt_path is not set; pass ckpt_path=last, a run dir or a .ckpt file")
    inputs = cfg.get("inputs")
    inputs = list(inputs) if isinstance(inputs, ListConfig) else ([inputs] if inputs else [])
    if not inputs:
        raise UsageError("no inputs; pass inputs=[digit.png,scans/] (files and/or directories)")
    if cfg.format not in FORMATS:
        raise UsageError(f"format={cfg.format} is not one of {', '.join(FORMATS)}")
    if not isinstance(cfg.top_k, int) or isinstance(cfg.top_k, bool) or not 1 <= cfg.top_k <= 10:
        raise UsageError(f"top_k={cfg.top_k} must be a whole number from 1 to 10")
    if not isinstance(cfg.batch_size, int) or isinstance(cfg.batch_size, bool) or cfg.batch_size < 1:
        raise UsageError(f"batch_size={cfg.batch_size} must be a whole number >= 1")
    if not isinstance(cfg.get("tta", False), bool):
        raise UsageError(f"tta={cfg.tta} must be true or false")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise UsageError(f"device={cfg.device} is not one of cpu, cuda, auto")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("device=cuda but no CUDA GPU is available; use device=cpu")
    return [str(i) for i in inputs]


def predict(cfg: DictConfig) -> int:
    """Run the prediction the config describes, print it; return the exit status."""
    inputs = check_settings(cfg)
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
    model = load_model(checkpoint_paths(cfg.ckpt_path, cfg.log_dir), tta=cfg.get("tta", False), map_location=device)
    results, errors = predict_files(model, inputs, cfg.top_k, cfg.batch_size)
    if results or cfg.format != "table":
        print(render(results, cfg.format))
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} of {len(results) + len(errors)} inputs failed", file=sys.stderr)
    return cli.EXIT_SOME_FAILED if errors else 0


@hydra.main(version_base="1.3", config_path=cli.CONFIG_DIR, config_name="predict")
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra task: exit status 0 if every file was predicted, 1 if some failed."""
    with cli.exit_on_user_error():
        status = predict(cfg)
    sys.exit(status)


def main() -> None:
    """CLI entry point: a usage error is one `error:` line, exit status 2 (see digit_lightning.cli)."""
    cli.run(hydra_main)


if __name__ == "__main__":
    main()
