"""Promotion gate grammar and evaluation on hand-computed numbers; the picture helpers' pairing of metrics."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.tracking.plots import (
    loss_curves,
    teacher_student_pairs,
    teacher_vs_student,
)
from pipeline.tracking.promote import (
    Gate,
    PromotionRefused,
    check_gates,
    evaluate,
    parse_gate,
)

METRICS = {"dev_acc": 0.9, "teacher_dev_acc": 0.92, "dev_f1": 0.5, "latency_ms": 12.0, "teacher_latency_ms": 40.0}


def test_parse_gate():
    assert parse_gate("dev_acc>=0.99*teacher") == Gate(text="dev_acc>=0.99*teacher", metric="dev_acc", op=">=",
                                                       factors=(0.99, "teacher"))
    assert parse_gate(" latency_ms < 0.5 * teacher * 1.2 ").factors == (0.5, "teacher", 1.2)
    assert parse_gate("dev_f1==dev_acc").factors == ("dev_acc",)
    for bad in ("dev_acc=>1", "dev_acc", ">= 0.9", "dev_acc >= 0.9*", "dev_acc >= 1+teacher"):
        with pytest.raises(ConfigError, match="gate"):
            parse_gate(bad)


def test_evaluate_against_hand_values():
    # 0.99 * 0.92 = 0.9108 > 0.9: refused; 0.97 * 0.92 = 0.8924 <= 0.9: holds.
    assert evaluate(parse_gate("dev_acc>=0.99*teacher"), METRICS) == (False, "dev_acc=0.9 < 0.99*teacher=0.9108")
    assert evaluate(parse_gate("dev_acc>=0.97*teacher"), METRICS) == (True, "dev_acc=0.9 >= 0.97*teacher=0.8924")
    # 0.5 * 40 = 20 > 12: a student at least twice as fast holds.
    assert evaluate(parse_gate("latency_ms<0.5*teacher"), METRICS)[0] is True
    assert evaluate(parse_gate("dev_f1>dev_acc"), METRICS) == (False, "dev_f1=0.5 <= dev_acc=0.9")
    assert evaluate(parse_gate("dev_acc==0.9"), METRICS)[0] is True
    assert evaluate(parse_gate("dev_acc>0.9"), METRICS)[0] is False


def test_check_gates_reports_failures_first():
    ok, reason = check_gates(["dev_acc>0.5", "dev_acc>=teacher"], METRICS)
    assert not ok and reason == "dev_acc=0.9 < teacher=0.92"
    assert check_gates(["dev_acc>0.5", "latency_ms<teacher"], METRICS) == (
        True, "dev_acc=0.9 > 0.5=0.5; latency_ms=12 < teacher=40")
    assert check_gates([], METRICS) == (True, "no gates")


def test_student_prefix_as_the_task_stage_records_it():
    task = {"student_dev_accuracy": 0.88, "teacher_dev_accuracy": 0.9}
    # 0.98 * 0.9 = 0.882 > 0.88: refused; 0.97 * 0.9 = 0.873 <= 0.88: holds.
    assert evaluate(parse_gate("dev_accuracy>=0.98*teacher"), task) == (
        False, "dev_accuracy=0.88 < 0.98*teacher=0.882")
    assert evaluate(parse_gate("student_dev_accuracy>=0.97*teacher"), task) == (
        True, "student_dev_accuracy=0.88 >= 0.97*teacher=0.873")
    assert teacher_student_pairs(task) == {"dev_accuracy": (0.9, 0.88)}


def test_missing_metric_is_a_refusal_naming_what_exists():
    with pytest.raises(PromotionRefused, match=r"the teacher's dev_f1 \(teacher_dev_f1\) is not recorded"):
        check_gates(["dev_f1>=teacher"], METRICS)
    with pytest.raises(PromotionRefused, match="dev_accuracy is not recorded .*dev_acc, dev_f1"):
        check_gates(["dev_accuracy>0.5"], METRICS)


def test_plots_pair_teacher_and_student(tmp_path):
    assert teacher_student_pairs(METRICS) == {"dev_acc": (0.92, 0.9), "latency_ms": (40.0, 12.0)}
    assert teacher_vs_student({"dev_acc": 0.9}, tmp_path / "none.png") is None
    assert loss_curves({"loss_kd": [(0, 1.0)]}, tmp_path / "one.png") is None  # a single point is no curve
    for made in (teacher_vs_student(METRICS, tmp_path / "bars.png"),
                 loss_curves({"loss_kd": [(1, 0.5), (0, 1.0)], "loss_ce": [(0, 2.0), (1, 1.0)]}, tmp_path / "c.png")):
        assert made.read_bytes()[:4] == b"\x89PNG" and made.stat().st_size > 1000
