"""Secrets stay out of everything a run writes. A real run (numbers, total, a model stage and register) against
a real `mlflow server` reached through a URI with a password in it, with MLflow credentials and TOKEN / SECRET /
PASSWORD / KEY variables in its environment: no secret is in any file of the run directory or of the server's
store, in the run's log lines, or in any MLflow param or tag (runs and model versions).
"""

from __future__ import annotations

import os
import subprocess
import sys

import yaml
from mlflow import MlflowClient

from pipeline.secrets import scrub, secret_values
from tests.conftest import REPO
from tests.fixtures.mlflow_server import mlflow_server

SECRETS = {
    "MLFLOW_TRACKING_USERNAME": "alice-the-operator", "MLFLOW_TRACKING_PASSWORD": "pw-Hunter2-xyz",
    "MLFLOW_TRACKING_TOKEN": "tok-abcdef123456", "HF_TOKEN": "hf_secretvalue999", "MY_SERVICE_SECRET": "sek-98765-q",
    "DB_PASSWORD": "dbpass-4321-w", "AWS_SECRET_ACCESS_KEY": "aws/KEY+value123", "OPENAI_API_KEY": "sk-test-5555-e",
}
URI_PASSWORD = "uri-pass-777-zz"
MAIN = ("import sys; from pipeline import registry; registry.register('numbers', 'tests.fixtures.toy_stages'); "
        "registry.register('total', 'tests.fixtures.toy_total'); registry.register('toy_model', 'tests.fixtures.toy_model'); "
        "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")


def _all_params_and_tags(client: MlflowClient) -> list[str]:
    texts = []
    for experiment in client.search_experiments():
        for run in client.search_runs([experiment.experiment_id]):
            texts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
    for version in client.search_model_versions():
        texts += [f"{k}={v}" for k, v in version.tags.items()] + [version.description or "", version.source]
    return texts


def test_no_secret_is_written_anywhere(tmp_path):
    with mlflow_server(tmp_path / "server") as server:
        host = server.uri.removeprefix("http://")
        uri = f"http://alice-the-operator:{URI_PASSWORD}@{host}"
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump({"run": {"name": "secrets"}, "tracking": {"enabled": True, "uri": uri},
                                          "stages": {"numbers": {"count": 2}, "total": {"numbers": "@numbers"},
                                                     "toy": {"stage": "toy_model", "steps": 3},
                                                     "register": {"model": "@toy", "name": "secret-test"}}},
                                         sort_keys=False))
        run_dir = tmp_path / "run"
        env = {**os.environ, **SECRETS, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", MAIN, "run", str(recipe), "--run-dir", str(run_dir)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "***@" in (run_dir / "config.yaml").read_text(), "the URI's password was not masked"
        texts = {"stdout+stderr": proc.stdout + proc.stderr}
        written = [p for root in (run_dir, tmp_path / "server") for p in root.rglob("*")
                   if p.is_file() and p.name != "server.log"]
        assert len(written) > 20, written  # the run and its artifacts are all there to search
        for path in written:
            texts[str(path)] = path.read_bytes().decode("latin-1")
        texts["mlflow params and tags"] = "\n".join(_all_params_and_tags(MlflowClient(server.uri)))
    for secret in [*SECRETS.values(), URI_PASSWORD]:
        leaks = [where for where, text in texts.items() if secret in text]
        lines = [line for line in texts["stdout+stderr"].splitlines() if secret in line]
        assert not leaks, f"{secret!r} was written to {leaks[:5]} {lines[:3]}"


def test_scrub_masks_secret_variables_and_uri_passwords():
    env = {"HF_TOKEN": "hf_abcdefgh", "PATH": "/usr/bin:/bin", "KEYTIMEOUT": "1", "my_api_key": "k-123456789"}
    assert secret_values(env) == ["hf_abcdefgh", "k-123456789"]
    got = scrub({"uri": "https://bob:p%40ss@host:5000/x", "list": ["hf_abcdefgh", "/usr/bin"], "n": 3},
                secret_values(env))
    assert got == {"uri": "https://bob:***@host:5000/x", "list": ["***", "/usr/bin"], "n": 3}
