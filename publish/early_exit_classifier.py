"""The early-exit kind of `publish.classifier.Classifier`: a fastbert stage's classifier with its branches, every
prediction (and the latency measurement) through the batched early exit at one speed threshold S.

`publish.classifier.LOADERS` puts this kind first, so `distill eval FASTBERT_DIR DATA [--speed S]` and
`distill predict FASTBERT_DIR FILE --speed S` load it the one way; S defaults to the stage's `default_speed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from formats import early_exit as saved
from kd.early_exit import early_exit
from pipeline.config import ConfigError
from publish.classifier import Classifier

KIND = "fastbert-early-exit"


def claims(folder: Path) -> bool:
    """A fastbert stage directory or its model folder (branches.json there or beside it)."""
    return saved.folder_of(folder) is not None


class EarlyExitForward(torch.nn.Module):
    """The classifier and its branches as one module whose forward is the early exit at `speed`: what
    `kd.latency.compare` times (and what `parameters()` counts: backbone, head and branches)."""

    def __init__(self, model: saved.EarlyExitModel, speed: float):
        super().__init__()
        self.classifier, self.branches, self.speed = model.classifier, model.branches, speed
        self.exit_layers = torch.zeros(0)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """Logits [N, C] of one batch, each row from the layer it exited at (kept in `exit_layers`)."""
        logits, self.exit_layers = early_exit(self.classifier, self.branches, input_ids, attention_mask,
                                              token_type_ids, speed=self.speed)
        return logits


def check_speed(speed: float | None, given: str = "") -> float | None:
    """`speed` if it is a speed threshold (or None) for the model `given` names, else a one-line ConfigError:
    a registry URI holds the model folder only, not the branches beside it."""
    if speed is None:
        return None
    if not 0 <= speed <= 1:
        raise ConfigError(f"--speed {speed}: a speed threshold is in [0, 1] (0: the full model)")
    if given.startswith(("runs:/", "models:/")):
        raise ConfigError(f"{given}: --speed needs a fastbert stage directory (its branches.json), not a "
                          "registry URI")
    return speed


@dataclass
class EarlyExitClassifier(Classifier):
    """A Classifier that predicts through `formats.early_exit.EarlyExitModel` at speed threshold `speed`."""

    exits: saved.EarlyExitModel | None = None
    """The loaded classifier with its branches (`model` is the same at `speed`, as one module to time)."""
    speed: float = 0.0
    """The speed threshold every prediction and the latency use (0: the full model)."""

    def with_speed(self, speed: float | None) -> None:
        """Predict (and time) at speed threshold `speed` from now on; None keeps the current one."""
        if check_speed(speed, self.name) is not None:
            self.speed = self.model.speed = speed

    def predict_exits(self, texts: list[str] | list[tuple[str, ...]]) -> tuple[np.ndarray, np.ndarray]:
        """(class probabilities [N, C], exit layer [N], 1-based) at `speed`."""
        from formats.taskdata import encode

        ids, types = encode(self.tokenizer, [(t,) if isinstance(t, str) else tuple(t) for t in texts],
                            self.max_length)
        logits, layers = self.exits.predict(ids, types, self.speed, self.batch_size)
        return torch.from_numpy(logits).softmax(-1).numpy(), layers

    def predict(self, texts: list[str] | list[tuple[str, ...]]) -> np.ndarray:
        """Class probabilities [N, C] at `speed`."""
        return self.predict_exits(texts)[0]

    def latency(self, *, batch_size: int, seq_len: int, repeats: int, texts: list | None = None) -> dict:
        """The early exit's CPU latency at `speed` (see Classifier.latency), with the average layer the timed
        rows exited at (random ids rarely exit where text would: give `texts`)."""
        measured = super().latency(batch_size=batch_size, seq_len=seq_len, repeats=repeats, texts=texts)
        return {**measured, "avg_exit_layer": float(self.model.exit_layers.float().mean())}

    def predict_report(self, texts: list[str] | list[tuple[str, ...]]) -> tuple[np.ndarray, dict]:
        """Probabilities, and how far the rows went: `early_exit` = speed, layers, avg_exit_layer, exit_share
        (fraction exiting after each layer), layer_speedup (layers / avg_exit_layer)."""
        probs, layers = self.predict_exits(texts)
        count = self.exits.layers
        average = float(layers.mean()) if len(layers) else float(count)
        share = np.bincount(layers, minlength=count + 1)[1:] / max(len(layers), 1)
        return probs, {"early_exit": {"speed": self.speed, "layers": count, "avg_exit_layer": average,
                                      "exit_share": share.tolist(), "layer_speedup": count / average}}


def load(name: str, folder: Path) -> EarlyExitClassifier:
    """The early-exit Classifier saved in `folder` (a fastbert stage directory or its model folder), at the
    stage's default speed threshold; its input length is the one it was trained at."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a command's output is its table or its one-line error, not load bars
    model = saved.load(folder)
    return EarlyExitClassifier(name, Path(folder), model.labels, EarlyExitForward(model, model.default_speed),
                               model.tokenizer, model.max_length, cost_follows_input=True, exits=model,
                               speed=model.default_speed)
