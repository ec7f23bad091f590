"""Masking scheme 2 (counter-based, vectorised per batch): a pure function of (seed, key), BERT's statistics,
whole words kept whole, pinned by a digest so caches written with it stay valid; and the scheme is recorded
and checked in the manifest's mask block (scheme 1 for blocks written before it existed)."""

from __future__ import annotations

import numpy as np
import pytest

from kd.masking import SCHEMES, MaskSpec, mask_batch, mask_sample
from pipeline.config import ConfigError
from tests.unit.test_masking_batch import SPECIALS, TABLE, corpus, digest

GOLDEN = {None: "b4944bcb902a399cfa3dada83af7c566badc09ade01b85c74023b218b585b943",
          "whole_word": "664fa561aa5341723ebb9c983996b1819add3c28adc0197de4b1adf3fe0311ac"}
VOCAB = 30522


def kwargs(whole_word=None, seed=7):
    return dict(mask_seed=seed, rate=0.15, mask_id=103, vocab_size=VOCAB, special_ids=SPECIALS,
                word_start=TABLE if whole_word else None, scheme=2)


@pytest.mark.parametrize("whole_word", [None, "whole_word"])
def test_masks_are_a_function_of_seed_and_key_only(whole_word):
    samples = corpus()
    alone = [mask_sample(s, **kwargs(whole_word)) for s in samples]
    batches = [mask_batch(samples[i:i + 37], **kwargs(whole_word)) for i in range(0, len(samples), 37)]
    together = [b.sample(i) for b in batches for i in range(len(b.keys))]
    assert digest(alone) == digest(together) == GOLDEN[whole_word], "batch size or order must not matter"
    shuffled = mask_batch(samples[::-1], **kwargs(whole_word))
    assert digest(shuffled.sample(i) for i in reversed(range(len(samples)))) == GOLDEN[whole_word]
    other_seed = [mask_sample(s, **kwargs(whole_word, seed=8)) for s in samples]
    assert digest(other_seed) != GOLDEN[whole_word]
    assert together[-1].positions.size == 0  # nothing maskable: no position


def test_token_masking_has_berts_statistics():
    rng = np.random.default_rng(0)

    class Sample:
        def __init__(self, i):
            self.key = f"s-{i}"
            self.input_ids = np.concatenate([[101], rng.integers(1000, 3000, 100), [102]]).astype(np.int32)

    samples = [Sample(i) for i in range(3000)]
    batch = mask_batch(samples, **kwargs())
    assert (batch.n_masked == 15).all(), "exactly round(rate * maskable) per sample"
    ids = np.concatenate([s.input_ids for s in samples])
    flat = batch.positions + np.repeat(np.arange(3000) * 102, batch.n_masked)
    assert not np.isin(ids[flat], SPECIALS).any(), "never a special token"
    assert (batch.labels == ids[flat]).all()
    per_sample = np.split(batch.positions, np.cumsum(batch.n_masked)[:-1])
    assert all((np.diff(p) > 0).all() for p in per_sample), "ascending, no repeats"
    # Every body position is chosen about equally often (rate 15/100): no positional bias.
    freq = np.bincount(batch.positions, minlength=102)[1:101] / 3000
    assert abs(freq.mean() - 0.15) < 1e-9 and np.abs(freq - 0.15).max() < 0.03
    got = batch.input_ids[flat]
    share_mask = (got == 103).mean()
    kept = (got == ids[flat]).mean()
    assert abs(share_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.015
    swapped = got[(got != 103) & (got != ids[flat])]
    assert abs(len(swapped) / len(got) - 0.1) < 0.01 and swapped.min() >= 0 and swapped.max() < VOCAB
    assert swapped.mean() == pytest.approx(VOCAB / 2, rel=0.05), "random ids uniform over the vocabulary"


def test_whole_words_are_masked_whole_and_never_overshoot():
    samples = corpus()
    batch = mask_batch(samples, **kwargs("whole_word"))
    for i, sample in enumerate(samples):
        ids = sample.input_ids
        chosen = set(batch.sample(i).positions.tolist())
        maskable = [p for p in range(len(ids)) if ids[p] not in SPECIALS]
        if not maskable:
            assert not chosen
            continue
        target = max(1, round(0.15 * len(maskable)))
        assert chosen and (len(chosen) <= target or len(chosen) == len(word_of(ids, min(chosen))))
        for p in chosen:
            assert set(word_of(ids, p)) <= chosen, "a chosen word is masked whole"


def word_of(ids, p):
    """The positions of the word holding position p (a start piece and its continuations, as masking groups)."""
    maskable = lambda q: 0 <= q < len(ids) and ids[q] not in SPECIALS  # noqa: E731
    starts = lambda q: ids[q] >= len(TABLE) or TABLE[ids[q]]  # noqa: E731
    lo = p
    while not starts(lo) and maskable(lo - 1):
        lo -= 1
    hi = p + 1
    while maskable(hi) and not starts(hi):
        hi += 1
    return list(range(lo, hi))


def test_the_scheme_is_recorded_and_an_unknown_one_is_one_line():
    spec = MaskSpec(mask_seed=1, rate=0.15, whole_word=False, mask_id=103, vocab_size=VOCAB, special_ids=(0, 101))
    assert spec.scheme == 2 and MaskSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "scheme"}
    assert MaskSpec.from_dict(old).scheme == 1, "a block written before schemes existed is scheme 1"
    with pytest.raises(ConfigError, match=r"^cache 'c': masking scheme 9 is newer .*rebuild the cache$"):
        MaskSpec.from_dict({**spec.to_dict(), "scheme": 9}, "cache 'c'")
    assert SCHEMES == (1, 2)
