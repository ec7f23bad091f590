"""The `fastbert` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.models import check_model_fields
from formats.taskdata import TaskData
from pipeline.train.optim import TrainConfig

DEFAULT_SPEEDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Add FastBERT branches to a fine-tuned classifier, self-distil them from its final classifier (backbone
    and classifier frozen, no labels), then report accuracy, layers and latency over speed thresholds (training
    keys: `pipeline.train.optim.TrainConfig`)."""

    data: TaskData = field(default_factory=TaskData)
    """Task data: train (its text trains the branches), dev (the choice of S), and the held-out test split the
    report scores (`data.test`, or `data.test_fraction` carved from train by the run seed; the teacher's and
    the augmented set's must be the same)."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """The fine-tuned classifier stage, e.g. `@teacher_finetune` (it gets the branches)."""
    teacher_path: str | None = None
    """Or a fine-tuned classifier folder / pkg: path (exactly one of teacher, teacher_path)."""
    augmented: str | None = field(default=None, metadata={"input": True})
    """Optional `augment` stage made from the same task data: its texts are added as unlabeled training text
    (it augmented no test row: it held out the same test split)."""
    branch_width: int = 128
    """Hidden size of each branch (the paper's 128)."""
    branch_heads: int = 2
    """Attention heads of each branch's self-attention (must divide branch_width)."""
    branch_dropout: float = 0.1
    """Dropout inside the branches while they train."""
    temperature: float = 1.0
    """Softmax temperature T of the self-distillation KL (1: the paper's plain KL)."""
    epochs: float = 2.0
    """Passes over the training text."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: epochs decide)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-4
    """Peak learning rate (branches start from random, so higher than fine-tuning's)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup."""
    warmup_ratio: float = 0.1
    """Share of steps with linear warm-up."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Optimizer steps between checkpoints (and one at the end)."""
    speeds: list[float] = field(default_factory=lambda: list(DEFAULT_SPEEDS))
    """Speed thresholds S the report evaluates (0 <= S <= 1; 0 is the full model)."""
    max_drop: float = 1.0
    """Accuracy drop (points) the reported speed-up may cost; its S is chosen on dev and saved as the default."""
    eval_batch_size: int = 32
    """Examples per batch in evaluation and latency: the batch early exit thins."""
    latency_examples: int = field(default=256, metadata={"hash": False})
    """Test rows timed per speed threshold (the first N, length-sorted batches)."""
    latency_repeats: int = field(default=3, metadata={"hash": False})
    """Timed passes per speed threshold (median reported)."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default); latency is measured with these."""

    def __post_init__(self):
        super().__post_init__()
        check_model_fields(self.teacher, self.teacher_path)
        for name in ("branch_width", "branch_heads", "batch_size", "eval_batch_size", "latency_examples",
                     "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.branch_width % self.branch_heads:
            raise ValueError(f"branch_heads ({self.branch_heads}) must divide branch_width ({self.branch_width})")
        if not 0 <= self.branch_dropout < 1:
            raise ValueError(f"branch_dropout must be in [0, 1), got {self.branch_dropout}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.speeds or any(not 0 <= s <= 1 for s in self.speeds) or sorted(set(self.speeds)) != self.speeds:
            raise ValueError(f"speeds must be distinct thresholds in [0, 1], ascending, got {self.speeds}")
        if self.max_drop < 0:
            raise ValueError(f"max_drop must be >= 0 (accuracy points), got {self.max_drop}")
        if self.data.preset.regression:
            raise ValueError("FastBERT's uncertainty is the entropy of class probabilities: data must be a "
                             "classification task (regression is not supported)")
