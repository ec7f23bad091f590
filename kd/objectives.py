"""General-distillation loss terms as small pluggable pieces: the trainer sums `TERMS` by name and weight.

A term is a function of a `Pair` (one micro-batch's student and teacher outputs) that returns its
unweighted mean over its unit: masked `positions` (logit losses) or real `tokens` (hidden and attention
losses). It says which outputs it needs, so the trainer runs only the forwards and hooks the enabled terms
use. The trainer, not the term, turns each rank's mean into its share of the global mean (by unit count),
multiplies by the configured weight, and sums. A new term is one function and one `TERMS` entry; its weight
is the `loss.<name>` key of the stage config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from kd import losses as L


@dataclass
class Pair:
    """What the loss terms see of one micro-batch."""

    batch: dict[str, Tensor]
    """The batch: attention_mask, labels, and the cached targets when training from a cache."""
    student_logits: Tensor
    """Student logits at the masked positions [N, V]."""
    student_hidden: tuple[Tensor, ...] | None
    """Student hidden states, embeddings first, when a term needs them."""
    student_capture: Any
    """The student's `AttentionCapture` when a term needs attention, else None."""
    teacher_logits: Tensor | None
    """Online teacher logits at the masked positions (None when targets come from a cache)."""
    teacher_hidden: tuple[Tensor, ...] | None
    teacher_capture: Any
    layer_map: list[int]
    """Teacher layer (1-based) for each student layer."""
    project_hidden: Callable[[Tensor], Tensor]
    """Student width -> teacher width for hidden states (identity when they match)."""
    project_embed: Callable[[Tensor], Tensor]
    student_heads: int
    teacher_heads: int
    temperature: float
    cache_targets: str
    """"topk" or "sampled": which cached targets the soft loss reads."""
    tail_column: int | None = None
    """Which cached `tail_logmass_t` column is the top-k tail at `temperature` (None: T=1, `tail_logmass`)."""

    @property
    def mask(self) -> Tensor:
        return self.batch["attention_mask"]


Unit = Literal["positions", "tokens"]


@dataclass(frozen=True)
class Term:
    """A loss term: its function, the unit its mean is over, and the outputs it needs."""

    fn: Callable[[Pair], Tensor]
    unit: Unit
    needs: frozenset[str] = frozenset()
    """Subset of {"hidden", "attention", "qkv", "teacher_logits"}."""


def _soft(p: Pair) -> Tensor:
    b = p.batch
    if "topk_ids" in b and p.cache_targets == "sampled":
        return L.soft_ce_sampled(p.student_logits, b["sampled_ids"], b["sampled_counts"], p.temperature)
    if "topk_ids" in b:
        tail = b["tail_logmass"] if p.tail_column is None else b["tail_logmass_t"][:, p.tail_column]
        return L.soft_ce_topk(p.student_logits, b["topk_ids"], b["topk_logp"], tail, p.temperature)
    return L.soft_ce_full(p.student_logits, p.teacher_logits, p.temperature)


def _mlm(p: Pair) -> Tensor:
    return L.mlm_loss(p.student_logits, p.batch["labels"])


def _cosine(p: Pair) -> Tensor:
    return L.cosine_hidden(p.project_hidden(p.student_hidden[-1]), p.teacher_hidden[-1], p.mask)


def _embedding(p: Pair) -> Tensor:
    return L.hidden_mse(p.project_embed(p.student_hidden[0]), p.teacher_hidden[0], p.mask)


def _hidden(p: Pair) -> Tensor:
    terms = [L.hidden_mse(p.project_hidden(p.student_hidden[m]), p.teacher_hidden[g], p.mask)
             for m, g in enumerate(p.layer_map, start=1)]
    return torch.stack(terms).sum()


def _attention(p: Pair) -> Tensor:
    # Scores of the mapped layers only (the captures hook just those).
    s, t = p.student_capture, p.teacher_capture
    terms = [L.attention_mse(s.score(m - 1, p.mask), t.score(g - 1, p.mask), p.mask)
             for m, g in enumerate(p.layer_map, start=1)]
    return torch.stack(terms).sum()


def _heads(p: Pair) -> dict:
    return {"student_heads": p.student_heads, "teacher_heads": p.teacher_heads, "mask": p.mask}


def _minilm_attention(p: Pair) -> Tensor:
    (sq, sk, _), (tq, tk, _) = p.student_capture.qkv[-1], p.teacher_capture.qkv[-1]
    return L.minilm_attention_kl(sq, sk, tq, tk, **_heads(p))


def _minilm_value(p: Pair) -> Tensor:
    (_, _, sv), (_, _, tv) = p.student_capture.qkv[-1], p.teacher_capture.qkv[-1]
    return L.minilm_value_kl(sv, tv, **_heads(p))


TERMS: dict[str, Term] = {
    "soft": Term(_soft, "positions"),
    "mlm": Term(_mlm, "positions"),
    "cosine": Term(_cosine, "tokens", frozenset({"hidden"})),
    "embedding": Term(_embedding, "tokens", frozenset({"hidden"})),
    "hidden": Term(_hidden, "tokens", frozenset({"hidden"})),
    "attention": Term(_attention, "tokens", frozenset({"attention"})),
    "minilm_attention": Term(_minilm_attention, "tokens", frozenset({"attention", "qkv"})),
    "minilm_value": Term(_minilm_value, "tokens", frozenset({"attention", "qkv"})),
}
"""Every general-distillation loss term by its `loss.<name>` weight key; the trainer reads this."""


def enabled(weights: Any) -> dict[str, float]:
    """{term: weight} for the terms whose weight in `weights` (a dataclass with one field per term) is not 0."""
    return {name: float(getattr(weights, name)) for name in TERMS if getattr(weights, name, 0)}


def needs(names: list[str] | dict) -> frozenset[str]:
    """Everything the named terms need from the forwards."""
    return frozenset().union(*(TERMS[n].needs for n in names))


def weighted_sum(parts: dict[str, Tensor], weights: dict[str, float], shares: dict[str, Tensor | float]
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_t weight_t * share_(unit of t) * part_t, and each weighted, shared term (detached) for logs.

    The logged parts stay tensors (no host sync): their mean over ranks is the global mean of each term.
    """
    weighted = {n: weights[n] * shares[TERMS[n].unit] * v for n, v in parts.items()}
    total = torch.stack(list(weighted.values())).sum()
    return total, {**{n: v.detach() for n, v in weighted.items()}, "total": total.detach()}
