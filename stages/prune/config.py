"""The `prune` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from formats.models import check_model_fields
from formats.taskdata import TaskData
from pipeline.train.optim import TrainConfig


@dataclass(kw_only=True)
class Config(TrainConfig):
    """Prune a fine-tuned classifier to `sparsity` in rounds, retraining with its masks held after every round
    (training keys: `pipeline.train.optim.TrainConfig`; the schedule and optimizer restart each round)."""

    model: str | None = field(default=None, metadata={"input": True})
    """The fine-tuned classifier to prune: an upstream stage, e.g. `@teacher_finetune`."""
    model_path: str | None = None
    """Or a classifier folder / pkg: path (exactly one of model, model_path)."""
    data: TaskData = field(default_factory=TaskData)
    """Task data: train (retraining), dev (logged during training) and the held-out test split the published
    scores are measured on (`data.test`, or `data.test_fraction` carved from train by the run seed; an upstream
    `model` stage must have held out the same split)."""
    method: Literal["magnitude", "structured"] = "magnitude"
    """magnitude: single weights by |w| (zeros in the export); structured: attention heads and FFN neurons by
    importance (smaller matrices in the export)."""
    scope: Literal["global", "layer"] = "global"
    """magnitude: one |w| ranking over all encoder matrices, or every matrix pruned to the same share.
    structured always prunes the same share of heads and of neurons in every layer (`layer`)."""
    sparsity: float = 0.5
    """Target share pruned: of the encoder's Linear weights (magnitude), of each layer's heads and neurons
    (structured)."""
    mode: Literal["oneshot", "iterative"] = "oneshot"
    """oneshot: prune to `sparsity` at once, then retrain; iterative: prune `rate` of the remaining per round,
    retraining after each, until `sparsity`."""
    rate: float = 0.2
    """iterative: share of the remaining weights (or units) pruned per round."""
    rewind_step: int | None = 0
    """Lottery ticket: after each pruning the kept weights restart from the weights at this step of the first
    round's training (0: the input model's weights; k > 0: "late rewinding", Frankle et al. 2020);
    null: no rewinding, retraining continues from the trained weights (prune and fine-tune)."""
    distill_alpha: float = 0.0
    """Weight of the soft cross-entropy at `temperature` against the unpruned model while retraining; the
    hard cross-entropy gets 1 - distill_alpha (0: no distillation)."""
    temperature: float = 2.0
    """Softmax temperature of the distillation term."""
    importance_batches: int = 8
    """structured: training batches the head and neuron importance is accumulated over."""
    epochs: float = 1.0
    """Retraining epochs per round."""
    max_steps: int | None = None
    """Cap on optimizer steps per round (quick runs)."""
    batch_size: int = 32
    """Examples per step."""
    lr: float = 5e-5
    """Peak learning rate per round (linear warm-up for `warmup_ratio`, then `schedule`)."""
    schedule: Literal["cosine", "linear", "constant"] = "linear"
    """Decay after warmup, per round."""
    warmup_ratio: float = 0.1
    """Warmup over this share of each round's steps."""
    eval_every: int = 200
    """Dev evaluation every N steps of a round (logged); dev and test are always evaluated at a round's end."""
    checkpoint_every: int = field(default=200, metadata={"hash": False})
    """Save resumable state every N steps (and at each round's end)."""
    eval_batch_size: int = field(default=128, metadata={"hash": False})
    """Examples per evaluation forward."""
    latency_batch_size: int = 32
    """Batch size of the CPU speed measurement (unpruned vs pruned)."""
    latency_seq_len: int = 64
    """Sequence length of the CPU speed measurement."""
    latency_repeats: int = field(default=10, metadata={"hash": False})
    """Timed repeats per model (median reported)."""
    threads: int | None = field(default=None, metadata={"hash": False})
    """CPU threads for torch (None: torch's default)."""

    def __post_init__(self):
        super().__post_init__()
        check_model_fields(self.model, self.model_path, role="model")
        if self.engine != "torch":
            raise ValueError("engine: prune re-applies its masks to the module's weights; DeepSpeed keeps its own "
                             "master copies, so use engine: torch (one process or DDP)")
        if not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")
        if self.method == "structured" and self.scope == "global":
            raise ValueError("scope: structured pruning keeps the same share of heads and neurons in every layer; "
                             "set scope: layer")
        if self.rewind_step is not None and self.rewind_step < 0:
            raise ValueError(f"rewind_step must be >= 0 or null, got {self.rewind_step}")
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        for name in ("batch_size", "eval_every", "eval_batch_size", "importance_batches", "latency_batch_size",
                     "latency_seq_len", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
