"""One seam for every command that scores text with a trained classifier: `load(given) -> Classifier`, then
`classifier.predict(texts) -> probabilities` over `classifier.labels`.

`given` is a model folder, a stage or export directory (its manifest's `extra.model_dir`), `@stage` (with a
run directory), `runs:/ID[/path]` or `models:/NAME@ALIAS` / `models:/NAME/VERSION` (downloaded from the MLflow
store first). `locate` turns any of these into a local folder; the first entry of `LOADERS` whose `claims`
accepts the folder builds the Classifier. A new kind of model folder adds its own `Loader` at the front of
`LOADERS`, as the early-exit kind (publish/early_exit_classifier.py: a fastbert stage, `with_speed(S)`) does;
nothing else changes.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest


@dataclass
class Classifier:
    """A loaded sequence classifier: what it is called, its label names in output order, and its parts."""

    name: str
    """What the user gave (folder, @stage, runs:/ or models:/ URI)."""
    folder: Path
    """The local model folder it was loaded from."""
    labels: list[str]
    """Class names in output order (empty for a regression model: one real-valued output)."""
    model: Any
    """The torch module (what `latency` times; an early-exit model's is its early exit at its speed)."""
    tokenizer: Any
    max_length: int = 128
    batch_size: int = 64
    cost_follows_input: bool = False
    """Whether a forward's cost depends on what the text says (early exit): then latency is timed on data rows."""

    def predict(self, texts: list[str] | list[tuple[str, ...]]) -> np.ndarray:
        """Class probabilities [N, C] (softmax of the logits), or the raw output [N, 1] of a regression model;
        a text is a string or a (sentence, sentence) pair."""
        import torch

        from formats.taskdata import encode, predict

        texts = [(t,) if isinstance(t, str) else tuple(t) for t in texts]
        ids, types = encode(self.tokenizer, texts, self.max_length)
        logits = predict(self.model, ids, types, self.tokenizer.pad_token_id, self.batch_size)
        return logits if not self.labels else torch.softmax(torch.from_numpy(logits), dim=-1).numpy()

    def predict_report(self, texts: list[str] | list[tuple[str, ...]]) -> tuple[np.ndarray, dict]:
        """`predict(texts)` and what else the kind of model says about how it got them, as result fields
        (nothing for a plain classifier; an early-exit model: the layers its rows exited at)."""
        return self.predict(texts), {}

    def with_speed(self, speed: float | None) -> None:
        """Predict at early-exit speed threshold `speed`: only an early-exit model can (None: nothing to do)."""
        if speed is not None:
            raise ConfigError(f"{self.name}: --speed needs an early-exit model (a fastbert stage directory with its "
                              f"branches.json); {self.folder} has no branches")

    def latency(self, *, batch_size: int, seq_len: int, repeats: int, texts: list | None = None) -> dict:
        """CPU latency of one forward of `model` (`kd.latency.compare`, median of `repeats`): on random ids of
        `batch_size` x `seq_len`, or on the first `batch_size` of `texts` cut to at most `seq_len` tokens."""
        from formats.taskdata import encode, pad_batch
        from kd.latency import compare

        batch = None
        if texts:
            ids, types = encode(self.tokenizer, [(t,) if isinstance(t, str) else tuple(t) for t in texts[:batch_size]],
                                seq_len)
            batch = pad_batch(ids, types, self.tokenizer.pad_token_id)
        measured = compare({"model": self.model}, vocab_size=self.tokenizer.vocab_size, batch_size=batch_size,
                           seq_len=seq_len, repeats=repeats, batch=batch)["model"]
        return {**measured, "device": "cpu", "batch_size": batch_size if batch is None else len(batch["input_ids"]),
                "seq_len": seq_len, "input": "random ids" if batch is None else "data rows"}

    def parameters(self) -> int:
        """Parameters of the model (embeddings included)."""
        from kd.latency import parameter_count

        return parameter_count(self.model)


@dataclass(frozen=True)
class Loader:
    """A kind of model folder: `claims(folder)` says whether it is one, `load(name, folder)` builds the Classifier."""

    kind: str
    claims: Callable[[Path], bool]
    load: Callable[[str, Path], Classifier]


def _is_hf_classifier(folder: Path) -> bool:
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, json.JSONDecodeError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _load_hf(name: str, folder: Path) -> Classifier:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from formats.mlmodel import read_labels

    hf_logging.disable_progress_bar()  # a command's output is its table or its one-line error, not load bars
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    labels = [] if model.config.num_labels == 1 else read_labels(folder)
    return Classifier(name, folder, labels, model, AutoTokenizer.from_pretrained(str(folder)))


EARLY_EXIT = "publish.early_exit_classifier"
"""The early-exit kind's module, named by a string like the registry's stages: it subclasses Classifier, so it
imports this module, and this one reaches it only when a folder is tried."""


def _is_early_exit(folder: Path) -> bool:
    return importlib.import_module(EARLY_EXIT).claims(folder)


def _load_early_exit(name: str, folder: Path) -> Classifier:
    return importlib.import_module(EARLY_EXIT).load(name, folder)


LOADERS: list[Loader] = [Loader("fastbert-early-exit", _is_early_exit, _load_early_exit),
                         Loader("hf-sequence-classifier", _is_hf_classifier, _load_hf)]
"""Kinds of model folder, tried in order; the first that claims a folder loads it."""


@contextlib.contextmanager
def mlflow_uris(uri: str) -> Iterator[None]:
    """MLflow's global tracking and registry URIs set to `uri` for the block, then restored with the environment.

    MLflow resolves `models:/` through its global URIs (and copies them into os.environ); leaving them set would
    send the caller's later runs into this store."""
    import mlflow

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    had_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(had_uri)
        mlflow.set_registry_uri(None)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _first_line(err: Exception) -> str:
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:300]


def _download(given: str, store_uri: str, into: Path) -> Path:
    """The model folder behind a runs:/ or models:/ URI, downloaded from the store into `into`."""
    import mlflow

    from publish.predict import model_uri

    with mlflow_uris(store_uri):
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri(given), dst_path=str(into)))
        except Exception as err:  # noqa: BLE001 - MLflow raises many types; the first line says what is wrong
            raise ConfigError(f"{given}: MLflow could not find it in {store_uri} ({_first_line(err)})") from None


def locate(given: str, *, run_dir: Path | None = None, store_uri: str | None = None,
           workdir: Path | None = None) -> Path:
    """The local model folder `given` names (downloading runs:/ and models:/ into `workdir`)."""
    if given.startswith(("runs:/", "models:/")):
        if store_uri is None or workdir is None:
            raise ConfigError(f"{given}: an MLflow URI needs a store (--tracking-uri or --run-dir)")
        return _download(given, store_uri, workdir)
    if given.startswith("@"):
        if run_dir is None:
            raise ConfigError(f"{given}: a stage reference needs --run-dir RUN_DIR")
        folder = Path(run_dir) / given[1:].strip("/")
        if not (folder / MANIFEST).is_file():
            raise ConfigError(f"{given}: no finished stage {folder} (run it first, or check --run-dir)")
    else:
        folder = Path(given)
    if (folder / MANIFEST).is_file() and not (folder / "config.json").is_file():
        model_dir = Manifest.load(folder).extra.get("model_dir")
        if not model_dir:
            raise ConfigError(f"{given}: its manifest names no model folder (extra.model_dir)")
        folder = folder / model_dir
    if not folder.is_dir():
        raise ConfigError(f"{given}: model folder not found")
    return folder


def load(given: str, *, run_dir: Path | None = None, store_uri: str | None = None,
         workdir: Path | None = None) -> Classifier:
    """The Classifier behind `given` (see the module docstring); one-line ConfigError when it is none."""
    folder = locate(given, run_dir=run_dir, store_uri=store_uri, workdir=workdir)
    for loader in LOADERS:
        if loader.claims(folder):
            return loader.load(given, folder)
    kinds = ", ".join(loader.kind for loader in LOADERS)
    raise ConfigError(f"{given}: {folder} is not a sequence classifier folder (known kinds: {kinds})")
