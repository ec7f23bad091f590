"""Model folders as MLflow Models: pinned requirements, deterministic files, the card, checkpoint lookup, URIs."""

from __future__ import annotations

import json

import pytest
import torch

from formats import mlmodel, models
from pipeline.config import ConfigError
from publish.export import find_checkpoint
from publish.predict import model_uri

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "the", "was"]


def tiny_classifier(labels: int = 2):
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertTokenizerFast,
    )

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(WORDS), hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=16, num_labels=labels))
    return model, BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})


def test_requirements_are_plain_pypi_pins():
    from importlib.metadata import version

    pins = dict(line.split("==") for line in mlmodel.requirements())
    assert set(pins) == set(mlmodel.PINNED)
    assert all("+" not in v for v in pins.values())  # no +cpu / +cu121 local builds
    assert pins["torch"] == version("torch").split("+")[0]


def test_saved_folder_is_a_deterministic_mlflow_model_with_labels(tmp_path):
    import mlflow

    model, tokenizer = tiny_classifier()
    card = mlmodel.ModelCard(title="run/task (task)", metrics={"speedup": 3.0, "teacher_latency_ms": 9.0,
                                                                "student_latency_ms": 3.0, "dev_accuracy": 0.75},
                             lineage=[{"name": "task", "stage": "task", "manifest_sha256": "ab" * 32, "run_id": "r1"}])
    first = models.save_model(model, tokenizer, tmp_path / "a", labels=["neg", "pos"], examples=["good film"], card=card)
    second = models.save_model(model, tokenizer, tmp_path / "b", labels=["neg", "pos"], examples=["good film"], card=card)
    assert [(o.path, o.sha256) for o in first] == [(o.path, o.sha256) for o in second]
    folder = tmp_path / "a" / "model"
    assert {"MLmodel", "config.json", "model.safetensors", "README.md", "requirements.txt"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model").exists() and not list(tmp_path.glob("a/.tmp-*"))  # one copy of the weights
    assert mlmodel.read_labels(folder) == ["neg", "pos"]
    assert set(mlflow.pyfunc.load_model(str(folder)).predict(["good film", "bad"])["label"]) <= {"neg", "pos"}
    text = (folder / "README.md").read_text()
    assert "3.00x faster than its teacher on CPU (9.00 ms -> 3.00 ms" in text and "Labels, in logit order: `neg`, `pos`" in text
    assert "| dev_accuracy | 0.75 |" in text and "`task` (task), manifest sha256 `abababababab`, MLflow run `r1`" in text
    with pytest.raises(ValueError, match="3 label names for a model with 2 outputs"):
        models.save_model(model, tokenizer, tmp_path / "c", labels=["a", "b", "c"])


def test_checkpoint_lookup_names_what_exists(tmp_path):
    stage = tmp_path / "task"
    with pytest.raises(ConfigError, match="no checkpoints with a model-template"):
        find_checkpoint(stage, "step-2")
    root = stage / "ckpt"
    (root / models.TEMPLATE).mkdir(parents=True)
    (root / "step-2").mkdir()
    (root / "step-2" / "meta.json").write_text(json.dumps({"step": 2}))
    (root / "step-4").mkdir()
    assert find_checkpoint(stage, "step-2") == root / "step-2"
    with pytest.raises(ConfigError, match="step-4: incomplete checkpoint"):
        find_checkpoint(stage, "step-4")
    with pytest.raises(ConfigError, match=r"no checkpoint step-9 \(complete: step-2\)"):
        find_checkpoint(stage, "step-9")


def test_model_uris(tmp_path):
    assert model_uri("runs:/abc") == "runs:/abc/model" and model_uri("runs:/abc/teacher/") == "runs:/abc/teacher"
    assert model_uri("models:/m@champion") == "models:/m@champion"
    with pytest.raises(ConfigError, match="not an MLflow Model folder"):
        model_uri(str(tmp_path))
