"""Replay exactly once: an offline run's journal is replayed into a real sqlite MLflow store by
`distill track replay`, killed with SIGKILL at seed-chosen points (one per seed in FAULT_SEEDS), then
replayed to the end. Every logged point is in the store once, no run is doubled, and the journal is retired.
"""

from __future__ import annotations

import random
import signal
import time

from mlflow import MlflowClient

from pipeline import registry
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.tracking.lineage import read_run_id
from pipeline.tracking.mlflow_tracker import BUFFER
from tests.e2e.test_mlflow import write_recipe
from tests.fixtures.faults import fault_seeds, spawn_cli
from tests.fixtures.mlflow_server import free_port

registry.register("toy_model", "tests.fixtures.toy_model")

STEPS = 40


def _offline_run(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"toy": {"stage": "toy_model", "steps": STEPS}, "numbers": {"count": 2}},
                          uri=f"http://127.0.0.1:{free_port()}", timeout_s=1, required=False)
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(recipe), run_dir)
    events = (run_dir / BUFFER).read_text().splitlines()
    return run_dir, len(events)


def _replay_killed_at(run_dir, uri: str, count: int) -> bool:
    """Start a replay, SIGKILL it once the progress file says `count` calls were sent; True if it was killed."""
    proc = spawn_cli("track", "replay", str(run_dir), "--tracking-uri", uri)
    progress = run_dir / f"{BUFFER}.sent"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if progress.is_file() and int(progress.read_text() or 0) >= count:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    return proc.returncode == -signal.SIGKILL


def test_interrupted_replays_send_each_call_once(tmp_path):
    run_dir, total = _offline_run(tmp_path)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    seeds = fault_seeds()  # one interrupted replay per seed (CI: one; `make chaos`: four)
    points = sorted(random.Random(f"{seeds}:replay").sample(range(1, total - 8), len(seeds)))
    kills = [_replay_killed_at(run_dir, uri, count) for count in points]
    assert all(kills), f"a replay finished before its kill point ({points} of {total})"
    sent_before = int((run_dir / f"{BUFFER}.sent").read_text())
    assert points[-1] <= sent_before < total

    final = spawn_cli("track", "replay", str(run_dir), "--tracking-uri", uri)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err[-3000:]
    assert not (run_dir / BUFFER).exists() and not (run_dir / f"{BUFFER}.sent").exists()
    assert f"({sent_before} sent by an earlier, interrupted replay)" in err

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("distill").experiment_id
    runs = client.search_runs([experiment])
    assert sorted(r.info.run_name for r in runs) == ["numbers", "toy", "toy"], "a run was created twice"
    toy = client.get_run(read_run_id(run_dir / "toy"))
    for key in ("loss_kd", "loss_hidden"):
        assert [m.step for m in client.get_metric_history(toy.info.run_id, key)] == list(range(STEPS)), key
    assert len(client.get_metric_history(toy.info.run_id, "dev_acc")) == 1
    numbers = client.get_run(read_run_id(run_dir / "numbers"))
    assert len(client.get_metric_history(numbers.info.run_id, "count")) == 1
    assert toy.info.status == numbers.info.status == "FINISHED"
    parent = client.get_run(read_run_id(run_dir))
    assert parent.info.status == "FINISHED" and parent.data.params["run.name"] == "toy"
