"""How this process was launched (torchrun, SLURM, or alone), from its environment only.

Kept apart from distributed.py, which needs torch: the CLI asks this of every command,
`report` included, before it knows whether the command will need torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from cunet_optimize.errors import CUNetError


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the job, as its launcher described it."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # "torchrun" (or any env:// launcher), "slurm", "none"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def detect_launch(environ: Mapping[str, str] = os.environ) -> Launch:
    """torchrun's RANK/WORLD_SIZE/LOCAL_RANK, else SLURM's SLURM_PROCID/SLURM_STEP_NUM_TASKS/
    SLURM_LOCALID (srun with one task per GPU), else one process. torchrun inside an srun step
    wins. The step's task count, not the job's SLURM_NTASKS: an sbatch script's own shell (not
    an srun step) is one process however many tasks the job has."""
    try:
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return Launch(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ.get("LOCAL_RANK", 0)),
                          "torchrun")
        ntasks = int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if "SLURM_PROCID" in environ and ntasks > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
            if missing:
                raise CUNetError(
                    f"SLURM job with {ntasks} tasks but no {' or '.join(missing)}: export "
                    "MASTER_ADDR=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1) and "
                    "MASTER_PORT=29500 before srun (docs/DISTRIBUTED.md)")
            return Launch(int(environ["SLURM_PROCID"]), ntasks, int(environ.get("SLURM_LOCALID", 0)), "slurm")
    except ValueError as e:
        raise CUNetError(f"launcher variables are not integers ({e}); run under torchrun or srun as documented")
    return Launch()
