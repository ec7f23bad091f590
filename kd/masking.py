"""Masked-LM masking fixed by `(mask_seed, sample key)`, so the teacher cache and the student see the same input.

BERT's rule: choose `rate` of the maskable positions (never special tokens), replace 80% of them with [MASK],
10% with a random token and keep 10%; the labels are the original ids. With whole-word masking the choice is
made over words (a word-start token plus its `##` continuations), as in BERT's later release.

Nothing here depends on batch composition, worker count or process: the random stream of a sample comes
from a hash of the seed and its key only, so the cache never has to store the masked input.

Two schemes, recorded in every cache manifest's `mask` block (`scheme`; a block without it is scheme 1):

- Scheme 1, what every cache before scheme 2 was written with: a numpy `PCG64` stream per sample, seeded from
  sha256(seed, key). `mask_batch` gives exactly `mask_sample`'s masks; `seed_states` computes numpy's own
  seeding for a whole batch at once, and one reused Generator is re-pointed at each state, but the draws stay a
  few numpy calls per sample (~25 us).
- Scheme 2, the default for new caches and online runs: counter-based. Every draw is a hash (splitmix64) of
  the sample's 64-bit key hash, the position and the draw's purpose, so a whole batch is a few array passes with
  no per-sample call. A token's choice score, its 80/10/10 roll and its random id are three such hashes; the
  chosen positions are the maskable ones with the `target` smallest scores (a uniformly random subset, like
  scheme 1's permutation). Whole words: a word's score is its first piece's, and words are taken in score
  order while they fit `target` (the first always), stopping at the first that would overshoot (BERT skips it
  and tries smaller ones, so scheme 2 masks at most as many pieces).

A cache is always read with the scheme it was written with, so old caches stay valid; a scheme this code does
not know is refused in one line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ConfigError

REPLACE_MASK = 0.8
"""Share of chosen positions that become [MASK]."""
REPLACE_RANDOM = 0.1
"""Share of chosen positions that become a random token (the rest keep their token)."""
SCHEMES = (1, 2)
"""Masking schemes this code reproduces (see the module docstring)."""
MASK_SCHEME = 2
"""The scheme new caches and online runs use."""


def _unknown_scheme(scheme: int) -> str:
    return (f"masking scheme {scheme} is newer than this code knows ({', '.join(map(str, SCHEMES))}); "
            "upgrade distill or rebuild the cache")


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


def _seed_int(mask_seed: int, key: str, purpose: str) -> int:
    digest = hashlib.sha256(f"{purpose}\0{int(mask_seed)}\0{key}".encode()).digest()
    return int.from_bytes(digest[:16], "little")


def sample_rng(mask_seed: int, key: str, purpose: str = "mask") -> np.random.Generator:
    """A numpy Generator seeded from a hash of (mask_seed, key, purpose) only.

    `purpose` separates independent streams of one sample (masking vs. sampled-logit draws).
    """
    return np.random.Generator(np.random.PCG64(_seed_int(mask_seed, key, purpose)))


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx) and PCG64's 128-bit multiplier.
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = 0x2360ED051FC65DA44385DF649FCCF645
_M128 = (1 << 128) - 1


def seed_states(seeds: "list[int] | np.ndarray") -> list[dict]:
    """PCG64 state dicts equal to `np.random.PCG64(seed).state` for 128-bit `seeds`, computed for all at once.

    numpy's seeding, vectorised over the batch: SeedSequence mixes the seed's four 32-bit words into a pool
    (hashmix/mix on uint32), draws four 64-bit words from it, and PCG64 steps once around adding the state
    word. tests/unit/test_masking_batch.py checks it against numpy on thousands of seeds. `seeds` may also be
    an [n, 4] array of the seeds' little-endian 32-bit words.
    """
    if isinstance(seeds, np.ndarray):
        n, words = len(seeds), seeds.astype(np.uint64)
    else:
        n = len(seeds)
        words = np.array([[(s >> (32 * i)) & 0xFFFFFFFF for i in range(4)] for s in seeds], dtype=np.uint64).reshape(n, 4)
    mask32 = np.uint64(0xFFFFFFFF)
    hash_const = [_INIT_A]

    def hashmix(value: np.ndarray) -> np.ndarray:
        value = (value ^ np.uint64(hash_const[0])) & mask32
        hash_const[0] = (hash_const[0] * _MULT_A) & 0xFFFFFFFF
        value = (value * np.uint64(hash_const[0])) & mask32
        return value ^ (value >> np.uint64(16))

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = ((np.uint64(_MIX_L) * x) - (np.uint64(_MIX_R) * y)) & mask32
        return result ^ (result >> np.uint64(16))

    pool = [hashmix(words[:, i]) for i in range(4)]
    for src in range(4):
        for dst in range(4):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    out, const = [], _INIT_B
    for i in range(8):
        value = (pool[i % 4] ^ np.uint64(const)) & mask32
        const = (const * _MULT_B) & 0xFFFFFFFF
        value = (value * np.uint64(const)) & mask32
        out.append(value ^ (value >> np.uint64(16)))
    state = np.stack(out, axis=1).astype(np.uint32).view(np.uint64)  # [n, 4]: little-endian pairs of words
    states = []
    for high_s, low_s, high_i, low_i in state.tolist():
        inc = ((((high_i << 64) | low_i) << 1) | 1) & _M128
        # pcg_setseq_128_srandom_r: state 0, one step (state = inc), add the seed word, one more step.
        value = (((inc + ((high_s << 64) | low_s)) & _M128) * _PCG_MULT + inc) & _M128
        states.append({"bit_generator": "PCG64", "state": {"state": value, "inc": inc}, "has_uint32": 0, "uinteger": 0})
    return states


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
    return _choose(np.flatnonzero(~np.isin(ids, special_ids)), ids, rng, rate, word_start)


def _choose(maskable: np.ndarray, ids: np.ndarray, rng: np.random.Generator, rate: float,
            word_start: np.ndarray | None) -> np.ndarray:
    """`choose_positions` given the maskable positions: the draws, in the order every cache was written with."""
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
                special_ids: np.ndarray, word_start: np.ndarray | None = None, scheme: int = 1) -> MaskedSample:
    """Mask one corpus sample (anything with `key` and `input_ids`), deterministically from (mask_seed, key).

    80% of the chosen positions become `mask_id`, 10% a uniformly random id in [0, vocab_size), 10% stay.
    """
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    if scheme != 1:
        return mask_batch([sample], mask_seed=mask_seed, rate=rate, mask_id=mask_id, vocab_size=vocab_size,
                          special_ids=special_ids, word_start=word_start, scheme=scheme).sample(0)
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
    scheme: int = MASK_SCHEME
    """How the masks are drawn (SCHEMES); a manifest block without it is scheme 1."""

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(_unknown_scheme(self.scheme))

    def to_dict(self) -> dict:
        """Plain data for a manifest's `mask` block."""
        return {"mask_seed": self.mask_seed, "rate": self.rate, "whole_word": self.whole_word,
                "mask_id": self.mask_id, "vocab_size": self.vocab_size, "special_ids": list(self.special_ids),
                "scheme": self.scheme}

    @classmethod
    def from_dict(cls, data: dict, where: str = "the cache manifest") -> "MaskSpec":
        """Inverse of `to_dict`; a block written before schemes existed is scheme 1. A scheme this code does not
        know is a ConfigError naming `where`."""
        scheme = int(data.get("scheme", 1))
        if scheme not in SCHEMES:
            raise ConfigError(f"{where}: {_unknown_scheme(scheme)}")
        return cls(mask_seed=int(data["mask_seed"]), rate=float(data["rate"]), whole_word=bool(data["whole_word"]),
                   mask_id=int(data["mask_id"]), vocab_size=int(data["vocab_size"]),
                   special_ids=tuple(int(i) for i in data["special_ids"]), scheme=scheme)


@dataclass(frozen=True)
class MaskedBatch:
    """A batch of masked samples as flat arrays (the samples one after another), ready to collate."""

    keys: list[str]
    input_ids: np.ndarray
    """Masked ids of all samples, concatenated (int32)."""
    token_type_ids: np.ndarray
    """Segment ids of all samples, concatenated (uint8; zeros where a sample has none)."""
    lengths: np.ndarray
    """int64 length of each sample."""
    positions: np.ndarray
    """int64 masked positions within their sample, sample after sample, each ascending."""
    n_masked: np.ndarray
    """int64 masked positions per sample."""
    labels: np.ndarray
    """Original ids at `positions` (int64)."""

    def sample(self, i: int) -> MaskedSample:
        """Sample `i` as `mask_sample` would return it."""
        start = int(self.lengths[:i].sum())
        lo = int(self.n_masked[:i].sum())
        hi = lo + int(self.n_masked[i])
        end = start + int(self.lengths[i])
        return MaskedSample(key=self.keys[i], input_ids=self.input_ids[start:end].copy(),
                            positions=self.positions[lo:hi].copy(), labels=self.labels[lo:hi].copy(),
                            token_type_ids=self.token_type_ids[start:end].copy())


def mask_batch(samples: list, *, mask_seed: int, rate: float, mask_id: int, vocab_size: int,
               special_ids: np.ndarray, word_start: np.ndarray | None = None, scheme: int = 1) -> MaskedBatch:
    """`mask_sample` over a batch, identical masks; the per-sample cost is the draws alone (scheme 1) or nothing
    but a key hash (scheme 2)."""
    if not 0 < rate < 1:
        raise ValueError(f"mask rate must be in (0, 1), got {rate}")
    if scheme not in SCHEMES:
        raise ValueError(_unknown_scheme(scheme))
    arrays = [s.input_ids for s in samples]
    lengths = np.fromiter(map(len, arrays), dtype=np.int64, count=len(samples))
    ids = np.concatenate(arrays).astype(np.int32, copy=False)
    types = [getattr(s, "token_type_ids", None) for s in samples]
    if all(t is not None for t in types):
        token_types = np.concatenate(types).astype(np.uint8, copy=False)
    else:
        token_types = np.concatenate([np.zeros(n, np.uint8) if t is None else np.asarray(t, np.uint8)
                                      for t, n in zip(types, lengths)])
    starts = np.concatenate([[0], np.cumsum(lengths)])
    maskable = _maskable(ids, special_ids)
    if scheme == 2:
        flat, n_masked, roll, random_ids = _counter_draws([s.key for s in samples], ids, starts, maskable, mask_seed=mask_seed,
                                                          rate=rate, vocab_size=vocab_size, word_start=word_start)
        local = flat - np.repeat(starts[:-1], n_masked)
        return _apply(samples, ids, token_types, lengths, local, flat, n_masked, roll, random_ids, mask_id)
    cuts = np.searchsorted(maskable, starts)
    rng = np.random.Generator(np.random.PCG64(0))
    digests = b"".join(hashlib.sha256(f"mask\0{int(mask_seed)}\0{s.key}".encode()).digest()[:16] for s in samples)
    states = seed_states(np.frombuffer(digests, dtype="<u4").reshape(len(samples), 4))  # = _seed_int's words
    positions, rolls, randoms = [], [], []
    local_maskable = maskable - np.repeat(starts[:-1], np.diff(cuts))  # positions within their sample
    bit_generator, empty = rng.bit_generator, np.zeros(0, np.int64)
    for i, state in enumerate(states):
        bit_generator.state = state
        lo, hi = int(cuts[i]), int(cuts[i + 1])
        if word_start is not None:
            chosen = _choose(local_maskable[lo:hi], ids[starts[i]:starts[i + 1]], rng, rate, word_start)
        elif hi > lo:  # `_choose` inlined: the same draws, without a call per sample
            chosen = np.sort(local_maskable[lo + rng.permutation(hi - lo)[:max(1, int(round(rate * (hi - lo))))]])
        else:
            chosen = empty
        positions.append(chosen)
        rolls.append(rng.random(chosen.size))
        randoms.append(rng.integers(0, vocab_size, chosen.size))
    n_masked = np.fromiter((p.size for p in positions), dtype=np.int64, count=len(positions))
    local = np.concatenate(positions) if positions else np.zeros(0, np.int64)
    flat = local + np.repeat(starts[:-1], n_masked)
    roll = np.concatenate(rolls) if rolls else np.zeros(0)
    random_ids = np.concatenate(randoms) if randoms else np.zeros(0, np.int64)
    return _apply(samples, ids, token_types, lengths, local, flat, n_masked, roll, random_ids, mask_id)


def _apply(samples, ids, token_types, lengths, local, flat, n_masked, roll, random_ids, mask_id) -> MaskedBatch:
    """The masked batch from the chosen positions and their draws: 80% [MASK], 10% a random id, 10% kept."""
    labels = ids[flat].astype(np.int64)
    masked = ids.copy()
    masked[flat[roll < REPLACE_MASK]] = mask_id
    swap = (roll >= REPLACE_MASK) & (roll < REPLACE_MASK + REPLACE_RANDOM)
    masked[flat[swap]] = random_ids[swap]
    return MaskedBatch(keys=[s.key for s in samples], input_ids=masked, token_type_ids=token_types, lengths=lengths,
                       positions=local.astype(np.int64), n_masked=n_masked, labels=labels)


_GAMMA, _MIX1, _MIX2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_CHOOSE, _ROLL, _RANDOM = 0, 1, 2
"""Purposes of a position's three scheme-2 draws (the low two bits of its counter)."""


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64 (wrapping arithmetic): a well-mixed 64-bit hash of each value."""
    return _mix(x + _GAMMA)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's output function after its increment, in place on `z` (no temporaries but the shifts)."""
    z ^= z >> np.uint64(30)
    z *= _MIX1
    z ^= z >> np.uint64(27)
    z *= _MIX2
    z ^= z >> np.uint64(31)
    return z


def key_hashes(mask_seed: int, keys: list[str]) -> np.ndarray:
    """Scheme 2's per-sample uint64: the first 8 bytes of sha256("mask2", seed, key)."""
    seeded = hashlib.sha256(f"mask2\0{int(mask_seed)}\0".encode())
    digests = []
    for key in keys:
        h = seeded.copy()  # the common prefix hashed once
        h.update(key.encode())
        digests.append(h.digest()[:8])
    return np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)


_COUNTERS = np.zeros((3, 0), dtype=np.uint64)
"""splitmix64 of each (position, purpose) counter, grown on demand: the half of a draw that is the same for
every sample."""


def _counter_hashes(length: int) -> np.ndarray:
    """[3, >= length] hashes of the counters (position << 2 | purpose)."""
    global _COUNTERS
    if _COUNTERS.shape[1] < length:
        size = max(length, 2 * _COUNTERS.shape[1], 512)
        positions = np.arange(size, dtype=np.uint64) << np.uint64(2)
        _COUNTERS = np.stack([_splitmix(positions | np.uint64(purpose)) for purpose in (_CHOOSE, _ROLL, _RANDOM)])
    return _COUNTERS


def _draw(base: np.ndarray, position: np.ndarray, purpose: int) -> np.ndarray:
    """The uint64 draw of (sample hash, position within the sample, purpose)."""
    counters = _counter_hashes(int(position.max()) + 1 if position.size else 0)
    z = counters[purpose][position]  # a new array: mixed in place
    z ^= base
    z += _GAMMA
    return _mix(z)


_LAST = np.uint64(2**64 - 1)
"""Score of an empty cell of the per-sample grid: after every real unit."""


def _counter_draws(keys: list[str], ids: np.ndarray, starts: np.ndarray, maskable: np.ndarray, *, mask_seed: int,
                   rate: float, vocab_size: int, word_start: np.ndarray | None):
    """Scheme 2 for a batch: (flat chosen positions ascending, chosen per sample, rolls in [0, 1), random ids).

    A unit is a maskable token (or a whole word); each sample's units sit in one row of a [samples, units]
    grid of choice scores, so choosing is one sort along the rows.
    """
    n = len(keys)
    base = key_hashes(mask_seed, keys)
    counts = np.diff(np.searchsorted(maskable, starts))
    owner = np.repeat(np.arange(n), counts)  # sample of each maskable position
    local = maskable - np.repeat(starts[:-1], counts)
    target = np.maximum(1, np.round(rate * counts)).astype(np.int64)
    if word_start is None:
        unit_owner, unit_local, unit_of = owner, local, None
    else:
        # A word: a word-start piece (or a sample's first maskable position, or one after a gap) and the
        # continuation pieces right after it; unknown ids start words.
        piece = ids[maskable]
        known = piece < len(word_start)
        begins = ~known | word_start[np.where(known, piece, 0)]
        if maskable.size:
            begins[0] = True
            begins[1:] |= (np.diff(maskable) != 1) | (np.diff(owner) != 0)
        unit_of = np.cumsum(begins) - 1  # word of each maskable position
        heads = np.flatnonzero(begins)
        unit_owner, unit_local = owner[heads], local[heads]
    units = counts if unit_of is None else np.bincount(unit_owner, minlength=n)
    score = _draw(np.repeat(base, units), unit_local, _CHOOSE)  # owners ascend: a repeat, not a gather
    col = np.arange(unit_owner.size) - np.repeat(np.cumsum(units) - units, units)
    grid = np.full((n, max(int(units.max()) if n else 0, 1)), _LAST, dtype=np.uint64)
    grid.reshape(-1)[np.repeat(np.arange(n) * grid.shape[1], units) + col] = score
    if unit_of is None:
        # The target smallest scores of each row (64-bit scores do not tie in practice).
        cutoff = np.sort(grid, axis=1)[np.arange(n), np.minimum(target, grid.shape[1]) - 1]
        taken = score <= np.repeat(cutoff, units)
    else:
        # Words in score order while they fit the target (the first always); stop at the first that overshoots.
        sizes = np.zeros(grid.shape, dtype=np.int64)
        sizes[unit_owner, col] = np.diff(np.append(heads, maskable.size))
        order = np.argsort(grid, axis=1, kind="stable")
        fits = np.cumsum(np.take_along_axis(sizes, order, axis=1), axis=1) <= target[:, None]
        fits[:, 0] = True
        take = np.zeros(grid.shape, dtype=bool)
        np.put_along_axis(take, order, fits, axis=1)
        taken = take[unit_owner, col][unit_of]
    chosen = np.flatnonzero(taken)
    flat, chosen_local = maskable[chosen], local[chosen]
    n_masked = np.bincount(owner[chosen], minlength=n).astype(np.int64)
    chosen_base = np.repeat(base, n_masked)
    roll = (_draw(chosen_base, chosen_local, _ROLL) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    random_ids = ((_draw(chosen_base, chosen_local, _RANDOM) >> np.uint64(32)) * np.uint64(vocab_size)
                  >> np.uint64(32)).astype(np.int64)
    return flat.astype(np.int64), n_masked, roll, random_ids


def _maskable(ids: np.ndarray, special_ids: np.ndarray) -> np.ndarray:
    """Flat indices of the non-special ids (a comparison per special id: faster than np.isin for a few)."""
    special_ids = np.asarray(special_ids)
    if special_ids.size > 16:
        return np.flatnonzero(~np.isin(ids, special_ids))
    keep = np.ones(ids.shape, dtype=bool)
    for special in special_ids.tolist():
        keep &= ids != special
    return np.flatnonzero(keep)


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
                           vocab_size=self.spec.vocab_size, special_ids=self.special_ids, word_start=self.word_start,
                           scheme=self.spec.scheme)

    def batch(self, samples: list) -> MaskedBatch:
        """`mask_batch` with this spec: the same masks as calling the masker on each sample."""
        return mask_batch(samples, mask_seed=self.spec.mask_seed, rate=self.spec.rate, mask_id=self.spec.mask_id,
                          vocab_size=self.spec.vocab_size, special_ids=self.special_ids, word_start=self.word_start,
                          scheme=self.spec.scheme)


def mask_spec_from_corpus(corpus_extra: dict, tokenizer: Any, *, mask_seed: int, rate: float,
                          whole_word: bool, scheme: int = MASK_SCHEME) -> MaskSpec:
    """A MaskSpec for a shard stage's output: ids from its manifest extra, special ids from its tokenizer."""
    specials = set(int(i) for i in tokenizer.all_special_ids)
    specials.update(int(corpus_extra[k]) for k in ("pad_id", "cls_id", "sep_id", "mask_id") if k in corpus_extra)
    return MaskSpec(mask_seed=mask_seed, rate=rate, whole_word=whole_word, mask_id=int(corpus_extra["mask_id"]),
                    vocab_size=int(corpus_extra["vocab_size"]), special_ids=tuple(sorted(specials)), scheme=scheme)
