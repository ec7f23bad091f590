"""Model extraction (Krishna et al. 2020, "Thieves on Sesame Street"): queries made without the victim's training
data, query budgets, the targets a student learns from the victim's answers, and agreement.

Generators (every one a pure function of its seed, so a resumed run regenerates the same queries):
  random   words drawn i.i.d. from a vocabulary with the unigram frequencies of a corpus (Krishna's RANDOM)
  corpus   real sentences of a corpus, none of them task data (Krishna's WIKI)
For a task of sentence pairs the second text is made from the first by the task heuristic of the paper:
`pair_replace` of its words swapped for vocabulary words (their MNLI/ QQP-style hypothesis).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

GENERATORS = ("random", "corpus")
"""Query generators by the name configs use."""
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|[0-9]+|[.,;:!?]")


@dataclass(frozen=True)
class Vocabulary:
    """Words and their unigram probabilities (most frequent first)."""

    words: list[str]
    probs: np.ndarray

    @classmethod
    def from_texts(cls, texts: Iterable[str], size: int, *, lower: bool = True) -> "Vocabulary":
        """The `size` most frequent words of `texts` (ties broken alphabetically, so the same corpus gives the
        same vocabulary) with their frequencies renormalised over those words."""
        counts = Counter(w for text in texts for w in WORD.findall(text.lower() if lower else text))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]
        if not top:
            raise ValueError("the corpus has no words to build a query vocabulary from")
        freq = np.array([c for _, c in top], dtype=np.float64)
        return cls([w for w, _ in top], freq / freq.sum())


def random_words(vocab: Vocabulary, n: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """`n` nonsense queries: lengths uniform in [min_words, max_words], words i.i.d. by unigram frequency."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_words, max_words + 1, size=n)
    picks = rng.choice(len(vocab.words), size=int(lengths.sum()), p=vocab.probs)
    out, at = [], 0
    for length in lengths:
        out.append(" ".join(vocab.words[i] for i in picks[at:at + length]))
        at += length
    return out


def corpus_sentences(sentences: Sequence[str], n: int, seed: int) -> list[str]:
    """`n` corpus sentences in a seeded order; once every sentence was drawn the order starts over (a budget
    larger than the corpus repeats sentences rather than inventing any)."""
    if not sentences:
        raise ValueError("the corpus has no sentences to query with")
    out: list[str] = []
    epoch = 0
    while len(out) < n:
        order = np.random.default_rng([seed, epoch]).permutation(len(sentences))
        out.extend(sentences[i] for i in order[: n - len(out)])
        epoch += 1
    return out


def replace_words(text: str, vocab: Vocabulary, k: int, rng: np.random.Generator) -> str:
    """Krishna's pair heuristic: `text` with `k` of its words (at random positions) replaced by vocabulary words."""
    words = text.split()
    if not words:
        return text
    for pos in rng.choice(len(words), size=min(k, len(words)), replace=False):
        words[pos] = vocab.words[rng.choice(len(vocab.words), p=vocab.probs)]
    return " ".join(words)


def queries(generator: str, n: int, seed: int, *, vocab: Vocabulary, sentences: Sequence[str], pairs: bool,
            min_words: int = 3, max_words: int = 20, pair_replace: int = 3) -> list[tuple[str, ...]]:
    """`n` queries of `generator`, each a tuple of one text (or two for a pair task), a function of the seed;
    the first m of a budget n are the queries of budget m, so budgets share their queries."""
    if generator == "random":
        first = random_words(vocab, n, seed, min_words, max_words)
    elif generator == "corpus":
        first = corpus_sentences(sentences, n, seed)
    else:
        raise ValueError(f"unknown generator {generator!r} (known: {', '.join(GENERATORS)})")
    if not pairs:
        return [(t,) for t in first]
    return [(t, replace_words(t, vocab, pair_replace, np.random.default_rng([seed, 7, i]))) for i, t in enumerate(first)]


def budget_sizes(budgets: Sequence[float], train_size: int) -> dict[float, int]:
    """Queries per budget, a budget being a multiple of the real training set's size (at least one query)."""
    return {b: max(1, math.ceil(b * train_size)) for b in budgets}


def answer_targets(labels: np.ndarray, scores: np.ndarray | None, num_labels: int) -> torch.Tensor:
    """What a student learns from the victim's answers: one-hot labels, or with the top-1 probability `p` a
    distribution with `p` on the answered label and the rest spread evenly over the others."""
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    onehot = torch.nn.functional.one_hot(labels_t, num_labels).float()
    if scores is None or num_labels == 1:
        return onehot
    p = torch.as_tensor(scores, dtype=torch.float32).clamp(0.0, 1.0).unsqueeze(1)
    rest = (1 - p) / (num_labels - 1)
    return onehot * p + (1 - onehot) * rest


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` against target distributions (one-hot targets give plain CE)."""
    return -(targets * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of inputs on which two models give the same label (Krishna's agreement)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or not len(a):
        raise ValueError(f"agreement needs two equal, non-empty label arrays, got {a.shape} and {b.shape}")
    return float((a == b).mean())


def _key(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def drop_known(sentences: Sequence[str], known: Iterable[str]) -> list[str]:
    """`sentences` without any that is (up to case, spacing and punctuation, which tokenizers change) one of
    `known`: a corpus that overlaps the task keeps the victim's own examples out of the queries."""
    seen = {_key(t) for t in known}
    return [s for s in sentences if _key(s) not in seen]
