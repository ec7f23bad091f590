"""Kubernetes manifests: every stage's objects pass offline schema validation; PyTorchJobs are checked field by field."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from kubeflow.training import models as kf

from launch import k8s
from launch.config import LaunchConfig
from launch.plan import build_plan
from pipeline.recipe import load_recipe

K8S_VERSION = "1.31.0"  # podFailurePolicy is GA from 1.31

RECIPE = """
run: {name: Toy_Run, seed: 1}
launch:
  workers: 3
  nodes: 2
  procs_per_node: 4
  gpus_per_node: 4
  cpus_per_task: 2
  image: registry.example/distill:0.1
  pvc: kd-runs
  namespace: kd
  env: {HF_HOME: /mnt/distill/hf}
stages:
  items: {stage: toy_array, items: 4}
  numbers: {count: 2}
  total: {numbers: "@numbers"}
  train: {stage: toy_train, data: "@items", steps: 5}
"""


@pytest.fixture
def recipe(tmp_path):
    from pipeline import registry

    registry.register("toy_array", "tests.fixtures.toy_array")
    registry.register("toy_train", "tests.fixtures.toy_train")
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return load_recipe(path)


def _validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("training", ["pytorchjob", "indexed"])
def test_every_manifest_passes_schema_validation(recipe, tmp_path, training):
    recipe.launch.k8s_training = training
    plan = build_plan(recipe, tmp_path / "run")
    files = k8s.write(recipe, plan, tmp_path / "k8s")
    assert sorted(files) == ["00-recipe", "01-items", "02-numbers", "03-total", "04-train"]
    kinds = []
    for path in files.values():
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.append(doc["kind"])
            if doc["kind"] == "PyTorchJob":
                for replica in doc["spec"]["pytorchReplicaSpecs"].values():
                    _validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                               "template": replica["template"]})
            else:
                _validate(doc)
    expected = ["ConfigMap", "Job", "Job", "Job"] + (["PyTorchJob"] if training == "pytorchjob" else ["Service", "Job"])
    assert kinds == expected


def test_validation_catches_a_broken_manifest(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    doc = k8s.to_dicts(k8s.objects(recipe, plan)["01-items"])[0]
    doc["spec"]["completions"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(doc)
    doc = k8s.to_dicts(k8s.objects(recipe, plan)["01-items"])[0]
    doc["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate(doc)


def test_array_stage_is_an_indexed_job(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    job = k8s.to_dicts(k8s.objects(recipe, plan)["01-items"])[0]
    spec = job["spec"]
    assert job["metadata"] == {"name": "distill-toy-run-items", "namespace": "kd",
                               "labels": {"app.kubernetes.io/name": "distill", "distill/run": "toy-run",
                                          "distill/stage": "items"}}
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.example/distill:0.1"
    assert container["command"] == ["python", "-m", "pipeline.cli", "run", "/etc/distill/recipe.yaml", "--stages",
                                    "items", "--run-dir", "/mnt/distill/runs/Toy_Run", "--num-workers", "3"]
    amounts = {"cpu": "2", "memory": "10Gi", "nvidia.com/gpu": "4"}  # 8Gi per task + 2Gi of /dev/shm (defaults)
    assert container["resources"] == {"requests": amounts, "limits": amounts}
    assert {"name": "HF_HOME", "value": "/mnt/distill/hf"} in container["env"]
    assert pod["volumes"][0] == {"name": "runs", "persistentVolumeClaim": {"claimName": "kd-runs"}}
    assert pod["volumes"][1] == {"name": "recipe", "configMap": {"name": "distill-toy-run-recipe"}}
    assert pod["restartPolicy"] == "Never" and "initContainers" not in pod
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0]["action"] == "Ignore" and rules[0]["onExitCodes"]["values"] == [75]


def test_dependent_stage_waits_for_upstream_manifest(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    job = k8s.to_dicts(k8s.objects(recipe, plan)["03-total"])[0]
    init = job["spec"]["template"]["spec"]["initContainers"]
    assert init[0]["command"][-1] == "until [ -f /mnt/distill/runs/Toy_Run/numbers/manifest.json ]; do sleep 10; done"
    assert job["spec"]["completionMode"] == "NonIndexed" and job["spec"]["completions"] == 1


def test_recipe_configmap_points_at_the_pvc_run_dir(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    configmap = k8s.to_dicts(k8s.objects(recipe, plan)["00-recipe"])[0]
    frozen = yaml.safe_load(configmap["data"]["recipe.yaml"])
    assert frozen["run"]["run_dir"] == "/mnt/distill/runs/Toy_Run"
    assert frozen["stages"]["train"] == {"stage": "toy_train", **recipe.resolved()["stages"]["train"]}


def test_pytorchjob_from_sdk_models_field_by_field(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    (job,) = k8s.objects(recipe, plan)["04-train"]
    assert isinstance(job, kf.KubeflowOrgV1PyTorchJob)
    assert (job.api_version, job.kind) == ("kubeflow.org/v1", "PyTorchJob")
    assert (job.metadata.name, job.metadata.namespace) == ("distill-toy-run-train", "kd")
    spec = job.spec
    assert isinstance(spec, kf.KubeflowOrgV1PyTorchJobSpec) and spec.nproc_per_node == "4"
    assert sorted(spec.pytorch_replica_specs) == ["Master", "Worker"]
    master, worker = spec.pytorch_replica_specs["Master"], spec.pytorch_replica_specs["Worker"]
    assert (master.replicas, worker.replicas) == (1, 1)
    assert master.restart_policy == worker.restart_policy == "OnFailure"
    assert spec.run_policy.clean_pod_policy == "None" and spec.run_policy.active_deadline_seconds == 86400
    container = master.template.spec.containers[0]
    assert container.command == ["python", "-m", "launch.ranks", "--nnodes", "2", "--nproc-per-node", "4", "--",
                                 "python", "-m", "pipeline.cli", "run", "/etc/distill/recipe.yaml", "--stages", "train",
                                 "--run-dir", "/mnt/distill/runs/Toy_Run"]
    amounts = {"cpu": "8", "memory": "34Gi", "nvidia.com/gpu": "4"}  # 4 ranks x (2 CPUs, 8Gi) + 2Gi of /dev/shm
    assert container.resources.requests == amounts and container.resources.limits == amounts
    assert master.template.spec.termination_grace_period_seconds == 120
    assert master.template.spec.init_containers[0].name == "wait-upstream"
    assert [v.persistent_volume_claim.claim_name for v in master.template.spec.volumes[:1]] == ["kd-runs"]
    dumped = k8s.to_dicts([job])[0]
    assert dumped["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1 and dumped["spec"]["nprocPerNode"] == "4"


def test_single_node_pytorchjob_has_no_workers(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run", launch=LaunchConfig(procs_per_node=2))
    (job,) = k8s.objects(recipe, plan)["04-train"]
    assert list(job.spec.pytorch_replica_specs) == ["Master"]


def test_indexed_training_job_and_headless_service(recipe, tmp_path):
    recipe.launch.k8s_training = "indexed"
    plan = build_plan(recipe, tmp_path / "run")
    service, job = k8s.to_dicts(k8s.objects(recipe, plan)["04-train"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "distill-toy-run-train"
    command = pod["containers"][0]["command"]
    assert command[:command.index("--")] == [
        "python", "-m", "launch.ranks", "--nnodes", "2", "--nproc-per-node", "4",
        "--master-addr", "distill-toy-run-train-0.distill-toy-run-train.kd.svc", "--master-port", "29500"]


def test_submit_k8s_without_kubeconfig_only_writes(tmp_path, capsys, monkeypatch):
    from tests.fixtures.toy_launch import submit_in_process

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    status, out, err = submit_in_process(capsys, "submit", str(tmp_path / "recipe.yaml"), "--backend", "k8s",
                                         "--run-dir", str(tmp_path / "run"))
    assert status == 0, err
    assert "no kubeconfig found: nothing submitted" in out
    assert len(list((tmp_path / "run" / "launch" / "k8s").glob("*.yaml"))) == 5
