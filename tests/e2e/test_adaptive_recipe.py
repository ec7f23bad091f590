"""The shipped adaptive recipe's DynaBERT path, reduced with --set, end to end: real WordNet, the real MiniLM
teacher fine-tuned for two steps, augmentation, one step of each DynaBERT phase, the grid report and an
exported sub-network that plain transformers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from tests.conftest import REPO
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "adaptive.yaml"
STAGES = "wordnet,teacher_finetune,augment,dynabert"
REDUCED = [
    "tracking.enabled=false",
    "stages.wordnet.max_train=40", "stages.wordnet.max_dev=16",
    "stages.teacher_finetune.max_steps=2", "stages.teacher_finetune.batch_size=8",
    "stages.augment.n_aug=1", "stages.augment.top_k=2", "stages.augment.data.max_length=24",
    "stages.teacher_finetune.data.max_length=24", "stages.dynabert.data.max_length=24",
    "stages.dynabert.widths=[0.5, 1.0]", "stages.dynabert.depths=[0.5, 1.0]", "stages.dynabert.max_steps=1",
    "stages.dynabert.batch_size=8", "stages.dynabert.importance_batches=1", "stages.dynabert.latency_repeats=1",
    "stages.dynabert.latency_batch_size=2", "stages.dynabert.latency_seq_len=8", "stages.dynabert.device=cpu",
]


def test_reduced_adaptive_recipe_runs_and_exports(wordnet, tmp_path):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    from pipeline.cli import main

    run_dir = tmp_path / "run"
    sets = [a for s in REDUCED for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(RECIPE), "--run-dir", str(run_dir),
                           "--stages", STAGES, *sets], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((run_dir / "dynabert/report.json").read_text())
    assert len(report["rows"]) == 4 and report["test_examples"] == 4  # 10% of 40 glosses held out
    assert report["train_examples"] > 36  # augmented variants of the 36 kept glosses
    out = tmp_path / "export"
    assert main(["export", str(run_dir / "dynabert"), "--width", "0.5", "--depth", "0.5", "--out", str(out)]) == 0
    small = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert small.config.num_hidden_layers == 3 and small.config.intermediate_size == 768  # MiniLM: 6 layers, 1536
    assert small.config.num_labels == len(json.loads((run_dir / "dynabert/manifest.json").read_text())["extra"]["label_names"])
    assert torch.isfinite(small(input_ids=torch.tensor([[101, 2000, 102]])).logits).all()
