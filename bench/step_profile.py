"""Where a training step's time goes in our `train`: `python bench/bench.py --profile` (`make bench ARGS=--profile`).

Lightning times every hook, the batch fetch and the optimizer step through its `Profiler` interface; `CPUProfiler`
records each action's CPU seconds (`time.process_time`: steadier than wall time on a shared machine) and keeps only
what an action spends outside the actions nested in it, so the parts add up to the step. `StepParts` adds the parts
Lightning does not time: the net's forward pass (module hooks) and `self.log`.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.profilers import Profiler

# What each part of the report covers, by Lightning's action names (the first pattern that matches wins).
PARTS: list[tuple[str, Callable[[str], bool]]] = [
    ("data (fetch a batch, move it to the device)", lambda a: "dataloader_next" in a or "to_device" in a),
    ("forward (the net)", lambda a: a == "forward"),
    ("logging (self.log, loggers)", lambda a: a == "log" or "log_metrics" in a),
    ("backward", lambda a: a.endswith(".backward")),
    ("optimizer (Adam's step, zero_grad)", lambda a: a.endswith(".optimizer_step") or a.endswith("zero_grad")),
    ("progress bar", lambda a: "ProgressBar" in a),
    ("callback and module hooks (ours and Lightning's)", lambda a: a.startswith("[Callback]") or ".on_" in a),
    ("loss, train metrics (training_step's own work)", lambda a: a.endswith(".training_step")),
    ("Lightning's loop (the rest)", lambda a: True),
]


class CPUProfiler(Profiler):
    """A Lightning profiler that sums each action's exclusive CPU seconds (time outside its nested actions)."""

    latest: CPUProfiler | None = None  # the instance a run made (train() builds it from the config)

    def __init__(self) -> None:
        super().__init__()
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.stack: list[list[Any]] = []  # [action, start, seconds spent in nested actions]
        CPUProfiler.latest = self

    def start(self, action_name: str) -> None:
        """Open `action_name`."""
        self.stack.append([action_name, time.process_time(), 0.0])

    def stop(self, action_name: str) -> None:
        """Close `action_name`: its own time to it, its whole time to its parent's nested time."""
        while self.stack and self.stack[-1][0] != action_name:  # an action Lightning left open: close it too
            self.stack.pop()
        if not self.stack:
            return
        name, start, nested = self.stack.pop()
        total = time.process_time() - start
        self.exclusive[name] += total - nested
        self.calls[name] += 1
        if self.stack:
            self.stack[-1][2] += total

    def restart(self) -> None:
        """Forget the totals so far (the warm-up steps); actions open now count from here on."""
        self.exclusive.clear()
        self.calls.clear()
        now = time.process_time()
        for frame in self.stack:
            frame[1], frame[2] = now, 0.0

    def summary(self) -> str:
        """Nothing here: `report()` turns the totals into the per-step table."""
        return ""

    def report(self, steps: int) -> list[tuple[str, float]]:
        """Milliseconds of CPU per training step in each part of `PARTS`, the per-step actions only."""
        # The epoch loop's own time is per step too (fetching the next step, the logger connector between steps),
        # and so is `log`, called on the logging steps only.
        per_step = {
            a: s
            for a, s in self.exclusive.items()
            if self.calls[a] >= 0.9 * steps or a in ("log", "run_training_epoch")
        }
        parts: dict[str, float] = defaultdict(float)
        for action, seconds in per_step.items():
            part = next(name for name, match in PARTS if match(action))
            parts[part] += seconds / steps * 1e3
        return [(name, parts[name]) for name, _ in PARTS if name in parts]


class StepParts(L.Callback):
    """Times, in the run's profiler, what Lightning does not: the net's forward pass and `self.log`;
    restarts the profiler's totals after `warmup` steps (first calls allocate, import and trace)."""

    def __init__(self, warmup: int = 50) -> None:
        self.warmup = warmup

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Time the net's forward (module hooks) and the module's `log`."""
        profiler = trainer.profiler
        pl_module.net.register_forward_pre_hook(lambda *_: profiler.start("forward"))
        pl_module.net.register_forward_hook(lambda *_: profiler.stop("forward"))
        pl_module.log = timed(profiler, "log", pl_module.log)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """After the warm-up steps, start counting afresh."""
        if batch_idx == self.warmup and isinstance(trainer.profiler, CPUProfiler):
            trainer.profiler.restart()


def timed(profiler: Profiler, action: str, function: Callable) -> Callable:
    """`function`, with each call recorded as `action` in `profiler`."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with profiler.profile(action):
            return function(*args, **kwargs)

    return wrapper
