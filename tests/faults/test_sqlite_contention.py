"""Two runs sharing one sqlite MLflow store while a third process holds it locked: "database is locked" is
retried with backoff and both runs finish, each recorded once; a lock held past `tracking.locked_retry_s` is
one line advising a tracking server, exit 2. Real processes, a real sqlite file, a real exclusive lock.
"""

from __future__ import annotations

import subprocess
import sys

import yaml
from mlflow import MlflowClient

from pipeline.tracking.store import prepare_sqlite
from tests.fixtures.faults import spawn_cli

LOCKER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


def _store(tmp_path) -> str:
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    prepare_sqlite(uri)
    return uri


def _lock(tmp_path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(tmp_path / "shared.db"), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _recipe(tmp_path, name: str, uri: str, **tracking) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": name}, "tracking": {"enabled": True, "uri": uri, **tracking},
                                    "stages": {"numbers": {"count": 3}, "total": {"numbers": "@numbers"}}}))
    return str(path)


def test_runs_on_a_locked_store_retry_with_backoff_or_fail_in_one_line(tmp_path):
    """MLflow waits 20 s (its sqlite busy timeout) before "database is locked"; the lock is held for 26 s.
    Runs a and c (default budget) retry and finish; run b (locked_retry_s: 1) gives up with the advice."""
    uri = _store(tmp_path)
    locker = _lock(tmp_path, 26.0)
    budgets = {"a": {}, "b": {"locked_retry_s": 1}, "c": {}}
    runs = {name: spawn_cli("run", _recipe(tmp_path, name, uri, **extra), "--run-dir", str(tmp_path / name))
            for name, extra in budgets.items()}
    errs = {name: proc.communicate(timeout=180)[1] for name, proc in runs.items()}
    locker.wait(timeout=60)
    codes = {name: proc.returncode for name, proc in runs.items()}
    assert codes == {"a": 0, "b": 2, "c": 0}, {n: e[-1500:] for n, e in errs.items()}
    assert all("database is locked (another run is writing it); retrying" in errs[n] for n in "ac"), errs["a"]

    errors = [line for line in errs["b"].splitlines() if line.startswith("distill: error:")]
    assert len(errors) == 1 and "Traceback" not in errs["b"], errs["b"][-3000:]
    assert "database is locked after" in errors[0] and "mlflow server --backend-store-uri" in errors[0], errors
    assert not (tmp_path / "b" / "numbers" / "manifest.json").exists()

    client = MlflowClient(uri)
    names = sorted(r.info.run_name for r in client.search_runs([client.get_experiment_by_name("distill").experiment_id]))
    assert names == ["a", "c", "numbers", "numbers", "total", "total"], names
