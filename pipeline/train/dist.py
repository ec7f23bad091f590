"""torch.distributed helpers for training stages: no-ops at world size 1, gloo on CPU, env:// from torchrun.

Stages never touch the process group directly; the engine calls `init(world)` and the trainer uses the
collectives below, which return their input unchanged when there is one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pipeline.world import World


def backend() -> str:
    """nccl when every rank has a GPU, else gloo (the CPU path tests use)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init(world: World, *, need_group: bool = False) -> None:
    """Join the process group torchrun set up (env://); at world size 1 make a private one only if `need_group`.

    DeepSpeed wants a process group even for one process, so the engine asks for one; a one-process group
    uses an in-memory store, so no port is opened and parallel test processes cannot collide.
    """
    if dist.is_initialized():
        return
    if world.world_size > 1 or need_group:
        # DeepSpeed checks LOCAL_RANK itself; torchrun sets it, a plain `distill run` does not.
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    if world.world_size > 1:
        dist.init_process_group(backend(), init_method="env://", rank=world.rank, world_size=world.world_size)
    elif need_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def active() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank; nothing at world size 1."""
    if active():
        dist.barrier()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a copy); the tensor itself at world size 1."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (a copy); the tensor itself at world size 1."""
    if not active():
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def shutdown() -> None:
    """Leave the process group at the end of a stage so the next stage (or test) can make its own."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


def global_share(local: torch.Tensor) -> float:
    """world_size * local / (sum of local over ranks): the weight that turns a rank's mean over its own units
    into its part of the global mean (1.0 at world size 1; one all-reduce otherwise)."""
    if not active():
        return 1.0
    total = all_reduce_sum(local.float()).item()
    return float(local) * dist.get_world_size() / max(total, 1.0)
