"""Defences against model extraction, as pure functions: a watermark keyed by a secret, and a detector of
extraction queries with its ROC AUC.

Watermark (after Szyller et al.'s DAWN): a deployment answers a secret share of queries with a wrong label.
Which queries, and which wrong label, follow from HMAC-SHA256(key, query text): the same query always gets the
same answer (asking twice reveals nothing), nobody without the key can tell which answers are marked, and the
owner can recompute them. A suspect model that gives the marked labels on the marked queries far more often
than chance (a binomial test against `chance_match`) learnt from the deployment's answers.

Detector: logistic regression on the victim's own [CLS] representations, real queries against generated ones;
its AUC on held-out queries says how well a deployment could flag an extraction attack.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Sequence

import numpy as np
import torch


def _digest(key: bytes, text: Sequence[str]) -> bytes:
    # The unit separator cannot occur in a text field, so ("a b", "c") and ("a", "b c") hash apart.
    return hmac.new(key, "\x1f".join(text).encode("utf-8"), hashlib.sha256).digest()


def watermark_draw(key: bytes, text: Sequence[str]) -> float:
    """A uniform number in [0, 1) fixed by the key and the query text."""
    return int.from_bytes(_digest(key, text)[:8], "big") / 2**64


def is_watermarked(key: bytes, text: Sequence[str], fraction: float) -> bool:
    """Whether the deployment answers this query with a wrong label."""
    return watermark_draw(key, text) < fraction


def watermark_label(key: bytes, text: Sequence[str], true_label: int, num_labels: int) -> int:
    """The wrong label a watermarked query gets: one of the other classes, chosen by the keyed hash."""
    if num_labels < 2:
        raise ValueError("a watermark needs at least two classes")
    shift = 1 + int.from_bytes(_digest(key, text)[8:16], "big") % (num_labels - 1)
    return (true_label + shift) % num_labels


def deployed_labels(key: bytes, texts: Sequence[Sequence[str]], labels: np.ndarray, fraction: float,
                    num_labels: int) -> np.ndarray:
    """What the watermarked deployment answers, given what the model itself answers."""
    out = np.asarray(labels).copy()
    for i, text in enumerate(texts):
        if is_watermarked(key, text, fraction):
            out[i] = watermark_label(key, text, int(out[i]), num_labels)
    return out


def watermark_match(suspect: np.ndarray, marked: np.ndarray) -> float:
    """Share of watermarked queries on which a suspect gives the watermark's label (recall on a copy, the
    false-positive rate on an independent model); NaN when there were no watermarked queries."""
    suspect, marked = np.asarray(suspect), np.asarray(marked)
    return float((suspect == marked).mean()) if len(marked) else float("nan")


def chance_match(num_labels: int) -> float:
    """How often a model that never saw the watermark gives a marked query's watermark label, at most: one
    specific wrong class of K-1 (a coin flip's 0.5 for two classes, where the other class is the only one)."""
    return min(0.5, 1.0 / max(num_labels - 1, 1))


def watermark_p_value(matches: int, marked: int, num_labels: int) -> float:
    """P(at least `matches` of `marked` watermark labels by chance): the binomial tail at `chance_match`.
    A small value says the suspect learnt from the watermarked answers."""
    p = chance_match(num_labels)
    return float(min(1.0, sum(math.comb(marked, k) * p**k * (1 - p) ** (marked - k)
                              for k in range(matches, marked + 1))))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the probability that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U over average ranks)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        raise ValueError(f"AUC needs positives and negatives, got {n_pos} and {n_neg}")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # tied scores share the mean of their ranks
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every threshold, from (0, 0) to (1, 1)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    order = np.argsort(-scores, kind="mergesort")
    tp = np.concatenate([[0], np.cumsum(positive[order])])
    fp = np.concatenate([[0], np.cumsum(~positive[order])])
    return fp / max(fp[-1], 1), tp / max(tp[-1], 1)


def fit_logistic(features: torch.Tensor, positive: torch.Tensor, *, weight_decay: float = 1e-3,
                 steps: int = 300, lr: float = 0.05, seed: int = 0):
    """Logistic regression (full-batch Adam on standardised features, L2 penalty, a fixed number of steps so
    its cost is known); returns a function of features giving the probability of the positive class."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    y = positive.double()
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(x.shape[1], generator=gen, dtype=torch.float64) * 0.01).requires_grad_(True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        opt.step()
    w, b = w.detach(), b.detach()
    return lambda f: torch.sigmoid(((f.double() - mean) / std) @ w + b).float()
