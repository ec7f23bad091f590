"""The shipped SKD recipe (configs/recipes/skd.yaml), reduced with --set, end to end through the real `distill`
CLI on real WordNet glosses and the real MiniLM teacher: three truncations fine-tuned, three caches over one
augmentation, the team scored, the student sampling per step (MLflow off here: tests/e2e/test_skd.py checks it)."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.manifest import Manifest
from tests.conftest import REPO
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "skd.yaml"
TEACHERS = ("teacher_finetune", "teacher_l4", "teacher_l2")
AUGMENTS = ("augment", "augment_l4", "augment_l2")
REDUCED = [
    "tracking.enabled=false", "stages.wordnet.max_train=100", "stages.wordnet.max_dev=16",
    *[f"stages.{t}.{k}" for t in TEACHERS for k in ("max_steps=2", "batch_size=8", "eval_every=2")],
    *[f"stages.{a}.{k}" for a in AUGMENTS for k in ("n_aug=1", "top_k=2", "batch_size=64")],
    "stages.task.max_steps=4", "stages.task.batch_size=4", "stages.task.latency_repeats=1",
    "stages.task.latency_batch_size=2", "stages.task.latency_seq_len=8", "stages.task.sampler.law=uniform",
]


def test_reduced_skd_recipe_runs_end_to_end(wordnet, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    sets = [a for s in REDUCED for a in ("--set", s)]
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir), *sets],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    team = Manifest.load(run_dir / "team")
    assert [m["name"] for m in team.extra["members"]] == ["l6", "l4", "l2"] and team.extra["cached"]
    assert [team.metrics[f"{n}_level"] for n in ("l6", "l4", "l2")] == [6 * 384, 4 * 384, 2 * 384]
    task = Manifest.load(run_dir / "task")
    assert task.metrics["teacher_train_examples"] == 0  # cached targets: no teacher forward while training
    assert sum(task.metrics[f"team_steps_{n}"] for n in ("l6", "l4", "l2")) == 4

