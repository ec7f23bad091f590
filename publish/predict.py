"""`distill predict`: labels and scores for lines of text, through the MLflow Model a server would load.

MODEL_URI is a model folder, a stage or export directory (its manifest's `extra.model_dir`), `runs:/ID[/path]`
(`/model` when no path is given) or `models:/NAME@ALIAS` / `models:/NAME/VERSION`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest

BATCH = 64
"""Lines per call to the model."""


def model_uri(given: str) -> str:
    """The MLflow model URI (or local MLflow Model folder) that `given` names."""
    if given.startswith("models:/"):
        return given
    if given.startswith("runs:/"):
        run_id, _, sub = given[len("runs:/"):].partition("/")
        return f"runs:/{run_id}/{sub.strip('/') or 'model'}"
    folder = Path(given)
    if (folder / "MLmodel").is_file():
        return str(folder)
    if (folder / MANIFEST).is_file():
        model_dir = Manifest.load(folder).extra.get("model_dir")
        if model_dir and (folder / model_dir / "MLmodel").is_file():
            return str(folder / model_dir)
    raise ConfigError(f"{given}: not an MLflow Model folder, a stage directory with one, runs:/ or models:/")


def load(given: str):
    """The pyfunc model behind `given`; one-line ConfigError when MLflow cannot load it."""
    import mlflow

    uri = model_uri(given)
    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types; the first line says what is wrong
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{given}: MLflow could not load it ({first[:300]})") from None


def rows(model, lines: Iterable[str]) -> Iterator[dict]:
    """One dict per non-empty line: the text and what the model returns for it (label and score for a classifier)."""
    texts = [line.rstrip("\n") for line in lines if line.strip()]
    for start in range(0, len(texts), BATCH):
        chunk = texts[start:start + BATCH]
        out = model.predict(chunk)
        records = out.to_dict("records") if hasattr(out, "to_dict") else list(out)
        for text, record in zip(chunk, records):
            yield {"text": text, **(record if isinstance(record, dict) else {"output": record})}


def early_exit_rows(model, lines: Iterable[str]) -> Iterator[dict]:
    """Like `rows`, through a loaded early-exit Classifier (`publish.classifier.load(...).with_speed(S)`): the text,
    label, score (softmax probability of the label) and the layer it exited at."""
    texts = [line.rstrip("\n") for line in lines if line.strip()]
    for start in range(0, len(texts), BATCH):
        chunk = texts[start:start + BATCH]
        probs, layers = model.predict_exits(chunk)
        for text, p, layer in zip(chunk, probs, layers):
            best = int(p.argmax())
            yield {"text": text, "label": model.labels[best], "score": float(p[best]), "exit_layer": int(layer)}


def dumps(row: dict) -> str:
    """A row as one JSON line (numpy numbers as plain ones)."""
    return json.dumps(row, default=lambda v: v.item() if hasattr(v, "item") else str(v))
