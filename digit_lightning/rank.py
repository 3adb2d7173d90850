"""The ground floor: this process's global rank before any Trainer exists (no torch or Lightning import).

Every process of a distributed run starts the same command: torchrun sets RANK, Lightning's own launcher LOCAL_RANK
for the processes it starts, srun SLURM_PROCID. The order is Lightning's (`rank_zero_only.rank` at import,
lightning.fabric.utilities.rank_zero), so that our rank-0 decisions taken before Lightning is imported (one `.hydra/`,
one run-dir lock) agree with its own: SLURM_PROCID can be set outside a SLURM-run job step, so LOCAL_RANK comes first.
"""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def global_rank() -> int:
    """This process's global rank: the first of RANK, LOCAL_RANK, SLURM_PROCID, JSM_NAMESPACE_RANK set, else 0."""
    return next((int(os.environ[name]) for name in RANK_VARIABLES if os.environ.get(name)), 0)
