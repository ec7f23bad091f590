"""Resolve references to upstream outputs: `@stage` in this run, `runs:/...`, `models:/...`, or a path."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST


def resolve_ref(ref: str, run_dir: Path, tracking=None) -> Path:
    """The directory (holding a manifest.json) that `ref` names.

    `@name` is stage `name` of this run; `runs:/` and `models:/` URIs are fetched through MLflow; anything
    else is a filesystem path (relative to the working directory).
    """
    if ref.startswith("@"):
        path = Path(run_dir) / ref[1:]
    elif ref.startswith(("runs:/", "models:/")):
        from pipeline.tracking.lineage import resolve_mlflow_uri

        path = resolve_mlflow_uri(ref, tracking, run_dir)
    else:
        path = Path(ref).expanduser()
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if not (path / MANIFEST).is_file():
        hint = f"run stage {ref[1:]!r} first" if ref.startswith("@") else "point it at a finished stage's output directory"
        raise ConfigError(f"input {ref!r}: {path} has no {MANIFEST} ({hint})")
    return path
