"""Pictures of a stage's run: loss curves per component (and per training phase, with its evaluation points),
teacher vs student metrics and labelled confusion matrices; and of a sweep (retention vs speed-up), as PNG files.

The drawing functions take plain data and write a file (testable without MLflow); `log_stage_plots` reads a
run's metric history from MLflow and attaches the pictures to it under `plots/`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

TEACHER_PREFIX = "teacher_"
"""Manifest metrics named `teacher_<metric>` are the teacher's value of `<metric>`."""
STUDENT_PREFIX = "student_"
"""The student's value of `<metric>` is `<metric>` or `student_<metric>`."""
NOT_LOSSES = ("lr", "tokens_per_s", "steps", "samples_per_s")
"""`train/` metrics that are not loss components."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    return plt


def loss_curves(histories: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """One line per loss component (step -> value); None when there is no curve to draw."""
    curves = {k: sorted(v) for k, v in histories.items() if len(v) > 1}
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, points in sorted(curves.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss by component")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def phase_curves(phases: list[dict], path: Path, *, eval_label: str = "dev score") -> Path | None:
    """One panel per training phase: its loss (`{"phase", "loss": [(step, value)], "evals": [(step, value)]}`)
    against the global step, and its evaluation points on a second axis; None when no phase has a loss."""
    drawn = [p for p in phases if p.get("loss")]
    if not drawn:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(drawn), figsize=(max(5, 4.5 * len(drawn)), 3.8), dpi=100, squeeze=False)
    for ax, phase in zip(axes[0], drawn):
        points = sorted(phase["loss"])
        marker = "." if len(points) < 30 else None
        ax.plot([s for s, _ in points], [v for _, v in points], color="tab:blue", marker=marker)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss", color="tab:blue")
        ax.set_title(f"phase: {phase['phase']}", fontsize=10)
        ax.grid(alpha=0.3)
        if phase.get("evals"):
            evals = sorted(phase["evals"])
            right = ax.twinx()
            right.plot([s for s, _ in evals], [v for _, v in evals], "o--", color="tab:orange")
            for step, value in evals:
                right.annotate(f"{value:.3f}", (step, value), textcoords="offset points", xytext=(0, 6), fontsize=8,
                               ha="center", color="tab:orange")
            right.set_ylabel(eval_label, color="tab:orange")
            if all(0 <= v <= 1 for _, v in evals):  # a score: on its whole range, so 0.1 does not look high
                right.set_ylim(0, 1.05)
    fig.suptitle("training loss per phase, with evaluation points", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_heatmap(matrix, names: list[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) as a heatmap with class names on both axes,
    coloured by the share of each true class (so rare classes show as clearly as common ones); counts are
    written in the cells when there are at most 20 classes."""
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    plt = _pyplot()
    side = max(4.0, 0.28 * len(names) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(names))
    size = 8 if len(names) <= 20 else 6
    ax.set_xticks(ticks, names, rotation=90, fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if len(names) <= 20:
        for i in ticks:
            for j in ticks:
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    predicted = int((counts.sum(axis=0) > 0).sum())
    ax.set_title(f"{title}\n(predicts {predicted} of {len(names)} classes)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def teacher_student_pairs(metrics: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Metric name -> (teacher value, student value) for every metric recorded for both."""
    pairs = {}
    for key, value in metrics.items():
        if key.startswith(TEACHER_PREFIX) and isinstance(value, (int, float)):
            name = key[len(TEACHER_PREFIX):]
            student = metrics.get(name, metrics.get(STUDENT_PREFIX + name))
            if isinstance(student, (int, float)) and not isinstance(student, bool):
                pairs[name] = (float(value), float(student))
    return pairs


def teacher_vs_student(metrics: dict[str, Any], path: Path) -> Path | None:
    """One small panel per shared metric (own scale: accuracy beside parameter counts), teacher and student bars."""
    pairs = teacher_student_pairs(metrics)
    if not pairs:
        return None
    plt = _pyplot()
    names = sorted(pairs)
    fig, axes = plt.subplots(1, len(names), figsize=(max(4, 2.2 * len(names)), 3.6), dpi=100, squeeze=False)
    for ax, name in zip(axes[0], names):
        teacher, student = pairs[name]
        ax.bar([0, 1], [teacher, student], color=["tab:gray", "tab:blue"])
        ax.set_xticks([0, 1], ["teacher", "student"])
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=8)
        if teacher:
            ax.annotate(f"{100 * student / teacher:.1f}%", (1, student), ha="center", va="bottom", fontsize=8)
    fig.suptitle("teacher vs student (student as % of teacher)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def retention_vs_speedup(points: list[tuple[str, float, float]], path: Path, title: str) -> Path | None:
    """One labelled point per (label, speed-up, retention): what each variant of a sweep keeps for its speed."""
    points = [p for p in points if p[1] is not None and p[2] is not None]
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    for label, speedup, retention in points:
        ax.scatter([speedup], [100 * retention], color="tab:blue", zorder=3)
        ax.annotate(label, (speedup, 100 * retention), xytext=(4, 4), textcoords="offset points", fontsize=7)
    ax.set_xlabel("CPU speed-up over the teacher (x)")
    ax.set_ylabel("retention: student score / teacher score (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_stage_plots(client, run_id: str, manifest_metrics: dict[str, Any]) -> list[str]:
    """Draw a run's loss curves and teacher-vs-student bars and log them under `plots/`; return their names."""
    run = client.get_run(run_id)
    loss_keys = [k for k in run.data.metrics
                 if "loss" in k.lower() or (k.startswith("train/") and k.split("/", 1)[1] not in NOT_LOSSES)]
    histories = {k: [(m.step, m.value) for m in client.get_metric_history(run_id, k)] for k in loss_keys}
    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        for made in (loss_curves(histories, Path(tmp) / "loss_curves.png"),
                     teacher_vs_student(manifest_metrics, Path(tmp) / "teacher_vs_student.png")):
            if made is not None:
                client.log_artifact(run_id, str(made), "plots")
                logged.append(f"plots/{made.name}")
    return logged
