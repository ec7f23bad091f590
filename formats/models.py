"""Model folders: what a model-producing stage hands the next one.

A model folder is a Hugging Face folder (config.json, safetensors weights, tokenizer files) inside a stage
directory; the stage's manifest names it in `extra.model_dir`. A config names a model role with two fields,
exactly one of them set: `<role>` (an upstream stage, e.g. "@teacher_adapt") or `<role>_path` (a local or
`pkg:` folder). This module is the one place that saves such a folder, finds an upstream one and hashes its
weights, so `teacher_sha256` means the same in every manifest.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.assets import resolve_asset
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, sha256_file

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


def save_model(model: Any, tokenizer: Any, stage_dir: Path, rel: str = MODEL_DIR) -> list[OutputFile]:
    """`save_pretrained` (safetensors) and the tokenizer into `stage_dir/rel`; return its manifest entries.

    Written to a temporary folder and renamed, so the folder appears complete or not at all.
    """
    final, tmp = Path(stage_dir) / rel, Path(stage_dir) / f".tmp-{rel}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return model_outputs(stage_dir, rel)


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
