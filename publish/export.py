"""`distill export`: turn a complete training checkpoint into a model folder (and MLflow Model) with a manifest.

The output directory looks like a finished stage: `manifest.json` (stage `export`, the checkpoint's eval
metrics and step, the source stage's inputs for lineage) and `model/`. So `distill register`, `distill
predict` and a recipe's `model:` field take it as they take a stage directory, and promotion gates read
the metrics the checkpoint was saved with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from formats import models
from pipeline import __version__
from pipeline.config import ConfigError, config_hash
from pipeline.context import now
from pipeline.manifest import MANIFEST, InputRef, Manifest, manifest_sha256
from pipeline.provenance import git_commit
from pipeline.train import checkpoint

STAGE = "export"
"""The `stage` an export's manifest names."""


def find_checkpoint(stage_dir: Path, name: str) -> Path:
    """`stage_dir/<root>/<name>` for the checkpoint root that has a model template; ConfigError naming what exists."""
    roots = sorted(p.parent for p in Path(stage_dir).glob(f"*/{models.TEMPLATE}") if p.is_dir())
    if not roots:
        raise ConfigError(f"{stage_dir}: no checkpoints with a {models.TEMPLATE}/ (only stages that train with "
                          "checkpoints, general and task, can be exported; rerun one with this version)")
    for root in roots:
        found = {f"step-{n}": (path, done) for n, path, done in checkpoint.steps(root)}
        if name in found:
            path, done = found[name]
            if not done:
                raise ConfigError(f"{path}: incomplete checkpoint (no {checkpoint.META}); pick a complete one")
            return path
    have = [f"step-{n}" for root in roots for n, _, done in checkpoint.steps(root) if done]
    raise ConfigError(f"{stage_dir}: no checkpoint {name} (complete: {', '.join(have) or 'none'})")


def _upstream(stage_dir: Path) -> dict[str, tuple[str, Path]]:
    """The source stage's finished `@stage` inputs (from its config.yaml): the export's lineage."""
    config_file = stage_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    found = {}
    for key, value in (config or {}).items():
        if isinstance(value, str) and value.startswith("@") and (stage_dir.parent / value[1:] / MANIFEST).is_file():
            found[key] = (value, stage_dir.parent / value[1:])
    return found


def export(stage_dir: Path, step: str, out: Path) -> Manifest:
    """Write `out/` (manifest.json + model/) from checkpoint `step` of `stage_dir`; return the manifest."""
    stage_dir, out = Path(stage_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder or remove it")
    folder = find_checkpoint(stage_dir, step)
    meta = json.loads((folder / checkpoint.META).read_text())
    checkpoint.verify_files(folder, meta.get("files"))
    weights = folder / "engine" / "model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{folder}: saved by engine {meta.get('backend')}; export reads engine: torch checkpoints "
                          "(consolidate a DeepSpeed one with its zero_to_fp32.py first)")
    model, tokenizer, labels = models.load_from_template(folder.parent / models.TEMPLATE, weights)
    metrics = {"step": int(meta["step"]), **(meta.get("metrics") or {})}
    inputs = _upstream(stage_dir)
    card = models.describe(stage_dir, inputs, metrics, f"{stage_dir.parent.name}/{stage_dir.name} at {step}")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    outputs = models.save_model(model, tokenizer, tmp, labels=labels or None, card=card)
    config = {"stage_dir": str(stage_dir.resolve()), "checkpoint": step}
    manifest = Manifest(
        stage=STAGE, name=f"{stage_dir.name}@{step}", config_hash=config_hash(config), config=config,
        version=__version__, git_commit=git_commit(),
        inputs=[InputRef(name=k, ref=ref, path=str(p.resolve()), sha256=manifest_sha256(p))
                for k, (ref, p) in inputs.items()],
        outputs=outputs, metrics=metrics,
        extra={"model_dir": models.MODEL_DIR, "checkpoint": str(folder.resolve()), "label_names": labels},
        started=now(), finished=now())
    manifest.write(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return manifest
