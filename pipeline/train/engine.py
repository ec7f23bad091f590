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
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError
from pipeline.train import device as devices
from pipeline.train import dist, host_memory
from pipeline.train.optim import EngineSettings, adamw, lr_at, param_groups  # noqa: F401 (re-exported)
from pipeline.world import World


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
    if merged.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") == "cpu":
        # Offload with the client torch AdamW (stepping on the CPU copy) instead of DeepSpeedCPUAdam, which
        # JIT-compiles a C++ extension on first use (about a minute, and a compiler on every node).
        merged["zero_force_ds_cpu_optimizer"] = False
    merged.setdefault("steps_per_print", 1 << 30)
    return merged


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
        return self.settings.schedule_lr(self.global_step)

    @property
    def device(self) -> torch.device:
        """The device the trained module and its batches live on."""
        return self.settings.device

    def to_device(self, batch):
        """A CPU batch on the engine's device (pinned memory, non_blocking on CUDA)."""
        return devices.to_device(batch, self.device)

    @property
    def boundary(self) -> bool:
        """True when the next `step()` completes an accumulation cycle and updates the weights."""
        return (self.micro_step + 1) % self.settings.grad_accum == 0

    def exported(self, make, prefix: str = ""):
        """On rank 0, a fresh CPU fp32 module from `make()` holding the trained weights under `prefix` (gathered
        from ZeRO partitions: call on every rank); None on the other ranks."""
        state = self.state_dict_for_export()
        if self.world.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):  # building the module must not move the training RNG
            module = make()
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        return module.eval()

    def _set_lr(self, optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.lr

    def _counters(self) -> dict[str, int]:
        return {"global_step": self.global_step, "micro_step": self.micro_step}


class TorchEngine(Engine):
    """Plain torch: one process, or DDP over the process group; bf16 through autocast on the device's type."""

    def __init__(self, model: torch.nn.Module, *, settings: EngineSettings, world: World):
        self.settings, self.world, self.module = settings, world, model.to(settings.device)
        self.optimizer = adamw(param_groups(model.named_parameters(), settings.weight_decay), lr=settings.lr,
                               betas=settings.betas)
        self.wrapped = model
        if world.world_size > 1:
            ids = [settings.device.index] if settings.device.type == "cuda" else None
            self.wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if settings.compile:
            self.wrapped = torch.compile(self.wrapped, dynamic=True)  # masked-position counts vary per batch
        self.global_step = self.micro_step = 0

    def forward(self, *args, **kwargs):
        """Run the (wrapped) model; skip DDP's gradient sync on micro steps inside an accumulation cycle."""
        sync = self.boundary or self.world.world_size == 1
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.precision == "bf16")
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

        load_model(self.module, str(directory / "model.safetensors"), device=str(self.device))
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True,
                                                  map_location=self.device))
        counters = json.loads((directory / "engine.json").read_text())
        self.global_step, self.micro_step = counters["global_step"], counters["micro_step"]

    def state_dict_for_export(self) -> dict[str, torch.Tensor]:
        """Full fp32 weights on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}


def _safe_checkpoint_engine(base):
    """DeepSpeed's checkpoint loader with pickle turned off: weights_only plus the three plain DeepSpeed data
    types its optimizer files hold (`fragment_address`, a (numel, start) pair, comes with ZeRO offload)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class SafeLoad(type(base)):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    base.__class__ = SafeLoad
    return base


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO 0-3 with torch AdamW as the client optimizer (no DeepSpeedCPUAdam build needed, offload
    included); DeepSpeed places the module on cuda:LOCAL_RANK itself, or keeps it on the CPU."""

    def __init__(self, model: torch.nn.Module, *, settings: EngineSettings, world: World, config: dict):
        import deepspeed

        self.settings, self.world, self.config = settings, world, config
        optimizer = adamw(param_groups(model.named_parameters(), settings.weight_decay), lr=settings.lr,
                          betas=settings.betas)
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
    if settings.activation_checkpointing:
        _checkpoint_activations(model)
    if settings.device.type == "cpu":
        if settings.keep_host_memory:
            host_memory.keep_freed_buffers()
        if settings.fast_dropout:
            from pipeline.train.dropout import use_fast_dropout

            use_fast_dropout(model)
    if params is not None:  # train only these: freeze the rest so both engines and DDP agree on what trains
        keep = {id(p) for _, p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    if settings.backend == "torch":
        if settings.zero_stage or settings.offload_optimizer:
            raise ConfigError("zero_stage and offload_optimizer need engine: deepspeed")
        dist.init(world, device=settings.device, timeout_s=settings.collective_timeout_s)
        return TorchEngine(model, settings=settings, world=world)
    config = deepspeed_json(settings, world.world_size)  # conflicts fail here, before any compute
    dist.init(world, device=settings.device, need_group=True, timeout_s=settings.collective_timeout_s)
    return DeepSpeedEngine(model, settings=settings, world=world, config=config)


def _checkpoint_activations(model: torch.nn.Module) -> None:
    """Hugging Face gradient checkpointing on every transformer inside `model` (recompute in backward)."""
    found = [m for m in model.modules() if getattr(m, "supports_gradient_checkpointing", False)]
    if not found:
        raise ConfigError("activation_checkpointing: the trained module holds no Hugging Face model that supports it")
    for module in found:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
