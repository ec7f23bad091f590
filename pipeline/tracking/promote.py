"""Promotion gates: whether a model version may take an alias, and moving it when it may.

A gate is `METRIC OP EXPR`, e.g. `dev_acc>=0.99*teacher`:
  METRIC   a metric recorded with the model version (the stage manifest's metrics; `dev_acc` also finds
           `student_dev_acc`)
  OP       one of >= > <= < ==
  EXPR     factors joined by `*`; a factor is a number, another metric's name, or `teacher`, which means the
           teacher's value of METRIC (`teacher_METRIC`, with
           any `student_` prefix of METRIC dropped)
An alias moves only when every gate holds; otherwise the refusal names each failing gate with its numbers.
"""

from __future__ import annotations

import json
import operator
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.tracking.plots import STUDENT_PREFIX, TEACHER_PREFIX

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|>|<)\s*(\S.*?)\s*$")
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")


class PromotionRefused(ConfigError):
    """A gate did not hold: the alias was not moved. The message says which gate and why."""


@dataclass(frozen=True)
class Gate:
    """A parsed promotion gate."""

    text: str
    metric: str
    op: str
    factors: tuple[float | str, ...]
    """Numbers, metric names and `teacher`, multiplied together."""


def parse_gate(text: str) -> Gate:
    """Parse `METRIC OP EXPR`; a malformed gate is a ConfigError quoting it."""
    match = _GATE.match(text)
    if not match:
        raise ConfigError(f"gate {text!r}: expected METRIC OP EXPR, e.g. 'dev_acc>=0.99*teacher' (OP: >= > <= < ==)")
    metric, op, expr = match.groups()
    factors: list[float | str] = []
    for raw in expr.split("*"):
        raw = raw.strip()
        try:
            factors.append(float(raw))
        except ValueError:
            if not _NAME.match(raw):
                raise ConfigError(f"gate {text!r}: {raw!r} is not a number, a metric name or 'teacher'") from None
            factors.append(raw)
    return Gate(text=text.strip(), metric=metric, op=op, factors=tuple(factors))


def _value(name: str, metrics: dict[str, Any], gate: Gate) -> float:
    if name == "teacher":  # the teacher's value of the gated metric: dev_acc or student_dev_acc -> teacher_dev_acc
        key = TEACHER_PREFIX + gate.metric.removeprefix(STUDENT_PREFIX)
    else:  # the task stage records the student's metrics as student_<name>
        key = name if name in metrics else STUDENT_PREFIX + name
    value = metrics.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        have = ", ".join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))) or "none"
        what = f"the teacher's {gate.metric} ({key})" if name == "teacher" else key
        raise PromotionRefused(f"gate {gate.text!r}: {what} is not recorded (metrics: {have})")
    return float(value)


def evaluate(gate: Gate, metrics: dict[str, Any]) -> tuple[bool, str]:
    """Whether the gate holds for `metrics`, and a line showing the numbers compared."""
    left = _value(gate.metric, metrics, gate)
    right = 1.0
    for factor in gate.factors:
        right *= factor if isinstance(factor, float) else _value(factor, metrics, gate)
    holds = OPS[gate.op](left, right)
    shown = "*".join(f"{f:g}" if isinstance(f, float) else f for f in gate.factors)
    sign = gate.op if holds else {">=": "<", ">": "<=", "<=": ">", "<": ">=", "==": "!="}[gate.op]
    return holds, f"{gate.metric}={left:.6g} {sign} {shown}={right:.6g}"


def check_gates(gates: list[str], metrics: dict[str, Any]) -> tuple[bool, str]:
    """Evaluate every gate; (all hold, one line: each gate's comparison, failures first)."""
    results = [evaluate(parse_gate(g), metrics) for g in gates]
    failed = [line for ok, line in results if not ok]
    passed = [line for ok, line in results if ok]
    if failed:
        return False, "; ".join(failed)
    return True, "; ".join(passed) or "no gates"


def version_metrics(client, version) -> dict[str, Any]:
    """The metrics a model version was registered with (its tag), else its run's metrics."""
    recorded = version.tags.get("distill.metrics")
    if recorded:
        return json.loads(recorded)
    return dict(client.get_run(version.run_id).data.metrics) if version.run_id else {}


def find_version(client, name: str, version: str | None = None, run_id: str | None = None):
    """A model version by number, or the newest one registered from `run_id`."""
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except Exception:  # noqa: BLE001 - unknown model and unknown version read the same to a user
        raise ConfigError(f"model {name!r} version {version}: not found in the registry") from None
    if not found:
        raise ConfigError(f"model {name!r}: no version was registered from run {run_id}")
    return max(found, key=lambda v: int(v.version))


def promote(client, name: str, version, alias: str, gates: list[str]) -> str:
    """Point `alias` at `version` when every gate holds; raise PromotionRefused with the reason otherwise."""
    ok, reason = check_gates(gates, version_metrics(client, version))
    if not ok:
        client.set_model_version_tag(name, version.version, "distill.promotion", f"refused @{alias}: {reason}")
        raise PromotionRefused(f"{name} version {version.version} not promoted to @{alias}: {reason}")
    client.set_registered_model_alias(name, alias, version.version)
    client.set_model_version_tag(name, version.version, "distill.promotion", f"@{alias}: {reason}")
    return f"{name} version {version.version} is now @{alias} ({reason})"
