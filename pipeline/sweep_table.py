"""What a sweep writes beside its stages: the plan (`sweep.yaml`, first) and the comparison (per variant its
varied values, student and teacher score, retention, speed-up and size) as `sweep.md`, `sweep.json` and
`sweep.png` (retention vs speed-up).

Scores come from the manifest metrics of the variant's scoring stage (`--score-stage`, else the last stage run
that reports `student_test_score` or `student_dev_score`). The test score is used when every variant has one;
otherwise every variant is compared on dev and the table says so, because dev also chose the checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.config import dump_yaml
from pipeline.manifest import MANIFEST, Manifest, atomic_write_text
from pipeline.tracking.plots import retention_vs_speedup

PLAN = "sweep.yaml"
"""The sweep's plan: recipe, --set, --vary, each variant's values and stage directories."""
OUTPUTS = ("sweep.md", "sweep.json", "sweep.png")
"""What a finished sweep leaves beside its plan."""
DEV_NOTE = ("dev split: not every variant's stage reports student_test_score, so all are compared on dev, which "
            "also picked their checkpoints (optimistic)")


def describe(sweep_dir: Path, variants: list, names: list[str]) -> str:
    """What a sweep would run: each variant's values, and how many stage runs it takes (shared ones once)."""
    runs = {v.keys[n] for v in variants for n in names}
    done = {k for k in runs if (Path(sweep_dir) / "stages" / k / MANIFEST).is_file()}
    per_stage = ", ".join(f"{n} {len({v.keys[n] for v in variants})}" for n in names)
    lines = [f"sweep {sweep_dir}: {len(variants)} variants, {len(runs)} stage runs ({per_stage}), "
             f"{len(done)} done already"]
    lines += [f"  {v.name}: " + ", ".join(f"{k}={x}" for k, x in v.values.items()) for v in variants]
    return "\n".join(lines)


def write_plan(sweep_dir: Path, recipe_path: str, overrides: list[str], axes: list, names: list[str],
                variants: list) -> None:
    """Write the plan (`sweep.yaml`) before any variant runs: what `distill status` lists."""
    dump_yaml({"recipe": str(recipe_path), "set": overrides, "vary": {a.key: a.raw for a in axes}, "stages": names,
               "variants": {v.name: {"values": v.values, "stages": {n: f"stages/{v.keys[n]}" for n in names}}
                            for v in variants}}, sweep_dir / PLAN)


def clear_table(sweep_dir: Path) -> None:
    """Remove an earlier comparison, so a sweep that stops half-way leaves none that looks complete."""
    for name in OUTPUTS:
        (Path(sweep_dir) / name).unlink(missing_ok=True)


def _metrics(sweep_dir: Path, variant, names: list[str], score_stage: str | None) -> tuple[str | None, dict]:
    """(scoring stage, its metrics) of one variant; (None, {}) when no stage run reports a student score."""
    for name in ([score_stage] if score_stage else reversed(names)):
        metrics = Manifest.load(Path(sweep_dir) / "stages" / variant.keys[name]).metrics
        if score_stage or "student_test_score" in metrics or "student_dev_score" in metrics:
            return name, metrics
    return None, {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def rows(sweep_dir: Path, variants: list, names: list[str], score_stage: str | None,
         failed: dict[str, str]) -> tuple[str, list[dict]]:
    """The split compared on ("test" or "dev") and one row per variant (a failed one has no numbers)."""
    found = [(None, {}) if v.name in failed else _metrics(sweep_dir, v, names, score_stage) for v in variants]
    split = "test" if all("student_test_score" in m for (_, m), v in zip(found, variants) if v.name not in failed) \
        else "dev"
    table = []
    for variant, (stage, metrics) in zip(variants, found):
        student, teacher = _number(metrics.get(f"student_{split}_score")), _number(metrics.get(f"teacher_{split}_score"))
        table.append({
            "variant": variant.name, "values": variant.values, "score_stage": stage, "split": split,
            "state": "failed" if variant.name in failed else "done", "error": failed.get(variant.name),
            "student_score": student, "teacher_score": teacher,
            "retention": student / teacher if student is not None and teacher else None,
            "speedup": _number(metrics.get("speedup")), "student_params": _number(metrics.get("student_params")),
            "teacher_params": _number(metrics.get("teacher_params")),
            "stages": {n: f"stages/{variant.keys[n]}" for n in names},
        })
    return split, table


def scores(row: dict) -> dict[str, float]:
    """A row's numbers as `sweep/<name>` metrics for the variant's MLflow run."""
    names = ("student_score", "teacher_score", "retention", "speedup", "student_params")
    return {f"sweep/{name}": row[name] for name in names if row[name] is not None}


def _cell(value: float | None, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "params":
        return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value:,.0f}"
    return f"{value:.4f}"


def markdown(title: str, axes: list, split: str, table: list[dict], shared: dict[str, list[str]]) -> str:
    """The comparison as a markdown page: one row per variant, the reused stages, the plot."""
    keys = [a.key for a in axes]
    head = ["variant", *[a.label for a in axes], f"student {split}", f"teacher {split}", "retention", "speed-up",
            "student params"]
    lines = [f"# {title}", "", f"Varied: {', '.join(f'`{k}`' for k in keys)}. Scores on the **{split}** split."]
    if split == "dev":
        lines += ["", f"Note: {DEV_NOTE}."]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        name = row["variant"] if row["state"] == "done" else f"{row['variant']} (failed: {row['error']})"
        cells = [name, *[f"`{row['values'][k]}`" for k in keys], _cell(row["student_score"], "score"),
                 _cell(row["teacher_score"], "score"), _cell(row["retention"], "pct"), _cell(row["speedup"], "x"),
                 _cell(row["student_params"], "params")]
        lines.append("| " + " | ".join(cells) + " |")
    if shared:
        lines += ["", "Stage directories shared by several variants (each ran once):", ""]
        lines += [f"- `{d}`: {', '.join(v)}" for d, v in sorted(shared.items())]
    lines += ["", "![retention vs speed-up](sweep.png)", ""]
    return "\n".join(lines)


def write_table(sweep_dir: Path, axes: list, variants: list, names: list[str], score_stage: str | None,
                failed: dict[str, str] | None = None) -> dict:
    """Write sweep.md, sweep.json and sweep.png (the picture when a variant has both numbers); return the JSON."""
    sweep_dir = Path(sweep_dir)
    failed = failed or {}
    split, table = rows(sweep_dir, variants, names, score_stage, failed)
    if failed:
        log.warn(f"sweep: {len(failed)} of {len(table)} variants failed: {', '.join(failed)} (rerun to retry them)")
    if all(r["score_stage"] is None for r in table):
        log.warn(f"sweep: no stage of {', '.join(names)} reports student_test_score or student_dev_score: "
                 "the table has no scores (name the scoring stage with --score-stage)")
    elif split == "dev":
        log.warn(f"sweep: {DEV_NOTE}")
    users: dict[str, list[str]] = {}
    for row in (r for r in table if r["state"] == "done"):
        for directory in row["stages"].values():
            users.setdefault(directory, []).append(row["variant"])
    shared = {d: v for d, v in users.items() if len(v) > 1}
    title = f"Sweep of {len(table)} variants"
    labels = [", ".join(f"{a.label}={r['values'][a.key]}" for a in axes) for r in table]
    picture = retention_vs_speedup([(label, r["speedup"], r["retention"]) for label, r in zip(labels, table)],
                                   sweep_dir / "sweep.png", f"{title}: retention ({split}) vs speed-up")
    result = {"split": split, "vary": {a.key: a.labels for a in axes}, "stages": names, "variants": table,
              "failed": sorted(failed),
              "shared": shared, "plot": picture.name if picture else None}
    atomic_write_text(sweep_dir / "sweep.md", markdown(title, axes, split, table, shared))
    atomic_write_text(sweep_dir / "sweep.json", json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result
