"""The shipped extract recipe, reduced with --set, through the real `distill` CLI: the demo's task teacher (a tiny
encoder in its place) is served by the stage with a real `mlflow models serve` on 127.0.0.1, asked through the
watermarking deployment, and stolen.

The first run is SIGKILLed right after its second journaled batch of answers; the rerun asks only the rest:
the model server's own access log counts every request it answered across both runs, and that count is the
number of batches an uninterrupted run sends. The journals hold labels only. The watermark flags the
extracted copy and not the model trained on real labels."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from formats import answers as journal
from tests.conftest import REPO
from tests.e2e.test_task_pipeline import tiny_encoder
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "extract.yaml"


def reduced(teacher, student, key) -> list[str]:
    return [
        "tracking.enabled=false",
        "stages.wordnet.max_train=64", "stages.wordnet.max_dev=24",
        "stages.shard.max_docs=300", "stages.shard.docs_per_shard=300", "stages.shard.max_seq_len=32",
        f"stages.teacher_finetune.teacher_path={teacher}", "stages.teacher_finetune.max_steps=12",
        "stages.teacher_finetune.batch_size=16", "stages.teacher_finetune.eval_every=6",
        "stages.teacher_finetune.lr=3e-3",
        f"stages.extract.student_path={student}", "stages.extract.budgets=[0.125,0.25]", "stages.extract.query_batch=4",
        "stages.extract.rate_limit=null", "stages.extract.corpus_max_sentences=400", "stages.extract.vocab_size=500",
        "stages.extract.watermark_fraction=0.3", f"stages.extract.watermark_key_file={key}",
        "stages.extract.detector_samples=48", "stages.extract.epochs=200", "stages.extract.max_steps=200",
        "stages.extract.lr=3e-3", "stages.extract.batch_size=16", "stages.extract.threads=1",
        # Memorising the watermark's few odd answers takes a tiny student many plain steps.
        "stages.extract.schedule=constant", "stages.extract.warmup_ratio=0.0", "stages.extract.clip_norm=null",
        "stages.extract.weight_decay=0.0",
    ]


def attacker_student(folder):
    """The attacker's pretrained init: a tiny encoder without dropout (it has to memorise, not generalise)."""
    tiny_encoder(folder, layers=2)
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def distill(*args: str, sets: list[str]) -> subprocess.CompletedProcess:
    """The real `distill` CLI in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    flags = [a for s in sets for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, wordnet):  # noqa: F811 - fixture
    root = tmp_path_factory.mktemp("extract")
    key = root / "watermark.key"  # a fixed key: the same queries are marked on every run of the test
    key.write_text("0123456789abcdef" * 4 + "\n")
    sets = reduced(tiny_encoder(root / "teacher"), attacker_student(root / "student"), key)
    run_dir = root / "run"
    killed = distill("run", str(RECIPE), "--run-dir", str(run_dir), sets=sets + ["stages.extract.die_after_batches=2"])
    assert killed.returncode == -9, killed.stderr[-3000:]
    stage = run_dir / "extract"
    first = journal.read(stage / "answers" / "random.jsonl")
    assert len(first) == 8 and not (stage / "manifest.json").exists()
    done = distill("run", str(RECIPE), "--run-dir", str(run_dir), sets=sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, first


def test_killed_extraction_resumes_without_asking_twice(extracted):
    run_dir, first = extracted
    stage = run_dir / "extract"
    report = json.loads((stage / "report.json").read_text())
    train, test = report["summary"]["train_size"], report["summary"]["test_size"]
    largest = math.ceil(0.25 * train)
    sets = {"random": largest, "corpus": largest, "test": test}
    for name, size in sets.items():
        records = journal.read(stage / "answers" / f"{name}.jsonl")
        assert sorted(r["i"] for r in records) == list(range(size)), name  # each query answered exactly once
        assert all(set(r) == {"i", "text", "label"} for r in records), "the attacker saw more than labels"
    assert journal.read(stage / "answers" / "random.jsonl")[:8] == first  # kept, not re-asked
    # What the server answered, by its own access log (both runs append to serve.log): one request per batch.
    served = (stage / "serve.log").read_text().count('"POST /invocations HTTP/1.1" 200')
    assert served == sum(math.ceil(n / 4) for n in sets.values())
    assert report["summary"]["requests"] == served - 2  # the rerun's own count: the 2 batches before the kill


def test_watermark_flags_the_copy_not_the_independent_model(extracted):
    run_dir, _ = extracted
    report = json.loads((run_dir / "extract" / "report.json").read_text())
    s = report["summary"]
    assert s["watermarked_queries"] >= 4
    copy = next(r for r in report["extraction"] if (r["generator"], r["budget"]) == ("random", 0.25))
    assert copy["watermark_verdict"] and copy["watermark_p_value"] < 0.01 and s["watermark_verdict"]
    independent = report["independent"]
    assert not independent["watermark_verdict"] and independent["watermark_p_value"] > 0.01
    assert copy["watermark_recall"] > s["watermark_fpr"]
    assert s["deployed_test_accuracy"] <= s["victim_test_accuracy"]
    assert 0.0 <= s["detector_auc"] <= 1.0 and set(report["detector"]["auc_by_generator"]) == {"random", "corpus"}
    assert len(report["extraction"]) == 4 and all(0 <= r["agreement"] <= 1 for r in report["extraction"])
    assert (run_dir / "extract" / "extract.png").stat().st_size > 10_000
    key = (run_dir.parent / "watermark.key").read_bytes().strip()
    for path in run_dir.rglob("*"):  # the key is in no output, log, config or tracking file
        if path.is_file():
            assert key not in path.read_bytes(), path


def test_audit_steals_a_promoted_model(extracted, tmp_path):
    run_dir, _ = extracted
    registered = distill("register", str(run_dir / "teacher_finetune"), "--name", "victim", "--alias", "champion",
                         "--run-dir", str(run_dir), sets=[])
    assert registered.returncode == 0, registered.stderr[-2000:]
    wordnet_dir, out = run_dir / "wordnet", tmp_path / "audit"
    student = run_dir.parent / "student"
    audit = distill("audit", "models:/victim@champion", "--run-dir", str(run_dir),
                    "--train", str(wordnet_dir / "train.tsv"),
                    "--test", str(wordnet_dir / "dev.tsv"), "--corpus", str(wordnet_dir / "corpus.txt"),
                    "--budget", "0.25", "--student", str(student), "--out", str(out),
                    sets=["stages.extract.max_steps=4", "stages.extract.detector_samples=16",
                          "stages.extract.corpus_max_sentences=300", "stages.extract.threads=1",
                          "stages.extract.watermark_fraction=0.2"])
    assert audit.returncode == 0, audit.stderr[-3000:]
    assert "# Model extraction of" in audit.stdout and "| random | 0.25x | 16 |" in audit.stdout
    assert (out / "victim" / "MLmodel").is_file()  # fetched from the registry, then served
    report = json.loads((out / "run" / "extract" / "report.json").read_text())
    assert report["summary"]["budgets"] == [0.25] and report["summary"]["generators"] == ["random"]
    assert '"POST /invocations HTTP/1.1" 200' in (out / "run" / "extract" / "serve.log").read_text()
