"""Early-exit model folders: a fine-tuned classifier with its FastBERT branches, as the `fastbert` stage saves it.

    STAGE_DIR/
      model/                 the classifier, a plain model folder (formats/models.py: HF + MLflow Model)
      branches.safetensors   the branch weights (kd.early_exit.Branches' state dict)
      branches.json          the branch shape (kd.early_exit.BranchSpec), the model folder's name, the
                             default speed threshold (chosen on dev), the input length it was trained and
                             scored at, and the sha256 of the branch weights

The model folder alone is the full model (what `distill predict` serves without --speed, and what S = 0
gives); `load(folder)` puts the two halves back together for early exit at any speed threshold:

    model = early_exit.load(stage_dir)
    logits, exit_layers = model.predict(ids, types, speed=0.3)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from formats import models
from kd.early_exit import Branches, BranchSpec, check_backbone, early_exit
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_path, atomic_write_text, sha256_file

BRANCHES = "branches.safetensors"
"""Branch weights, beside the model folder."""
SPEC = "branches.json"
"""What the branches are and which model folder they belong to."""
FORMAT = "fastbert-branches/1"


def save(stage_dir: Path, classifier, branches: Branches, tokenizer, *, default_speed: float, max_length: int,
         labels: list[str], examples: list[str], card) -> list[OutputFile]:
    """Write the model folder, the branch weights and branches.json (last) into `stage_dir`; return the
    manifest entries."""
    from safetensors.torch import save_file

    stage_dir = Path(stage_dir)
    outputs = models.save_model(classifier, tokenizer, stage_dir, labels=labels, examples=examples, card=card)
    with atomic_path(stage_dir / BRANCHES) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in branches.state_dict().items()}, str(tmp))
    spec = {"format": FORMAT, "model_dir": models.MODEL_DIR, "branches": BRANCHES,
            "branches_sha256": sha256_file(stage_dir / BRANCHES), "default_speed": float(default_speed),
            "max_length": max_length, "spec": branches.spec.to_dict()}
    atomic_write_text(stage_dir / SPEC, json.dumps(spec, indent=2, sort_keys=True) + "\n")
    return outputs + [OutputFile.of(stage_dir, BRANCHES), OutputFile.of(stage_dir, SPEC)]


def folder_of(given: Path) -> Path | None:
    """The early-exit folder `given` names (it, or the parent of its model folder), or None."""
    given = Path(given)
    for candidate in (given, given.parent):
        if (candidate / SPEC).is_file():
            return candidate
    return None


def read_spec(folder: Path) -> dict:
    """branches.json, checked: its format, and the branch weights it names hash to what it recorded."""
    path = Path(folder) / SPEC
    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: unreadable early-exit description ({err}); rerun the fastbert stage") from None
    if spec.get("format") != FORMAT:
        raise ConfigError(f"{path}: format {spec.get('format')!r}, expected {FORMAT!r}")
    weights = Path(folder) / spec["branches"]
    if not weights.is_file() or sha256_file(weights) != spec["branches_sha256"]:
        raise ConfigError(f"{weights}: missing or not the branch weights {path.name} names; rerun the fastbert stage")
    return spec


class EarlyExitModel:
    """A classifier with its branches, in eval mode on the CPU (or where `to` puts it)."""

    def __init__(self, classifier, branches: Branches, tokenizer, default_speed: float, max_length: int):
        self.classifier, self.branches, self.tokenizer = classifier.eval(), branches.eval(), tokenizer
        self.default_speed, self.max_length = default_speed, max_length
        self.labels = [classifier.config.id2label[i] for i in range(classifier.config.num_labels)]

    @property
    def layers(self) -> int:
        """Backbone layers (what the full model runs)."""
        return self.classifier.config.num_hidden_layers

    def to(self, device) -> "EarlyExitModel":
        """Move both halves to `device`."""
        self.classifier.to(device)
        self.branches.to(device)
        return self

    @torch.no_grad()
    def predict(self, ids: list[list[int]], types: list[list[int]], speed: float | None = None,
                batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """(logits [N, C], exit layer [N], 1-based) for encoded examples, in order, under speed threshold
        `speed` (None: the default chosen on dev). Batches are length-sorted, so they pad little."""
        from formats.taskdata import pad_batch

        speed = self.default_speed if speed is None else speed
        device = next(self.classifier.parameters()).device
        order = np.argsort([len(x) for x in ids], kind="stable")
        logits, layers = [], []
        for start in range(0, len(ids), batch_size):
            pick = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in pad_batch([ids[i] for i in pick], [types[i] for i in pick],
                                                           self.tokenizer.pad_token_id).items()}
            out, exits = early_exit(self.classifier, self.branches, batch["input_ids"], batch["attention_mask"],
                                    batch["token_type_ids"], speed=speed)
            logits.append(out.float().cpu())
            layers.append(exits.cpu())
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), np.zeros(0, np.int64)
        result, exit_layers = np.empty((len(ids), len(self.labels)), np.float32), np.empty(len(ids), np.int64)
        result[order], exit_layers[order] = torch.cat(logits).numpy(), torch.cat(layers).numpy()
        return result, exit_layers


def load(folder: Path) -> EarlyExitModel:
    """The early-exit model saved in `folder` (a fastbert stage directory, or its model folder)."""
    from safetensors.torch import load_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    found = folder_of(folder)
    if found is None:
        raise ConfigError(f"{folder}: no {SPEC} here or beside it; --speed needs a fastbert stage directory")
    spec = read_spec(found)
    model_dir = found / spec["model_dir"]
    try:
        classifier = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{model_dir}: cannot load the classifier ({str(err).splitlines()[0]})") from None
    try:
        check_backbone(classifier)
    except ValueError as err:
        raise ConfigError(f"{model_dir}: {err}") from None
    branches = Branches(BranchSpec(**spec["spec"]))
    if branches.spec.layers != classifier.config.num_hidden_layers:
        raise ConfigError(f"{found / SPEC}: branches for {branches.spec.layers} layers, the classifier has "
                          f"{classifier.config.num_hidden_layers}")
    load_model(branches, str(found / spec["branches"]), strict=True)
    return EarlyExitModel(classifier, branches, AutoTokenizer.from_pretrained(str(model_dir)), spec["default_speed"],
                          spec["max_length"])
