"""Model folders: what a model-producing stage hands the next one.

A model folder is a Hugging Face folder (config.json, safetensors weights, tokenizer files) inside a stage
directory; the stage's manifest names it in `extra.model_dir`. A config names a model role with two fields,
exactly one of them set: `<role>` (an upstream stage, e.g. "@teacher_adapt") or `<role>_path` (a local or
`pkg:` folder). This module is the one place that saves such a folder, finds an upstream one and hashes its
weights, so `teacher_sha256` means the same in every manifest.

Every saved folder is also an MLflow Model (formats/mlmodel.py): a classifier as a text-classification
pipeline with its label names, an MLM as fill-mask, with a model card (README.md). A training stage also
leaves a checkpoint template (`<checkpoints>/model-template/`: config, tokenizer, label names), so any
complete `step-N/` checkpoint can later be exported to such a folder (`distill export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from formats import mlmodel
from formats.mlmodel import ModelCard
from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, sha256_file
from pipeline.tracking.lineage import lineage_chain

MODEL_DIR = "model"
"""Where a stage keeps its model folder, relative to the stage directory (the manifest's `extra.model_dir`)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def check_model_fields(ref: str | None, path: str | None, role: str = "teacher") -> None:
    """ValueError unless exactly one of `<role>` (upstream stage) and `<role>_path` (folder) is set."""
    if (ref is None) == (path is None):
        raise ValueError(f"set exactly one of {role} (an upstream stage, e.g. \"@teacher_adapt\") "
                         f"and {role}_path (a local or pkg: folder)")


def model_outputs(stage_dir: Path, rel: str = MODEL_DIR) -> list[OutputFile]:
    """The manifest entries of the model folder `stage_dir/rel`."""
    folder = Path(stage_dir) / rel
    return [OutputFile.of(stage_dir, p.relative_to(stage_dir)) for p in sorted(folder.rglob("*")) if p.is_file()]


def save_model(model: Any, tokenizer: Any, stage_dir: Path, rel: str = MODEL_DIR, *, task: str | None = None,
               labels: list[str] | None = None, examples: list[str] | None = None,
               card: ModelCard | None = None) -> list[OutputFile]:
    """Save `model` (safetensors) and its tokenizer into `stage_dir/rel` as a model folder that is also an
    MLflow Model; return its manifest entries.

    task      the pipeline it is served as (default: from the model class, see `mlmodel.task_of`)
    labels    a classifier's class names in logit order (written into config.json as id2label)
    examples  the input example (a few texts; default: two generic sentences)
    card      what README.md says (see `card`); default: a card with the stage directory's name only
    Written to a temporary folder and renamed, so the folder appears complete or not at all.
    """
    task = task or mlmodel.task_of(model)
    if task not in mlmodel.TASKS:
        raise ValueError(f"task {task!r}: expected one of {', '.join(mlmodel.TASKS)}")
    if labels:
        if len(labels) != model.config.num_labels:
            raise ValueError(f"{len(labels)} label names for a model with {model.config.num_labels} outputs")
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {name: i for i, name in enumerate(labels)}
    card = card or ModelCard(title=Path(stage_dir).name)
    card.task, card.labels = task, list(labels or [])
    final, tmp = Path(stage_dir) / rel, Path(stage_dir) / f".tmp-{rel}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    mlmodel.write(tmp, model, tokenizer, task=task, examples=examples, card=card)
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return model_outputs(stage_dir, rel)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def describe(stage_dir: Path, inputs: dict[str, tuple[str, Path]], metrics: dict[str, Any], title: str) -> ModelCard:
    """A model card from a stage directory (its config.yaml), its inputs (field -> (reference, folder)) and metrics."""
    import yaml

    config_file = Path(stage_dir) / "config.yaml"
    recipe = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    sources = [f"`{f}`: {ref} -> {path}" for f, (ref, path) in sorted(inputs.items()) if f != "data.source"]
    sources += [f"`{key}`: {value}" for key, value in sorted(recipe.items())
                if key.endswith("_path") and isinstance(value, str)]
    lineage, seen = [], set()
    for _, path in inputs.values():
        for link in lineage_chain(Path(path)):
            if link["path"] not in seen:
                seen.add(link["path"])
                lineage.append(link)
    return ModelCard(title=title, distilled_from=sources, recipe=recipe, metrics=dict(metrics), lineage=lineage)


def card(ctx: Any, metrics: dict[str, Any]) -> ModelCard:
    """The model card of the stage `ctx` runs, with the metrics it is about to record."""
    inputs = {name: (i.ref, i.path) for name, i in ctx.inputs.items()}
    return describe(ctx.stage_dir, inputs, metrics, f"{Path(ctx.run_dir).name}/{ctx.name} ({ctx.stage})")


TEMPLATE = "model-template"
"""Folder beside a stage's `step-N/` checkpoints: what turns a checkpoint's weights into a model folder."""


def save_template(root: Path, model: Any, tokenizer: Any, *, prefix: str = "student.",
                  labels: list[str] | None = None) -> Path:
    """Write `root/model-template/`: the model's config, the tokenizer and template.json (class, weight-key
    prefix inside the checkpoint, label names). Training stages call this once before their first checkpoint."""
    final, tmp = Path(root) / TEMPLATE, Path(root) / f".tmp-{TEMPLATE}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    spec = {"class": type(model).__name__, "prefix": prefix, "labels": list(labels or [])}
    (tmp / "template.json").write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    _fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def load_from_template(template: Path, weights: Path) -> tuple[Any, Any, list[str]]:
    """(model, tokenizer, labels) from a checkpoint template and a checkpoint's engine weights (safetensors)."""
    import torch
    import transformers
    from safetensors.torch import load_model

    try:
        spec = json.loads((Path(template) / "template.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{template}: unreadable checkpoint template ({err})") from None
    if not spec["class"].endswith(("ForSequenceClassification", "ForMaskedLM", "Model")):
        raise ConfigError(f"{template}/template.json: unsupported model class {spec['class']!r}")
    config = transformers.AutoConfig.from_pretrained(str(template))
    model = getattr(transformers, spec["class"])(config)
    # The engine saved the whole trainee (student + projections); the student sits under `prefix`. Loading
    # through a holder with that attribute lets safetensors resolve the tied embeddings it stored once.
    holder, prefix = torch.nn.Module(), spec["prefix"]
    holder.add_module(prefix.rstrip("."), model)
    missing, _ = load_model(holder, str(weights), strict=False)
    missing = sorted(k for k in missing if k.startswith(prefix))
    if missing:
        raise ConfigError(f"{weights}: the checkpoint lacks {missing[0]} ({len(missing)} missing) of a "
                          f"{spec['class']} built from {template}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(template))
    return model.eval(), tokenizer, spec["labels"]


def upstream_model(ctx: Any, ref: str | None, path: str | None, role: str = "teacher") -> Path:
    """The model folder of a role: input `role`'s `extra.model_dir` when `ref` is set, else the resolved path."""
    if ref:
        return ctx.input_dir(role) / ctx.input_manifest(role).extra.get("model_dir", MODEL_DIR)
    return resolve_asset(path)


def default_teacher_id(ref: str | None, path: str | None) -> str:
    """A readable id from the config: the upstream stage name, else the model folder's package or name."""
    if ref is not None:
        text = ref.lstrip("@").rstrip("/")
    elif path.startswith("pkg:"):
        text = path[4:].split("/")[0]
    else:
        text = Path(path).name
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "teacher"


def weights_sha256(folder: Path) -> str:
    """One sha256 over a model folder's weight files (name and content hash of each, sorted by name)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"{folder}: no weight files (*.safetensors) in the model folder")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return digest.hexdigest()
