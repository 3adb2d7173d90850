"""Benchmark: our `train` against the tutorial's script and against a plain-PyTorch loop, as whole commands.

`python bench/bench.py` (or `make bench`) prints a Markdown table; progress goes to stderr. Every comparison is
interleaved (A, B, A, B, ...) in one run so that a busy machine slows both sides alike; whole commands run as
subprocesses timed from launch to exit (wall seconds, and CPU seconds, the steadier measure on a shared machine).
Rows: import time (`--imports` alone prints just that); the tutorial's script vs ours at its settings (batch 16,
1 epoch); `experiment=fast` vs bench/reference.py (time to 99%); per-step throughput in one process at the same
thread count; the cost of logging every step. On a GPU machine the same commands run on the GPU (the table names
the device). `--profile` prints only where a training step's CPU time goes (bench/step_profile.py), beside the
bare net's step. `--quick` (a few minutes) cuts the tutorial comparison to 8,000 training images and leaves out the
time-to-99% commands; `--smoke` is a seconds-long check for the tests.
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
from dataclasses import dataclass
from pathlib import Path

import torch
import tutorial

from digit_lightning.cli import compose_config
from digit_lightning.train import set_cpu_threads, train

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
IMPORTS = {"digit_lightning.train": "import digit_lightning.train", "lightning, hydra, torchmetrics":
           "import lightning, hydra, torchmetrics"}  # fmt: skip
ACCURACY = r"(?:test accuracy |test/acc=)([\d.]+)"


def say(message: str) -> None:
    """Progress, on stderr (stdout keeps just the table)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def device_name() -> str:
    """The device the commands train on: the GPU if CUDA is present, else the CPU, named."""
    cpu = f"{cpu_name()}, {os.cpu_count()} cores"
    return f"{torch.cuda.get_device_name()} (host: {cpu})" if torch.cuda.is_available() else cpu


@dataclass
class Run:
    """One whole command: wall and CPU seconds from launch to exit, and the test accuracy it printed."""

    wall: float
    cpu: float
    acc: float | None


def command(args: list[str]) -> Run:
    """Run `python <args>` from the repository root, as a user types it; raise if it fails."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"`python {' '.join(args)}` failed: {result.stderr.strip()[-2000:]}")
    found = re.findall(ACCURACY, result.stdout + result.stderr)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Run(wall, cpu, float(found[-1]) if found else None)


def interleaved(commands: dict[str, list[str]], repeats: int) -> dict[str, list[Run]]:
    """Each command `repeats` times, in turn (A, B, A, B, ...)."""
    runs: dict[str, list[Run]] = {name: [] for name in commands}
    for i in range(repeats):
        for name, args in commands.items():
            runs[name].append(command(args))
            r = runs[name][-1]
            acc = f", test acc {r.acc:.4f}" if r.acc is not None else ""
            say(f"{name} ({i + 1}/{repeats}): {r.wall:.1f} s wall, {r.cpu:.1f} CPU s{acc}")
    return runs


def median(runs: list[Run], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs)


def ratio(slow: list[Run], fast: list[Run], field: str) -> float:
    """The median over interleaved pairs of slow/fast: each pair ran under the same load."""
    return statistics.median(getattr(s, field) / getattr(f, field) for s, f in zip(slow, fast, strict=True))


def describe(runs: list[Run]) -> str:
    accs = [r.acc for r in runs if r.acc is not None]
    acc = f"; test acc {min(accs):.4f}" + (f"-{max(accs):.4f}" if max(accs) != min(accs) else "") if accs else ""
    return f"{median(runs, 'wall'):.1f} s, {median(runs, 'cpu'):.1f} CPU s{acc}"


def import_times(repeats: int) -> dict[str, list[Run]]:
    """`python -c "import ..."`: our train module, then its three big dependencies; fresh processes, interleaved."""
    return interleaved({name: ["-c", code] for name, code in IMPORTS.items()}, repeats)


def compare(label: str, ours_name: str, runs: dict[str, list[Run]], theirs_name: str, target: str) -> str:
    """A table row: their command, ours, and how many times faster ours is (wall; CPU), against `target`."""
    theirs, ours = runs[theirs_name], runs[ours_name]
    speedup = ratio(theirs, ours, "wall")
    return (f"| {label} | {describe(theirs)} | {describe(ours)} | {speedup:.2f}x ({ratio(theirs, ours, 'cpu'):.2f}x "
            f"CPU); ours takes {1 / speedup:.2f}x the time ({target}) |")  # fmt: skip


def ours_in_process(data_dir: str, workdir: str, images: int, *overrides: str) -> float:
    """`train` at the tutorial's settings for `images` training images (no validation, no test); seconds."""
    steps = images // tutorial.BATCH_SIZE
    cfg = compose_config([f"paths.output_dir={workdir}", f"paths.data_dir={data_dir}", "experiment=tutorial",
                          "trainer.max_epochs=1", f"+trainer.limit_train_batches={steps}",
                          "+trainer.limit_val_batches=0", "test=false", "cpu_threads=null", *overrides])  # fmt: skip
    start = time.perf_counter()
    train(cfg)
    seconds = time.perf_counter() - start
    torch.set_flush_denormal(False)  # train() set it for this process: the tutorial's runs here must not get it
    return seconds


def throughput(data_dir: str, images: int, repeats: int) -> dict[str, list[float]]:
    """Training images per second, set-up included, of the tutorial's loop and of our `train`, in this process at
    the same thread count (so that the ratio is the loops', not the thread settings'), interleaved."""
    rates: dict[str, list[float]] = {"tutorial": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:

        def run(name: str, n: int) -> float:
            if name == "ours":
                return ours_in_process(data_dir, tmp, n)
            start = time.perf_counter()
            tutorial.run(data_dir, images=n, test=False)
            return time.perf_counter() - start

        for name in rates:  # warm-up: first-call costs (lazy imports, allocator) are not either side's
            run(name, 160)
        for _ in range(repeats):
            for name in rates:
                rates[name].append(images / run(name, images))
                say(f"in process, {name}: {rates[name][-1]:,.0f} images/s")
    return rates


def logging_cost(data_dir: str, steps: int, repeats: int) -> float:
    """Milliseconds per training step that `trainer.log_every_n_steps=1` adds to the default (every 50), batch 16."""
    per_step: dict[int, list[float]] = {1: [], 50: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            for every in per_step:
                every_n = f"trainer.log_every_n_steps={every}"
                seconds = ours_in_process(data_dir, tmp, steps * tutorial.BATCH_SIZE, every_n)
                per_step[every].append(seconds / steps * 1e3)
                say(f"in process, log every {every} steps: {per_step[every][-1]:.2f} ms/step")
    return statistics.median(a - b for a, b in zip(per_step[1], per_step[50], strict=True))


def bare_step(data_dir: str, steps: int) -> dict[str, float]:
    """CPU ms per step of the Digit net alone at batch 16 (channels-last, fused Adam, as `train` sets them up):
    forward, backward, optimizer; no Lightning, no metrics: what a step cannot cost less than."""
    from digit_lightning.data import MNISTTensors, load_mnist
    from digit_lightning.models import build_net

    net = build_net(name="digit").to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    data = MNISTTensors(*load_mnist(data_dir, train=True))
    parts = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(steps + 50):  # 50 warm-up steps
        x, y = data.__getitems__(torch.randint(len(data), (tutorial.BATCH_SIZE,)).tolist())
        t0 = time.process_time()
        loss = torch.nn.functional.nll_loss(net(x), y)
        t1 = time.process_time()
        loss.backward()
        t2 = time.process_time()
        optimizer.step()
        optimizer.zero_grad()
        t3 = time.process_time()
        if step >= 50:
            for part, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[part] += seconds / steps * 1e3
    return parts


def step_profile(data_dir: str, steps: int) -> list[str]:
    """Where a training step of `train` at the tutorial's settings spends its CPU time (bench/step_profile.py), and
    the bare net's step beside it; Markdown lines."""
    from step_profile import CPUProfiler

    with tempfile.TemporaryDirectory() as tmp:
        warmup = 50
        profiled = ["+trainer.profiler._target_=step_profile.CPUProfiler", f"+callbacks.step_parts.warmup={warmup}",
                    "+callbacks.step_parts._target_=step_profile.StepParts"]  # fmt: skip
        ours_in_process(data_dir, tmp, (steps + warmup) * tutorial.BATCH_SIZE, *profiled)
    parts = CPUProfiler.latest.report(steps)
    bare = bare_step(data_dir, steps)
    total = sum(ms for _, ms in parts)
    lines = [f"| part of a step (`train experiment=tutorial`, batch 16, {steps} steps) | CPU ms/step | share |",
             "| --- | ---: | ---: |"]  # fmt: skip
    lines += [f"| {name} | {ms:.3f} | {ms / total:.0%} |" for name, ms in parts]
    lines.append(f"| **whole step** | **{total:.2f}** | |")
    lines.append(f"| the bare net, no Lightning: {', '.join(f'{k} {v:.2f}' for k, v in bare.items())} | "
                 f"{sum(bare.values()):.2f} | |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("DIGIT_LIGHTNING_DATA", str(ROOT / "data")))
    parser.add_argument("--repeats", type=int, help="interleaved runs of each side (whole commands 2, else 3)")
    parser.add_argument("--imports", action="store_true", help="only the import-time ratio (5 interleaved pairs)")
    parser.add_argument("--quick", action="store_true", help="8,000 images at batch 16; no time-to-99%% commands")
    parser.add_argument("--whole", action="store_true", help="only the whole-command rows (no in-process rows)")
    parser.add_argument("--profile", action="store_true", help="only where a training step's CPU time goes")
    parser.add_argument("--steps", type=int, default=1000, help="training steps that --profile measures")
    parser.add_argument("--smoke", action="store_true", help="seconds-long, no whole commands (tests)")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    data = f"--data={args.data}"
    threads = torch.get_num_threads()
    set_cpu_threads("auto", 1)  # what our commands use (cpu_threads=auto); the reference gets the same
    ours_threads = torch.get_num_threads()

    device = device_name()
    load = os.getloadavg()[0]
    say(f"torch {torch.__version__} on {device}, load average {load:.1f}")
    if args.profile:
        torch.set_num_threads(ours_threads)
        with contextlib.redirect_stdout(sys.stderr):
            lines = step_profile(args.data, 50 if args.smoke else args.steps)
        print(f"\nMeasured on {device}, torch {torch.__version__}, {ours_threads} CPU thread(s) (cpu_threads=auto); "
              f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n")  # fmt: skip
        print("\n".join(lines))
        return
    lines = ["| measure | theirs | ours | ours is faster by |", "| --- | --- | --- | --- |"]
    imports = import_times(1 if args.smoke else args.repeats or (3 if args.quick else 5))
    names = list(IMPORTS)
    slowdown = 1 / ratio(imports[names[1]], imports[names[0]], "wall")
    lines.append(f"| `import` in a fresh process: `{names[1]}` vs `{names[0]}` (median) | "
                 f"{describe(imports[names[1]])} | {describe(imports[names[0]])} | "
                 f"ours takes {slowdown:.2f}x (target <= 1.2x) |")  # fmt: skip
    if args.imports:
        print(f"import digit_lightning.train takes {slowdown:.2f}x the time of import lightning, hydra, torchmetrics "
              f"(median of {len(imports[names[0]])} interleaved pairs; target <= 1.2x) on {device}")  # fmt: skip
        return

    with tempfile.TemporaryDirectory() as tmp:
        train_cli = ["-m", "digit_lightning.train", f"paths.data_dir={args.data}"]
        if not args.smoke:
            images = ["--images", "8000"] if args.quick else []
            limit = ["+trainer.limit_train_batches=500"] if args.quick else []
            epoch = "8,000 images" if args.quick else "1 epoch"
            runs = interleaved({
                "tutorial": ["bench/tutorial.py", "--epochs", "1", data, *images],
                "ours": [*train_cli, "experiment=tutorial", "trainer.max_epochs=1", *limit, f"hydra.run.dir={tmp}/t"],
            }, args.repeats or 2)  # fmt: skip
            lines.append(compare(f"whole command at the tutorial's settings (batch 16, {epoch}, test): "
                                 "bench/tutorial.py vs `experiment=tutorial`", "ours", runs, "tutorial",
                                 "target: ours faster by >= 1.4x"))  # fmt: skip
        if not (args.smoke or args.quick):
            runs = interleaved({
                "reference": ["bench/reference.py", data, f"--threads={ours_threads}"],
                "fast": [*train_cli, "experiment=fast", f"hydra.run.dir={tmp}/f"],
            }, args.repeats or 2)  # fmt: skip
            lines.append(compare("time to 99%, whole command: bench/reference.py (plain PyTorch) vs `experiment=fast`",
                                 "fast", runs, "reference", "target: ours takes <= 1.3x"))  # fmt: skip

    if not args.whole:
        torch.set_num_threads(ours_threads)
        with contextlib.redirect_stdout(sys.stderr):
            images, repeats = (320, 1) if args.smoke else (8_000, args.repeats or 2) if args.quick else (32_000, 3)
            rates = throughput(args.data, images, repeats)
            t, o = statistics.median(rates["tutorial"]), statistics.median(rates["ours"])
            lines.append(f"| images/s, batch 16, {images:,} images x {repeats}, in one process at {ours_threads} "
                         f"thread(s) (median) | {t:,.0f} | {o:,.0f} | {o / t:.2f}x |")  # fmt: skip
            cost = logging_cost(args.data, 50 if args.smoke else 300, 1 if args.smoke else 3)
            lines.append(f"| cost of logging every step (`trainer.log_every_n_steps=1` vs 50), batch 16 | | "
                         f"{cost:+.2f} ms/step | |")  # fmt: skip
    torch.set_num_threads(threads)

    print(f"\nMeasured on {device}, torch {torch.__version__}; our commands use {ours_threads} CPU thread(s) "
          f"(cpu_threads=auto), so does the reference; the tutorial's script uses torch's default ({threads}). "
          f"Load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.\n")  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
