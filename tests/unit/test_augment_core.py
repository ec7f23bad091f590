"""TinyBERT augmentation rules on a tiny vocabulary: MLM top-K, GloVe neighbours, p_t, dedup, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.augmentation import (
    GloveTable,
    augment_sentences,
    banned_token_mask,
    make_variants,
    mlm_candidates,
    split_words,
    word_pieces,
)

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "big", "red", "ran", "play", "fast", "slow", "film", "good"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "##ing", "##s"] + WORDS


@pytest.fixture(scope="module")
def tiny():
    """A WordPiece tokenizer over 23 tokens and a random 1-layer MLM over it."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)).eval()
    return tokenizer, mlm


def glove() -> GloveTable:
    # 2-d vectors: cosine neighbours are the smallest angles, easy to read off.
    words = ["playing", "cats", "dogs", "films", "run", "x"]
    angles = np.array([0.0, 0.1, 0.25, 1.0, 1.2, 3.0])
    return GloveTable(np.stack([np.cos(angles), np.sin(angles)], 1) * np.arange(1, 7)[:, None], words)


def test_mlm_candidates_are_the_top_k_of_one_masked_forward(tiny):
    tokenizer, mlm = tiny
    sentences = [split_words(tokenizer, "The cat sat on a mat ."), split_words(tokenizer, "a big dog ran")]
    pieces = word_pieces(tokenizer, {w for s in sentences for w in s})
    banned = banned_token_mask(tokenizer)
    found = mlm_candidates(mlm, tokenizer, sentences, pieces, top_k=3, max_length=32, batch_size=64, banned=banned)
    small = mlm_candidates(mlm, tokenizer, sentences, pieces, top_k=3, max_length=32, batch_size=1, banned=banned)
    assert found == small  # batching does not change the answer
    assert (0, 6) not in found  # punctuation gets no candidates
    assert len(found) == 6 + 4
    # Reference: the plain model on one sentence with word 1 ("cat") masked, banned tokens and "cat" removed.
    ids = tokenizer("the [MASK] sat on a mat .", return_tensors="pt")
    logits = mlm(**ids).logits[0, 2].clone()
    logits[banned] = float("-inf")
    logits[tokenizer.convert_tokens_to_ids("cat")] = float("-inf")
    assert found[(0, 1)] == tokenizer.convert_ids_to_tokens(logits.topk(3).indices.tolist())
    assert all(len(c) == 3 and not any(w.startswith(("##", "[")) or w == "." for w in c) for c in found.values())


def test_glove_neighbours_by_cosine_without_self():
    table = glove()
    near = table.neighbours(["playing", "films", "unknown"], k=2)
    assert near == {"playing": ["cats", "dogs"], "films": ["run", "dogs"]}  # norms do not matter, angles do


def test_p_t_rule_and_dedup():
    words = [f"w{i}" for i in range(60)]
    cands = [[f"c{i}a", f"c{i}b"] if i % 3 else None for i in range(60)]  # every third word has none
    rng = np.random.default_rng(0)
    assert make_variants(words, cands, n_aug=5, p_t=0.0, rng=rng) == [" ".join(words)]
    full = make_variants(words, cands, n_aug=4, p_t=1.0, rng=rng, keep_original=False)
    for variant in full:
        for i, w in enumerate(variant.split()):
            assert (w in cands[i]) if cands[i] else (w == words[i])
    some = make_variants(words, cands, n_aug=200, p_t=0.4, rng=np.random.default_rng(1))
    assert len(some) == len(set(some)) == 201 and some[0] == " ".join(words)
    replaced = [sum(a != b for a, b in zip(v.split(), words)) for v in some[1:]]
    assert np.mean(replaced) / 40 == pytest.approx(0.4, abs=0.03)  # 40 words have candidates


def test_augment_is_seeded_and_independent_of_chunking(tiny):
    tokenizer, mlm = tiny
    texts = ["the cat sat on a mat", "a big dog ran fast", "good film playing", "the red cats ran"]
    kw = dict(tokenizer=tokenizer, mlm=mlm, glove=glove(), n_aug=6, p_t=0.5, top_k=2, max_length=32,
              batch_size=8, banned=banned_token_mask(tokenizer))
    whole = augment_sentences(texts, seed=3, **kw)
    assert whole == augment_sentences(texts, seed=3, **kw)
    split = augment_sentences(texts[:1], seed=3, **kw) + augment_sentences(texts[1:], seed=3, first_index=1, **kw)
    assert split == whole
    assert whole != augment_sentences(texts, seed=4, **kw)
    # "playing" is two pieces (play ##ing): it may only become one of its GloVe neighbours.
    third = [v.split()[2] for v in whole[2]]
    assert set(third) <= {"playing", "cats", "dogs"} and len(whole[2]) > 1


def test_n_aug_zero_keeps_only_the_originals_without_mlm_or_glove_work(tiny):
    tokenizer, mlm = tiny
    texts = ["the cat sat on a mat", "A big dog ran fast"]
    kw = dict(tokenizer=tokenizer, mlm=None, glove=None, p_t=0.5, top_k=2, max_length=32, batch_size=8, banned=None,
              seed=3)
    originals = augment_sentences(texts, n_aug=0, **kw)
    assert originals == [["the cat sat on a mat"], ["a big dog ran fast"]]  # normalised as the variants' original
    with_aug = augment_sentences(texts, tokenizer=tokenizer, mlm=mlm, glove=glove(), n_aug=3, p_t=0.5, top_k=2,
                                 max_length=32, batch_size=8, banned=banned_token_mask(tokenizer), seed=3)
    assert [v[0] for v in with_aug] == [o[0] for o in originals]
    from stages.augment.config import Config
    from formats.taskdata import TaskData

    with pytest.raises(ValueError, match="leaves no sentence"):
        Config(data=TaskData(task="sst2", train="x", dev="y"), n_aug=0, keep_original=False, teacher="@t")
