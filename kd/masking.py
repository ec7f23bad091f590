"""Masked-LM masking fixed by `(mask_seed, sample key)`, so the teacher cache and the student see the same input.

BERT's rule: choose `rate` of the maskable positions (never special tokens), replace 80% of them with [MASK],
10% with a random token and keep 10%; the labels are the original ids. With whole-word masking the choice is
made over words (a word-start token plus its `##` continuations), as in BERT's later release.

Nothing here depends on batch composition, worker count or process: the random stream of a sample comes
from a hash of the seed and its key only, so the cache never has to store the masked input.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

REPLACE_MASK = 0.8
"""Share of chosen positions that become [MASK]."""
REPLACE_RANDOM = 0.1
"""Share of chosen positions that become a random token (the rest keep their token)."""


@dataclass(frozen=True)
class MaskedSample:
    """A corpus sample with its masked input and what the masked positions held."""

    key: str
    input_ids: np.ndarray
    """The masked input (int32), same length as the original."""
    positions: np.ndarray
    """int64 indices of the masked positions, sorted ascending."""
    labels: np.ndarray
    """Original token ids at `positions` (int64)."""
    token_type_ids: np.ndarray | None = None
    """Segment ids of the original sample, passed through unchanged."""


def sample_rng(mask_seed: int, key: str, purpose: str = "mask") -> np.random.Generator:
    """A numpy Generator seeded from a hash of (mask_seed, key, purpose) only.

    `purpose` separates independent streams of one sample (masking vs. sampled-logit draws).
    """
    digest = hashlib.sha256(f"{purpose}\0{int(mask_seed)}\0{key}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def word_start_table(tokenizer: Any) -> np.ndarray:
    """Bool per vocab id: True where the token begins a word (WordPiece `##x` and SentencePiece non-`▁` do not)."""
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    table = np.ones(size, dtype=bool)
    sentencepiece = any(tok.startswith("\u2581") for tok in vocab)
    for token, idx in vocab.items():
        if sentencepiece:
            table[idx] = token.startswith("\u2581")
        else:
            table[idx] = not token.startswith("##")
    return table


def _word_groups(maskable: np.ndarray, ids: np.ndarray, word_start: np.ndarray | None) -> list[np.ndarray]:
    """Maskable positions grouped into words (one position per group without a word-start table)."""
    if word_start is None:
        return [np.array([p]) for p in maskable]
    groups: list[list[int]] = []
    previous = -2
    for pos in maskable:
        starts = bool(word_start[ids[pos]]) if ids[pos] < len(word_start) else True
        # A continuation piece joins the word before it only if that word ends right before it.
        if starts or previous != pos - 1 or not groups:
            groups.append([int(pos)])
        else:
            groups[-1].append(int(pos))
        previous = pos
    return [np.array(g) for g in groups]


def choose_positions(ids: np.ndarray, rng: np.random.Generator, *, rate: float, special_ids: np.ndarray,
                     word_start: np.ndarray | None = None) -> np.ndarray:
    """Sorted int64 positions to mask: about `rate` of the non-special positions, at least one when any exists."""
    maskable = np.flatnonzero(~np.isin(ids, special_ids))
    if maskable.size == 0:
        return np.zeros(0, dtype=np.int64)
    target = max(1, int(round(rate * maskable.size)))
    if word_start is None:
        chosen = rng.permutation(maskable.size)[:target]
        return np.sort(maskable[chosen]).astype(np.int64)
    groups = _word_groups(maskable, ids, word_start)
    picked: list[np.ndarray] = []
    count = 0
    for g in rng.permutation(len(groups)):
        # Like BERT's whole-word masking: skip a word that would overshoot, but always take the first.
        if picked and count + len(groups[g]) > target:
            continue
        picked.append(groups[g])
        count += len(groups[g])
        if count >= target:
            break
    return np.sort(np.concatenate(picked)).astype(np.int64)


def mask_sample(sample: Any, *, mask_seed: int, rate: float, mask_id: int, vocab_size: int,
                special_ids: np.ndarray, word_start: np.ndarray | None = None) -> MaskedSample:
    """Mask one corpus sample (anything with `key` and `input_ids`), deterministically from (mask_seed, key).

    80% of the chosen positions become `mask_id`, 10% a uniformly random id in [0, vocab_size), 10% stay.
    """
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    ids = np.asarray(sample.input_ids)
    rng = sample_rng(mask_seed, sample.key)
    positions = choose_positions(ids, rng, rate=rate, special_ids=np.asarray(special_ids), word_start=word_start)
    labels = ids[positions].astype(np.int64)
    masked = ids.astype(np.int32, copy=True)
    roll = rng.random(positions.size)
    random_ids = rng.integers(0, vocab_size, positions.size)
    masked[positions[roll < REPLACE_MASK]] = mask_id
    swap = (roll >= REPLACE_MASK) & (roll < REPLACE_MASK + REPLACE_RANDOM)
    masked[positions[swap]] = random_ids[swap]
    token_types = getattr(sample, "token_type_ids", None)
    return MaskedSample(key=sample.key, input_ids=masked, positions=positions, labels=labels,
                        token_type_ids=None if token_types is None else np.asarray(token_types))


@dataclass(frozen=True, kw_only=True)
class MaskSpec:
    """Everything that fixes the masks of a corpus: recorded in the cache manifest, reused by the student."""

    mask_seed: int
    rate: float
    whole_word: bool
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...]

    def to_dict(self) -> dict:
        """Plain data for a manifest's `mask` block."""
        return {"mask_seed": self.mask_seed, "rate": self.rate, "whole_word": self.whole_word,
                "mask_id": self.mask_id, "vocab_size": self.vocab_size, "special_ids": list(self.special_ids)}

    @classmethod
    def from_dict(cls, data: dict) -> "MaskSpec":
        """Inverse of `to_dict`."""
        return cls(mask_seed=int(data["mask_seed"]), rate=float(data["rate"]), whole_word=bool(data["whole_word"]),
                   mask_id=int(data["mask_id"]), vocab_size=int(data["vocab_size"]),
                   special_ids=tuple(int(i) for i in data["special_ids"]))


class Masker:
    """`mask_sample` bound to one MaskSpec (and the tokenizer's word-start table when whole-word)."""

    def __init__(self, spec: MaskSpec, tokenizer: Any = None):
        self.spec = spec
        self.special_ids = np.array(spec.special_ids, dtype=np.int64)
        self.word_start = None
        if spec.whole_word:
            if tokenizer is None:
                raise ValueError("whole-word masking needs the tokenizer (for its word-start table)")
            self.word_start = word_start_table(tokenizer)

    def __call__(self, sample: Any) -> MaskedSample:
        return mask_sample(sample, mask_seed=self.spec.mask_seed, rate=self.spec.rate, mask_id=self.spec.mask_id,
                           vocab_size=self.spec.vocab_size, special_ids=self.special_ids, word_start=self.word_start)


def mask_spec_from_corpus(corpus_extra: dict, tokenizer: Any, *, mask_seed: int, rate: float,
                          whole_word: bool) -> MaskSpec:
    """A MaskSpec for a shard stage's output: ids from its manifest extra, special ids from its tokenizer."""
    specials = set(int(i) for i in tokenizer.all_special_ids)
    specials.update(int(corpus_extra[k]) for k in ("pad_id", "cls_id", "sep_id", "mask_id") if k in corpus_extra)
    return MaskSpec(mask_seed=mask_seed, rate=rate, whole_word=whole_word, mask_id=int(corpus_extra["mask_id"]),
                    vocab_size=int(corpus_extra["vocab_size"]), special_ids=tuple(sorted(specials)))
