"""The `general` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.models import check_model_fields
from kd.students import StudentConfig
from kd.teams import SamplerConfig, check_member
from pipeline.config import ConfigError
from pipeline.train.engine import EngineSettings
from pipeline.train.optim import TrainConfig


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
class TeamTeacher:
    """One masked-LM teacher of a general-stage team (SKD, docs/skd.md): its model and, preferably, its cache."""

    name: str
    """Short name (letters, digits, `_`, `-`, `.`): it names the member in logs, metrics and errors."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Upstream stage holding this teacher (e.g. "@teacher_adapt"); or set teacher_path."""
    teacher_path: str | None = None
    """A local or pkg: folder with this teacher (exactly one of teacher, teacher_path)."""
    cache: str | None = field(default=None, metadata={"input": True})
    """This teacher's cache stage (e.g. "@cache_l4") over the same corpus and masks as the other members;
    None: the member runs online (every member has a cache, or none)."""
    level: float | None = None
    """Capacity for the capacity and curriculum laws; None: encoder layers x hidden width."""
    score: float | None = None
    """Quality for the quality law; None: its masked-LM accuracy (the cache's `teacher_mlm_accuracy`, or
    measured on the valid split when online)."""

    def __post_init__(self):
        check_member(self.name, self.level)
        check_model_fields(self.teacher, self.teacher_path)


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Distil a student from a teacher on a sharded corpus, from the cache and/or an online teacher.

    The training keys (engine, device, precision, lr, schedule, warmup, checkpoints, ...) are
    `pipeline.train.optim.TrainConfig`'s, shared with every stage that trains.
    """

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
    team: list[TeamTeacher] = field(default_factory=list)
    """A teacher team (SKD): the logit losses learn, at each step (or example), from one member drawn by
    `sampler`, from its cache (no teacher forward) or online. `teacher` stays the reference (student init,
    evaluation). Empty: plain distillation from `teacher`/`cache`."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """How the team member is drawn (`kd.teams.SamplerConfig`); read only with `team`."""
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
    teacher_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """Precision of the online teacher: auto is bf16 on a GPU that supports it, fp32 on the CPU."""
    engine: Literal["torch", "deepspeed"] = "deepspeed"
    """Training engine: DeepSpeed ZeRO, or plain torch (one process or DDP)."""
    batch_size: int = 32
    """Global samples per optimizer step (all ranks and accumulation steps together)."""
    max_steps: int = 1000
    """Optimizer steps."""
    shuffle_buffer: int = 1024
    """Samples a shuffle window holds at least (consecutive shards of a seeded permutation, mixed together)."""
    reader_partitions: int = 48
    """Partitions the shuffle windows are dealt to: fixes the sample order; rank counts that divide it (with
    their loader workers) read disjoint shards. A rank holds one window per partition it reads."""
    loader_workers: int = field(default=2, metadata={"hash": False})
    """DataLoader worker processes per rank (0: in the training process); the batches do not depend on it."""
    prefetch_factor: int = field(default=2, metadata={"hash": False})
    """Batches each loader worker prepares ahead."""
    pin_memory: bool | None = field(default=None, metadata={"hash": False})
    """Pin batches in page-locked memory for fast copies to the GPU; None: when CUDA is available."""
    eval_every: int = 200
    """Optimizer steps between evaluations on the valid split (0: only at the end)."""
    eval_batches: int = 20
    """Batches of the valid split per evaluation."""

    def __post_init__(self):
        super().__post_init__()
        if (self.teacher is None) == (self.teacher_path is None):
            raise ValueError("set exactly one of teacher (an upstream stage) and teacher_path (a folder)")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cache is None and self.loss.soft == 0 and self.loss.mlm == 0 and not self.loss.online_only:
            raise ValueError("every loss weight is 0: enable at least one loss")
        for name in ("batch_size", "max_steps", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
        if self.team:
            names = [m.name for m in self.team]
            if len(set(names)) != len(names):
                raise ValueError(f"team: member names must be distinct, got {names}")
            if len({m.cache is None for m in self.team}) > 1:
                raise ValueError("team: give every member a cache, or none (then every member runs online)")
            if self.cache is not None:
                raise ValueError("team: the members' caches are the soft targets; drop `cache` (set each "
                                 "member's `cache` instead)")
            if self.loss.online_only:
                raise ValueError(f"team: loss {', '.join(self.loss.online_only)} pairs one teacher's layers and "
                                 "widths; with a team only the logit losses (soft, mlm) are on")
            if self.loss.soft == 0:
                raise ValueError("team: loss.soft is 0, so no member would teach; set loss.soft > 0")
        if self.shuffle_buffer < 1 or self.reader_partitions < 1 or self.loader_workers < 0 or self.prefetch_factor < 1:
            raise ValueError("shuffle_buffer, reader_partitions and prefetch_factor must be >= 1, loader_workers >= 0")

    def settings_for(self, world) -> EngineSettings:
        """What the engine needs on this process; a batch that does not split over the ranks is a ConfigError."""
        per_step = self.batch_size // self.grad_accum
        if per_step % world.world_size:
            raise ConfigError(f"batch_size {self.batch_size} / grad_accum {self.grad_accum} = {per_step} samples per "
                              f"micro step do not split over {world.world_size} ranks")
        return self.engine_settings(total_steps=self.max_steps, micro_batch_size=per_step // world.world_size,
                                    world=world)
