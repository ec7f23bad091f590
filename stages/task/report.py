"""The `task` stage's report: report.json, a report.md a person can read, and the pictures it links.

Scores are given on dev (what early stopping and choices may have looked at) and on the held-out test split
(what nothing selected on: the numbers to publish). The confusion matrices of the test split are labelled
heatmaps (`confusion_teacher.png`, `confusion_student.png`), the per-class precision / recall / F1 a table
with the class names, and each training phase's loss a curve with its dev evaluation points
(`phase_loss_curves.png`); the PNGs are logged to MLflow under `plots/` too.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.tracking import plots

CONFUSION = "confusion_{who}.png"
LOSS_CURVES = "phase_loss_curves.png"
EVAL_PREFIX = "eval/dev_"
"""Metric names of the dev evaluation points logged while training (`eval/dev_score`, ...)."""


def phase_histories(phases: list[dict], history: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """Each phase's loss (`train/total`) and dev score points (`eval/dev_score`) from a recorded metric history."""
    out = []
    for phase in phases:
        first, last = phase["first_step"], phase["first_step"] + phase["steps"]
        inside = lambda points: [(s, v) for s, v in points if first < s <= last]  # noqa: E731
        out.append({"phase": phase["phase"], "loss": inside(history.get("train/total", [])),
                    "evals": inside(history.get(f"{EVAL_PREFIX}score", []))})
    return out


def pictures(stage_dir: Path, report: dict, label_names: list[str], phases: list[dict]) -> list[str]:
    """Draw the report's PNGs into `stage_dir`; return their file names."""
    made = []
    for who in ("teacher", "student"):
        matrix = report[who].get("test_confusion_matrix")
        if matrix:
            name = CONFUSION.format(who=who)
            plots.confusion_heatmap(matrix, label_names, stage_dir / name, f"{who}: test confusion matrix")
            made.append(name)
    if plots.phase_curves(phases, stage_dir / LOSS_CURVES, eval_label="student dev score") is not None:
        made.append(LOSS_CURVES)
    return made


def _score_rows(report: dict) -> list[str]:
    t, st = report["teacher"], report["student"]
    lines = []
    for split in ("dev", "test"):
        names = [k for k in t[split] if k != "score"] + ["score"]
        lines += [f"| {split} {n} | {t[split][n]:.4f} | {st[split][n]:.4f} |" for n in names]
    return lines


def _per_class_rows(report: dict) -> list[str]:
    teacher, student = report["teacher"].get("test_per_class"), report["student"].get("test_per_class")
    if not teacher or not student:
        return []
    lines = ["## Per class (test split)", "",
             "| class | support | teacher P | teacher R | teacher F1 | student P | student R | student F1 | "
             "student predicted |", "|---|---|---|---|---|---|---|---|---|"]
    for t, s in zip(teacher, student):
        lines.append(f"| {t['label']} | {t['support']} | {t['precision']:.2f} | {t['recall']:.2f} | {t['f1']:.2f} | "
                     f"{s['precision']:.2f} | {s['recall']:.2f} | {s['f1']:.2f} | {s['predicted']} |")
    return lines + [""]


def markdown(report: dict, images: list[str]) -> str:
    """report.md: teacher vs student on dev and test, size and speed, the pictures, the per-class table."""
    s, t, st = report["summary"], report["teacher"], report["student"]
    lines = [f"# {s['task']}: {s['objective']}", "", f"Held-out {s['test_split']}.", "",
             "| | teacher | student |", "|---|---|---|", *_score_rows(report),
             f"| parameters | {t['params']:,} | {st['params']:,} |",
             f"| latency ms (batch {s['latency_shape'][0]}, length {s['latency_shape'][1]}, {s['device']}) | "
             f"{t['latency_ms']:.1f} | {st['latency_ms']:.1f} |",
             f"| throughput /s | {t['throughput_per_s']:.1f} | {st['throughput_per_s']:.1f} |", "",
             f"Student keeps {100 * s['student_test_share_of_teacher']:.1f}% of the teacher's test score "
             f"({100 * s['student_share_of_teacher']:.1f}% of its dev score) at {s['speedup']:.2f}x its speed.", ""]
    for who in ("teacher", "student"):
        classes = report[who].get("test_per_class")
        if classes:
            used = sum(1 for c in classes if c["predicted"])
            lines.append(f"- the {who} predicts {used} of {len(classes)} classes on the test split")
    lines.append("")
    titles = {CONFUSION.format(who="teacher"): "Teacher confusion matrix (test)",
              CONFUSION.format(who="student"): "Student confusion matrix (test)",
              LOSS_CURVES: "Training loss per phase, with dev evaluation points"}
    for image in images:
        lines += [f"## {titles[image]}", "", f"![{titles[image]}]({image})", ""]
    return "\n".join(lines + _per_class_rows(report))


def write(ctx, report: dict, label_names: list[str], phases: list[dict]) -> list[OutputFile]:
    """Write report.json, the PNGs and report.md into the stage directory, log the PNGs; return the outputs."""
    stage_dir = ctx.stage_dir
    images = pictures(stage_dir, report, label_names, phases)
    atomic_write_text(stage_dir / "report.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(stage_dir / "report.md", markdown(report, images))
    for image in images:
        ctx.tracker.log_artifact(stage_dir / image, "plots")
    return [OutputFile.of(stage_dir, name) for name in ("report.json", "report.md", *images)]
