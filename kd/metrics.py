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


def per_class(preds, labels, names: list[str]) -> list[dict]:
    """Precision, recall, F1 and support of each class (index i is `names[i]`), one dict per class, in order.

    precision = TP / predicted as the class, recall = TP / truly the class, F1 their harmonic mean; each is
    0 where its denominator is (a class never predicted has precision 0).
    """
    cm = confusion_matrix(preds, labels, range(len(names)))
    rows = []
    for i, name in enumerate(names):
        tp, predicted, support = int(cm[i, i]), int(cm[:, i].sum()), int(cm[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1_value = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"label": name, "precision": precision, "recall": recall, "f1": f1_value,
                     "support": support, "predicted": predicted})
    return rows


def macro_f1(rows: list[dict]) -> float:
    """Mean F1 over the classes that occur in the labels (`per_class` rows with support > 0)."""
    present = [r["f1"] for r in rows if r["support"]]
    return float(np.mean(present)) if present else 0.0
