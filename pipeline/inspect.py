"""`distill status` and `distill verify`: what a run directory holds, and whether it is intact."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import registry
from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest, ManifestError


def _disk_usage(directory: Path) -> tuple[int, int]:
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return len(files), sum(p.stat().st_size for p in files)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def stage_rows(run_dir: Path) -> list[dict]:
    """One row per stage of the run: name, type, state (done/partial/missing), files, size, item counts."""
    run_dir = Path(run_dir)
    resolved = run_dir / "config.yaml"
    if not resolved.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml; start one with `distill run RECIPE`)")
    stages = (yaml.safe_load(resolved.read_text()) or {}).get("stages", {})
    rows = []
    for name, body in stages.items():
        stage_dir = run_dir / name
        row = {"stage": name, "type": (body or {}).get("stage", name), "state": "missing", "files": 0, "bytes": 0, "items": {}}
        if (stage_dir / MANIFEST).is_file():
            try:
                manifest = Manifest.load(stage_dir)
                totals = manifest.totals()
                row.update(state="done", files=totals.pop("files"), bytes=totals.pop("bytes"), items=totals)
            except ManifestError:
                row["state"] = "corrupt"
        elif stage_dir.is_dir():
            files, size = _disk_usage(stage_dir)
            row.update(state="partial" if files else "missing", files=files, bytes=size)
        rows.append(row)
    return rows


def sweep_variants(path: Path) -> list[Path] | None:
    """The variant run directories of a sweep directory (one holding `sweep.yaml`), or None for any other path."""
    from pipeline.sweep_table import PLAN

    plan = Path(path) / PLAN
    if not plan.is_file():
        return None
    names = (yaml.safe_load(plan.read_text()) or {}).get("variants") or {}
    return [Path(path) / "variants" / name for name in names if (Path(path) / "variants" / name).is_dir()]


def format_status(rows: list[dict], extra_columns: dict[str, dict[str, str]] | None = None) -> str:
    """A plain-text table of `stage_rows`, with optional extra columns keyed by stage name."""
    extra_columns = extra_columns or {}
    header = ["stage", "type", "state", "files", "size", "counts", *extra_columns]
    lines = [header]
    for r in rows:
        counts = ", ".join(f"{k}={v:,}" for k, v in r["items"].items())
        lines.append([r["stage"], r["type"], r["state"], str(r["files"]), _human(r["bytes"]), counts,
                      *[col.get(r["stage"], "") for col in extra_columns.values()]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def verify_path(path: Path) -> list[str]:
    """Re-hash everything under `path` (a stage dir, a manifest.json, a run dir or a sweep dir); return what was
    checked.

    Raises ManifestError naming the first bad file. Stage types with a `verify` hook check more (a cache's
    rows sorted and finite, say).
    """
    path = Path(path)
    if path.is_file() and path.name == MANIFEST:
        path = path.parent
    if (path / MANIFEST).is_file():
        stage_dirs = [path]
    elif (path / "config.yaml").is_file() or sweep_variants(path) is not None:
        # A sweep's stage directories are all in stages/; its variants only link to them.
        pattern = f"stages/*/{MANIFEST}" if sweep_variants(path) is not None else f"*/{MANIFEST}"
        stage_dirs = sorted(p.parent for p in path.glob(pattern))
        if not stage_dirs:
            raise ManifestError(f"{path}: no finished stage to verify (no */{MANIFEST})")
    else:
        raise ManifestError(f"{path}: no {MANIFEST} here (give a stage directory, its manifest, or a run directory)")
    checked = []
    for stage_dir in stage_dirs:
        manifest = Manifest.load(stage_dir)
        manifest.verify(stage_dir)
        try:
            hook = registry.get(manifest.stage).verify
        except ConfigError:
            hook = None
        if hook is not None:
            hook(manifest, stage_dir)
        checked.append(f"{stage_dir}: {len(manifest.outputs)} files ok")
    return checked
