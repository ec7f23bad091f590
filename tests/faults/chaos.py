"""`make chaos`: the whole fault matrix in one go, and its table.

Runs tests/faults/ and tests/dist/test_rank_loss.py with every kill-point seed (`CHAOS_SEEDS`, default
0,1,2,3: each stage killed at four seed-chosen points) and the property tests' chaos profile (more examples),
then prints one row per kind of fault:

  faults injected   test cases run (for property tests: examples tried); each injects at least one fault
  reruns identical  cases whose rerun after the fault matched the uninterrupted run (where there is a rerun)
  lost/duplicated   failed cases whose failure is about outputs: a file differs or is missing, a second model
                    version, a run created twice, a metric logged twice, a manifest left by a failed stage
  tracebacks        failed cases where a traceback reached the user (in a subprocess's stderr, or an
                    exception other than a failed check escaping the in-process CLI)

Exit status 0 when every case passed. The JSON of the table goes to CHAOS_OUT (default chaos.json) too.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["tests/faults", "tests/dist/test_rank_loss.py"]
RERUN_ROWS = ("kill -9", "rank loss", "disk full", "replay")
OUTPUT_WORDS = re.compile(r"differ|missing|versions registered|created twice|left a manifest|get_metric_history|"
                          r"outputs|tensors", re.I)


def row_of(nodeid: str) -> str:
    """The table row a test case belongs to."""
    file, _, name = nodeid.partition("::")
    stage = re.search(r"\[(\w+?)-\d+\]", name)
    if file.endswith(("test_kill_rerun.py", "test_kill_more_stages.py")):
        return f"kill -9 {stage.group(1) if stage else '?'}"
    rows = {"test_rank_loss.py": "rank loss", "test_full_disk.py": "disk full", "test_locks.py": "lock races",
            "test_replay.py": "replay", "test_sqlite_contention.py": "sqlite contention",
            "test_corruption.py": "damaged files", "test_bad_inputs.py": "bad inputs", "test_secrets.py": "secrets"}
    if file.endswith("test_properties.py"):
        return {"mutated": "recipe mutations", "damaged": "damaged files", "hostile": "hostile corpus"}[
            next(k for k in ("mutated", "damaged", "hostile") if k in name)]
    return rows.get(Path(file).name, Path(file).stem)


class Table:
    """A pytest plugin that sorts every case's outcome into its row."""

    def __init__(self):
        self.rows = defaultdict(lambda: {"faults injected": 0, "passed": 0, "reruns identical": 0,
                                         "lost or duplicated outputs": 0, "tracebacks": 0, "failed": 0})
        self.cases: dict[str, str] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and report.failed):
            self.cases[report.nodeid] = report.outcome
            row = self.rows[row_of(report.nodeid)]
            row["passed" if report.passed else "failed"] += 1
            if report.passed and any(row_of(report.nodeid).startswith(r) for r in RERUN_ROWS):
                row["reruns identical"] += 1
            if report.failed:
                text = str(report.longrepr) + "".join(body for _, body in report.sections)
                row["lost or duplicated outputs"] += bool(OUTPUT_WORDS.search(text))
                escaped = getattr(report.longrepr, "reprcrash", None)
                crashed = escaped is not None and not escaped.message.startswith("AssertionError")
                row["tracebacks"] += "Traceback (most recent call last)" in text or crashed

    def pytest_sessionfinish(self, session):
        from tests.faults import test_properties

        examples = dict(test_properties.EXAMPLES) if "tests.faults.test_properties" in sys.modules else {}
        for nodeid in self.cases:
            name = nodeid.partition("::")[2].split("[")[0]
            self.rows[row_of(nodeid)]["faults injected"] += examples.get(name, 1)


def format_table(rows: dict) -> str:
    """The table as fixed-width text."""
    columns = ["faults injected", "reruns identical", "lost or duplicated outputs", "tracebacks", "failed"]
    order = sorted(rows, key=lambda r: (not r.startswith("kill"), r))
    lines = [["fault", *columns]]
    for name in order:
        row = rows[name]
        lines.append([name, *(str(row[c]) if c != "reruns identical" or any(name.startswith(r) for r in RERUN_ROWS)
                              else "-" for c in columns)])
    total = {c: sum(rows[r][c] for r in rows) for c in columns}
    lines.append(["total", *(str(total[c]) for c in columns)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths))) for line in lines)


def main() -> int:
    os.environ["FAULT_SEEDS"] = os.environ.get("CHAOS_SEEDS", "0,1,2,3")
    os.environ.setdefault("HYPOTHESIS_PROFILE", "chaos")
    table = Table()
    started = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *TARGETS], plugins=[table])
    text = format_table(table.rows)
    minutes = (time.monotonic() - started) / 60
    print(f"\nchaos: seeds {os.environ['FAULT_SEEDS']}, {minutes:.1f} min\n{text}")
    Path(os.environ.get("CHAOS_OUT", "chaos.json")).write_text(json.dumps(
        {"seeds": os.environ["FAULT_SEEDS"], "minutes": round(minutes, 1), "rows": table.rows}, indent=2) + "\n")
    return int(code)


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
