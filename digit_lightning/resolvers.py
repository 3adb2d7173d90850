"""OmegaConf resolvers the configs use so that every process of one distributed run agrees on one run dir.

Under torchrun (and srun with several tasks) each rank is a process of its own that runs Hydra itself:
- `${launch_time:%Y-%m-%d_%H-%M-%S}`: when the run was launched. Under torchrun it is the start time of the torchrun
  agent that started this rank (its parent process), the same for all ranks of a node, so they share one run dir;
  elsewhere it is now, like Hydra's `${now:...}`.
- `${rank_zero_only:X}`: X on the global rank 0, null on the others (`hydra.output_subdir`: one `.hydra/`).
Registered when `digit_lightning.cli` is imported, which every entry point does before Hydra starts. They read no
file (psutil gives the agent's start time): where a resumed training runs is decided before Hydra starts
(runs.plan_resume).
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import datetime

import psutil
from omegaconf import OmegaConf

from digit_lightning.rank import global_rank


def launch_time(pattern: str) -> str:
    """`pattern` (strftime) of the torchrun agent's start under torchrun, else of now."""
    started = time.time()
    if "TORCHELASTIC_RUN_ID" in os.environ:  # every torchrun sets it; the agent is each rank's parent
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(os.getppid()).create_time()
    return datetime.fromtimestamp(started).strftime(pattern)


def rank_zero_only(value: object) -> object:
    """`value` on the global rank 0, None on the other ranks."""
    return value if global_rank() == 0 else None


OmegaConf.register_new_resolver("launch_time", launch_time, use_cache=True, replace=True)
OmegaConf.register_new_resolver("rank_zero_only", rank_zero_only, replace=True)
