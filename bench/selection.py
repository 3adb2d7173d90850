"""Which checkpoint should be a run's model? Train short recipes over seeds, keep every epoch, compare rules on test.

    python bench/selection.py run --root /tmp/selection --seeds 1,2,3,4
    python bench/selection.py table /tmp/selection

`run` trains each recipe of RECIPES once per seed (one torch thread each, two at a time) with every epoch's
checkpoint kept and the CSV logger on, and no test. `table` then scores each epoch's checkpoint on the official
test set and, per recipe, reports the test accuracy of the checkpoint each selection rule picks from the
validation curve alone (the test set never picks): mean ± sd over seeds, and how often each rule lost to another.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from digit_lightning.checkpoint import load_checkpoint
from digit_lightning.data import MNISTDataModule

# Short recipes: the default one-cycle run, the same with an EMA (the record recipe's pair), and experiment=fast at
# two lengths. (A constant-lr recipe, e.g. experiment=tutorial, would be the next row to add.)
LIMITS = ["+trainer.limit_train_batches=300", "trainer.max_epochs=5"]
RECIPES = {
    "default (one cycle)": LIMITS,
    "default + EMA": [*LIMITS, "callbacks=ema"],
    "experiment=fast (one cycle)": ["experiment=fast", "+trainer.limit_train_batches=40", "trainer.max_epochs=5"],
    "experiment=fast 6 x 100 batches": ["experiment=fast", "+trainer.limit_train_batches=100", "trainer.max_epochs=6"],
}


def slug(name: str) -> str:
    """A recipe name as a directory name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def train(root: Path, recipe: str, seed: int) -> None:
    """One training run of `recipe` with every epoch's checkpoint and the CSV logger, no test."""
    run_dir = root / slug(recipe) / f"seed{seed}"
    if (run_dir / "csv" / "metrics.csv").is_file() and any((run_dir / "checkpoints").glob("epoch_*.ckpt")):
        return
    cmd = [sys.executable, "-m", "digit_lightning.train", *RECIPES[recipe], f"seed={seed}", "cpu_threads=1",
           "test=false", "logger=csv", "callbacks.model_checkpoint.save_top_k=-1", "callbacks.progress_bar=null",
           "callbacks.dashboards=null", f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(f"{recipe} seed {seed}: exit {done.returncode} {done.stderr[-2000:] if done.returncode else ''}", flush=True)


def val_curve(run_dir: Path) -> list[dict[str, float]]:
    """Per epoch, in order: val/acc and val/loss as the run logged them."""
    rows = [r for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open()) if r.get("val/acc")]
    return [{"epoch": int(r["epoch"]), "acc": float(r["val/acc"]), "loss": float(r["val/loss"])} for r in rows]


RULES = {
    "best val/acc, first max": lambda c: max(c, key=lambda r: (r["acc"], -r["epoch"])),
    "best val/acc, last max": lambda c: max(c, key=lambda r: (r["acc"], r["epoch"])),
    "best val/loss": lambda c: min(c, key=lambda r: r["loss"]),
    "final epoch": lambda c: c[-1],
}


def fitted(log: Path) -> bool:
    """Whether the run of this train.log finished its fit."""
    return "`Trainer.fit` stopped" in log.read_text()


@torch.no_grad()
def test_acc(ckpt: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Official test accuracy of one checkpoint."""
    model = load_checkpoint(ckpt)
    preds = torch.cat([model(x).argmax(1) for x in images.split(1000)])
    return (preds == labels).float().mean().item()


def table(root: Path) -> None:
    """Print, per recipe and rule, the test accuracy of the picked checkpoint over seeds (Markdown)."""
    torch.set_num_threads(1)
    dm = MNISTDataModule(data_dir=os.environ.get("DIGIT_LIGHTNING_DATA", "data"))
    dm.prepare_data()
    dm.setup("test")
    batches = list(dm.test_dataloader())
    images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    print("| recipe | seeds | " + " | ".join(RULES) + " |")
    print("|---" * (len(RULES) + 2) + "|")
    for recipe in RECIPES:
        runs = sorted(p.parent for p in (root / slug(recipe)).glob("seed*/train.log") if fitted(p))  # finished fits
        picks: dict[str, list[float]] = {rule: [] for rule in RULES}
        for run in runs:
            curve = val_curve(run)
            cache = run / "test_acc_per_epoch.json"  # scored once; the table is printed again from it
            if not cache.is_file():
                ckpts = {r["epoch"]: run / "checkpoints" / f"epoch_{r['epoch']:03d}.ckpt" for r in curve}
                cache.write_text(json.dumps({e: test_acc(c, images, labels) for e, c in ckpts.items()}))
            scores = {int(e): acc for e, acc in json.loads(cache.read_text()).items()}
            for rule, pick in RULES.items():
                picks[rule].append(scores[pick(curve)["epoch"]])
            print(f"  {recipe} {run.name}: val/acc {[r['acc'] for r in curve]} test {list(scores.values())}",
                  file=sys.stderr)  # fmt: skip
        if not runs:
            continue
        cells = [
            f"{100 * statistics.mean(v):.2f} ± {100 * (statistics.stdev(v) if len(v) > 1 else 0):.2f}"
            for v in picks.values()
        ]
        print(f"| {recipe} | {len(runs)} | " + " | ".join(cells) + " |")


def main() -> None:
    """`run` or `table` (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--root", type=Path, required=True)
    run.add_argument("--seeds", default="1,2,3,4")
    run.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names of RECIPES")
    run.add_argument("--jobs", type=int, default=2)
    tab = sub.add_parser("table")
    tab.add_argument("root", type=Path)
    args = parser.parse_args()
    if args.cmd == "table":
        return table(args.root)
    jobs = [(r, int(s)) for s in args.seeds.split(",") for r in args.recipes.split(",")]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: train(args.root, *job), jobs))


if __name__ == "__main__":
    main()
