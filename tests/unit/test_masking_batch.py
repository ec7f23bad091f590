"""Batch masking gives today's masks exactly, so every existing teacher cache stays valid.

The golden digests were computed with kd/masking.py as it was before `mask_batch` existed (commit 1bd0063):
per-sample `np.random.PCG64(sha256(...))` and `mask_sample`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest

from kd.masking import _seed_int, mask_batch, mask_sample, seed_states

SPECIALS = np.array([0, 100, 101, 102, 103])
TABLE = np.ones(3000, bool)
TABLE[1500:2500] = False  # continuation pieces, so whole-word groups span several positions
GOLDEN = {None: "14621d6b9da1f55749e4820f90e9786f500cc910abf04adee297952568bcd630",
          "whole_word": "e22f17fa288bb3434f76bed64551a12d83343eeb446013cdad41f9c143b1d68b"}


@dataclass
class Sample:
    key: str
    input_ids: np.ndarray


def corpus() -> list[Sample]:
    rng = np.random.default_rng(11)
    out = []
    for i in range(300):
        body = rng.integers(0, 3000, int(rng.integers(1, 127)))  # specials (0, 100..103) appear inside too
        out.append(Sample(f"train-{i % 7:06d}-{i:06d}", np.concatenate([[101], body, [102]]).astype(np.int32)))
    return out + [Sample("only-specials", np.array([101, 102], np.int32))]


def digest(masked) -> str:
    h = hashlib.sha256()
    for m in masked:
        h.update(m.positions.tobytes())
        h.update(m.input_ids.tobytes())
        h.update(m.labels.tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("whole_word", [None, "whole_word"])
def test_batch_and_sample_masks_equal_the_masks_every_cache_was_written_with(whole_word):
    table = TABLE if whole_word else None
    kwargs = dict(mask_seed=7, rate=0.15, mask_id=103, vocab_size=30522, special_ids=SPECIALS, word_start=table)
    samples = corpus()
    assert digest(mask_sample(s, **kwargs) for s in samples) == GOLDEN[whole_word]
    batches = [mask_batch(samples[i:i + 37], **kwargs) for i in range(0, len(samples), 37)]  # batch size is irrelevant
    assert digest(b.sample(i) for b in batches for i in range(len(b.keys))) == GOLDEN[whole_word]
    assert batches[-1].sample(len(batches[-1].keys) - 1).positions.size == 0  # nothing maskable: no position


def test_seed_states_are_numpys_own_seeding():
    seeds = [_seed_int(3, f"k{i}", "mask") for i in range(500)] + [0, 1, 2**32, 2**64 - 1, 2**128 - 1]
    assert seed_states(seeds) == [np.random.PCG64(s).state for s in seeds]
