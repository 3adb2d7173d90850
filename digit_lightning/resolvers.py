"""OmegaConf resolvers the configs use so that every process of one distributed run agrees on one run dir.

Under torchrun (and srun with several tasks) each rank is a process of its own that runs Hydra itself:
- `${launch_time:%Y-%m-%d_%H-%M-%S}`: when the run was launched. Under torchrun it is the start time of the torchrun
  agent that started this rank (its parent process), the same for all ranks of a node, so they share one run dir;
  elsewhere it is now, like Hydra's `${now:...}`.
- `${rank_zero_only:X}`: X on the global rank 0, null on the others (`hydra.output_subdir`: one `.hydra/`).
Registered when `digit_lightning.cli` is imported, which every entry point does before Hydra starts. They read no
file but /proc's start times: where a resumed training runs is decided before Hydra starts (runs.plan_resume).
"""

from __future__ import annotations

import os
from datetime import datetime

from omegaconf import OmegaConf

from digit_lightning.rank import global_rank


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


def rank_zero_only(value: object) -> object:
    """`value` on the global rank 0, None on the other ranks."""
    return value if global_rank() == 0 else None


OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("rank_zero_only", rank_zero_only, replace=True)
