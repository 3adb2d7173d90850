"""Resuming runs: which checkpoint `ckpt_path` names, re-running in the original run dir, saving on SIGTERM/Ctrl-C.

`ckpt_path` takes a checkpoint file, a run dir (its `checkpoints/last.ckpt`), or `last`: the newest
`<log_dir>/<task_name>/runs/*/checkpoints/last.ckpt`. On the command line a resumed run re-applies the original run's
overrides (from its `.hydra/overrides.yaml`; the ones typed now win) and reuses its run dir, so the model, data and
trainer settings match and TensorBoard shows one continuous run.
"""

from __future__ import annotations

import logging
import os
import random
import shlex
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)
LAST = "last.ckpt"


class ResumeError(RuntimeError):
    """A `ckpt_path` that names no checkpoint; the message is one line with the fix."""


def find_checkpoint(spec: str | Path, runs_dir: str | Path) -> Path:
    """Resolve a `ckpt_path` value: a file, a run dir (its last.ckpt) or `last` (the newest one under `runs_dir`)."""
    if str(spec) == "last":
        found = sorted(Path(runs_dir).glob(f"*/checkpoints/{LAST}"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ResumeError(f"ckpt_path=last: no {Path(runs_dir) / '*' / 'checkpoints' / LAST}; train a run first")
        return found[-1].resolve()
    path = Path(spec).expanduser()
    for candidate in (path, path / "checkpoints" / LAST, path / LAST):
        if candidate.is_file():
            return candidate.resolve()
    raise ResumeError(f"ckpt_path={spec}: no such checkpoint file or run dir with checkpoints/{LAST}")


def requeued_checkpoint(run_dir: str | Path) -> Path | None:
    """In a SLURM job that SLURM requeued (preemption, `scontrol requeue`, Lightning's auto-requeue on SIGUSR1), the
    checkpoint to go on from: the newer of `<run_dir>/checkpoints/last.ckpt` (saved on SIGTERM or at an epoch end) and
    Lightning's `<run_dir>/hpc_ckpt_N.ckpt` (saved on SIGUSR1). None in a job's first run, or with neither file.
    The requeued job runs the same sweep job again, in the same run dir (submitit pickles its resolved config)."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1:
        return None
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / LAST, *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime).resolve() if found else None


def run_dir_of(ckpt: Path) -> Path | None:
    """The Hydra run dir that wrote `ckpt` (`<run>/checkpoints/<name>.ckpt` beside `<run>/.hydra/`), if any."""
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / ".hydra" / "overrides.yaml").is_file() else None


def _key(override: str) -> str:
    parsed = OverridesParser.create().parse_override(override)
    return f"{parsed.key_or_group}@{parsed.package}" if parsed.package else parsed.key_or_group


def resume_argv(argv: list[str]) -> list[str]:
    """Turn `prog ... ckpt_path=X ...` into the original run's command, resuming from X in the original run dir.

    Multiruns and command lines without `ckpt_path` are returned unchanged; X becomes an absolute checkpoint file.
    """
    if "-m" in argv or "--multirun" in argv:
        return argv
    overrides = [a for a in argv[1:] if "=" in a and not a.startswith("-")]
    spec = next((o.split("=", 1)[1] for o in overrides if _key(o) == "ckpt_path"), None)
    if spec in (None, "", "null"):
        return argv
    others = [o for o in overrides if _key(o) != "ckpt_path"]
    runs_dir = None
    if spec == "last":  # compose the config as typed to learn where this task's runs are
        from digit_lightning.config import compose_config

        cfg = compose_config([o for o in others if not o.startswith("hydra")])
        runs_dir = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    ckpt = find_checkpoint(spec, runs_dir or ".")
    typed = {_key(o) for o in overrides}
    new = [f"ckpt_path={ckpt}" if _key(a) == "ckpt_path" else a for a in argv[1:] if a in overrides]
    run_dir = run_dir_of(ckpt)
    if run_dir is not None:
        original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
        new = [o for o in original if _key(o) not in typed] + new
        if "hydra.run.dir" not in typed:
            new.append(f"hydra.run.dir={run_dir}")
    flags = [a for a in argv[1:] if a not in overrides]
    return [argv[0], *flags, *new]


def resume_command(ckpt: Path) -> str:
    """The command that resumes from `ckpt` (its run's overrides are re-applied automatically)."""
    return f"python -m digit_lightning.train {shlex.quote(f'ckpt_path={ckpt}')}"


def _rng_states() -> dict[str, Any]:
    """The global RNG states as plain data (lists, tensors), so checkpoints still load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def _set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumableRun(L.Callback):
    """Makes fit resumable: RNG states ride in every checkpoint (the data order after a resume is the same),
    and SIGTERM or Ctrl-C during fit saves `<dirpath>/last.ckpt` and prints the command that resumes it.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: Path | None = None

    def state_dict(self) -> dict[str, Any]:
        """The random-number generators' states, saved in every checkpoint."""
        return {"rng": _rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the random-number generators' states from a checkpoint."""
        if "rng" in state_dict:
            _set_rng_states(state_dict["rng"])

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """On SIGTERM or Ctrl-C during fit: save `last.ckpt` and log the command that resumes the run."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run:
            return
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)):
            return
        dirpath = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        self.saved = (dirpath / LAST).resolve()
        trainer.save_checkpoint(self.saved)  # every rank calls it (it synchronizes); rank 0 writes
        what = "SIGTERM" if isinstance(exception, SIGTERMException) else "Ctrl-C"
        self._report(what, trainer.current_epoch, trainer.global_step)

    @rank_zero_only
    def _report(self, what: str, epoch: int, step: int) -> None:
        log.warning(
            f"Interrupted by {what} in epoch {epoch} at step {step}; saved {self.saved}. "
            f"To resume: {resume_command(self.saved)}"
        )


EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's convention for "terminated by SIGTERM"
