"""`distill export`: turn a complete training checkpoint into a model folder (and MLflow Model) with a manifest.

The output directory looks like a finished stage: `manifest.json` (stage `export`, the checkpoint's eval
metrics and step, the source stage's inputs for lineage) and `model/`. So `distill register`, `distill
predict` and a recipe's `model:` field take it as they take a stage directory, and promotion gates read
the metrics the checkpoint was saved with.

From a finished `dynabert` stage, `--width W --depth D` exports one sub-network instead of a checkpoint: the
adaptive model cut to that width and depth (`kd.dynabert.cut`), with the scores its grid row reports.
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


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: exists and is not empty; choose a new folder or remove it")


def _publish(tmp: Path, out: Path, manifest: Manifest) -> None:
    """Write the manifest last into `tmp`, then move it to `out`: the folder appears complete or not at all."""
    manifest.write(tmp)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)


def _grid_row(stage_dir: Path, report: str, width: float, depth: float) -> dict:
    rows = json.loads((stage_dir / report).read_text())["rows"]
    for row in rows:
        if row["width"] == width and row["depth"] == depth:
            return row
    have = ", ".join(f"{r['width']:g}/{r['depth']:g}" for r in rows)
    raise ConfigError(f"{stage_dir}: no sub-network --width {width:g} --depth {depth:g} in its grid (width/depth: {have})")


def export_subnetwork(stage_dir: Path, width: float, depth: float, out: Path) -> Manifest:
    """Write `out/` (manifest.json + model/): the (width, depth) sub-network of a finished `dynabert` stage as a
    plain Hugging Face BERT (FFN neurons and layers cut into smaller matrices, see `kd.importance` for heads),
    with that grid row's scores as its metrics."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd.dynabert import cut

    stage_dir, out = Path(stage_dir), Path(out)
    _check_out(out)
    source = Manifest.load(stage_dir)
    if source.extra.get("adaptive") != "dynabert":
        raise ConfigError(f"{stage_dir}: a {source.stage} stage; --width/--depth cut sub-networks of a finished "
                          "dynabert stage (use --checkpoint for other stages)")
    source.verify(stage_dir)
    row = _grid_row(stage_dir, source.extra["report"], width, depth)
    folder = stage_dir / source.extra["model_dir"]
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    small = cut(model, width, depth)
    metrics = {"width": width, "depth": depth, "params": row["params"], "export_params": row["export_params"],
               **{f"dev_{k}": v for k, v in row["dev"].items()}, **{f"test_{k}": v for k, v in row["test"].items()}}
    labels = source.extra.get("label_names") or None
    inputs = {"model": (str(stage_dir), stage_dir)}
    card = models.describe(stage_dir, _upstream(stage_dir), metrics,
                           f"{stage_dir.parent.name}/{stage_dir.name} at width {width:g}, depth {depth:g}")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    outputs = models.save_model(small, AutoTokenizer.from_pretrained(str(folder)), tmp, labels=labels, card=card)
    config = {"stage_dir": str(stage_dir.resolve()), "width": width, "depth": depth}
    manifest = Manifest(
        stage=STAGE, name=f"{stage_dir.name}@w{width:g}_d{depth:g}", config_hash=config_hash(config), config=config,
        version=__version__, git_commit=git_commit(),
        inputs=[InputRef(name=k, ref=ref, path=str(p.resolve()), sha256=manifest_sha256(p)) for k, (ref, p) in inputs.items()],
        outputs=outputs, metrics=metrics,
        extra={"model_dir": models.MODEL_DIR, "source": str(stage_dir.resolve()), "label_names": labels,
               "width": width, "depth": depth}, started=now(), finished=now())
    _publish(tmp, out, manifest)
    return manifest


def export(stage_dir: Path, step: str, out: Path) -> Manifest:
    """Write `out/` (manifest.json + model/) from checkpoint `step` of `stage_dir`; return the manifest."""
    stage_dir, out = Path(stage_dir), Path(out)
    _check_out(out)
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
    _publish(tmp, out, manifest)
    return manifest
