"""`distill status` and `distill cancel` for a run submitted to Kubernetes, against a fake API server.

There is no Kubernetes API server here; the fake stands in for it only (the client calls and their arguments
are the real ones `launch.k8s` makes), and keeps objects the way the server would.
"""

from __future__ import annotations

import json

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from launch import jobs
from launch import k8s_cluster as k8s

NS = "kd"


class FakeServer:
    """Objects by (kind, name); Jobs carry a V1JobStatus, PyTorchJobs a status dict with conditions."""

    def __init__(self, objects: dict):
        self.objects = dict(objects)
        self.deleted: list[tuple] = []
        self.batch, self.core, self.custom = self, self, self

    def _get(self, kind, name, namespace):
        assert namespace == NS
        if (kind, name) not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[(kind, name)]

    def _delete(self, kind, name, namespace, **options):
        self._get(kind, name, namespace)
        del self.objects[(kind, name)]
        self.deleted.append((kind, name, options))

    def read_namespaced_job_status(self, name, namespace):
        return client.V1Job(status=self._get("Job", name, namespace))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        return self._get("PyTorchJob", name, namespace)

    def delete_namespaced_job(self, name, namespace, propagation_policy=None):
        self._delete("Job", name, namespace, propagation_policy=propagation_policy)

    def delete_namespaced_service(self, name, namespace):
        self._delete("Service", name, namespace)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        self._delete("PyTorchJob", name, namespace, propagation_policy=body.propagation_policy)


@pytest.fixture
def run_dir(tmp_path):
    """A run whose array stage finished and whose training stage (a PyTorchJob) is running."""
    ids = {"items": "Job/distill-toy-items", "train": "PyTorchJob/distill-toy-train",
           "eval": "Service/distill-toy-eval,Job/distill-toy-eval"}
    jobs.record_jobs(tmp_path, "k8s", {s: {"id": i, "kind": "x", "log": k8s.log_command(i, NS)} for s, i in ids.items()},
                     namespace=NS)
    (tmp_path / "items").mkdir()
    (tmp_path / "items" / "manifest.json").write_text("{}")
    return tmp_path


def _server():
    done = client.V1JobStatus(succeeded=2, conditions=[client.V1JobCondition(type="Complete", status="True")])
    running = {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}}
    return FakeServer({("Job", "distill-toy-items"): done, ("PyTorchJob", "distill-toy-train"): running,
                       ("Service", "distill-toy-eval"): {}, ("Job", "distill-toy-eval"): client.V1JobStatus(active=0)})


def test_status_columns_show_job_live_state_and_log(run_dir, monkeypatch):
    server = _server()
    monkeypatch.setattr(k8s, "_clients", lambda api=None: (server.batch, server.core, server.custom))
    monkeypatch.setattr(k8s, "kubeconfig_present", lambda: True)
    columns = jobs.job_columns(run_dir)
    assert columns["job"]["train"] == "k8s:PyTorchJob/distill-toy-train"
    assert columns["job state"] == {"items": "COMPLETED", "train": "RUNNING", "eval": "PENDING"}
    assert columns["log"]["train"] == "kubectl logs -n kd -l training.kubeflow.org/job-name=distill-toy-train --prefix"
    assert columns["log"]["items"] == "kubectl logs -n kd -l job-name=distill-toy-items --prefix"


def test_status_without_a_cluster_falls_back_to_the_record(run_dir, monkeypatch):
    monkeypatch.setattr(k8s, "kubeconfig_present", lambda: False)
    assert set(jobs.job_columns(run_dir)["job state"].values()) == {"unknown"}


def test_cancel_deletes_unfinished_stages_only(run_dir):
    server = _server()
    lines = jobs.cancel_run(run_dir, k8s_api=server)
    assert lines == ["eval: deleted Service/distill-toy-eval, Job/distill-toy-eval",
                     "items: finished, left as it is",
                     "train: deleted PyTorchJob/distill-toy-train"]
    assert ("Job", "distill-toy-items") in server.objects, "a finished stage's Job was deleted"
    assert ("PyTorchJob", "distill-toy-train", {"propagation_policy": "Background"}) in server.deleted
    assert (run_dir / "items" / "manifest.json").is_file()
    record = json.loads((run_dir / "launch" / "jobs.json").read_text())["stages"]
    assert (record["train"]["state"], record["train"]["backend"]) == ("CANCELLED", "k8s")
    assert "state" not in record["items"]
    # Cancelling again: the objects are gone already, which is not an error.
    assert jobs.cancel_run(run_dir, k8s_api=server)[2] == "train: deleted nothing (already gone)"


def test_cancel_without_a_submission_is_one_line(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["cancel", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"distill: error: {tmp_path}/launch/jobs.json: no submitted jobs to cancel (submit with `distill submit`)"
