"""Kubernetes pods: /dev/shm, requests = limits, node selectors, tolerations, pull secrets, non-root, from `launch:`."""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from launch import k8s
from launch.plan import build_plan
from pipeline.config import ConfigError
from pipeline.recipe import load_recipe

RECIPE = """
run: {name: pods, seed: 1}
launch:
  workers: 2
  procs_per_node: 4
  gpus_per_node: 4
  cpus_per_task: 3
  memory_per_task: 12Gi
  shm_size: 16Gi
  node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
  image_pull_secrets: [regcred]
  stages:
    items: {gpus_per_node: 0, memory_per_task: 1536Mi, node_selector: {pool: cpu}, tolerations: []}
stages:
  items: {stage: toy_array, items: 4}
  train: {stage: toy_train, data: "@items", steps: 5}
"""


@pytest.fixture
def pods(tmp_path):
    from pipeline import registry

    registry.register("toy_array", "tests.fixtures.toy_array")
    registry.register("toy_train", "tests.fixtures.toy_train")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    recipe = load_recipe(tmp_path / "recipe.yaml")
    objs = k8s.objects(recipe, build_plan(recipe, tmp_path / "run"))
    items = k8s.to_dicts(objs["01-items"])[0]["spec"]["template"]
    train = k8s.to_dicts(objs["02-train"])[0]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    for template in (items, train):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, "1.31.0", strict=True)
    return items["spec"], train["spec"]


def test_shm_is_memory_backed_and_sized_from_the_config(pods):
    for pod in pods:
        assert {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}} in pod["volumes"]
        assert {"name": "shm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_requests_equal_limits_per_process_plus_shm(pods):
    items, train = (pod["containers"][0]["resources"] for pod in pods)
    # Training pod: 4 ranks x (3 CPUs, 12Gi) + 16Gi /dev/shm, 4 GPUs. Array pod: 1 task, its own override.
    assert train["requests"] == train["limits"] == {"cpu": "12", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert items["requests"] == items["limits"] == {"cpu": "3", "memory": "17920Mi"}


def test_node_selector_and_tolerations_with_per_stage_override(pods):
    items, train = pods
    assert train["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert train["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert items["nodeSelector"] == {"pool": "cpu"} and "tolerations" not in items


def test_pull_secret_by_name_non_root_and_no_secret_values(pods, tmp_path):
    for pod in pods:
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}
        for container in pod["containers"] + pod.get("initContainers", []):
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
            assert all("valueFrom" not in e for e in container.get("env", []))


@pytest.mark.parametrize("setting, expect", [
    ("launch.memory_per_task=lots", "launch: memory_per_task 'lots': expected a Kubernetes quantity"),
    ("launch.shm_size=0Mi", "shm_size '0Mi': expected a Kubernetes quantity"),
    ("launch.tolerations=[{key: a, operator: Exists, value: b}]", "operator Exists takes no value"),
    ("launch.tolerations=[{key: a, operator: Sometimes}]", "launch.tolerations.0.operator: expected one of"),
    ("launch.node_selector=[gpu]", "launch.node_selector: expected dict"),
])
def test_bad_pod_settings_are_one_line_errors(tmp_path, setting, expect):
    (tmp_path / "recipe.yaml").write_text("stages:\n  numbers: {}\n")
    with pytest.raises(ConfigError, match=expect) as err:
        load_recipe(tmp_path / "recipe.yaml", [setting])
    assert "\n" not in str(err.value)


def test_shipped_k8s_launch_file_loads(repo):
    tree = yaml.safe_load((repo / "configs" / "launch" / "k8s.yaml").read_text())
    from launch.config import LaunchConfig
    from pipeline.config import build

    launch = build(LaunchConfig, tree["launch"], origin_file="configs/launch/k8s.yaml", path=("launch",))
    assert launch.shm_size and launch.memory_per_task and launch.tolerations
