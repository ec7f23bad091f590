"""The training engine seam: the ONE module that imports deepspeed, plus a plain-torch engine.

`build_engine` wraps a student model with its optimizer, LR schedule, gradient accumulation, clipping and
precision, and hides whether DeepSpeed ZeRO (stage 0-3) or plain torch (one process, or DDP) runs it. Batch
size, lr, precision, accumulation, clipping and the ZeRO stage come from our config and are written into the
DeepSpeed JSON; a different value already in the user's JSON is a ConfigError raised before any compute.

A frozen online teacher never goes through here: each rank loads its own copy in eval mode with no grad.
That costs one teacher copy per rank (for a BERT-base teacher about 0.45 GB in fp32), but keeps it out of the
optimizer and out of ZeRO-3 partitioning, where gathering it every forward would cost more than it saves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.config import ConfigError
from pipeline.train import dist
from pipeline.world import World


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine decay to lr*min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(kw_only=True)
class EngineSettings:
    """What build_engine needs besides the model; the trainer fills it from its stage config."""

    backend: Literal["torch", "deepspeed"] = "deepspeed"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    total_steps: int = 1
    min_lr_ratio: float = 0.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    clip_norm: float | None = 1.0
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 0
    offload_optimizer: bool = False
    deepspeed_config: str | None = None
    collective_timeout_s: float = 600.0

    def schedule(self, step: int) -> float:
        """The learning rate at optimizer step `step`."""
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     min_lr_ratio=self.min_lr_ratio)


def deepspeed_json(settings: EngineSettings, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON (ZeRO/offload knobs) with our values filled in.

    A key the user set to a different value than ours is a ConfigError naming the file and the key;
    "auto" (accelerate's convention) means "take ours". An `optimizer` or `scheduler` block is refused:
    the engine brings its own AdamW and schedule so both engines train the same way.
    """
    source = settings.deepspeed_config or "deepspeed config"
    user: dict[str, Any] = {}
    if settings.deepspeed_config:
        path = Path(settings.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"{path}: DeepSpeed config not found (deepspeed_config names a JSON file)")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
    for block in ("optimizer", "scheduler", "fp16"):
        if block in user and (block != "fp16" or user[block].get("enabled")):
            raise ConfigError(f"{source}: {block}: remove it; the lr, schedule and precision come from the stage config"
                              + (" (fp16 does not run on CPU; use precision: bf16)" if block == "fp16" else ""))
    ours = {
        ("train_micro_batch_size_per_gpu",): settings.micro_batch_size,
        ("gradient_accumulation_steps",): settings.grad_accum,
        ("train_batch_size",): settings.micro_batch_size * settings.grad_accum * world_size,
        ("gradient_clipping",): settings.clip_norm or 0.0,
        ("bf16", "enabled"): settings.precision == "bf16",
        ("zero_optimization", "stage"): settings.zero_stage,
    }
    if settings.offload_optimizer or "offload_optimizer" in user.get("zero_optimization", {}):
        ours[("zero_optimization", "offload_optimizer", "device")] = "cpu" if settings.offload_optimizer else "none"
    merged = json.loads(json.dumps(user))
    for keys, value in ours.items():
        node = merged
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        have = node.get(keys[-1], "auto")
        if have != "auto" and have != value and not (isinstance(have, (int, float)) and have == value):
            raise ConfigError(f"{source}: {'.'.join(keys)} is {have!r} but the stage config gives {value!r}; "
                              f"set it to \"auto\" or remove it")
        node[keys[-1]] = value
    merged["zero_allow_untested_optimizer"] = True  # torch AdamW as the client optimizer
    merged.setdefault("steps_per_print", 1 << 30)
    return merged


def _param_groups(model: torch.nn.Module, params, weight_decay: float) -> list[dict]:
    # Biases and LayerNorm weights get no weight decay (BERT's recipe).
    trainable = [(n, p) for n, p in (params or model.named_parameters()) if p.requires_grad]
    decay = [p for n, p in trainable if p.ndim >= 2]
    no_decay = [p for n, p in trainable if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """Common surface of both engines; `step()` returns True when the optimizer stepped."""

    settings: EngineSettings
    world: World
    global_step: int = 0
    """Optimizer steps taken."""
    micro_step: int = 0
    """Backward passes taken."""

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.settings.schedule(self.global_step)

    @property
    def boundary(self) -> bool:
        """True when the next `step()` completes an accumulation cycle and updates the weights."""
        return (self.micro_step + 1) % self.settings.grad_accum == 0

    def _set_lr(self, optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr

    def _counters(self) -> dict[str, int]:
        return {"global_step": self.global_step, "micro_step": self.micro_step}


class TorchEngine(Engine):
    """Plain torch: one process, or DDP over the process group; bf16 through CPU/GPU autocast."""

    def __init__(self, model: torch.nn.Module, *, settings: EngineSettings, world: World, groups: list[dict]):
        self.settings, self.world, self.module = settings, world, model
        self.optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)
        self.wrapped = model
        if world.world_size > 1:
            self.wrapped = torch.nn.parallel.DistributedDataParallel(model)
        self.global_step = self.micro_step = 0

    def forward(self, *args, **kwargs):
        """Run the (wrapped) model; skip DDP's gradient sync on micro steps inside an accumulation cycle."""
        sync = self.boundary or self.world.world_size == 1
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.settings.precision == "bf16")
        if not sync:
            with self.wrapped.no_sync(), ctx:
                return self.wrapped(*args, **kwargs)
        with ctx:
            return self.wrapped(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate the micro-batch loss, scaled so an accumulation cycle averages its micro-batches."""
        (loss / self.settings.grad_accum).backward()

    def step(self) -> bool:
        """Count a micro step; at an accumulation boundary clip, set the lr, update and zero the grads."""
        stepped = self.boundary
        if stepped:
            if self.settings.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.settings.clip_norm)
            self._set_lr(self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
        self.micro_step += 1
        return stepped

    def save(self, directory: Path) -> None:
        """Rank 0 writes the weights (safetensors), the optimizer state and the counters; the state is not
        partitioned, so any world size can load it."""
        from safetensors.torch import save_model

        if self.world.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            save_model(self.module, str(directory / "model.safetensors"))
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
            (directory / "engine.json").write_text(json.dumps({"backend": "torch", **self._counters()}))

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote (tensors only: weights_only loading, no pickle)."""
        from safetensors.torch import load_model

        load_model(self.module, str(directory / "model.safetensors"))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
        counters = json.loads((directory / "engine.json").read_text())
        self.global_step, self.micro_step = counters["global_step"], counters["micro_step"]

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}


def _safe_checkpoint_engine(base):
    """DeepSpeed's checkpoint loader with pickle turned off: weights_only plus the two DeepSpeed types its
    optimizer files hold."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    class SafeLoad(type(base)):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum]):
                return torch.load(path, map_location=map_location, weights_only=True)

    base.__class__ = SafeLoad
    return base


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 with torch AdamW as the client optimizer (no DeepSpeedCPUAdam build needed)."""

    def __init__(self, model: torch.nn.Module, *, settings: EngineSettings, world: World, config: dict,
                 groups: list[dict]):
        import deepspeed

        self.settings, self.world, self.config = settings, world, config
        optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        _safe_checkpoint_engine(self.ds.checkpoint_engine)
        self.module = self.ds.module
        self.global_step = self.micro_step = 0

    def forward(self, *args, **kwargs):
        """Run the model through DeepSpeed (which casts inputs and gathers ZeRO-3 partitions)."""
        return self.ds(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """DeepSpeed's backward: it divides by the accumulation steps itself."""
        self.ds.backward(loss)

    def step(self) -> bool:
        """DeepSpeed's step; at a boundary it clips and updates with the lr we set just before."""
        stepped = self.ds.is_gradient_accumulation_boundary()
        if stepped:
            self._set_lr(self.optimizer)
        self.ds.step()
        self.micro_step += 1
        self.global_step += int(stepped)
        return stepped

    def save(self, directory: Path) -> None:
        """Every rank writes its ZeRO partition through DeepSpeed; rank 0 adds the counters."""
        self.ds.save_checkpoint(str(directory), tag="ds", save_latest=False)
        if self.world.rank == 0:
            (directory / "engine.json").write_text(json.dumps({"backend": "deepspeed", **self._counters()}))

    def load(self, directory: Path) -> None:
        """Restore weights, optimizer partitions and counters saved by the same world size."""
        path, _ = self.ds.load_checkpoint(str(directory), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ConfigError(f"{directory}: DeepSpeed found no checkpoint to load (incomplete or another layout)")
        counters = json.loads((directory / "engine.json").read_text())
        self.global_step, self.micro_step = counters["global_step"], counters["micro_step"]

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights (gathered from the ZeRO partitions; call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        names = {id(p): n for n, p in self.module.named_parameters()}
        for name, tensor in self.module.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(tensor) if id(tensor) in names else None
            if full is None and getattr(tensor, "ds_id", None) is not None:
                import deepspeed

                with deepspeed.zero.GatheredParameters([tensor]):
                    full = tensor.detach().clone()
            out[name] = (full if full is not None else tensor).detach().float().cpu().clone()
        return out


def build_engine(model: torch.nn.Module, *, settings: EngineSettings, world: World, params=None) -> Engine:
    """Wrap `model` for training under the backend `settings` names; init the process group if needed.

    `params` is an optional iterable of (name, parameter) to train (default: every parameter of `model`
    that requires grad; register projections as submodules of the model so both engines see them).
    """
    groups = _param_groups(model, params, settings.weight_decay)
    if settings.backend == "torch":
        if settings.zero_stage or settings.offload_optimizer:
            raise ConfigError("zero_stage and offload_optimizer need engine: deepspeed")
        dist.init(world, timeout_s=settings.collective_timeout_s)
        return TorchEngine(model, settings=settings, world=world, groups=groups)
    config = deepspeed_json(settings, world.world_size)  # conflicts fail here, before any compute
    dist.init(world, need_group=True, timeout_s=settings.collective_timeout_s)
    return DeepSpeedEngine(model, settings=settings, world=world, config=config, groups=groups)
