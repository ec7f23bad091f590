"""The shipped configs/recipes/prune.yaml end to end, reduced with --set: real WordNet, a tiny encoder in place
of MiniLM, two steps per round; every stage done, the pruned models registered from their plain folders, scored
on the wordnet stage's test.tsv; a model that held out another test split is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.manifest import Manifest
from tests.conftest import REPO
from tests.e2e.test_task_pipeline import tiny_encoder
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "prune.yaml"
PRUNE = ("prune_50", "prune_90", "prune_heads")


def reduced(teacher) -> list[str]:
    sets = ["stages.wordnet.max_train=60", "stages.wordnet.max_dev=40", "stages.wordnet.max_test=20",
            f"stages.teacher_finetune.teacher_path={teacher}", "stages.teacher_finetune.max_steps=2",
            "stages.teacher_finetune.batch_size=16", "stages.teacher_finetune.eval_every=2", "run.name=prune-tiny"]
    for stage in PRUNE:
        sets += [f"stages.{stage}.{key}" for key in ("max_steps=2", "batch_size=8", "latency_repeats=1",
                                                     "latency_batch_size=2", "latency_seq_len=8", "importance_batches=1")]
    return [arg for s in sets for arg in ("--set", s)]


def test_reduced_prune_recipe_runs_and_registers(wordnet, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir),
                           *reduced(tiny_encoder(tmp_path / "teacher", layers=2))],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for stage in PRUNE:
        manifest = Manifest.load(run_dir / stage)
        report = json.loads((run_dir / stage / "report.json").read_text())
        assert report["summary"]["test_split"] == "test split: the data.test file, 20 rows"
        assert report["summary"]["test_examples"] == 20 and report["summary"]["dev_examples"] == 40
        assert manifest.extra["test_split"]["sha256"] == \
            Manifest.load(run_dir / "teacher_finetune").extra["test_split"]["sha256"]
        assert abs(manifest.metrics["sparsity"] - manifest.config["sparsity"]) < 0.02, stage
    assert len(json.loads((run_dir / "prune_90/report.json").read_text())["rounds"]) == 3
    registered = json.loads((run_dir / "register/registered.json").read_text())
    assert registered["name"] == "demo-pruned" and registered["version"] == "1"
    # prune_50 with the test split carved from train instead: teacher_finetune trained on those rows.
    carved = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir),
                             "--stages", "prune_50", *reduced(tmp_path / "teacher"),
                             "--set", "stages.prune_50.data.test="],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=600)
    assert carved.returncode == 2 and "held out a different test split" in carved.stderr, carved.stderr[-3000:]
    assert "Traceback" not in carved.stderr
