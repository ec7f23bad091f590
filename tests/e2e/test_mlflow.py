"""MLflow tracking against the embedded sqlite store: runs, lineage, artifacts, plots, registry, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from pipeline import registry
from pipeline.cli import main as distill
from pipeline.config import ConfigError
from pipeline.recipe import load_recipe
from pipeline.runner import run_recipe
from pipeline.tracking.lineage import read_run_id, resolve_mlflow_uri
from tests.conftest import run_cli

registry.register("toy_model", "tests.fixtures.toy_model")


def write_recipe(path: Path, stages: dict, **tracking) -> Path:
    path.write_text(yaml.safe_dump({"run": {"name": "toy", "seed": 1},
                                    "tracking": {"enabled": True, **tracking}, "stages": stages}, sort_keys=False))
    return path


def runs_by_name(client: MlflowClient) -> dict:
    experiment = client.get_experiment_by_name("distill").experiment_id
    return {r.info.run_name: r for r in client.search_runs([experiment])}


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_runs_lineage_plots_registry_and_resolution(tmp_path, capsys):
    run_dir = tmp_path / "run"
    recipe = write_recipe(tmp_path / "a.yaml", {
        "numbers": {"count": 3},
        "total": {"numbers": "@numbers"},
        "toy": {"stage": "toy_model"},
        "reg": {"stage": "register", "model": "@toy", "name": "toy-student", "alias": "champion",
                "require": ["dev_acc>=0.97*teacher"]},
    })
    run_recipe(load_recipe(recipe), run_dir)
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(uri)
    runs = runs_by_name(client)
    parent = runs["toy"]
    assert read_run_id(run_dir) == parent.info.run_id and parent.info.status == "FINISHED"
    for stage in ("numbers", "total", "reg"):
        assert runs[stage].data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert runs[stage].info.status == "FINISHED"
    toy = next(r for r in client.search_runs([parent.info.experiment_id]) if r.data.tags.get("distill.stage") == "toy")
    assert toy.data.tags["mlflow.parentRunId"] == parent.info.run_id

    # Lineage: the consumer names the producer's run and manifest hash.
    total = runs["total"].data.tags
    numbers_id = runs["numbers"].info.run_id
    assert total["distill.input.numbers.run_id"] == numbers_id
    assert total["distill.input.numbers.manifest_sha256"] == runs["numbers"].data.tags["distill.manifest_sha256"]
    assert total["distill.lineage"] == "total <- numbers(numbers)"
    assert runs["total"].data.params["numbers"] == "@numbers" and runs["total"].data.metrics["total"] == 3

    # Large outputs are referenced, models logged in full; loss history and plots are on the run.
    assert artifact_paths(client, numbers_id) == {".mlflow_run_id", "config.yaml", "manifest.json"}
    assert runs["numbers"].data.tags["distill.output.uri"] == (run_dir / "numbers").resolve().as_uri()
    toy_files = artifact_paths(client, toy.info.run_id)
    assert {"model/model.safetensors", "model/config.json", "manifest.json",
            "plots/loss_curves.png", "plots/teacher_vs_student.png"} <= toy_files
    assert [m.step for m in client.get_metric_history(toy.info.run_id, "loss_kd")] == [0, 1, 2, 3, 4]
    png = Path(client.download_artifacts(toy.info.run_id, "plots/loss_curves.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Registry: version 1 from the toy run, promoted past its gate, lineage recorded on the version.
    champion = client.get_model_version_by_alias("toy-student", "champion")
    assert str(champion.version) == "1" and champion.run_id == toy.info.run_id
    assert champion.tags["distill.lineage"] == "toy(toy_model)"
    assert json.loads(champion.tags["distill.metrics"]) == {"dev_acc": 0.9, "teacher_dev_acc": 0.92}
    assert "0.97*teacher=0.8924" in champion.tags["distill.promotion"]
    by_number = resolve_mlflow_uri("models:/toy-student/1", load_recipe(recipe).tracking, run_dir)
    assert (by_number / "model" / "model.safetensors").is_file() and read_run_id(by_number) == toy.info.run_id

    # Another run in the same store reads the outputs back through runs:/ and models:/...@alias; a stricter
    # gate registers version 2 but refuses to move the alias, saying why.
    second = write_recipe(tmp_path / "b.yaml", {
        "total": {"numbers": f"runs:/{numbers_id}"},
        "reg": {"stage": "register", "model": "models:/toy-student@champion", "name": "toy-student",
                "alias": "champion", "require": ["dev_acc>=teacher"]},
    }, uri=uri)
    results = run_recipe(load_recipe(second), tmp_path / "run2")
    assert results["total"].metrics["total"] == 3
    assert results["total"].inputs[0].path == str((run_dir / "numbers").resolve())
    record = json.loads((tmp_path / "run2" / "reg" / "registered.json").read_text())
    assert record["version"] == "2" and record["promoted"] is False
    assert "dev_acc=0.9 < teacher=0.92" in record["reason"]
    assert record["lineage"][0]["run_id"] == toy.info.run_id
    assert str(client.get_model_version_by_alias("toy-student", "champion").version) == "1"

    # `distill promote`: a gate that fails exits 2 with the reason; a looser one moves the alias.
    capsys.readouterr()
    assert distill(["promote", "toy-student", "--version", "2", "--require", "dev_acc>=teacher",
                    "--tracking-uri", uri]) == 2
    assert "not promoted to @champion: dev_acc=0.9 < teacher=0.92" in capsys.readouterr().err
    assert distill(["promote", "toy-student", "--run", toy.info.run_id, "--alias", "best",
                    "--require", "dev_acc>=0.95*teacher", "--require", "dev_acc>0.5", "--run-dir", str(run_dir)]) == 0
    assert "is now @best" in capsys.readouterr().out
    assert str(client.get_model_version_by_alias("toy-student", "best").version) == "2"  # newest from that run


def test_register_refuses_a_stage_without_a_model(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {
        "numbers": {"count": 1}, "reg": {"stage": "register", "model": "@numbers", "name": "nope"}})
    with pytest.raises(ConfigError, match="did not save a model"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    bad = write_recipe(tmp_path / "bad.yaml", {"reg": {"stage": "register", "name": "x", "require": ["dev_acc=>1"]}})
    with pytest.raises(ConfigError, match="expected METRIC OP EXPR"):
        load_recipe(bad)


def test_killed_stage_resumes_its_own_run(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", {"numbers": {"count": 4}})
    run_dir = tmp_path / "run"
    killed = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--set", "stages.numbers.die_after=2")
    assert killed.returncode == -9
    first = read_run_id(run_dir / "numbers")
    assert first and not (run_dir / "numbers" / "manifest.json").exists()
    resumed = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert read_run_id(run_dir / "numbers") == first
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("distill").experiment_id
    stage_runs = [r for r in client.search_runs([experiment]) if r.info.run_name == "numbers"]
    assert [r.info.run_id for r in stage_runs] == [first]
    assert stage_runs[0].info.status == "FINISHED" and "distill.resumed_at" in stage_runs[0].data.tags
    assert len(client.search_runs([experiment])) == 2  # the parent was reopened too, not duplicated
