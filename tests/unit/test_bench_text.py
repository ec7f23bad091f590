"""`distill bench` text comes from what a user can install (WordNet, else the tokenizer's vocabulary), never ../shared."""

from __future__ import annotations

from bench import text
from tests.conftest import REPO
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture


def test_no_benchmark_reads_the_shared_folder():
    for path in sorted((REPO / "bench").glob("*.py")):
        source = path.read_text()
        assert '"shared"' not in source and "../shared" not in source, f"{path.name} reads ../shared"


def test_wordnet_glosses_and_a_two_class_task(wordnet):  # noqa: F811
    assert text.source() == "wordnet"
    lines = text.sentences(500)
    assert len(lines) == 500 and all(len(line.split()) >= 1 for line in lines)
    pairs = text.labelled(200)
    assert len(pairs) == 200 and {label for _, label in pairs} == {0, 1}
    assert len({t for t, _ in pairs}) == 200


def test_vocabulary_fallback_without_wordnet(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "WORDNET", tmp_path / "absent")
    assert text.source() == "tokenizer vocabulary"
    lines = text.sentences(50)
    assert len(lines) == 50 and lines == text.sentences(50), "fallback text must be deterministic"
    assert all(6 <= len(line.split()) <= 24 for line in lines)
    assert {label for _, label in text.labelled(20)} == {0, 1}


def test_shard_and_task_benchmarks_take_their_text_from_here(tmp_path, wordnet):  # noqa: F811
    import gzip

    from transformers import AutoTokenizer

    from bench import shard_bench, task_bench
    from pipeline.assets import resolve_asset

    (path,) = shard_bench._slice(tmp_path, 300)
    with gzip.open(path, "rt") as handle:
        assert handle.read().splitlines() == text.sentences(300)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset(text.MINILM)))
    batch, labels = task_bench._batch(tokenizer, 16)
    assert batch["input_ids"].shape[0] == 16 and labels.tolist() == [0, 1] * 8
