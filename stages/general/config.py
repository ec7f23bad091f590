"""The `general` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kd.students import StudentConfig
from pipeline.config import ConfigError
from pipeline.train.engine import EngineSettings


@dataclass(kw_only=True)
class LossWeights:
    """Weight of each loss in the sum; 0 turns a loss off (and skips what only it needs)."""

    soft: float = 1.0
    """Soft cross-entropy at `temperature` against the teacher's distribution (cache or online), T^2-scaled."""
    mlm: float = 0.0
    """Hard masked-LM cross-entropy on the true tokens (DistilBERT's L_mlm)."""
    cosine: float = 0.0
    """Cosine loss between the last hidden states (DistilBERT); online teacher."""
    embedding: float = 0.0
    """MSE between embedding outputs (TinyBERT); online teacher."""
    hidden: float = 0.0
    """MSE between mapped hidden states, summed over student layers (TinyBERT); online teacher."""
    attention: float = 0.0
    """MSE between mapped pre-softmax attention scores, summed over layers (TinyBERT); online teacher."""
    minilm_attention: float = 0.0
    """MiniLM last-layer self-attention distribution KL; online teacher."""
    minilm_value: float = 0.0
    """MiniLM last-layer value-relation KL; online teacher."""

    def __post_init__(self):
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {value}")

    @property
    def online_only(self) -> list[str]:
        """The enabled losses whose targets only an online teacher gives."""
        names = ("cosine", "embedding", "hidden", "attention", "minilm_attention", "minilm_value")
        return [n for n in names if getattr(self, n) > 0]


@dataclass(kw_only=True)
class Config:
    """Distil a student from a teacher on a sharded corpus, from the cache and/or an online teacher."""

    corpus: str = field(default="@shard", metadata={"input": True})
    """The shard stage the student trains on."""
    cache: str | None = field(default=None, metadata={"input": True})
    """The teacher cache (e.g. "@cache") for logit losses; None runs the teacher online."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Upstream stage holding the teacher (e.g. "@teacher_adapt"); or set teacher_path."""
    teacher_path: str | None = None
    """A local or pkg: folder with the teacher; or set teacher."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """How the student is built (size, or layers taken from the teacher)."""
    loss: LossWeights = field(default_factory=LossWeights)
    """Weights of the losses."""
    temperature: float = 2.0
    """Softmax temperature of the soft losses."""
    cache_targets: Literal["topk", "sampled"] = "topk"
    """Which cached targets the soft loss uses: top-k with the tail mass, or the sampled ids."""
    layer_map: Literal["uniform", "last", "skip", "first", "explicit"] = "uniform"
    """Which teacher layer each student layer learns from (hidden and attention losses)."""
    layer_map_layers: list[int] | None = None
    """Teacher layers (1-based), one per student layer, for layer_map 'explicit'."""
    projection: bool = True
    """Learn linear projections student width -> teacher width for hidden/embedding/cosine losses."""
    mask_rate: float = 0.15
    """Masking rate with an online teacher (with a cache its manifest fixes the masks)."""
    mask_seed: int = 0
    """Mask seed with an online teacher."""
    teacher_dtype: Literal["fp32", "bf16"] = "fp32"
    """Precision of the online teacher."""
    engine: Literal["torch", "deepspeed"] = "deepspeed"
    """Training engine: DeepSpeed ZeRO, or plain torch (one process or DDP)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """DeepSpeed: keep optimizer state on the CPU."""
    deepspeed_config: str | None = None
    """Optional DeepSpeed JSON with further ZeRO knobs; values we set must agree or be "auto"."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Training precision (fp16 is not supported: it does not run on CPU)."""
    batch_size: int = 32
    """Global samples per optimizer step (all ranks and accumulation steps together)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    max_steps: int = 1000
    """Optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (not on biases and LayerNorms)."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio."""
    clip_norm: float | None = 1.0
    """Gradient norm clipping; None turns it off."""
    shuffle_buffer: int = 1024
    """Samples in the reader's shuffle buffer."""
    eval_every: int = 200
    """Optimizer steps between evaluations on the valid split (0: only at the end)."""
    eval_batches: int = 20
    """Batches of the valid split per evaluation."""
    checkpoint_every: int = 500
    """Optimizer steps between checkpoints (0: none but the preemption one)."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    resume: Literal["auto", "none"] = field(default="auto", metadata={"hash": False})
    """auto: continue from the newest complete checkpoint of this stage; none: start over."""
    log_every: int = field(default=10, metadata={"hash": False})
    """Optimizer steps between training log lines."""
    collective_timeout_s: float = field(default=600.0, metadata={"hash": False})
    """Seconds a rank waits in a collective for the others; past it (or at once when a rank dies) the run
    stops with one line naming the lost rank, and a rerun resumes from the last complete checkpoint."""
    die_after_steps: int | None = field(default=None, metadata={"hash": False})
    """Test hook: SIGKILL this process after this many optimizer steps."""
    preempt_at_step: int | None = field(default=None, metadata={"hash": False})
    """Test hook: raise the preemption flag after this optimizer step."""

    def __post_init__(self):
        if (self.teacher is None) == (self.teacher_path is None):
            raise ValueError("set exactly one of teacher (an upstream stage) and teacher_path (a folder)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cache is None and self.loss.soft == 0 and self.loss.mlm == 0 and not self.loss.online_only:
            raise ValueError("every loss weight is 0: enable at least one loss")
        if not 0 <= self.zero_stage <= 3:
            raise ValueError(f"zero_stage must be 0..3, got {self.zero_stage}")
        if self.engine == "torch" and (self.zero_stage or self.offload_optimizer or self.deepspeed_config):
            raise ValueError("zero_stage, offload_optimizer and deepspeed_config need engine: deepspeed")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_batches", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            raise ValueError("eval_every and checkpoint_every must be >= 0")
        if not 1 <= self.collective_timeout_s <= 86400:
            raise ValueError(f"collective_timeout_s must be between 1 and 86400, got {self.collective_timeout_s}")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")

    def engine_settings(self, world_size: int) -> EngineSettings:
        """What the engine needs; a batch that does not split over the ranks is a ConfigError."""
        per_step = self.batch_size // self.grad_accum
        if per_step % world_size:
            raise ConfigError(f"batch_size {self.batch_size} / grad_accum {self.grad_accum} = {per_step} samples per "
                              f"micro step do not split over {world_size} ranks")
        return EngineSettings(
            backend=self.engine, lr=self.lr, weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
            total_steps=self.max_steps, min_lr_ratio=self.min_lr_ratio, micro_batch_size=per_step // world_size,
            grad_accum=self.grad_accum, clip_norm=self.clip_norm, precision=self.precision,
            zero_stage=self.zero_stage, offload_optimizer=self.offload_optimizer,
            deepspeed_config=self.deepspeed_config, collective_timeout_s=self.collective_timeout_s)
