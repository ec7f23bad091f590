"""Packing, cleaning, dedup/split and SentencePiece training of the `shard` stage, in-process."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import numpy as np
import pytest

from formats.corpus import write_shard
from pipeline.config import ConfigError, build
from stages import shard
from stages.shard.packing import pack_pairs, pack_plain
from stages.shard.sources import clean, doc_hash, documents, expand_inputs, split_of

CLS, SEP = 101, 102


def hand_docs():
    # Lengths chosen to cross sequence boundaries: a doc longer than a sequence, a one-token doc, exact fits.
    lengths = [3, 9, 1, 6, 4, 14, 2]
    docs, next_id = [], 1000
    for n in lengths:
        docs.append(np.arange(next_id, next_id + n, dtype=np.int32))
        next_id += n
    return docs


def test_plain_packing_loses_no_token():
    docs = hand_docs()
    seqs = pack_plain(docs, 8, CLS, SEP)
    for ids, types in seqs:
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= 8 and types.dtype == np.uint8 and not types.any()
    assert all(len(ids) == 8 for ids, _ in seqs[:-1]), "only the last sequence may be short"
    body = np.concatenate([ids[1:-1] for ids, _ in seqs])
    expected = np.concatenate([np.concatenate([d, [SEP]]) for d in docs])[:-1]
    np.testing.assert_array_equal(body, expected)
    # 39 doc tokens + 6 separators = 45 body tokens -> ceil(45 / 6) sequences.
    assert len(seqs) == 8 and sum(len(ids) for ids, _ in seqs) == 45 + 2 * 8


def test_pairs_packing_splits_at_document_boundary_and_loses_no_token():
    docs = hand_docs()
    seqs = pack_pairs(docs, 10, CLS, SEP)
    content = []
    for ids, types in seqs:
        assert ids[0] == CLS and ids[-1] == SEP and len(ids) <= 10
        first_sep = int(np.argmax(ids == SEP))
        assert (types[: first_sep + 1] == 0).all() and (types[first_sep + 1:] == 1).all()
        content.extend(t for t in ids.tolist() if t not in (CLS, SEP))
    assert content == np.concatenate(docs).tolist()
    # First chunk holds tokens 0..6 (docs of 3 and 9 -> boundary at 3): A = first doc exactly.
    first_ids = seqs[0][0].tolist()
    assert first_ids[:5] == [CLS, 1000, 1001, 1002, SEP]


def test_shard_bytes_are_reproducible(tmp_path):
    seqs = pack_plain(hand_docs(), 8, CLS, SEP)
    write_shard(tmp_path / "a.tar", "train-000000", seqs)
    write_shard(tmp_path / "b.tar", "train-000000", seqs)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        infos = tar.getmembers()
    assert {i.mtime for i in infos} == {0} and {i.uid for i in infos} == {0}
    assert infos[0].name == "train-000000-000000.input_ids.npy"
    assert infos[1].name == "train-000000-000000.token_type_ids.npy"


def test_cleaning_dedup_and_split_are_stable(tmp_path):
    lines = ["Ｈｅｌｌｏ  world", "Hello world", "", "   ", "x" * 50, "a second line", "a second line"]
    lines += [f"document number {i}" for i in range(400)]
    (tmp_path / "a.txt").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as handle:
        for i in range(400):
            handle.write(json.dumps({"body": f"document number {i}" if i % 2 else f"json doc {i}"}) + "\n")
    files = expand_inputs([str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl.gz")])
    docs = list(documents(files[:1], max_doc_chars=40, valid_fraction=0.2))
    texts = [d.text for d in docs]
    assert texts[:2] == ["Hello world", "a second line"], "NFKC folds full-width letters, dedup drops the copies"
    assert "x" * 50 not in texts and "" not in texts
    both = list(documents(files, text_field="body", max_doc_chars=40, valid_fraction=0.2))
    assert len(both) == len(docs) + 200, "the odd JSON docs repeat text lines and are dropped"
    # The split is a function of the text alone: the same text lands in the same split in both runs.
    split_a = {d.text: d.split for d in docs}
    assert all(split_a[d.text] == d.split for d in both if d.text in split_a)
    valid = sum(d.split == "valid" for d in both)
    assert 0.1 < valid / len(both) < 0.3
    assert split_of(doc_hash(clean("Hello world", "NFKC")), 0.2) == split_a["Hello world"]


def test_document_separator_and_missing_input(tmp_path):
    (tmp_path / "p.txt").write_text("first line\nof doc one\n\nsecond doc\n\n\nthird\n")
    docs = [d.text for d in documents(expand_inputs([str(tmp_path)]), separator="")]
    assert docs == ["first line of doc one", "second doc", "third"]
    with pytest.raises(ConfigError, match="nothere.txt: file not found"):
        expand_inputs([str(tmp_path / "nothere.txt")])
    with pytest.raises(ConfigError, match="no file matches"):
        expand_inputs([str(tmp_path / "*.zzz")])


def test_config_validation():
    with pytest.raises(ConfigError, match="exactly one of tokenizer"):
        build(shard.Config, {"inputs": ["x"]})
    with pytest.raises(ConfigError, match="max_seq_len"):
        build(shard.Config, {"inputs": ["x"], "tokenizer": "t", "max_seq_len": 4})
    config = build(shard.Config, {"inputs": ["x"], "train_tokenizer": {"vocab_size": 300}})
    assert config.train_tokenizer.vocab_size == 300


def test_sentencepiece_training_round_trips(tmp_path, shared_data):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from stages.shard.tokenizer import TrainTokenizer, _normalizer, train_sentencepiece

    with gzip.open(shared_data / "corpus" / "wordnet_glosses.txt.gz", "rt") as handle:
        lines = [line.strip() for _, line in zip(range(700), handle)]
    train_sentencepiece(iter(lines[:600]), TrainTokenizer(vocab_size=400), tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    processor = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    normalizer = _normalizer(True)
    for line in lines[600:]:
        ids = loaded(line, add_special_tokens=False)["input_ids"]
        assert ids == processor.encode(normalizer.normalize_str(line)), line
    known = "the act of walking"
    assert loaded.decode(loaded(known, add_special_tokens=False)["input_ids"]) == known
    pair = loaded("one two", "three")
    assert pair["input_ids"][0] == loaded.cls_token_id and pair["token_type_ids"][-1] == 1
    assert len(loaded) == 400 and loaded.mask_token_id is not None and loaded.pad_token_id == 0
