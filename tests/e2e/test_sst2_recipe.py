"""The shipped SST-2 recipe (configs/recipes/sst2.yaml), reduced with --set, end to end through the real `distill`
CLI: WordNet's glosses for general distillation, the real MiniLM teacher, GLUE's SST-2 rows for the task with a
test split carved from train, the student registered against its 0.95 gate and the report written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.manifest import Manifest
from tests.conftest import REPO, SHARED_DATA
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "sst2.yaml"
SST2 = SHARED_DATA / "sst2"
DATA = (f"{{task: sst2, train: {SST2}/train.tsv, dev: {SST2}/dev.tsv, test_fraction: 0.05, max_length: 32, "
        "limit_train: 64, limit_dev: 32, limit_test: 32}")
REDUCED = [
    "stages.shard.max_docs=300", "stages.shard.docs_per_shard=100", "stages.shard.max_seq_len=32",
    "stages.teacher_adapt.steps=2", "stages.teacher_adapt.batch_size=8", "stages.teacher_adapt.eval_samples=16",
    "stages.cache.k=8",
    "stages.general.max_steps=4", "stages.general.batch_size=8", "stages.general.warmup_steps=1",
    "stages.general.eval_every=2", "stages.general.eval_batches=1", "stages.general.checkpoint_every=2",
    "stages.general.student.importance_samples=16",
    *[f"stages.{s}.data={DATA}" for s in ("teacher_finetune", "augment", "task")],
    "stages.teacher_finetune.max_steps=2", "stages.teacher_finetune.batch_size=8", "stages.teacher_finetune.eval_every=2",
    "stages.augment.n_aug=1", "stages.augment.top_k=2", "stages.augment.batch_size=64",
    "stages.task.max_steps=4", "stages.task.batch_size=8", "stages.task.latency_repeats=1",
    "stages.task.latency_batch_size=2", "stages.task.latency_seq_len=8",
]


def test_reduced_sst2_recipe_runs_end_to_end(wordnet, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    sets = [a for s in REDUCED for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir), *sets],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    # General distillation read WordNet's glosses (the wordnet stage's corpus.txt), never SST-2's text.
    shard = Manifest.load(run_dir / "shard")
    assert shard.config["source"] == "@wordnet" and shard.config["inputs"] == ["corpus.txt"]
    assert shard.extra["splits"]["train"]["docs"] > 0
    assert Manifest.load(run_dir / "general").metrics["train_steps"] == 4
    # The student is the general stage's 4-layer, 128-wide cut; its targets came from augment's cache.
    config = json.loads((run_dir / "task" / "model" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (4, 128, 512)
    task = Manifest.load(run_dir / "task")
    assert task.metrics["teacher_train_examples"] == 0
    # Scored on the 32 test rows kept of those carved from train, which no stage trained or selected on.
    assert task.metrics["test_examples"] == 32 and 0 <= task.metrics["student_test_score"] <= 1
    registered = json.loads((run_dir / "register" / "registered.json").read_text())
    assert registered["name"] == "sst2-student" and registered["version"] == "1"
    # The report joins the three: the gate's verdict quotes the recipe's 0.95 bound on dev and on test.
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["student"]["params"] < summary["teacher"]["params"] / 4
    assert "0.95*teacher" in summary["promotion"] and "test_score" in summary["promotion"]
