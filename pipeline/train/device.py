"""Where a process computes: its device, resolved once from the config and the local rank, and its precision.

`resolve("auto", world)` is `cuda:LOCAL_RANK` when a GPU is visible, else the CPU; "cuda" is `cuda:LOCAL_RANK`
and, with no GPU visible, a ConfigError (one line, exit 2). `use(device)` makes it the current CUDA device,
which must happen before the process group starts (NCCL binds a communicator to the current device).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.world import World


def resolve(name: str, world: World | None = None) -> torch.device:
    """The device `name` ("auto", "cpu", "cuda", "cuda:i") means for this process."""
    local = (world or World()).local_rank
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() and local < torch.cuda.device_count() \
            else torch.device("cpu")
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise ConfigError(f"device {name!r}: use auto, cpu, cuda or cuda:i")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible here; use device: cpu or auto")
    index = local if name == "cuda" else int(name[5:])
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} (local rank {local}): only {torch.cuda.device_count()} GPU(s) visible; "
                          "start at most one rank per GPU")
    return torch.device("cuda", index)


def use(device: torch.device) -> torch.device:
    """Make `device` the current CUDA device (nothing on the CPU); returns it."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def precision(name: str, device: torch.device) -> str:
    """"auto" is bf16 on a GPU that supports it, else fp32; an explicit name is kept."""
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision name."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def to_device(batch: Any, device: torch.device) -> Any:
    """A batch (tensors in dicts, lists or tuples) on `device`: from pinned memory with non_blocking on CUDA,
    unchanged on the CPU."""
    if device.type != "cuda":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory().to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (timing); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
