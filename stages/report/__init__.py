"""Stage `report`: the end of a pipeline run in one table and one JSON file.

Reads the task stage's teacher-vs-student evaluation and, when given, the register stage's model version and
alias; prints a summary table, says where to look in MLflow, and writes `summary.json` in its own folder and,
as the run's front page, `RUN_DIR/summary.json`.
"""

from __future__ import annotations

import json

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import OutputFile, atomic_write_text
from pipeline.secrets import scrub

LAUNCH = "single"


from stages.report.config import Config


def summarise(task_metrics: dict, registered: dict | None, general_metrics: dict | None, tracking_uri: str | None) -> dict:
    """The summary.json content from the upstream manifests' metrics (pure, for tests)."""
    required = ("teacher_params", "teacher_dev_score", "student_params", "student_dev_score",
                "teacher_latency_ms", "student_latency_ms")
    missing = [k for k in required if k not in task_metrics]
    if missing:
        raise ConfigError(f"task manifest lacks {', '.join(missing)}: point `task` at a task stage's output")
    teacher_score, student_score = task_metrics["teacher_dev_score"], task_metrics["student_dev_score"]
    summary = {
        "teacher": {"params": task_metrics["teacher_params"], "dev_score": teacher_score,
                    "cpu_latency_ms": task_metrics["teacher_latency_ms"]},
        "student": {"params": task_metrics["student_params"], "dev_score": student_score,
                    "retention": student_score / teacher_score if teacher_score else 0.0,
                    "cpu_speedup": task_metrics["teacher_latency_ms"] / task_metrics["student_latency_ms"],
                    "cpu_latency_ms": task_metrics["student_latency_ms"]},
        "task": task_metrics.get("task"),
        "registered_model": None,
        "promoted": None,
        "tracking_uri": tracking_uri,
    }
    if "teacher_test_score" in task_metrics and "student_test_score" in task_metrics:  # the held-out numbers
        teacher_test, student_test = task_metrics["teacher_test_score"], task_metrics["student_test_score"]
        summary["teacher"]["test_score"] = teacher_test
        summary["student"]["test_score"] = student_test
        summary["student"]["test_retention"] = student_test / teacher_test if teacher_test else 0.0
    if registered:
        ref = registered.get("alias") if registered.get("promoted") else registered.get("version")
        sep = "@" if registered.get("promoted") else "/"
        summary["registered_model"] = f"models:/{registered['name']}{sep}{ref}"
        summary["promoted"] = bool(registered.get("promoted"))
        summary["promotion"] = registered.get("reason")
    if general_metrics:
        summary["general"] = {k: v for k, v in general_metrics.items() if k.startswith(("eval_", "final_"))}
    return summary


def format_table(summary: dict) -> str:
    """Teacher vs student, side by side."""
    t, s = summary["teacher"], summary["student"]
    rows = [
        ("", "teacher", "student"),
        ("parameters", f"{t['params'] / 1e6:.1f} M", f"{s['params'] / 1e6:.1f} M"),
        ("dev score", f"{t['dev_score']:.4f}", f"{s['dev_score']:.4f} ({s['retention']:.1%} of teacher)"),
        *([("test score", f"{t['test_score']:.4f}", f"{s['test_score']:.4f} ({s['test_retention']:.1%} of teacher)")]
          if "test_score" in s else []),
        ("CPU latency", f"{t['cpu_latency_ms']:.1f} ms", f"{s['cpu_latency_ms']:.1f} ms ({s['cpu_speedup']:.1f}x faster)"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(config: Config, ctx):
    """Write summary.json (here and in the run directory) and print the table."""
    registered = ctx.input_manifest("register").extra if "register" in ctx.inputs else None
    general = ctx.input_manifest("general").metrics if "general" in ctx.inputs else None
    uri = scrub(getattr(ctx.tracker, "uri", None))
    summary = summarise(ctx.input_manifest("task").metrics, registered, general, uri)
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    atomic_write_text(ctx.stage_dir / "summary.json", text)
    atomic_write_text(ctx.run_dir / "summary.json", text)
    for line in format_table(summary).splitlines():
        log.info(line)
    if summary["registered_model"]:
        log.info(f"registered: {summary['registered_model']} ({summary.get('promotion')})")
    if uri:
        log.info(f"MLflow: `mlflow ui --backend-store-uri {uri}` then open the '{ctx.tracker.config.experiment}' experiment")
    log.info(f"summary: {ctx.run_dir / 'summary.json'}")
    metrics = {"student_retention": summary["student"]["retention"], "student_cpu_speedup": summary["student"]["cpu_speedup"]}
    if "test_retention" in summary["student"]:
        metrics["student_test_retention"] = summary["student"]["test_retention"]
    return ctx.manifest(config, [OutputFile.of(ctx.stage_dir, "summary.json")], metrics=metrics)
