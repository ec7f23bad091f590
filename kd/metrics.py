"""Task metrics as pure numpy functions: accuracy, F1, Matthews correlation, Pearson/Spearman, confusion matrix.

The GLUE task presets in `formats.taskdata` name which of these a task reports; `task_score` averages them
the way the GLUE leaderboard does (e.g. MRPC = mean of accuracy and F1).
"""

from __future__ import annotations

import numpy as np


def accuracy(preds, labels) -> float:
    """Share of predictions equal to the label."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else 0.0


def f1(preds, labels, positive: int = 1) -> float:
    """Binary F1 of class `positive`: 2PR / (P + R); 0 when there are no true positives."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = float(((preds == positive) & (labels == positive)).sum())
    fp = float(((preds == positive) & (labels != positive)).sum())
    fn = float(((preds != positive) & (labels == positive)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(preds, labels) -> float:
    """Matthews correlation (multi-class form of Gorodkin 2004, equal to the binary formula for 2 classes)."""
    classes = np.union1d(np.asarray(preds), np.asarray(labels))
    cm = confusion_matrix(preds, labels, classes=classes).astype(np.float64)
    t, p = cm.sum(axis=1), cm.sum(axis=0)  # rows: true class, columns: predicted class
    c, s = np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denom == 0 else float((c * s - (t * p).sum()) / denom)


def pearson(preds, labels) -> float:
    """Pearson correlation coefficient; 0 when either side is constant."""
    x, y = np.asarray(preds, np.float64), np.asarray(labels, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _ranks(values) -> np.ndarray:
    """Ranks starting at 1 with ties given their average rank (what Spearman needs)."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(preds, labels) -> float:
    """Spearman rank correlation: Pearson of the (tie-averaged) ranks."""
    return pearson(_ranks(preds), _ranks(labels))


def confusion_matrix(preds, labels, classes=None) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class, in the order of `classes`."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels) if classes is None else np.asarray(classes)
    index = {c: i for i, c in enumerate(classes.tolist())}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(labels.tolist(), preds.tolist()):
        cm[index[t], index[p]] += 1
    return cm


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson, "spearman": spearman}
"""Metric name (as presets and reports spell it) -> function(preds, labels)."""


def compute(names: list[str], preds, labels) -> dict[str, float]:
    """The named metrics plus `score`, their mean (the GLUE convention for tasks with two metrics)."""
    out = {name: METRICS[name](preds, labels) for name in names}
    out["score"] = float(np.mean([out[n] for n in names]))
    return out


def report_markdown(report: dict) -> str:
    """A short human-readable report: teacher vs student dev metrics, size and speed, confusion matrices."""
    s, t, st = report["summary"], report["teacher"], report["student"]
    names = [k for k in t["dev"] if k != "score"] + ["score"]
    lines = [f"# {s['task']}: {s['objective']}", "", "| | teacher | student |", "|---|---|---|"]
    lines += [f"| dev {n} | {t['dev'][n]:.4f} | {st['dev'][n]:.4f} |" for n in names]
    lines += [f"| parameters | {t['params']:,} | {st['params']:,} |",
              f"| latency ms (batch {s['latency_shape'][0]}, length {s['latency_shape'][1]}, {s['device']}) | "
              f"{t['latency_ms']:.1f} | {st['latency_ms']:.1f} |",
              f"| throughput /s | {t['throughput_per_s']:.1f} | {st['throughput_per_s']:.1f} |", "",
              f"Student keeps {100 * s['student_share_of_teacher']:.1f}% of the teacher's score at "
              f"{s['speedup']:.2f}x its speed.", ""]
    for who in ("teacher", "student"):
        if report[who].get("confusion_matrix"):
            lines += [f"{who} confusion matrix (rows: true, columns: predicted):", ""]
            lines += ["    " + " ".join(f"{v:6d}" for v in row) for row in report[who]["confusion_matrix"]] + [""]
    return "\n".join(lines)
