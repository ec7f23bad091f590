"""Extraction and its defences as pure code, against hand-worked cases: query generators, budgets, targets,
the keyed watermark, ROC AUC and the detector; the answer journal under a torn write; the client's retries and
rate limit and the watermarking deployment, over real HTTP on 127.0.0.1 (a small upstream in this process)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from formats import answers as journal
from formats import serving
from kd import defences, extraction
from pipeline.config import ConfigError
from pipeline.manifest import ManifestError

VOCAB = extraction.Vocabulary.from_texts(["the cat sat on the mat", "the dog sat", "a dog ran"], 5)


def test_vocabulary_and_generators_are_functions_of_the_seed():
    assert VOCAB.words == ["the", "dog", "sat", "a", "cat"] and np.isclose(VOCAB.probs.sum(), 1)
    assert np.allclose(VOCAB.probs, np.array([3, 2, 2, 1, 1]) / 9)
    ten = extraction.queries("random", 10, 3, vocab=VOCAB, sentences=[], pairs=False, min_words=2, max_words=4)
    assert ten == extraction.queries("random", 10, 3, vocab=VOCAB, sentences=[], pairs=False, min_words=2, max_words=4)
    assert all(2 <= len(t[0].split()) <= 4 and set(t[0].split()) <= set(VOCAB.words) for t in ten)
    five = extraction.corpus_sentences(list("abcde"), 5, 1)
    assert sorted(five) == list("abcde")  # every sentence once before any repeats
    assert extraction.corpus_sentences(list("abcde"), 12, 1)[:5] == five
    pairs = extraction.queries("corpus", 4, 0, vocab=VOCAB, sentences=["w x y z"] * 4, pairs=True, pair_replace=2)
    assert all(len(p) == 2 and sum(a != b for a, b in zip(p[0].split(), p[1].split())) <= 2 for p in pairs)
    assert extraction.budget_sizes([0.1, 1.0, 2.5], 67) == {0.1: 7, 1.0: 67, 2.5: 168}
    assert extraction.drop_known(["The cat, sat.", "a dog"], ["the cat sat"]) == ["a dog"]
    with pytest.raises(ValueError, match="unknown generator"):
        extraction.queries("wiki", 1, 0, vocab=VOCAB, sentences=[], pairs=False)


def test_answer_targets_and_agreement():
    hard = extraction.answer_targets(np.array([2, 0]), None, 3)
    assert hard.tolist() == [[0, 0, 1], [1, 0, 0]]
    soft = extraction.answer_targets(np.array([2, 0]), np.array([0.8, 0.5]), 3)
    assert torch.allclose(soft, torch.tensor([[0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]))
    loss = extraction.soft_cross_entropy(torch.zeros(2, 3), hard)
    assert torch.isclose(loss, torch.log(torch.tensor(3.0)))
    assert extraction.agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75


def test_roc_auc_on_a_hand_made_case():
    # Positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of the 4 pairs ordered right.
    assert defences.roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert defences.roc_auc(np.array([0.5, 0.5, 0.9]), np.array([1, 0, 1])) == 0.75  # a tie counts one half
    assert defences.roc_auc(np.array([3.0, 1.0]), np.array([0, 1])) == 0.0
    fpr, tpr = defences.roc_curve(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    assert fpr.tolist() == [0, 0, 0.5, 0.5, 1] and tpr.tolist() == [0, 0.5, 0.5, 1, 1]
    with pytest.raises(ValueError, match="positives and negatives"):
        defences.roc_auc(np.array([1.0]), np.array([1]))


def test_detector_separates_shifted_features_and_not_identical_ones():
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) + 1.5
    labels = torch.cat([torch.zeros(100), torch.ones(100)])
    score = defences.fit_logistic(torch.cat([real[:100], fake[:100]]), labels, steps=100)
    held = score(torch.cat([real[100:], fake[100:]])).numpy()
    assert defences.roc_auc(held, labels.numpy()) > 0.95
    same = torch.randn(400, 8, generator=gen)
    score = defences.fit_logistic(same[:200], labels, steps=100)
    assert abs(defences.roc_auc(score(same[200:]).numpy(), labels.numpy()) - 0.5) < 0.15


def test_watermark_is_keyed_deterministic_and_always_wrong():
    texts = [(f"query number {i}",) for i in range(4000)]
    marked = [t for t in texts if defences.is_watermarked(b"k" * 32, t, 0.1)]
    assert 320 < len(marked) < 480
    assert marked == [t for t in texts if defences.is_watermarked(b"k" * 32, t, 0.1)]
    other = {t for t in texts if defences.is_watermarked(b"j" * 32, t, 0.1)}
    assert len(other & set(marked)) < 80  # another key marks other queries
    wrong = [defences.watermark_label(b"k" * 32, t, 2, 5) for t in marked]
    assert 2 not in wrong and set(wrong) == {0, 1, 3, 4}
    labels = np.full(len(texts), 2)
    deployed = defences.deployed_labels(b"k" * 32, texts, labels, 0.1, 5)
    assert int((deployed != 2).sum()) == len(marked)
    assert defences.watermark_match(np.array([1, 0, 3]), np.array([1, 2, 3])) == pytest.approx(2 / 3)
    # Binomial tails by hand: 1 of 2 at 0.5 (two classes) is 3/4; 2 of 3 at 1/10 (11 classes) is 3*.01*.9 + .001.
    assert defences.watermark_p_value(1, 2, 2) == pytest.approx(0.75)
    assert defences.watermark_p_value(2, 3, 11) == pytest.approx(0.028)
    assert defences.watermark_p_value(0, 5, 45) == pytest.approx(1.0)
    split = [defences.watermark_label(b"k" * 32, t, 0, 1000) for t in (("a b", "c"), ("a", "b c"))]
    assert split[0] != split[1]  # the text fields are hashed apart


def test_journal_keeps_answered_batches_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    journal.append(path, [{"i": 0, "text": ["a"], "label": "x"}, {"i": 1, "text": ["b"], "label": "y"}])
    with open(path, "ab") as handle:  # a writer killed mid-line
        handle.write(b'{"i": 2, "text": ["c"], "la')
    assert [r["i"] for r in journal.read(path)] == [0, 1]
    journal.append(path, [{"i": 2, "text": ["c"], "label": "x"}])
    assert [r["i"] for r in journal.read(path)] == [0, 1, 2] and path.read_bytes().count(b"\n") == 3
    assert set(journal.answered(path, [("a",), ("b",), ("c",), ("d",)])) == {0, 1, 2}
    with pytest.raises(ManifestError, match="another query"):
        journal.answered(path, [("a",), ("changed",), ("c",)])
    path.write_bytes(b'not json\n{"i": 0}\n')
    with pytest.raises(ManifestError, match="line 1 is not JSON"):
        journal.read(path)


class Upstream:
    """A model server stand-in on 127.0.0.1: answers label `pos` with score 0.9 after `fail` 503s."""

    def __init__(self, fail: int = 0):
        self.fail, self.seen = fail, 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                upstream.seen += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                code = 503 if upstream.seen <= upstream.fail else 200
                data = json.dumps({"predictions": [{"label": "pos", "score": 0.9} for _ in body["inputs"]]}).encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_client_retries_with_backoff_keeps_labels_only_and_keeps_the_rate():
    upstream = Upstream(fail=2)
    try:
        client = serving.Client(upstream.url, retries=3, backoff_s=0.05)
        assert client.ask([("a",), ("b",)]) == [{"label": "pos"}, {"label": "pos"}] and upstream.seen == 3
        prob = serving.Client(upstream.url, answers="top1_prob")
        assert prob.ask([("a",)]) == [{"label": "pos", "score": 0.9}]
        paced, started = serving.Client(upstream.url, rate_limit=20), time.monotonic()
        for _ in range(5):
            paced.ask([("a",)])
        assert time.monotonic() - started >= 0.19
        upstream.fail = 10**6
        with pytest.raises(ConfigError, match="did not answer after 2 tries"):
            serving.Client(upstream.url, retries=1, backoff_s=0.01).ask([("a",)])
    finally:
        upstream.close()


def test_watermarking_deployment_relabels_marked_queries_and_journals_them(tmp_path):
    upstream = Upstream()
    texts = [(f"q{i}",) for i in range(60)]
    key = b"s" * 32
    try:
        with serving.WatermarkProxy(upstream.url, key=key, fraction=0.3, label_names=["neg", "pos"],
                                    journal_path=tmp_path / "wm.jsonl") as proxy:
            got = serving.Client(proxy.url).ask(texts)
    finally:
        upstream.close()
    expected = ["neg" if defences.is_watermarked(key, t, 0.3) else "pos" for t in texts]
    assert [g["label"] for g in got] == expected and all(set(g) == {"label"} for g in got)
    records = journal.read(tmp_path / "wm.jsonl")
    assert [tuple(r["text"]) for r in records] == [t for t, e in zip(texts, expected) if e == "neg"]
    assert all(r["label"] == "neg" and r["model_label"] == "pos" for r in records) and 8 < len(records) < 30


def test_watermark_key_file_is_made_secret_and_reused(tmp_path):
    from types import SimpleNamespace

    from stages.extract.asking import watermark_key
    from stages.extract.config import Config

    config = Config(victim_path="v", corpus_path="c")
    key = watermark_key(config, SimpleNamespace(run_dir=tmp_path))
    assert len(key) == 64 and (tmp_path / "watermark.key").stat().st_mode & 0o077 == 0
    assert watermark_key(config, SimpleNamespace(run_dir=tmp_path)) == key
    (tmp_path / "short.key").write_text("abc")
    with pytest.raises(ConfigError, match="at least 16"):
        watermark_key(Config(victim_path="v", corpus_path="c", watermark_key_file=str(tmp_path / "short.key")), None)
    for bad, named in (({"budgets": [0]}, "budgets"), ({"generators": ["wiki"]}, "generators"),
                       ({"corpus": "@shard"}, "corpus_path"), ({"watermark_fraction": 0.7}, "watermark_fraction")):
        with pytest.raises(ValueError, match=named):
            Config(**{"victim_path": "v", "corpus_path": "c", **bad})


def test_extract_scores_on_the_victims_held_out_split_and_refuses_another(tmp_path):
    """The stage's train and test are the task stages' split (test rows carved by the run seed, out of train);
    a victim whose teacher_finetune held out other rows (it may have trained on these test rows) is refused."""
    from formats.taskdata import TaskData
    from formats.testsplit import load_splits
    from pipeline.context import ResolvedInput, RunContext
    from pipeline.manifest import Manifest
    from stages.extract import _task

    rows = [(f"sentence number {i}", "ab"[i % 2]) for i in range(40)]
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\nx\ta\ny\tb\n")
    data = TaskData(task="custom", train=str(tmp_path / "train.tsv"), dev=str(tmp_path / "dev.tsv"),
                    text_columns=["sentence"], label_column="label", metrics=["accuracy"], test_fraction=0.25)

    def ctx_with_victim(seed: int) -> RunContext:
        held_out = load_splits(data, seed=seed).test_split
        manifest = Manifest(stage="teacher_finetune", name="teacher_finetune", config_hash="0", config={}, version="1",
                            git_commit=None, inputs=[], outputs=[], extra={"test_split": held_out})
        victim = ResolvedInput(field="victim", ref="@teacher_finetune", path=tmp_path / "tf", manifest=manifest, sha256="0")
        return RunContext(run_dir=tmp_path, stage_dir=tmp_path / "extract", name="extract", stage="extract",
                          inputs={"victim": victim})

    config = SimpleNamespace(data=data)
    train, test, info = _task(config, ctx_with_victim(0), ["b", "a"])  # the victim's class order, not the file's
    test_texts = {t for (t,) in test.texts}
    assert len(test) == 10 and len(train) == 30 and not {t for (t,) in train.texts} & test_texts
    assert info["source"] == "carved" and info["size"] == 10
    assert train.label_names == ["b", "a"] and all(["b", "a"][y] == rows[int(t.split()[-1])][1]
                                                   for (t,), y in zip(test.texts, test.labels))
    with pytest.raises(ConfigError, match="victim .*held out a different test split"):
        _task(config, ctx_with_victim(1), ["a", "b"])
