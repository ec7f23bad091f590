"""Task metrics against values worked out by hand from their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kd import metrics


def test_accuracy_f1_mcc_by_hand():
    preds, labels = [1, 0, 1, 1], [1, 1, 1, 0]
    assert metrics.accuracy(preds, labels) == 0.5
    # TP = 2, FP = 1, FN = 1: F1 = 2*2 / (2*2 + 1 + 1)
    assert metrics.f1(preds, labels) == pytest.approx(4 / 6)
    # TN = 0: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = -1 / 3
    assert metrics.matthews(preds, labels) == pytest.approx(-1 / 3)
    # TP = 2, TN = 2, FP = 1, FN = 0: (4 - 0) / sqrt(3 * 2 * 3 * 2)
    assert metrics.matthews([1, 1, 0, 0, 1], [1, 0, 0, 0, 1]) == pytest.approx(4 / 6)
    assert metrics.matthews([1, 1, 1], [1, 1, 1]) == 0.0  # a constant side has no correlation
    assert metrics.f1([0, 0], [0, 0]) == 0.0


def test_multiclass_mcc_matches_gorodkin():
    preds, labels = [0, 1, 2, 2, 1, 0], [0, 1, 2, 1, 1, 2]
    cm = metrics.confusion_matrix(preds, labels)
    assert cm.tolist() == [[1, 0, 0], [0, 2, 1], [1, 0, 1]]
    # c = 4 correct, s = 6; t = row sums (1, 3, 2), p = column sums (2, 2, 2)
    expected = (4 * 6 - (1 * 2 + 3 * 2 + 2 * 2)) / math.sqrt((36 - 12) * (36 - (1 + 9 + 4)))
    assert metrics.matthews(preds, labels) == pytest.approx(expected)


def test_pearson_and_spearman_with_ties():
    # mean(x) = 2, mean(y) = 7/3; sum dx*dy = 3, sum dx^2 = 2, sum dy^2 = 42/9
    assert metrics.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    # ranks of x with the tie averaged: 1, 2.5, 2.5, 4; of y: 1, 3, 2, 4 -> 4.5 / sqrt(4.5 * 5)
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_compute_averages_named_metrics():
    out = metrics.compute(["accuracy", "f1"], np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0]))
    assert out["score"] == pytest.approx((0.5 + 4 / 6) / 2)
    cm = metrics.confusion_matrix([1, 1], [0, 1], classes=range(3))
    assert cm.shape == (3, 3) and cm[0, 1] == 1 and cm[1, 1] == 1


def test_per_class_precision_recall_f1_by_hand():
    # true:  a a a b b c      predicted: a b a b c c
    labels, preds = [0, 0, 0, 1, 1, 2], [0, 1, 0, 1, 2, 2]
    rows = metrics.per_class(preds, labels, ["a", "b", "c", "d"])
    assert [r["label"] for r in rows] == ["a", "b", "c", "d"]
    # a: TP 2, predicted 2, support 3 -> P 1, R 2/3, F1 = 2*(2/3)/(5/3) = 0.8
    assert (rows[0]["precision"], rows[0]["recall"], rows[0]["f1"]) == pytest.approx((1.0, 2 / 3, 0.8))
    # b: TP 1, predicted 2, support 2 -> P 1/2, R 1/2, F1 1/2;  c: TP 1, predicted 2, support 1 -> P 1/2, R 1, F1 2/3
    assert (rows[1]["precision"], rows[1]["recall"], rows[1]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (rows[2]["precision"], rows[2]["recall"], rows[2]["f1"]) == pytest.approx((0.5, 1.0, 2 / 3))
    # d never occurs and is never predicted: zeros, and it stays out of the macro mean
    assert rows[3] == {"label": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "predicted": 0}
    assert [r["support"] for r in rows] == [3, 2, 1, 0] and [r["predicted"] for r in rows] == [2, 2, 2, 0]
    assert metrics.macro_f1(rows) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
