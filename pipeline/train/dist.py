"""torch.distributed helpers for training stages: no-ops at world size 1, gloo on CPU, env:// from torchrun.

Stages never touch the process group directly; the engine calls `init(world)` and the trainer uses the
collectives below, which return their input unchanged when there is one process.
"""

from __future__ import annotations

import os
import re
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from pipeline.world import World


def backend(device: torch.device | None = None) -> str:
    """gloo for CPU tensors, plus nccl for CUDA ones when this process trains on a GPU; when more ranks share
    a node than it has GPUs (ranks sharing one, as a 1-GPU test does) gloo carries CUDA tensors too, since
    NCCL refuses two ranks on one device."""
    if device is None or device.type != "cuda":
        return "gloo"
    shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
    return "cpu:gloo,cuda:gloo" if shared else "cpu:gloo,cuda:nccl"


TIMEOUT_S = 600.0
"""How long a collective waits for the other ranks by default before it fails (torch's own default: 30 min)."""


class RankLost(RuntimeError):
    """A collective failed because another rank died or stopped answering; the message names it."""


def init(world: World, *, device: torch.device | None = None, need_group: bool = False, timeout_s: float = TIMEOUT_S,
         **options) -> None:
    """Join the process group torchrun set up (env://); at world size 1 make a private one only if `need_group`.

    `device` is the process's training device: a CUDA one is made current first (NCCL binds to it) and gets
    the nccl backend beside gloo. Every collective fails after `timeout_s` if a rank does not join it, so a
    dead rank cannot hang the others. DeepSpeed wants a process group even for one process, so the engine asks
    for one; a one-process group uses an in-memory store, so no port is opened and parallel test processes
    cannot collide. `options` go to `init_process_group` as they are.
    """
    if dist.is_initialized():
        return
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    if world.world_size > 1 or need_group:
        # DeepSpeed checks LOCAL_RANK itself; torchrun sets it, a plain `distill run` does not.
        os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    if world.world_size > 1:
        dist.init_process_group(backend(device), init_method="env://", rank=world.rank, world_size=world.world_size,
                                timeout=timedelta(seconds=timeout_s), **options)
    elif need_group:
        dist.init_process_group(backend(device), store=dist.HashStore(), rank=0, world_size=1, **options)


def lost_ranks(err: BaseException, wait_s: float = 3.0) -> RankLost | None:
    """After a failed collective: which ranks are gone, as a RankLost naming them; None if `err` is not that.

    The survivors check in through the rendezvous store and wait `wait_s` for each other; a rank that does not
    check in is lost. When the store itself is unreachable, its host (rank 0, which serves it) is the lost one.
    """
    text = str(err).strip()
    transport = isinstance(err, dist.DistError) or re.search(r"gloo|nccl|connection|timed? ?out", text, re.I)
    if not active() or isinstance(err, RankLost) or not transport:
        return None
    rank, size = dist.get_rank(), dist.get_world_size()
    # "[.../gloo/transport/tcp/pair.cc:537] Read error ...: Connection reset by peer. This is typically ..."
    reason = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0] if text else type(err).__name__).split(". ")[0][:160]
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"distill/alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(size) if r != rank and not store.check([f"distill/alive/{r}"])]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - the store lives on rank 0: unreachable means rank 0 is gone
        missing = [0] if rank != 0 else []
    if not missing:
        return None
    names = ", ".join(str(r) for r in missing)
    return RankLost(f"rank {names} of {size} lost (it died or stopped answering; this is rank {rank}: {reason}); "
                    "rerun the same command to resume from the last complete checkpoint")


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


def global_shares(local: torch.Tensor) -> torch.Tensor:
    """world_size * local / (sum of local over ranks), elementwise for a vector of unit counts: the weights that
    turn a rank's means over its own units into its parts of the global means. Ones at world size 1; one
    all-reduce otherwise, on the tensor's own device, with no host sync."""
    local = local.float()
    if not active():
        return torch.ones_like(local)
    return local * dist.get_world_size() / all_reduce_sum(local).clamp(min=1.0)


def global_share(local: torch.Tensor) -> float:
    """`global_shares` of one count, as a float (a host sync; for code outside the hot loop)."""
    return float(global_shares(torch.as_tensor(local).reshape(1))[0])
