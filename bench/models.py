"""The model zoo's results table: train each model as a whole command, then tabulate the runs' metrics.json.

    python bench/models.py run --models digit,lenet5,fast --seeds 1,2,3 --epochs 1 --root logs/zoo
    python bench/models.py table logs/zoo --write docs/models.md

`run` times each training command from launch to exit (set-up and the final test included) and leaves
`wall.json` (seconds, hardware) beside the run's `metrics.json`. `table` groups runs by model, epochs, batch size
and hardware, and prints test/acc as mean ± sd over seeds; `--write` replaces the table between the markers in a
Markdown file. Recipes that were not run (e.g. GPU-only budgets) get a row that says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from digit_lightning.models import build_net, count_parameters

START, END = "<!-- model-table:start -->", "<!-- model-table:end -->"
# Recipes the table lists even when no run of theirs is found: (model, epochs, batch size, command).
PLANNED = [("strong", 30, 128, "experiment=record")]


def hardware() -> str:
    """The device a run used: the GPU's name, else the CPU's model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
              if line.startswith("model name")]  # fmt: skip
    name = models[0] if models else name
    return f"{name}, {os.cpu_count()} cores (CPU)"


def run(models: list[str], seeds: list[int], epochs: int, root: Path, extra: list[str]) -> None:
    """Train every model with every seed (interleaved: a busy machine slows all alike), one run dir each."""
    for seed in seeds:
        for model in models:
            out = root / f"{model}_e{epochs}" / f"seed{seed}"
            if (out / "wall.json").is_file():
                continue  # already done: a re-run only adds what is missing
            command = [sys.executable, "-m", "digit_lightning.train", f"model={model}", f"seed={seed}",
                       f"trainer.max_epochs={epochs}", f"hydra.run.dir={out}", "callbacks.progress_bar=null",
                       *extra]  # fmt: skip
            start = time.perf_counter()
            result = subprocess.run(command, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
            (out / "wall.json").write_text(json.dumps({"wall_s": wall, "hardware": hardware(), "command": command}))
            acc = json.loads((out / "metrics.json").read_text())["test/acc"]
            print(f"{model} seed {seed}: test/acc={acc:.4f} in {wall:.0f} s", file=sys.stderr)


def collect(roots: list[Path]) -> dict[tuple, list[dict]]:
    """Every finished run under `roots`, grouped by (model, epochs, batch size, hardware)."""
    groups: dict[tuple, list[dict]] = {}
    for root in roots:
        for wall_file in sorted(root.rglob("wall.json")):
            run_dir = wall_file.parent
            cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
            metrics = json.loads((run_dir / "metrics.json").read_text())
            timing = json.loads(wall_file.read_text())
            net = cfg["model"]["net"]
            key = (net["name"], cfg["trainer"]["max_epochs"], cfg["data"]["batch_size"], timing["hardware"])
            groups.setdefault(key, []).append({"net": net, "acc": metrics["test/acc"], "wall": timing["wall_s"]})
    return groups


def table(roots: list[Path]) -> str:
    """The Markdown table of the runs under `roots`, plus a 'not run here' row for each planned recipe not found."""
    lines = [
        "| model | parameters | epochs | batch | seeds | test/acc (mean ± sd) | wall per run (whole command) "
        "| hardware |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    groups = collect(roots)
    for (name, epochs, batch, device), runs in sorted(groups.items()):
        accs = [100 * r["acc"] for r in runs]
        sd = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else " (1 seed)"
        params = count_parameters(build_net(**runs[0]["net"]))
        wall = statistics.mean(r["wall"] for r in runs)
        recipe = next((f" (`{command}`)" for n, e, b, command in PLANNED if (n, e, b) == (name, epochs, batch)), "")
        lines.append(f"| {name}{recipe} | {params:,} | {epochs} | {batch} | {len(runs)} | "
                     f"{statistics.mean(accs):.2f}%{sd} | {wall:.0f} s | {device} |")  # fmt: skip
    for name, epochs, batch, command in PLANNED:
        if not any(k[:3] == (name, epochs, batch) for k in groups):
            params = count_parameters(build_net(name))
            lines.append(f"| {name} (`{command}`) | {params:,} | {epochs} | {batch} | – | not run here | – | GPU |")
    return "\n".join(lines)


def write(path: Path, text: str) -> None:
    """Replace what lies between the table markers in `path` with `text`."""
    doc = path.read_text()
    head, rest = doc.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{tail}")


def main() -> None:
    """Command line: `run` or `table` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train models x seeds as whole commands")
    r.add_argument("--models", default="digit,lenet5,pytorch_examples,fast,strong")
    r.add_argument("--seeds", default="1,2,3")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--root", type=Path, default=Path("logs/zoo"))
    r.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. data.batch_size=128")
    t = sub.add_parser("table", help="print (or --write) the results table")
    t.add_argument("roots", nargs="+", type=Path)
    t.add_argument("--write", type=Path, help="a Markdown file with the table markers")
    args = parser.parse_args()
    if args.command == "run":
        seeds = [int(s) for s in args.seeds.split(",")]
        run(args.models.split(","), seeds, args.epochs, args.root, args.overrides)
    else:
        text = table(args.roots)
        write(args.write, text) if args.write else print(text)


if __name__ == "__main__":
    main()
