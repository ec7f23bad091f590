"""MLflow Models on a tiny teacher and student (real MiniLM tokenizer, 64 SST-2 lines), in a real sqlite store:
the promoted student loads through `mlflow.pyfunc` and `mlflow models serve` with the labels our evaluation
gives, the teacher is a run beside it, a killed register rerun leaves one version, and a checkpoint is
exported, registered, promoted through a gate and queried with `distill predict`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from formats.serving import stop_group
from pipeline.cli import main as distill
from pipeline.manifest import Manifest
from pipeline.tracking.lineage import read_run_id
from tests.conftest import SHARED_DATA, run_cli
from tests.e2e.test_task_pipeline import tiny_encoder
from tests.fixtures.mlflow_server import free_port

RECIPE = """
run: {{name: tiny-models, seed: 0}}
tracking: {{enabled: true}}
stages:
  teacher_finetune:
    teacher_path: {teacher}
    data: &data {{train: {sst2}/train.tsv, dev: {sst2}/dev.tsv, limit_train: 64, limit_dev: 32, limit_test: 32, max_length: 32}}
    epochs: 2
    batch_size: 16
    eval_every: 4
    lr: 1.0e-3
  task:
    data: *data
    teacher: "@teacher_finetune"
    objective: pkd
    student_init: {{num_layers: 2}}
    max_steps: 4
    batch_size: 8
    checkpoint_every: 2
    keep_last: 10
    latency_repeats: 1
    latency_batch_size: 2
    latency_seq_len: 8
  register:
    model: "@task"
    name: tiny-student
    alias: champion
    require: ["dev_accuracy>=0.1*teacher"]
  register_again:
    stage: register
    model: "@task"
    name: killed-student
"""

SENTENCES = ["a charming and often affecting journey", "unflinchingly bleak and desperate",
             "the acting is superb", "a dull , lifeless mess", "it is a film", "never boring and always smart"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_recipe

    root = tmp_path_factory.mktemp("models")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE.format(teacher=tiny_encoder(root / "teacher"), sst2=SHARED_DATA / "sst2"))
    run_dir = root / "run"
    run_recipe(load_recipe(recipe), run_dir, stages=["teacher_finetune", "task", "register"])
    return recipe, run_dir, f"sqlite:///{run_dir / 'mlflow.db'}"


@pytest.fixture
def store(run, monkeypatch):
    """MLflow's own client APIs pointed at the run's store, as a user would with MLFLOW_TRACKING_URI."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", run[2])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", run[2])  # restored after the test, like the tracking URI
    mlflow.set_tracking_uri(run[2])
    mlflow.set_registry_uri(run[2])
    yield MlflowClient(run[2])
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)  # a registry URI left set would send later tests' registrations here


def our_labels(model_dir, texts) -> list[str]:
    """What our evaluation predicts (formats.taskdata.predict, argmax), as label names."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from formats.mlmodel import read_labels
    from formats.taskdata import encode, predict, predictions

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir))
    ids, types = encode(tokenizer, [(t,) for t in texts], 32)
    names = read_labels(model_dir)
    return [names[i] for i in predictions(predict(model, ids, types, tokenizer.pad_token_id), False)]


def test_champion_is_an_mlflow_model_with_card_and_teacher_beside_it(run, store):
    import mlflow

    _, run_dir, _ = run
    expected = our_labels(run_dir / "task/model", SENTENCES)
    assert set(expected) <= {"0", "1"}
    champion = store.get_model_version_by_alias("tiny-student", "champion")
    assert champion.source == f"runs:/{read_run_id(run_dir / 'task')}/model"
    got = mlflow.pyfunc.load_model("models:/tiny-student@champion").predict(SENTENCES)
    assert list(got["label"]) == expected
    pipe = mlflow.transformers.load_model("models:/tiny-student@champion")
    assert [r["label"] for r in pipe(SENTENCES)] == expected

    folder = run_dir / "task/model"
    spec = mlflow.models.Model.load(str(folder))
    assert spec.flavors["transformers"]["task"] == "text-classification"
    assert spec.signature.inputs.to_dict() == [{"type": "string", "required": True}]
    assert [c["name"] for c in spec.signature.outputs.to_dict()] == ["label", "score"]
    assert len(json.loads((folder / "input_example.json").read_text())) == 3  # the first dev sentences
    pins = (folder / "requirements.txt").read_text().split()
    assert {p.split("==")[0] for p in pins} >= {"mlflow", "torch", "transformers"}
    assert all("==" in p and "+" not in p and "://" not in p for p in pins)
    card = (folder / "README.md").read_text()
    for part in ("pipeline_tag: text-classification", "## Distilled from", "teacher_finetune", "## Recipe",
                 "objective: pkd", "| student_dev_accuracy |", "x faster than its teacher", "## Lineage"):
        assert part in card, part
    assert Manifest.load(run_dir / "task").extra["label_names"] == ["0", "1"]

    # The teacher is a run beside the student's, with the same metric names, pointing at its own logged model.
    experiment = store.get_experiment_by_name("distill").experiment_id
    runs = {r.info.run_name: r for r in store.search_runs([experiment])}
    teacher, student = runs["task/teacher"], runs["task"]
    assert teacher.data.tags["mlflow.parentRunId"] == read_run_id(run_dir)
    assert teacher.data.tags["distill.model_uri"] == f"runs:/{read_run_id(run_dir / 'teacher_finetune')}/model"
    for key in ("dev_accuracy", "params", "latency_ms"):
        assert key in teacher.data.metrics and key in student.data.metrics
    assert teacher.data.metrics["params"] > student.data.metrics["params"]
    for key in ("test_accuracy", "test_score"):  # the held-out split's scores beside the dev ones
        assert key in teacher.data.metrics and key in student.data.metrics
    plots = {a.path for a in store.list_artifacts(student.info.run_id, "plots")}
    assert {"plots/confusion_teacher.png", "plots/confusion_student.png", "plots/phase_loss_curves.png"} <= plots
    assert mlflow.pyfunc.load_model(teacher.data.tags["distill.model_uri"]).predict(SENTENCES[:2]).shape == (2, 2)


def test_served_champion_answers_invocations(run, store, tmp_path):
    _, run_dir, uri = run
    expected = our_labels(run_dir / "task/model", SENTENCES)
    port = free_port()
    with open(tmp_path / "serve.log", "w") as log:
        _serve_and_query(uri, port, log, tmp_path, expected)
    with pytest.raises(requests.RequestException):  # stopped: nothing answers on that port any more
        requests.get(f"http://127.0.0.1:{port}/ping", timeout=2)


def _serve_and_query(uri, port, log, tmp_path, expected) -> None:
    """Start `mlflow models serve` on the champion, wait for /ping, POST /invocations, stop it."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/tiny-student@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # MLflow execs `uvicorn` from PATH: the venv's bin, as for a user who activated it.
        env={**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={"inputs": SENTENCES}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert [p["label"] for p in answer.json()["predictions"]] == expected
    finally:
        stop_group(server)


def test_register_killed_after_its_version_reruns_to_one_version(run, store):
    recipe, run_dir, _ = run
    args = ("run", str(recipe), "--run-dir", str(run_dir), "--stages", "register_again")
    killed = run_cli(*args, "--set", "stages.register_again.die_after_version=true")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "register_again/manifest.json").exists()
    assert len(store.search_model_versions("name='killed-student'")) == 1
    # The rerun finds its version by the stage and the model it registers, not by a tracking run it may fail to
    # reopen: without the stage's run id file it opens a new run and must still not add a version.
    (run_dir / "register_again" / ".mlflow_run_id").unlink()
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "registered by an earlier attempt" in rerun.stderr
    versions = store.search_model_versions("name='killed-student'")
    assert [v.version for v in versions] == [1]
    assert Manifest.load(run_dir / "register_again").extra["version"] == "1"


def test_checkpoint_exported_registered_promoted_and_predicted(run, store, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    _, run_dir, _ = run
    task = run_dir / "task"
    assert distill(["export", str(task), "--checkpoint", "step-9", "--out", str(tmp_path / "x")]) == 2
    assert "complete: step-2, step-4)" in capsys.readouterr().err
    out = tmp_path / "export"
    assert distill(["export", str(task), "--checkpoint", "step-4", "--out", str(out)]) == 0
    manifest = Manifest.load(out)
    manifest.verify(out)
    assert manifest.stage == "export" and manifest.metrics["step"] == 4 and "pkd_loss" in manifest.metrics
    assert [i.name for i in manifest.inputs] == ["teacher"]
    # PKD runs one phase of 4 steps here: step-4 is the final student, so its weights are the task's model.
    final, exported = load_file(str(task / "model/model.safetensors")), load_file(str(out / "model/model.safetensors"))
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
    assert (out / "model/MLmodel").is_file() and "at step-4" in (out / "model/README.md").read_text()
    assert distill(["export", str(task), "--checkpoint", "step-4", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err

    # Registered with a gate that fails: the version exists, the alias does not move, exit 2 says why.
    common = ["--name", "ckpt-student", "--alias", "champion", "--run-dir", str(run_dir)]
    assert distill(["register", str(out), *common, "--require", "step>=100"]) == 2
    assert "step=4 < 100=100" in capsys.readouterr().err
    assert distill(["register", str(out), *common, "--require", "step>=4", "--require", "pkd_loss<100"]) == 0
    said = capsys.readouterr().out
    assert "already registered as ckpt-student version 1" in said and "is now @champion" in said
    assert [v.version for v in store.search_model_versions("name='ckpt-student'")] == [1]
    assert distill(["promote", "ckpt-student", "--version", "1", "--alias", "best", "--require", "step>=4",
                    "--run-dir", str(run_dir)]) == 0
    capsys.readouterr()

    # `distill predict` from the registry, from stdin and from the folder: the labels our evaluation gives.
    expected = our_labels(out / "model", SENTENCES)
    (tmp_path / "lines.txt").write_text("\n".join(SENTENCES) + "\n\n")
    assert distill(["predict", "models:/ckpt-student@champion", str(tmp_path / "lines.txt"),
                    "--run-dir", str(run_dir)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == SENTENCES and [r["label"] for r in rows] == expected
    assert all(0 <= r["score"] <= 1 for r in rows)
    monkeypatch.setattr(sys, "stdin", io.StringIO(SENTENCES[0] + "\n"))
    assert distill(["predict", str(out), "-"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == expected[0]
    assert distill(["predict", str(tmp_path), "-"]) == 2
    assert "not an MLflow Model folder" in capsys.readouterr().err
