"""One writer per stage directory: a second `distill run` on the same run directory is refused with one line
naming the holder; a lock left by a dead process (same host: pid gone; other host: heartbeat past the lease)
is taken over and logged; of several runs started at once exactly one runs. Real processes, real kill -9.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

from pipeline.lock import LOCKS, Holder, LockHeld, acquire
from tests.fixtures.faults import spawn_cli

RECIPE = "stages:\n  numbers: {{count: 3, pause_s: {pause}}}\n"


def _recipe(tmp_path, pause: float):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(pause=pause))
    return path


def _wait_for(path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("distill: error:")]


def _write_lock(path, **fields) -> None:
    holder = {**Holder.me().__dict__, **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    recipe, run_dir = _recipe(tmp_path, pause=1.0), tmp_path / "run"
    first = spawn_cli("run", str(recipe), "--run-dir", str(run_dir))
    lock = run_dir / LOCKS / "numbers.lock"
    _wait_for(lock)
    second = spawn_cli("run", str(recipe), "--run-dir", str(run_dir))
    _, err = second.communicate(timeout=120)
    errors = _errors(err)
    assert second.returncode == 2 and len(errors) == 1, err
    assert f"pid {first.pid}" in errors[0] and f"host {socket.gethostname()}" in errors[0], errors
    assert "Traceback" not in err
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert (run_dir / "numbers" / "manifest.json").is_file() and not lock.exists()


def test_lock_of_a_killed_run_is_taken_over_and_logged(tmp_path):
    recipe, run_dir = _recipe(tmp_path, pause=5.0), tmp_path / "run"
    first = spawn_cli("run", str(recipe), "--run-dir", str(run_dir))
    lock = run_dir / LOCKS / "numbers.lock"
    _wait_for(lock)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert lock.exists(), "kill -9 cannot release the lock; the next run must take it over"
    rerun = spawn_cli("run", str(recipe), "--run-dir", str(run_dir), "--set", "stages.numbers.pause_s=0")
    _, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert f"took over the lock of host {socket.gethostname()} pid {first.pid}" in err
    assert f"pid {first.pid} on {socket.gethostname()} is not running" in err
    assert (run_dir / "numbers" / "manifest.json").is_file() and not lock.exists()


def test_runs_started_at_once_one_runs_the_others_are_refused(tmp_path):
    recipe, run_dir = _recipe(tmp_path, pause=0.5), tmp_path / "run"
    procs = [spawn_cli("run", str(recipe), "--run-dir", str(run_dir)) for _ in range(4)]
    results = [(p.returncode, err) for p in procs for _, err in [p.communicate(timeout=180)]]
    # A run that starts after the winner finished finds the stage done and skips it: also exit 0, no rewrite.
    ran = [err for code, err in results if code == 0 and "numbers: start" in err]
    refused = [err for code, err in results if code == 2]
    skipped = [err for code, err in results if code == 0 and "done already" in err]
    assert len(ran) == 1 and len(ran) + len(refused) + len(skipped) == 4, results
    assert all(len(_errors(err)) == 1 and "is held by host" in err for err in refused)
    manifest = json.loads((run_dir / "numbers" / "manifest.json").read_text())
    assert [o["path"] for o in manifest["outputs"]] == ["n-0.txt", "n-1.txt", "n-2.txt"]


def test_dead_pid_on_this_host_frees_the_lock(tmp_path):
    path = tmp_path / LOCKS / "s.lock"
    _write_lock(path, pid=_dead_pid())
    acquire(path, lease_s=600).release()
    assert not path.exists()


def test_reused_pid_frees_the_lock(tmp_path):
    """Our own pid, but a different process start time: the pid was reused, the holder is gone."""
    path = tmp_path / LOCKS / "s.lock"
    _write_lock(path, pid_start="1")
    acquire(path, lease_s=600).release()


def test_live_holder_on_this_host_keeps_the_lock(tmp_path):
    path = tmp_path / LOCKS / "s.lock"
    held = acquire(path, lease_s=600)
    try:
        try:
            acquire(path, lease_s=600)
        except LockHeld as err:
            assert f"pid {held.holder.pid}" in str(err)
        else:
            raise AssertionError("a second acquire of a held lock succeeded")
    finally:
        held.release()


def test_other_host_is_judged_by_its_heartbeat(tmp_path):
    path = tmp_path / LOCKS / "s.lock"
    _write_lock(path, host="node-17", pid=1, pid_start=None, heartbeat=time.time() - 5)
    try:
        acquire(path, lease_s=60)
    except LockHeld as err:
        assert "host node-17 pid 1" in str(err)
    else:
        raise AssertionError("a lock with a fresh heartbeat from another host was taken")
    _write_lock(path, host="node-17", pid=1, pid_start=None, heartbeat=time.time() - 61)
    acquire(path, lease_s=60).release()


def test_heartbeat_moves_while_held(tmp_path):
    path = tmp_path / LOCKS / "s.lock"
    held = acquire(path, lease_s=2)  # beats every 0.5 s
    try:
        first = json.loads(path.read_text())["heartbeat"]
        time.sleep(1.2)
        assert json.loads(path.read_text())["heartbeat"] > first
    finally:
        held.release()


def test_array_workers_lock_separately(tmp_path):
    from pipeline.lock import stage_lock
    from pipeline.world import World

    with stage_lock(tmp_path, "cache", "array", World(worker=0, num_workers=2), 600) as a, \
            stage_lock(tmp_path, "cache", "array", World(worker=1, num_workers=2), 600) as b:
        assert a.path.name == "cache.worker-0.lock" and b.path.name == "cache.worker-1.lock"


def test_lock_holder_clears_what_a_killed_holder_half_wrote(tmp_path):
    from pipeline.lock import clear_partial_writes

    (tmp_path / "ckpt" / ".tmp-step-3").mkdir(parents=True)
    (tmp_path / "ckpt" / ".tmp-step-3" / "x.pt").write_text("half")
    (tmp_path / ".tmp-.mlflow_run_id.k1ll3d_x").write_text("half")
    (tmp_path / "model.safetensors").write_text("whole")
    assert clear_partial_writes(tmp_path) == 2  # a half-written folder, a half-written file
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ckpt", "model.safetensors"]
