"""OmegaConf resolvers the configs use so that every process of one distributed run agrees on one run dir.

Under torchrun (and srun with several tasks) each rank is a process of its own that runs Hydra itself:
- `${launch_time:%Y-%m-%d_%H-%M-%S}`: when the run was launched. Under torchrun it is the start time of the torchrun
  agent that started this rank (its parent process), the same for all ranks of a node, so they share one run dir;
  elsewhere it is now, like Hydra's `${now:...}`.
- `${rank_zero_only:X}`: X on the global rank 0, null on the others (`hydra.output_subdir`: one `.hydra/`).
- `${resume_dir:...}` and `${resume_subdir:...}`: a training resumed from a run's checkpoint continues in that run's
  dir (digit_lightning/runs.py).
Registered when `digit_lightning.cli` is imported, which every entry point does before Hydra starts.
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

from digit_lightning import runs


def process_start(pid: int) -> datetime | None:
    """When process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, counted after the comm field
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return datetime.fromtimestamp(boot + ticks / os.sysconf("SC_CLK_TCK"))


def launch_time(pattern: str) -> str:
    """`pattern` (strftime) of the torchrun agent's start under torchrun, else of now."""
    started = process_start(os.getppid()) if "TORCHELASTIC_RUN_ID" in os.environ else None
    return (started or datetime.now()).strftime(pattern)


def global_rank() -> int:
    """This process's global rank: torchrun's RANK, else srun's SLURM_PROCID, else 0."""
    return int(os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or 0)


def rank_zero_only(value: object) -> object:
    """`value` on the global rank 0, None on the other ranks."""
    return value if global_rank() == 0 else None


OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("rank_zero_only", rank_zero_only, replace=True)


OmegaConf.register_new_resolver("resume_dir", runs.resume_dir, replace=True)
OmegaConf.register_new_resolver("resume_subdir", runs.resume_subdir, replace=True)
