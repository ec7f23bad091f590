"""The keys every stage that trains shares, defined once: engine, device, precision, optimizer, schedule, checkpoints.

A training stage's `Config` subclasses `TrainConfig` (overriding defaults where the stage wants other ones), so
`lr`, `schedule`, `precision`, `checkpoint_every`, ... mean the same thing and are validated the same way in
teacher_adapt, general, teacher_finetune and task. `TrainConfig.engine_settings` turns them into the engine's
`EngineSettings`; `lr_at` is the one learning-rate schedule and `param_groups` the one AdamW grouping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

SCHEDULES = ("cosine", "linear", "constant")
"""Named learning-rate schedules; each warms up linearly over `warmup` steps first."""


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float,
          schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then `schedule` down to lr*min_lr_ratio."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "constant":
        return lr
    shape = 1 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * shape)


def param_groups(named_params, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on biases and LayerNorm weights (BERT's recipe); frozen ones left out."""
    trainable = [(n, p) for n, p in named_params if p.requires_grad]
    return [{"params": [p for _, p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in trainable if p.ndim < 2], "weight_decay": 0.0}]


def adamw(groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float = 1e-8) -> torch.optim.AdamW:
    """The one optimizer: torch AdamW, fused (one kernel over all parameters, CPU and CUDA alike; what the
    Hugging Face Trainer uses by default) when every parameter is a float tensor on the CPU or a GPU."""
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass(kw_only=True)
class EngineSettings:
    """What build_engine needs besides the model; `TrainConfig.engine_settings` fills it from a stage config."""

    backend: Literal["torch", "deepspeed"] = "deepspeed"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
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
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the trained module, its batches and autocast live (resolved by pipeline.train.device)."""
    compile: bool = False
    activation_checkpointing: bool = False
    fast_dropout: bool = True
    """On the CPU, draw dropout masks with pipeline.train.dropout (16-bit draws) instead of torch's bernoulli."""
    keep_host_memory: bool = True
    """On the CPU, keep freed buffers in the process heap for the next step (pipeline.train.host_memory)."""
    collective_timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before the run stops naming the lost one."""

    def schedule_lr(self, step: int) -> float:
        """The learning rate at optimizer step `step`."""
        return lr_at(step, lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.total_steps,
                     min_lr_ratio=self.min_lr_ratio, schedule=self.schedule)


@dataclass(kw_only=True)
class TrainConfig:
    """Training keys shared by every stage that trains (inherited by its Config)."""

    engine: Literal["torch", "deepspeed"] = "torch"
    """Training engine: plain torch (one process or DDP) or DeepSpeed ZeRO."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """DeepSpeed ZeRO 1-3: keep optimizer state (and its step) on the CPU."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON with further ZeRO knobs; values we set must agree or be "auto"."""
    device: str = field(default="auto", metadata={"hash": False})
    """"auto" (cuda:LOCAL_RANK when a GPU is visible, else cpu), "cpu", "cuda" (cuda:LOCAL_RANK) or "cuda:i"."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Autocast precision: auto is bf16 on a GPU that supports it, fp32 elsewhere (fp16 is not offered)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorms)."""
    clip_norm: float | None = 1.0
    """Gradient norm clipping; None turns it off."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup: cosine or linear down to lr * min_lr_ratio, or constant."""
    warmup_steps: int = 0
    """Linear warmup steps (or set warmup_ratio)."""
    warmup_ratio: float = 0.0
    """Warmup as a share of the total steps, used when warmup_steps is 0."""
    min_lr_ratio: float = 0.0
    """The decay ends at lr * min_lr_ratio."""
    compile: bool = field(default=False, metadata={"hash": False})
    """torch.compile the trained module (torch engine)."""
    activation_checkpointing: bool = field(default=False, metadata={"hash": False})
    """Recompute activations in backward (Hugging Face gradient checkpointing): less memory, ~30% more compute."""
    fast_dropout: bool = field(default=True, metadata={"hash": False})
    """Training on the CPU: dropout masks from 16-bit draws, four per 64-bit random number, also inside
    attention (pipeline.train.dropout), instead of torch's one-thread bernoulli (about 5% of a student step
    here); false keeps torch's dropout and SDPA's own masks."""
    keep_host_memory: bool = field(default=True, metadata={"hash": False})
    """Training on the CPU: keep freed buffers in the process heap (glibc) so each step reuses them instead of
    faulting fresh pages in (about 8% of a student step here); false hands them back to the OS at once."""
    checkpoint_every: int = field(default=500, metadata={"hash": False})
    """Optimizer steps between checkpoints (0: only the preemption one and, where a stage keeps it, the last)."""
    keep_last: int = field(default=2, metadata={"hash": False})
    """Complete checkpoints kept."""
    resume: Literal["auto", "none"] = field(default="auto", metadata={"hash": False})
    """auto: continue from the newest complete checkpoint of this stage; none: start over."""
    log_every: int = field(default=10, metadata={"hash": False})
    """Optimizer steps between progress lines (and the host syncs and reductions they need)."""
    collective_timeout_s: float = field(default=600.0, metadata={"hash": False})
    """Seconds a rank waits in a collective for the others; past it (or at once when a rank dies) the run
    stops with one line naming the lost rank, and a rerun resumes from the last complete checkpoint."""
    die_after_steps: int | None = field(default=None, metadata={"hash": False})
    """Test hook: SIGKILL this process after this many optimizer steps."""
    preempt_at_step: int | None = field(default=None, metadata={"hash": False})
    """Test hook: raise the preemption flag after this optimizer step."""

    def __post_init__(self):
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.engine == "torch" and (self.zero_stage or self.offload_optimizer or self.deepspeed_config):
            raise ValueError("zero_stage, offload_optimizer and deepspeed_config need engine: deepspeed")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:i, got {self.device!r}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm must be > 0 or null, got {self.clip_norm}")
        if self.warmup_steps < 0 or not 0 <= self.warmup_ratio < 1 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("warmup_steps must be >= 0, warmup_ratio in [0, 1) and min_lr_ratio in [0, 1]")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        for name in ("grad_accum", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if not 1 <= self.collective_timeout_s <= 86400:
            raise ValueError(f"collective_timeout_s must be between 1 and 86400, got {self.collective_timeout_s}")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of `total_steps`."""
        if self.warmup_steps:
            return self.warmup_steps
        return max(1, int(self.warmup_ratio * total_steps)) if self.warmup_ratio else 0

    def engine_settings(self, *, total_steps: int, micro_batch_size: int, world):
        """The engine's settings for a run of `total_steps` optimizer steps on this process's device."""
        from pipeline.train import device as devices

        where = devices.resolve(self.device, world)
        return EngineSettings(
            backend=self.engine, lr=self.lr, weight_decay=self.weight_decay, schedule=self.schedule,
            warmup_steps=self.warmup_for(total_steps), total_steps=total_steps, min_lr_ratio=self.min_lr_ratio,
            micro_batch_size=micro_batch_size, grad_accum=self.grad_accum, clip_norm=self.clip_norm,
            precision=devices.precision(self.precision, where), zero_stage=self.zero_stage,
            offload_optimizer=self.offload_optimizer, deepspeed_config=self.deepspeed_config, device=where,
            compile=self.compile, activation_checkpointing=self.activation_checkpointing,
            fast_dropout=self.fast_dropout, keep_host_memory=self.keep_host_memory,
            collective_timeout_s=self.collective_timeout_s)
