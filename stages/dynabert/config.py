"""The `dynabert` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.taskdata import TaskData
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Train a width- and depth-adaptive DynaBERT from a fine-tuned teacher, then report every sub-network
    (training keys: `pipeline.train.optim.TrainConfig`; the schedule restarts in each phase)."""

    data: TaskData = field(default_factory=TaskData)
    """Task data: train, dev (the choice of `smallest_within`) and the held-out test split the grid reports
    (`data.test`, or `data.test_fraction` carved from train by the run seed; the teacher's and the augmented
    set's must be the same)."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Fine-tuned teacher stage, e.g. `@teacher_finetune` (a BERT classifier)."""
    teacher_path: str | None = None
    """Or a fine-tuned BERT classifier folder / pkg: path (exactly one of teacher, teacher_path)."""
    augmented: str | None = field(default=None, metadata={"input": True})
    """`augment` stage whose examples replace the training set (it augmented no test row: it held out the same
    test split)."""
    widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """Width multipliers: share of heads and FFN neurons kept (most important first); must include 1.0."""
    depths: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    """Depth multipliers: share of layers kept, layer floor(i / d) for i < round(d L); must include 1.0."""
    importance_batches: int = 8
    """Training batches over which head / neuron importance (|d task loss / d mask|) is summed."""
    width_epochs: float = 3.0
    """Epochs of width-adaptive training (teacher: the fine-tuned model)."""
    depth_epochs: float = 3.0
    """Epochs of depth-adaptive training (teacher: the width-adaptive model at the same width, full depth)."""
    max_steps: int | None = None
    """Cap on optimizer steps per phase (quick runs)."""
    batch_size: int = 32
    """Examples per step (every sub-network of the grid sees the same batch)."""
    lr: float = 2e-5
    """Peak learning rate (DynaBERT's GLUE setting)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, per phase."""
    warmup_ratio: float = 0.1
    """Warmup over this share of each phase's steps."""
    temperature: float = 1.0
    """Softmax temperature of the logit loss (soft cross-entropy)."""
    tolerance: float = 0.01
    """The reported figure: the smallest sub-network whose dev score is within this of the full model's (0.01 =
    1 point)."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Save resumable training state every N steps (and at the end of each phase)."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per dev / test forward."""
    latency_batch_size: int = 32
    """Batch size of the CPU latency measurement."""
    latency_seq_len: int = 64
    """Sequence length of the CPU latency measurement."""
    latency_repeats: int = field(default=10, metadata={"hash": False})
    """Timed repeats per sub-network (median reported)."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        super().__post_init__()
        if bool(self.teacher) == bool(self.teacher_path):
            raise ValueError("give exactly one of teacher (e.g. '@teacher_finetune') or teacher_path")
        if self.zero_stage == 3:
            raise ValueError("zero_stage 3 partitions the weights DynaBERT slices per sub-network; use 0, 1 or 2")
        for name in ("widths", "depths"):
            values = getattr(self, name)
            if not values or any(not 0 < v <= 1 for v in values) or len(set(values)) != len(values):
                raise ValueError(f"{name} must be distinct multipliers in (0, 1], got {values}")
            if 1.0 not in values:
                raise ValueError(f"{name} must include 1.0 (the full model is the reference and the next teacher)")
        for name in ("importance_batches", "batch_size", "eval_batch_size", "latency_batch_size", "latency_seq_len",
                     "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width_epochs <= 0 or self.depth_epochs < 0:
            raise ValueError("width_epochs must be > 0 and depth_epochs >= 0 (0 skips depth-adaptive training)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.temperature <= 0 or not 0 <= self.tolerance < 1:
            raise ValueError("temperature must be > 0 and tolerance in [0, 1)")

    def phases(self) -> list[tuple[str, float]]:
        """(phase, epochs) in training order: width-adaptive, then (unless 0 epochs) depth-adaptive."""
        return [("width", self.width_epochs)] + ([("depth", self.depth_epochs)] if self.depth_epochs else [])
