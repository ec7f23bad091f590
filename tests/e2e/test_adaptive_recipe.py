"""The shipped adaptive recipe, reduced with --set, end to end on real WordNet and the real MiniLM teacher:
wordnet -> teacher_finetune -> augment -> fastbert and dynabert, with MLflow tracking on (its sqlite store in
the run directory); then `distill predict --speed` on what fastbert saved and `distill export --width --depth`
of a DynaBERT sub-network that plain transformers loads; both report on the wordnet stage's test.tsv, and a
teacher that held out another test split is refused."""

from __future__ import annotations

import json

import torch

from pipeline.cli import main
from pipeline.manifest import Manifest
from pipeline.tracking.lineage import RUN_ID_FILE
from tests.conftest import REPO
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

RECIPE = REPO / "configs" / "recipes" / "adaptive.yaml"
STAGES = ["wordnet", "teacher_finetune", "augment", "fastbert", "dynabert"]
REDUCED = [
    "stages.wordnet.max_train=40", "stages.wordnet.max_dev=16", "stages.wordnet.max_test=8",
    "stages.teacher_finetune.max_steps=2", "stages.teacher_finetune.batch_size=8",
    "stages.teacher_finetune.eval_every=2", "stages.teacher_finetune.data.max_length=24",
    "stages.augment.n_aug=1", "stages.augment.top_k=2", "stages.augment.data.max_length=24",
    "stages.fastbert.max_steps=3", "stages.fastbert.batch_size=16", "stages.fastbert.data.max_length=24",
    "stages.fastbert.speeds=[0.0, 0.5, 0.9]", "stages.fastbert.latency_examples=8",
    "stages.fastbert.latency_repeats=1",
    "stages.dynabert.data.max_length=24", "stages.dynabert.widths=[0.5, 1.0]", "stages.dynabert.depths=[0.5, 1.0]",
    "stages.dynabert.max_steps=1", "stages.dynabert.batch_size=8", "stages.dynabert.importance_batches=1",
    "stages.dynabert.latency_repeats=1", "stages.dynabert.latency_batch_size=2", "stages.dynabert.latency_seq_len=8",
    "stages.dynabert.device=cpu",
]


def _fastbert(run_dir, tmp_path, capsys):
    stage = run_dir / "fastbert"
    manifest = Manifest.load(stage)
    manifest.verify(stage)
    report = json.loads((stage / "report.json").read_text())
    s = report["summary"]
    assert s["layers"] == 6 and s["steps"] == 3 and s["test_examples"] == 8 and s["augmented_texts"] > 0
    assert s["train_texts"] == 40 + s["augmented_texts"] and s["test_split"] == "test split: the data.test file, 8 rows"
    assert manifest.extra["test_split"]["sha256"] == Manifest.load(run_dir / "augment").extra["test_split"]["sha256"]
    assert report["grid"][0]["test_accuracy"] == report["teacher"]["test_accuracy"]
    # the report went to the stage's MLflow run: the grid as metrics by step, the files as artifacts
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = (stage / RUN_ID_FILE).read_text().strip()
    assert sorted(m.step for m in client.get_metric_history(run_id, "grid/avg_layers")) == [0, 50, 90]
    assert client.get_run(run_id).data.metrics["speedup_at_max_drop"] == s["speedup_at_max_drop"]
    names = {a.path for a in client.list_artifacts(run_id, "report")}
    assert names == {"report/report.json", "report/report.md", "report/report.png"}
    lines = tmp_path / "lines.txt"
    lines.write_text("a small domesticated carnivorous mammal\n")
    capsys.readouterr()
    assert main(["predict", str(stage), str(lines), "--speed", "0.5"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 1 <= row["exit_layer"] <= 6 and row["label"] in manifest.extra["label_names"]


def _dynabert(run_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    report = json.loads((run_dir / "dynabert/report.json").read_text())
    assert len(report["rows"]) == 4 and report["test_examples"] == 8  # wordnet's test.tsv
    assert report["train_examples"] > 40  # augmented variants of the 40 training glosses
    out = tmp_path / "export"
    assert main(["export", str(run_dir / "dynabert"), "--width", "0.5", "--depth", "0.5", "--out", str(out)]) == 0
    small = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    assert small.config.num_hidden_layers == 3 and small.config.intermediate_size == 768  # MiniLM: 6 layers, 1536
    labels = json.loads((run_dir / "dynabert/manifest.json").read_text())["extra"]["label_names"]
    assert small.config.num_labels == len(labels)
    assert torch.isfinite(small(input_ids=torch.tensor([[101, 2000, 102]])).logits).all()


def test_reduced_adaptive_recipe_runs_end_to_end(wordnet, tmp_path, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    sets = [a for s in REDUCED for a in ("--set", s)]
    status = main(["run", str(RECIPE), "--run-dir", str(run_dir), "--stages", ",".join(STAGES), *sets])
    assert status == 0, capsys.readouterr().err[-3000:]
    _fastbert(run_dir, tmp_path, capsys)
    _dynabert(run_dir, tmp_path)
    # dynabert with the test split carved from train instead: the teacher and augment trained on those rows.
    status = main(["run", str(RECIPE), "--run-dir", str(run_dir), "--stages", "dynabert", *sets,
                   "--set", "stages.dynabert.data.test="])
    err = capsys.readouterr().err
    assert status == 2 and "held out a different test split" in err and "Traceback" not in err, err[-2000:]
