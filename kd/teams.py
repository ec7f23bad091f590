"""Stochastic knowledge distillation (SKDBERT, Ding et al. 2023): a team of teachers of several capacities, one
teacher drawn per training step (or per example) by a sampling law, distilled from one to one.

The laws (docs/skd.md gives the equations and where we chose):
  uniform     p_i = 1 / K
  quality     p_i proportional to max(s_i, 0)^(1/tau), s_i the member's dev score
  capacity    p_i proportional to r_i^(1/tau), r_i = min(c_i, c_s) / max(c_i, c_s): closeness of the member's
              capacity c_i (layers x width) to the student's c_s
  curriculum  a fixed schedule, small to large: the phase's steps cut into K equal blocks, block b taught by
              the b-th smallest member
  single      one member (the best, the largest or a named one): plain KD, the degenerate case
Every draw is a pure function of (run seed, step[, example id]) through a counter-based hash, never of a
random generator's history, so a resumed run draws the teachers an uninterrupted one would, on any number of
ranks. Tensors in, tensors out: no files, no stage code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

LAWS = ("uniform", "quality", "capacity", "curriculum", "single")
"""The sampling laws, by the name `sampler.law` takes."""

_MASK = (1 << 64) - 1
_STEP_STREAM = _MASK  # the id of the per-step draw: no example has it


@dataclass(kw_only=True)
class SamplerConfig:
    """How the teacher of each step (or example) is drawn from the team."""

    law: Literal["uniform", "quality", "capacity", "curriculum", "single"] = "uniform"
    """Sampling law (kd/teams.py, docs/skd.md): uniform, quality (dev score), capacity (closeness to the
    student), curriculum (small to large) or single (one member: plain KD)."""
    unit: Literal["step", "example"] = "step"
    """Draw one teacher per optimizer step (SKDBERT's one-to-one setting) or one per training example."""
    temperature: float = 1.0
    """tau of the quality and capacity laws: p_i proportional to (score or capacity ratio)^(1/tau); smaller
    is sharper, 1 is proportional."""
    member: str = "best"
    """Law single: "best" (highest dev score), "largest" (highest level) or a member's name."""
    student_level: float | None = None
    """Capacity law: the student's capacity in the members' unit (None: its layers x hidden width)."""

    def __post_init__(self):
        if self.law not in LAWS:
            raise ValueError(f"law must be one of {', '.join(LAWS)}, got {self.law!r}")
        if self.unit not in ("step", "example"):
            raise ValueError(f"unit must be step or example, got {self.unit!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.student_level is not None and self.student_level <= 0:
            raise ValueError(f"student_level must be > 0, got {self.student_level}")


def check_member(name: str, level: float | None) -> None:
    """ValueError unless a team member's name is short and plain and its level (if given) is > 0."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
        raise ValueError(f"name {name!r}: use letters, digits, '_', '-' or '.'")
    if level is not None and level <= 0:
        raise ValueError(f"level must be > 0, got {level}")


def capacity(model_config) -> float:
    """A model's level: encoder layers x hidden width."""
    return float(model_config.num_hidden_layers * model_config.hidden_size)


def single_index(member: str, names: Sequence[str], levels: Sequence[float], scores: Sequence[float]) -> int:
    """The member law `single` keeps: "best" (first highest score), "largest" (first highest level) or a name."""
    if member == "best":
        return int(np.argmax(scores))
    if member == "largest":
        return int(np.argmax(levels))
    if member not in names:
        raise ValueError(f"sampler.member {member!r} is not a team member (members: {', '.join(names)})")
    return list(names).index(member)


def probabilities(config: SamplerConfig, *, names: Sequence[str], levels: Sequence[float],
                  scores: Sequence[float], student_level: float) -> np.ndarray:
    """The law's probability per member, in team order (curriculum: its average over the phase, 1/K each)."""
    k = len(names)
    levels, scores = np.asarray(levels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if config.law in ("uniform", "curriculum"):
        weights = np.ones(k)
    elif config.law == "quality":
        weights = np.clip(scores, 0.0, None) ** (1.0 / config.temperature)
        if weights.sum() <= 0:
            raise ValueError("sampler law quality: every member has a dev score <= 0; use another law")
    elif config.law == "capacity":
        ratio = np.minimum(levels, student_level) / np.maximum(levels, student_level)
        weights = ratio ** (1.0 / config.temperature)
    else:
        weights = np.zeros(k)
        weights[single_index(config.member, names, levels, scores)] = 1.0
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        raise ValueError(f"sampler law {config.law}: temperature {config.temperature} makes every weight 0 or "
                         "overflow; raise sampler.temperature")
    return weights / weights.sum()


def _splitmix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed hash of 64-bit words (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seed: int, step: int, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """U[0, 1) draws, one per id, that depend only on (seed, step, id)."""
    key = _splitmix(_splitmix(np.array([seed & _MASK], dtype=np.uint64)) ^ np.uint64(step & _MASK))
    words = _splitmix(key ^ np.asarray([int(i) & _MASK for i in ids], dtype=np.uint64))
    return (words >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class TeamSampler:
    """The teacher of each step or example of one training phase of `total` steps."""

    law: str
    unit: str
    probs: tuple[float, ...]
    """Each member's probability (static laws)."""
    order: tuple[int, ...]
    """Member indices from the smallest level to the largest (the curriculum's order)."""
    seed: int
    total: int

    @classmethod
    def build(cls, config: SamplerConfig, probs: np.ndarray, levels: Sequence[float], seed: int, total: int):
        """A sampler from a law's probabilities; ties in level keep team order."""
        order = tuple(int(i) for i in np.argsort(np.asarray(levels, dtype=np.float64), kind="stable"))
        return cls(law=config.law, unit=config.unit, probs=tuple(float(p) for p in probs), order=order,
                   seed=int(seed), total=max(1, int(total)))

    def _curriculum(self, step: int) -> int:
        block = min(len(self.order) - 1, step * len(self.order) // self.total)
        return self.order[block]

    def _draw(self, u: np.ndarray) -> np.ndarray:
        edges = np.cumsum(self.probs)
        edges[-1] = 1.0  # rounding never leaves a draw past the last member
        picks = np.searchsorted(edges, u, side="right")
        # side="right": a member of probability 0 (an edge equal to the one before) is never drawn.
        return np.minimum(picks, len(self.probs) - 1)

    def step_teacher(self, step: int) -> int:
        """The member that teaches optimizer step `step` (0-based) of the phase."""
        if self.law == "curriculum":
            return self._curriculum(step)
        return int(self._draw(uniforms(self.seed, step, [_STEP_STREAM]))[0])

    def teachers(self, step: int, example_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The member of each example of step `step`: all the step's member (unit step, curriculum), or each
        example's own draw, keyed by its id, so it does not depend on the batch it lands in or the rank."""
        ids = np.asarray(example_ids, dtype=np.int64)
        if self.unit == "step" or self.law == "curriculum":
            return np.full(len(ids), self.step_teacher(step), dtype=np.int64)
        return self._draw(uniforms(self.seed, step, ids)).astype(np.int64)


@torch.no_grad()
def routed_logits(models: Sequence[torch.nn.Module], batch: dict[str, torch.Tensor], choices: torch.Tensor) -> torch.Tensor:
    """Each example's class logits from the member chosen for it; a member runs on its own examples only."""
    out = None
    for member in torch.unique(choices).tolist():
        rows = (choices == member).nonzero(as_tuple=True)[0]
        logits = models[member](**{k: v[rows] for k, v in batch.items()}).logits.float()
        if out is None:
            out = logits.new_empty((len(choices), logits.shape[1]))
        out[rows] = logits
    return out


def truncate_encoder(model, num_layers: int):
    """Keep the first `num_layers` encoder layers of a BERT-style model in place (a smaller team member)."""
    layers = model.base_model.encoder.layer
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be between 1 and the model's {len(layers)} layers, got {num_layers}")
    model.base_model.encoder.layer = torch.nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    return model
