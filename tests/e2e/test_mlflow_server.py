"""MLflow tracking against a real `mlflow server` (remote artifact store), and against a dead one."""

from __future__ import annotations

import json
import time

import pytest
from mlflow import MlflowClient

from pipeline.cli import main as distill
from pipeline.config import ConfigError
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.tracking import TrackingConfig
from pipeline.tracking.lineage import read_run_id
from pipeline.tracking.mlflow_tracker import BUFFER, MlflowTracker
from tests.e2e.test_mlflow import artifact_paths, runs_by_name, write_recipe
from tests.fixtures.mlflow_server import free_port, mlflow_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def test_server_runs_registry_and_download(tmp_path, server):
    recipe = write_recipe(tmp_path / "a.yaml", {
        "numbers": {"count": 3},
        "toy": {"stage": "toy_model", "dev_acc": 0.95},
        "reg": {"stage": "register", "model": "@toy", "name": "served-student", "alias": "champion",
                "require": ["dev_acc>=0.99*teacher"]},
    }, uri=server.uri)
    run_recipe(load_recipe(recipe), tmp_path / "run")
    client = MlflowClient(server.uri)
    runs = runs_by_name(client)
    assert not (tmp_path / "run" / "mlflow.db").exists(), "tracking.uri was ignored"
    toy_id = read_run_id(tmp_path / "run" / "toy")
    assert client.get_run(toy_id).data.tags["mlflow.parentRunId"] == read_run_id(tmp_path / "run")
    assert runs["reg"].data.tags["distill.input.model.run_id"] == toy_id
    assert "model/model.safetensors" in artifact_paths(client, toy_id)
    assert client.get_run(toy_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert client.get_model_version_by_alias("served-student", "champion").run_id == toy_id

    # A job elsewhere: the model comes by alias, downloaded and checked; the shard-like output by URI + hash.
    numbers_id = read_run_id(tmp_path / "run" / "numbers")
    later = write_recipe(tmp_path / "b.yaml", {
        "total": {"numbers": f"runs:/{numbers_id}"},
        "reg": {"stage": "register", "model": "models:/served-student@champion", "name": "served-copy"},
    }, uri=server.uri)
    results = run_recipe(load_recipe(later), tmp_path / "run2")
    fetched = tmp_path / "run2" / ".resolved" / "runs" / toy_id
    assert (fetched / "model" / "model.safetensors").is_file() and (fetched / "manifest.json").is_file()
    assert results["reg"].inputs[0].path == str(fetched)
    assert results["total"].metrics["total"] == 3

    # A tampered download is refused, naming the file.
    (fetched / "model" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json"):
        run_recipe(load_recipe(later), tmp_path / "run2", stages=["reg"], force=True)


def test_dead_server_fails_within_timeout(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"numbers": {"count": 2}},
                          uri=f"http://127.0.0.1:{free_port()}", timeout_s=2)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="no answer within 2 s.*tracking.required: false"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    assert time.monotonic() - started < 8
    assert not (tmp_path / "run" / "numbers" / "manifest.json").exists()


def test_dead_server_buffers_then_replays(tmp_path, server, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", {"toy": {"stage": "toy_model", "steps": 3}},
                          uri=f"http://127.0.0.1:{free_port()}", timeout_s=1, required=False)
    results = run_recipe(load_recipe(recipe), tmp_path / "run")
    assert results["toy"].metrics["dev_acc"] == 0.9
    events = [json.loads(line) for line in (tmp_path / "run" / BUFFER).read_text().splitlines()]
    assert [e["op"] for e in events if e["op"] != "log_metrics"] == ["start_pipeline", "start_stage", "end_stage",
                                                                    "end_pipeline"]
    assert sum(e["op"] == "log_metrics" for e in events) == 3

    capsys.readouterr()
    assert distill(["track", "replay", str(tmp_path / "run"), "--tracking-uri", server.uri]) == 0
    assert "replayed 7 tracking calls" in capsys.readouterr().out
    assert not (tmp_path / "run" / BUFFER).exists()
    client = MlflowClient(server.uri)
    stage_id = read_run_id(tmp_path / "run" / "toy")
    run = client.get_run(stage_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.parentRunId"] == read_run_id(tmp_path / "run")
    assert [m.step for m in client.get_metric_history(stage_id, "loss_kd")] == [0, 1, 2]
    assert "model/model.safetensors" in artifact_paths(client, stage_id)


def test_next_run_replays_the_journal_first(tmp_path, server):
    stages = {"numbers": {"count": 2}, "total": {"numbers": "@numbers"}}
    offline = write_recipe(tmp_path / "off.yaml", stages, uri=f"http://127.0.0.1:{free_port()}", timeout_s=1,
                           required=False)
    run_recipe(load_recipe(offline), tmp_path / "run")
    assert (tmp_path / "run" / BUFFER).is_file() and read_run_id(tmp_path / "run" / "numbers") is None
    online = write_recipe(tmp_path / "on.yaml", stages, uri=server.uri)
    run_recipe(load_recipe(online), tmp_path / "run")  # both stages are done: only the replay talks to MLflow
    assert not (tmp_path / "run" / BUFFER).exists()
    client = MlflowClient(server.uri)
    total = client.get_run(read_run_id(tmp_path / "run" / "total"))
    assert total.data.metrics["total"] == 1 and total.info.status == "FINISHED"
    assert total.data.tags["distill.input.numbers.run_id"] == read_run_id(tmp_path / "run" / "numbers")
    assert total.data.tags["mlflow.parentRunId"] == read_run_id(tmp_path / "run")


def test_server_dying_mid_run_goes_to_the_journal(tmp_path, server):
    """Last in this file: it kills the shared server."""
    tracker = MlflowTracker(TrackingConfig(enabled=True, uri=server.uri, required=False, timeout_s=2), tmp_path)
    stage_dir = tmp_path / "train"
    stage_dir.mkdir()
    tracker.start_pipeline("dying", tmp_path, {"run": {"seed": 1}})
    tracker.start_stage("train", stage_dir, {"lr": 0.1}, [])
    tracker.log_metrics({"loss": 1.0}, 0)
    stage_run = read_run_id(stage_dir)
    assert [m.value for m in MlflowClient(server.uri).get_metric_history(stage_run, "loss")] == [1.0]
    server.stop()
    started = time.monotonic()
    tracker.log_metrics({"loss": 0.5}, 1)
    tracker.log_metrics({"loss": 0.25}, 2)
    tracker.end_stage(None, "FINISHED")
    tracker.end_pipeline("FINISHED")
    assert time.monotonic() - started < 15, "retries were not bounded"
    events = [json.loads(line) for line in (tmp_path / BUFFER).read_text().splitlines()]
    # Re-opening calls first, so a replay continues the same runs (their id files stay).
    assert [e["op"] for e in events] == ["start_pipeline", "start_stage", "log_metrics", "log_metrics",
                                         "end_stage", "end_pipeline"]
    assert events[1]["stage_dir"] == str(stage_dir) and read_run_id(stage_dir) == stage_run
    assert [e["metrics"]["loss"] for e in events if e["op"] == "log_metrics"] == [0.5, 0.25]
