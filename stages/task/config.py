"""The `task` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.taskdata import (
    TaskData,
)
from kd.students import StudentConfig
from kd.teams import SamplerConfig
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Distil a student classifier from a fine-tuned teacher, then evaluate both side by side (training keys:
    `pipeline.train.optim.TrainConfig`; the schedule restarts in each phase)."""

    data: TaskData = field(default_factory=TaskData)
    """Task data: train (unless `augmented` is given), dev for the evaluation points, and the held-out test
    split (`data.test`, or carved from train by the run seed) whose scores are the published ones."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """Fine-tuned teacher stage, e.g. `@teacher_finetune`."""
    teacher_path: str | None = None
    """Or a fine-tuned teacher classifier folder / pkg: path (exactly one of teacher, teacher_path)."""
    student: str | None = field(default=None, metadata={"input": True})
    """Student model stage (`@general`, or a `task` stage for TinyBERT's second step)."""
    student_path: str | None = None
    """Or a student folder / pkg: path; with neither, the student is built from the teacher's layers."""
    student_init: StudentConfig = field(default_factory=lambda: StudentConfig(num_layers=4))
    """How to build a student from the teacher's layers (used without student / student_path)."""
    augmented: str | None = field(default=None, metadata={"input": True})
    """`augment` stage whose examples (and cached teacher logits) replace the training set."""
    team: str | None = field(default=None, metadata={"input": True})
    """`team` stage (`@team`): the prediction step's soft targets come from one member drawn per step (or
    per example) by `sampler` (SKD, docs/skd.md), cached when the members have caches, else online."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    """How the team member is drawn (`kd.teams.SamplerConfig`); read only with `team`."""
    objective: Literal["tinybert", "tinybert_intermediate", "tinybert_prediction", "pkd"] = "tinybert"
    """What to train (see the module docstring)."""
    intermediate_epochs: float = 10.0
    """Epochs of TinyBERT step 1."""
    prediction_epochs: float = 3.0
    """Epochs of TinyBERT step 2, or of Patient KD."""
    max_steps: int | None = None
    """Cap on optimizer steps per phase (quick runs)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-5
    """Peak learning rate (linear warm-up for 10% of a phase, then linear decay: `schedule`, `warmup_ratio`)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, per phase."""
    warmup_ratio: float = 0.1
    """Warmup over this share of each phase's steps."""
    temperature: float = 1.0
    """Softmax temperature T of the soft cross-entropy."""
    alpha: float = 0.5
    """Patient KD: weight of the soft loss (the hard loss gets 1 - alpha)."""
    hard_weight: float = field(default=0.0, metadata={"hash": "unless_default"})
    """TinyBERT's prediction step: weight of the ground-truth cross-entropy mixed into the soft loss, as
    (1 - hard_weight) soft + hard_weight hard (Hinton et al. 2015's weighted sum; TinyBERT uses 0). An
    augmented row carries its original sentence's label."""
    beta: float = 100.0
    """Patient KD: weight of the [CLS] loss `kd.losses.pkd_cls_mse`, the mean over mapped layers, batch and
    features of the squared difference of L2-normalised states (the released code's scale, where the paper's
    grid 10/100/500/1000 belongs; docs/task.md has measured term sizes)."""
    pkd_layers: Literal["skip", "last"] = "skip"
    """Patient KD: PKD-skip (every N/M-th teacher layer) or PKD-last (the last M)."""
    layer_map: Literal["uniform", "last", "skip"] = "uniform"
    """TinyBERT step 1: teacher layer per student layer (g(m) = m N / M for uniform)."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Save resumable training state every N steps (and at the end of each phase)."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per dev / test forward."""
    eval_every: int = field(default=0, metadata={"hash": False})
    """Score the student on dev every N steps of each phase (0: only at the end of each phase); the points
    are drawn on the loss curves (`phase_loss_curves.png`). Nothing is selected on them."""
    latency_batch_size: int = 32
    """Batch size of the inference-speed comparison."""
    latency_seq_len: int = 64
    """Sequence length of the inference-speed comparison."""
    latency_device: bool = field(default=True, metadata={"hash": False})
    """Also measure latency on the training device when it is not the CPU (the CPU figures are always there)."""
    latency_repeats: int = field(default=10, metadata={"hash": False})
    """Timed repeats per model (median reported)."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        super().__post_init__()
        if bool(self.teacher) == bool(self.teacher_path):
            raise ValueError("give exactly one of teacher (e.g. '@teacher_finetune') or teacher_path")
        if self.student and self.student_path:
            raise ValueError("give student or student_path, not both")
        if self.objective == "tinybert_prediction" and not (self.augmented or self.team):
            raise ValueError("objective tinybert_prediction reads cached teacher logits: set augmented: '@augment'")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        for name in ("batch_size", "latency_batch_size", "latency_seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.team and self.objective not in ("tinybert", "tinybert_prediction"):
            raise ValueError(f"team: objective {self.objective} is not sampled from a team (its layer losses pair "
                             "one teacher's widths); use tinybert or tinybert_prediction")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 <= self.hard_weight <= 1:
            raise ValueError(f"hard_weight must be in [0, 1], got {self.hard_weight}")

    def phases(self) -> list[tuple[str, float]]:
        """(phase, epochs) in training order."""
        if self.objective == "tinybert":
            return [("intermediate", self.intermediate_epochs), ("prediction", self.prediction_epochs)]
        if self.objective == "tinybert_intermediate":
            return [("intermediate", self.intermediate_epochs)]
        return [(self.objective.replace("tinybert_", ""), self.prediction_epochs)]
