"""Distillation losses as pure functions: tensors in, a scalar tensor out; no I/O, no torch.distributed.

Conventions shared by every function here:
- Logit losses take rows already selected by the caller (`[N, V]`: the masked positions only).
- Temperature-softened losses are multiplied by T^2 (Hinton et al. 2015) so their gradients keep the same
  scale as the hard loss when T changes.
- `mask` is `[B, L]` with 1 (or True) for real tokens; padded positions never contribute.
- Everything is computed in float32 whatever the input dtype (caches hold fp16/bf16).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _soft_ce(teacher_probs: Tensor, student_logp: Tensor) -> Tensor:
    """-sum_j q_j log p_j per row, with 0 * log 0 read as 0 (a token the teacher never predicts)."""
    terms = torch.where(teacher_probs > 0, teacher_probs * student_logp, torch.zeros_like(student_logp))
    return -terms.sum(-1)


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def soft_ce_full(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Soft cross-entropy against an online teacher's full logits (Hinton et al.; DistilBERT's L_ce).

    L = T^2 * mean_n [ -sum_v softmax(t_n / T)_v * log_softmax(s_n / T)_v ].
    """
    _check_temperature(temperature)
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    return temperature**2 * _soft_ce(t.softmax(-1), s.log_softmax(-1)).mean()


def kl_full(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(teacher || student) at temperature T, T^2-scaled, averaged over rows (the same gradient as
    `soft_ce_full`; the value differs by the teacher's entropy, so 0 means a perfect match)."""
    _check_temperature(temperature)
    s = student_logits.float() / temperature
    t = teacher_logits.float() / temperature
    t_logp = t.log_softmax(-1)
    kl = (t_logp.exp() * (t_logp - s.log_softmax(-1))).sum(-1)
    return temperature**2 * kl.mean()


def soft_ce_topk(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logp: Tensor,
    tail_logmass: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Soft cross-entropy against a cached top-k teacher distribution at temperature T, T^2-scaled.

    The cache holds, per masked position, the teacher's k most likely ids, their log-probabilities at T=1
    (`topk_logp`, log p_i) and optionally the tempered weight of every other token, as one number:
        tail_logmass = log sum_{v not in the top-k} p_v^(1/T)
    (at T=1 the log of the mass outside the top-k; the cache stores it at each of its `tail_temperatures`,
    and the caller passes the one of the training T). The tempered teacher softmax(t / T) is then exactly
        q_i    = p_i^(1/T) / Z                 for the k cached ids
        q_tail = exp(tail_logmass) / Z         for all other tokens as one bucket
    with Z = sum_i p_i^(1/T) + exp(tail_logmass). The student side uses the same buckets: its
    log-probabilities at T on the k ids, and the log of its tempered mass on all other ids. Without
    `tail_logmass` the top-k is renormalised (q_i = softmax(topk_logp / T)) and the tail is dropped. With
    k = V both equal `soft_ce_full`.
    """
    _check_temperature(temperature)
    vocab = student_logits.shape[-1]
    ids = topk_ids.long()
    t_top = topk_logp.float() / temperature
    k = ids.shape[-1]
    if tail_logmass is None or k >= vocab:
        scaled = student_logits.float() / temperature
        s_top = scaled.gather(-1, ids) - scaled.logsumexp(-1, keepdim=True)
        return temperature**2 * _soft_ce(t_top.softmax(-1), s_top).mean()
    # Rounding can make 1 - sum p slightly negative, so a cache may hold NaN: it means "no tail".
    t_tail = torch.nan_to_num(tail_logmass.float(), nan=-math.inf)
    q = torch.cat([t_top, t_tail.unsqueeze(-1)], -1).softmax(-1)
    return temperature**2 * _TopkTailCE.apply(student_logits, ids, q.detach(), temperature).mean()


LOSS_ROWS = 32
"""Rows per pass of `_TopkTailCE`: 32 x a 30k vocabulary (~4 MB) stays in cache between the passes."""

STUDENT_EXACT_BELOW = 1e-2
"""Student tail mass under which 1 - sum(top-k) (fp64 from fp32 log-probs: ~1e-7 absolute) is too imprecise
and `_TopkTailCE` sums the tail's own terms."""


class _TopkTailCE(torch.autograd.Function):
    """Per-row soft cross-entropy of student logits [N, V] at T against k + 1 teacher buckets `q` [N, k + 1]
    (the k ids, then the tail), with its gradient written in closed form:

        loss_n = -sum_i q_i log p_i - q_tail log P_tail        p = softmax(s_n / T), P_tail = p outside the ids
        d loss_n / d s_v = (p_v - q_i) / T                      for v = id_i
                         = p_v (1 - q_tail / P_tail) / T        for the other ids

    Both passes go through the rows in blocks of LOSS_ROWS and keep no [N, V] temporary: the forward is one
    normaliser and a gather, the backward one exp and a scatter. The same numbers as the composed autograd
    form (`tail` in `soft_ce_topk`'s docstring) at a fraction of the memory traffic. A q of 0 contributes
    nothing (0 log 0 = 0), like `_soft_ce`.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, ids: Tensor, q: Tensor, temperature: float) -> Tensor:
        rows = len(logits)
        log_z = logits.new_empty(rows, dtype=torch.float32)
        s_top = logits.new_empty(ids.shape, dtype=torch.float32)
        s_tail = logits.new_empty(rows, dtype=torch.float32)
        for start in range(0, rows, LOSS_ROWS):
            end = start + LOSS_ROWS
            z = logits[start:end].float() / temperature
            log_z[start:end] = lz = z.logsumexp(-1)
            s_top[start:end] = top = z.gather(-1, ids[start:end]) - lz[:, None]
            s_tail[start:end] = tail = (1.0 - top.double().exp().sum(-1)).clamp_(min=0.0).log().float()
            tiny = torch.nonzero(tail < math.log(STUDENT_EXACT_BELOW)).flatten()
            if tiny.numel():  # the student's tail summed from its own terms
                exact = z[tiny].scatter_(-1, ids[start:end][tiny], -math.inf).logsumexp(-1) - lz[tiny]
                s_tail[start + tiny] = exact
        ctx.save_for_backward(logits, ids, q, log_z, s_top, s_tail)
        ctx.temperature = temperature
        s = torch.cat([s_top, s_tail[:, None]], -1)
        return -torch.where(q > 0, q * s, torch.zeros_like(s)).sum(-1)

    @staticmethod
    def backward(ctx, grad_rows: Tensor):
        logits, ids, q, log_z, s_top, s_tail = ctx.saved_tensors
        t = ctx.temperature
        q_tail = q[:, -1]
        # The tail's coefficient; a zero teacher tail contributes nothing, even where the student's is 0.
        tail_coef = torch.where(q_tail > 0, q_tail / s_tail.exp(), torch.zeros_like(q_tail))
        top_grad = s_top.exp() - q[:, :-1]
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), LOSS_ROWS):
            end = start + LOSS_ROWS
            scale = (grad_rows[start:end] / t)[:, None]
            p = torch.exp(logits[start:end].float() / t - log_z[start:end, None])
            p.mul_((1.0 - tail_coef[start:end, None]) * scale)
            p.scatter_(-1, ids[start:end], top_grad[start:end] * scale)
            grad[start:end] = p
        return grad, None, None, None


def soft_ce_sampled(
    student_logits: Tensor, sampled_ids: Tensor, sampled_counts: Tensor, temperature: float = 1.0
) -> Tensor:
    """Soft cross-entropy against teacher samples, T^2-scaled: an unbiased estimate of `soft_ce_full` at T.

    The cache drew s ids per position from the teacher's tempered distribution softmax(t / T_s) (its
    `sample_temperature`) and stores each distinct id with how many times it came up (zero counts pad the row).
    The estimate is
        L = T^2 * mean_n [ -sum_j (c_j / sum c) * log_softmax(s_n / T)[id_j] ],
    whose expectation over the draws, and that of its gradient, is the full soft cross-entropy at T only when
    T = T_s: the general stage refuses any other training temperature (`formats.cache.check_sample_temperature`).
    """
    _check_temperature(temperature)
    s_logp = (student_logits.float() / temperature).log_softmax(-1)
    counts = sampled_counts.float()
    weights = counts / counts.sum(-1, keepdim=True).clamp(min=1.0)
    return temperature**2 * _soft_ce(weights, s_logp.gather(-1, sampled_ids.long())).mean()


def mlm_loss(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Masked-LM cross-entropy on the true tokens (DistilBERT's L_mlm), averaged over the labelled positions;
    labels of -100 are ignored. A batch with no masked token gives 0 (still attached to the graph)."""
    flat_labels = labels.reshape(-1)
    logits = student_logits.float().reshape(flat_labels.numel(), -1)
    # Sum / count instead of a mean: no NaN and no host sync when nothing is masked.
    total = F.cross_entropy(logits, flat_labels, ignore_index=-100, reduction="sum")
    return total / (flat_labels != -100).sum().clamp(min=1)


def _valid(mask: Tensor | None, like: Tensor) -> Tensor:
    """[B, L] bool of the positions that count (all of them without a mask)."""
    if mask is None:
        return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
    return mask.bool()


def cosine_hidden(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor) -> Tensor:
    """DistilBERT's cosine embedding loss (target 1): mean over real tokens of 1 - cos(h_s, h_t)."""
    keep = _valid(mask, student_hidden)
    s, t = student_hidden[keep].float(), teacher_hidden[keep].float()
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT's embedding / hidden-state loss MSE(H_s W_h, H_t), averaged over real tokens and features.
    The caller applies the learned projection W_h when the widths differ."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden_mse: shapes differ {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}"
                         " (project the student first)")
    keep = _valid(mask, student_hidden)
    return F.mse_loss(student_hidden[keep].float(), teacher_hidden[keep].float())


def attention_mse(student_scores: Tensor, teacher_scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT's attention loss: MSE of pre-softmax scores [B, h, L, L], averaged over heads and the
    (query, key) pairs where both are real tokens; scores at padded keys (often -inf) never count."""
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(f"attention_mse: shapes differ {tuple(student_scores.shape)} vs {tuple(teacher_scores.shape)}")
    keep = _valid(mask, student_scores[:, 0])
    pair = (keep[:, :, None] & keep[:, None, :]).unsqueeze(1).expand_as(student_scores)
    diff = torch.where(pair, student_scores.float() - teacher_scores.float(), torch.zeros((), device=pair.device))
    return diff.pow(2).sum() / pair.sum().clamp(min=1)


def _attention_logp(q: Tensor, k: Tensor, heads: int, keep: Tensor) -> Tensor:
    """log softmax(q_a k_a^T / sqrt(d)) per head a over real keys, [B, heads, L, L], from [B, L, width]."""
    b, length, width = q.shape
    if width % heads:
        raise ValueError(f"width {width} is not divisible into {heads} heads")
    d = width // heads
    qa = q.float().view(b, length, heads, d).transpose(1, 2)
    ka = k.float().view(b, length, heads, d).transpose(1, 2)
    scores = qa @ ka.transpose(-1, -2) / math.sqrt(d)
    return scores.masked_fill(~keep[:, None, None, :], -math.inf).log_softmax(-1)


def _row_kl(student_logp: Tensor, teacher_logp: Tensor, keep: Tensor) -> Tensor:
    """Mean over heads and real query rows of KL(teacher row || student row)."""
    t_probs = teacher_logp.exp()
    kl = _soft_ce(t_probs, student_logp) - _soft_ce(t_probs, teacher_logp)  # [B, h, L]
    return kl[keep[:, None, :].expand_as(kl)].mean()


def _check_heads(student_heads: int, teacher_heads: int) -> None:
    if student_heads != teacher_heads:
        raise ValueError(f"MiniLM losses need the same number of heads on both sides, got student "
                         f"{student_heads} vs teacher {teacher_heads}")


def minilm_attention_kl(student_q: Tensor, student_k: Tensor, teacher_q: Tensor, teacher_k: Tensor, *,
                        student_heads: int, teacher_heads: int, mask: Tensor) -> Tensor:
    """MiniLM's self-attention distribution transfer on the last layer.

    Inputs are the query/key projections [B, L, width] (`AttentionCapture.qkv`). Each side is split into
    heads of its own width, A = softmax(Q K^T / sqrt(d)), and L = mean over heads and real queries of
    KL(A_teacher || A_student). Equal heads with the models' own head counts is MiniLM v1; any common count
    that divides both widths gives MiniLM v2's relation heads.
    """
    _check_heads(student_heads, teacher_heads)
    keep = _valid(mask, student_q)
    return _row_kl(_attention_logp(student_q, student_k, student_heads, keep),
                   _attention_logp(teacher_q, teacher_k, teacher_heads, keep), keep)


def minilm_value_kl(student_v: Tensor, teacher_v: Tensor, *, student_heads: int, teacher_heads: int,
                    mask: Tensor) -> Tensor:
    """MiniLM's value-relation transfer: VR = softmax(V_a V_a^T / sqrt(d)) per head, then the mean over
    heads and real queries of KL(VR_teacher || VR_student). Widths may differ; head counts may not."""
    _check_heads(student_heads, teacher_heads)
    keep = _valid(mask, student_v)
    return _row_kl(_attention_logp(student_v, student_v, student_heads, keep),
                   _attention_logp(teacher_v, teacher_v, teacher_heads, keep), keep)


def pkd_cls_mse(student_cls: list[Tensor], teacher_cls: list[Tensor]) -> Tensor:
    """Patient KD's L_PT on the released code's scale: the mean over layers, batch and features of
    (h_s^j/||h_s^j|| - h_t^j/||h_t^j||)^2, each list item the [CLS] state of one mapped layer, [B, H].

    The paper writes the sum over layers of the squared L2 norm (batch-averaged); the released code
    (`patience_loss`: F.mse_loss of the normalised [B, layers, H] stacks) takes the mean, which is the
    paper's value divided by layers x H, and its beta grid is on that scale. The caller projects a narrower
    student to the teacher's width first.
    """
    if len(student_cls) != len(teacher_cls) or not student_cls:
        raise ValueError(f"pkd_cls_mse: {len(student_cls)} student vs {len(teacher_cls)} teacher layers")
    s = torch.stack([F.normalize(h.float(), dim=-1) for h in student_cls])
    t = torch.stack([F.normalize(h.float(), dim=-1) for h in teacher_cls])
    if s.shape != t.shape:
        raise ValueError(f"pkd_cls_mse: shapes differ {tuple(s.shape)} vs {tuple(t.shape)} (project the student first)")
    return (s - t).pow(2).mean()


def task_soft_ce(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Classification KD on [B, C] logits: the soft cross-entropy at T, T^2-scaled (TinyBERT's L_pred)."""
    return soft_ce_full(student_logits, teacher_logits, temperature)


def hard_loss(logits: Tensor, labels: Tensor, *, regression: bool = False) -> Tensor:
    """The ground-truth loss: cross-entropy on class ids, or MSE on a [B] / [B, 1] score for regression."""
    if regression:
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))
    return F.cross_entropy(logits.float(), labels.long())


LAYER_MAP_KINDS = ("uniform", "last", "skip", "first", "explicit")


def layer_map(kind: str, student_layers: int, teacher_layers: int, layers: list[int] | None = None) -> list[int]:
    """For student layer m = 1..M, the teacher layer it learns from (1-based; 0 is the embeddings).

    uniform   TinyBERT's g(m) = m * N / M (floored when M does not divide N; the top maps to the top)
    last      the last M teacher layers: N - M + m
    skip      PKD-skip: every (N // M)-th layer, g(m) = m * (N // M)
    first     the first M layers: g(m) = m (PKD-last's counterpart for initialisation)
    explicit  `layers`, one teacher index per student layer, increasing
    """
    m_count, n_count = student_layers, teacher_layers
    if m_count < 1 or n_count < 1:
        raise ValueError(f"layer_map needs at least one layer on each side, got student {m_count}, teacher {n_count}")
    if kind != "explicit" and m_count > n_count:
        raise ValueError(f"layer_map {kind!r}: student has {m_count} layers, more than the teacher's {n_count}")
    if kind == "uniform":
        return [m * n_count // m_count for m in range(1, m_count + 1)]
    if kind == "last":
        return [n_count - m_count + m for m in range(1, m_count + 1)]
    if kind == "skip":
        return [m * (n_count // m_count) for m in range(1, m_count + 1)]
    if kind == "first":
        return list(range(1, m_count + 1))
    if kind == "explicit":
        if layers is None or len(layers) != m_count:
            raise ValueError(f"layer_map 'explicit' needs {m_count} teacher layers (one per student layer), got {layers}")
        if any(not 0 <= i <= n_count for i in layers) or any(a >= b for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layer_map 'explicit': layers {layers} must increase within 0..{n_count}")
        return list(layers)
    raise ValueError(f"layer_map kind must be one of {', '.join(LAYER_MAP_KINDS)}, got {kind!r}")


LOSSES: dict[str, Callable[..., Tensor]] = {
    "soft_ce_topk": soft_ce_topk,
    "soft_ce_sampled": soft_ce_sampled,
    "soft_ce_full": soft_ce_full,
    "kl_full": kl_full,
    "mlm": mlm_loss,
    "cosine_hidden": cosine_hidden,
    "hidden_mse": hidden_mse,
    "attention_mse": attention_mse,
    "minilm_attention_kl": minilm_attention_kl,
    "minilm_value_kl": minilm_value_kl,
    "pkd_cls_mse": pkd_cls_mse,
    "task_soft_ce": task_soft_ce,
    "hard": hard_loss,
}
"""Every loss by the name configs use; later methods register theirs here."""
