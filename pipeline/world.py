"""Who this process is: its rank for training, and its worker index for shard-parallel stages.

Read once from the environment by the CLI and launchers (torchrun, srun, Slurm arrays, Kubernetes Indexed
Jobs); stages only ever see the resulting `World`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class World:
    """Process-group and worker-split facts for one process."""

    rank: int = 0
    """Global rank in the torch.distributed group (0 when not distributed)."""
    world_size: int = 1
    """Number of training processes."""
    local_rank: int = 0
    """Rank on this node, used to pick a device."""
    worker: int = 0
    """Index of this worker for shard-parallel stages (shard, cache, augment)."""
    num_workers: int = 1
    """Number of workers splitting a shard-parallel stage."""

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not 0 <= self.worker < self.num_workers:
            raise ValueError(f"worker {self.worker} is outside --num-workers {self.num_workers}")

    @property
    def is_main(self) -> bool:
        """True on the process that logs, tracks and writes shared files."""
        return self.rank == 0 and self.worker == 0


def _env_int(env: dict, *names: str) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            return int(env[name])
    return None


def world_from_env(worker: int | None = None, num_workers: int | None = None, env: dict | None = None) -> World:
    """Build a World from explicit worker flags, else torchrun / Slurm / Kubernetes variables.

    Shard-parallel stages split over whatever runs them: a job array's task index, an Indexed Job's
    completion index, or the training ranks.
    """
    env = dict(os.environ if env is None else env)
    rank = _env_int(env, "RANK") or 0
    world_size = _env_int(env, "WORLD_SIZE") or 1
    local_rank = _env_int(env, "LOCAL_RANK") or 0
    if worker is None:
        worker = _env_int(env, "DISTILL_WORKER", "SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX")
    if num_workers is None:
        num_workers = _env_int(env, "DISTILL_NUM_WORKERS", "SLURM_ARRAY_TASK_COUNT")
    if worker is None:
        worker = rank
    if num_workers is None:
        num_workers = world_size if world_size > 1 else max(worker + 1, 1)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, worker=worker, num_workers=num_workers)
