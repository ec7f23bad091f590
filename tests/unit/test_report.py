"""The report stage's summary: retention, speed-up and the registered model URI from upstream manifests."""

import pytest

from pipeline.config import ConfigError
from stages.report import format_table, summarise

TASK = {"teacher_params": 22_700_000, "teacher_dev_score": 0.80, "teacher_latency_ms": 50.0,
        "student_params": 4_000_000, "student_dev_score": 0.76, "student_latency_ms": 10.0, "task": "wordnet"}


def test_summary_keys_and_ratios():
    registered = {"name": "demo-student", "version": "3", "alias": "champion", "promoted": True, "reason": "gates hold"}
    summary = summarise(TASK, registered, None, "sqlite:///x/mlflow.db")
    assert summary["student"]["retention"] == pytest.approx(0.95)
    assert summary["student"]["cpu_speedup"] == pytest.approx(5.0)
    assert summary["teacher"]["params"] == 22_700_000 and summary["student"]["dev_score"] == 0.76
    assert summary["registered_model"] == "models:/demo-student@champion"
    assert summary["tracking_uri"] == "sqlite:///x/mlflow.db"
    assert "95.0% of teacher" in format_table(summary) and "5.0x faster" in format_table(summary)


def test_held_out_test_scores_are_reported_beside_dev():
    summary = summarise({**TASK, "teacher_test_score": 0.70, "student_test_score": 0.63}, None, None, None)
    assert summary["student"]["test_retention"] == pytest.approx(0.9) and summary["teacher"]["test_score"] == 0.70
    assert "test score" in format_table(summary) and "90.0% of teacher" in format_table(summary)
    assert "test_score" not in summarise(TASK, None, None, None)["student"]  # a task manifest from before test splits


def test_refused_promotion_points_at_the_version():
    registered = {"name": "m", "version": "2", "alias": "champion", "promoted": False, "reason": "dev_acc too low"}
    summary = summarise(TASK, registered, None, None)
    assert summary["registered_model"] == "models:/m/2" and summary["promoted"] is False


def test_not_a_task_manifest():
    with pytest.raises(ConfigError, match="task manifest lacks"):
        summarise({"loss": 1.0}, None, None, None)
