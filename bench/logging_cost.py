"""What the per-step TensorBoard curves cost: `python bench/logging_cost.py [--images N] [--repeats R]`.

The same training loop, interleaved R times each way: with the default logging (train/loss, train/acc and the
learning rate every `trainer.log_every_n_steps=50` steps, into TensorBoard) and with none
(`trainer.log_every_n_steps=0`). The tutorial's batch of 16 makes the steps short, so the logging's share is the
largest it gets. Timed by Lightning's `Timer` over `fit` alone (set-up excluded); prints one Markdown table row.
`bench.py` can call `logging_cost()` and `markdown_row()` for `make bench`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, Timer

import digit_lightning.tensorboard  # noqa: F401  (registers the logger config's ${sweep_job_name:})
from digit_lightning.cli import compose_config, instantiate_group

ROOT = Path(__file__).resolve().parent.parent


def step_seconds(data_dir: str, images: int, log_every_n_steps: int, workdir: str) -> float:
    """Seconds per training step of `fit` at the tutorial's settings, TensorBoard logger and LR monitor on."""
    steps = images // 16
    cfg = compose_config([f"paths.output_dir={workdir}", f"paths.data_dir={data_dir}", "experiment=tutorial",
                          f"trainer.log_every_n_steps={log_every_n_steps}"])  # fmt: skip
    timer = Timer()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=1, limit_train_batches=steps, limit_val_batches=0,
                        log_every_n_steps=log_every_n_steps, logger=instantiate_group(cfg.logger),
                        callbacks=[LearningRateMonitor("step"), timer], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    model = hydra.utils.instantiate(cfg.model, _convert_="all")
    trainer.fit(model, datamodule=hydra.utils.instantiate(cfg.data))
    return timer.time_elapsed("train") / steps


def logging_cost(data_dir: str, images: int = 16_000, repeats: int = 3) -> dict[str, list[float]]:
    """Seconds per step with the default per-step logging ("logged") and without any ("none"), interleaved."""
    times: dict[str, list[float]] = {"none": [], "logged": []}
    with tempfile.TemporaryDirectory() as tmp:
        step_seconds(data_dir, 800, 50, tmp)  # warm-up: first-call costs are neither side's
        for i in range(repeats):
            for name, every in (("none", 0), ("logged", 50)):
                times[name].append(step_seconds(data_dir, images, every, f"{tmp}/{name}{i}"))
                print(f"bench: logging {name}: {times[name][-1] * 1e3:.3f} ms/step", file=sys.stderr)
    return times


def markdown_row(times: dict[str, list[float]]) -> str:
    """The bench table's row: median ms per step without and with per-step logging, and the ratio."""
    none, logged = statistics.median(times["none"]), statistics.median(times["logged"])
    return (f"| step time, per-step TensorBoard curves every 50 steps vs none, ms (median of {len(times['none'])}) "
            f"| {none * 1e3:.3f} | {logged * 1e3:.3f} | {logged / none:.3f}x |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DIGIT_LIGHTNING_DATA", str(ROOT / "data")))
    parser.add_argument("--images", type=int, default=16_000, help="training images per run (1,000 steps)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    times = logging_cost(args.data, args.images, args.repeats)
    print(f"\nMeasured on {device}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}:\n")
    print("| measure | no per-step logging | per-step logging | ratio |\n| --- | --- | --- | --- |")
    print(markdown_row(times))


if __name__ == "__main__":
    main()
