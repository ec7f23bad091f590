"""Every recipe we ship, on every path a user takes: `distill config`, and `distill submit --dry-run` on Slurm,
Kubernetes and local, alone and with each shipped `configs/launch/*.yaml`.

Kubernetes manifests are validated strictly offline (core objects against the API schema, PyTorchJobs against
the training SDK's models with their pod templates against the API schema); the Slurm dependency graph, the
Kubernetes wait-for-upstream init containers and the local run order are checked against the recipe's input
graph, read here straight from the YAML (every "@stage" string in a stage's section), not through the code that
builds the plan.
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_yaml
from pipeline.recipe import load_recipe
from tests.conftest import REPO

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
LAUNCH_FILES = sorted((REPO / "configs" / "launch").glob("*.yaml"))
BACKENDS = ("slurm", "k8s", "local")
K8S_VERSION = "1.31.0"


def test_the_shipped_recipes_are_found():
    assert {p.stem for p in RECIPES} >= {"demo", "sst2"} and {p.stem for p in LAUNCH_FILES} == {"k8s", "slurm"}


def input_graph(recipe: Path) -> dict[str, set[str]]:
    """stage -> the stages it reads, from every "@name" string anywhere (nested too) in its YAML section."""
    tree, _ = load_yaml(recipe)
    stages = tree["stages"]

    def refs(node) -> set[str]:
        if isinstance(node, dict):
            return set().union(*map(refs, node.values())) if node else set()
        if isinstance(node, list):
            return set().union(*map(refs, node)) if node else set()
        return {node[1:]} if isinstance(node, str) and node.startswith("@") and node[1:] in stages else set()

    return {name: refs(body or {}) for name, body in stages.items()}


def _distill(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out = capsys.readouterr()
    return status, out.out, out.err


def _with_launch(recipe: Path, launch: Path | None, tmp_path: Path) -> Path:
    if launch is None:
        return recipe
    path = tmp_path / f"{recipe.stem}+{launch.stem}.yaml"
    path.write_text(yaml.safe_dump({"include": [str(recipe), str(launch)]}))
    return path


def _slurm_graph(out: Path) -> dict[str, set[str]]:
    graph = {}
    for line in (out / "submit.sh").read_text().splitlines():
        found = re.match(r"(\w+)=\$\(sbatch --parsable(?: --dependency=afterok:(\S+))? (\S+)\)$", line)
        if found:
            deps = found.group(2) or ""
            graph[found.group(1)] = {d.strip("${}") for d in deps.split(":") if d}
    return graph


def _check_k8s_strictly(docs: list[dict]) -> None:
    from kubeflow.training import models as kf
    from kubernetes import client

    def against_model(node, model):
        names = {v: k for k, v in model.attribute_map.items()}
        for key, value in node.items():
            assert key in names, f"{model.__name__}: unknown field {key!r}"
            kind = model.openapi_types[names[key]]
            inner = re.fullmatch(r"(?:dict\(str, |list\[)?(\w+)[)\]]?", kind).group(1)
            values = value.values() if kind.startswith("dict(") else (value if kind.startswith("list[") else [value])
            for item in values:
                if inner == "V1PodTemplateSpec":
                    kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                                  "template": item}, K8S_VERSION, strict=True)
                elif hasattr(kf, inner) or hasattr(client, inner):
                    against_model(item, getattr(kf, inner, None) or getattr(client, inner))

    for doc in docs:
        if doc["kind"] == "PyTorchJob":
            assert doc["apiVersion"] == "kubeflow.org/v1"
            against_model(doc, kf.KubeflowOrgV1PyTorchJob)
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_distill_config(capsys, recipe):
    status, out, err = _distill(capsys, "config", str(recipe))
    assert status == 0, err
    resolved = yaml.safe_load(out)
    assert list(resolved["stages"]) == list(input_graph(recipe))


@pytest.mark.parametrize("launch", [None, *LAUNCH_FILES], ids=lambda p: p.stem if p else "recipe-only")
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_submit_dry_run_on_every_backend(capsys, tmp_path, recipe, launch):
    expected = input_graph(recipe)
    path = _with_launch(recipe, launch, tmp_path)
    for backend in BACKENDS:
        out = tmp_path / backend
        if launch is not None and backend == "local":
            # A cluster shape (several nodes for a training stage) cannot run on one machine: one line, exit 2.
            status, _, err = _distill(capsys, "submit", str(path), "--backend", backend, "--dry-run", "--out", str(out))
            multi_node = "distributed" in {e.spec.launch for e in load_recipe(path).stages.values()}
            assert (status, len(err.splitlines())) == ((2, 1) if multi_node else (0, 0)), err
            assert not multi_node or "the local backend has one node" in err
            continue
        status, stdout, err = _distill(capsys, "submit", str(path), "--backend", backend, "--dry-run",
                                       "--out", str(out), "--run-dir", str(tmp_path / "run"))
        assert status == 0, f"{backend}: {err}"
        assert "nothing" in stdout and not (tmp_path / "run" / "launch" / "jobs.json").exists()
    assert _slurm_graph(tmp_path / "slurm") == expected
    # Every stage's sbatch script has the shape its stage type asks for.
    loaded = load_recipe(path)
    for script in (tmp_path / "slurm").glob("*.sbatch"):
        stage = script.stem.split("-", 1)[1]
        text = script.read_text()
        kind = loaded.stages[stage].spec.launch
        assert ("#SBATCH --array=" in text) == (kind == "array"), script.name
        assert ("#SBATCH --requeue" in text) == (kind == "distributed"), script.name
    docs = [d for p in sorted((tmp_path / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text())]
    _check_k8s_strictly(docs)
    waits = {}
    for doc in docs[1:]:
        template = (doc["spec"]["pytorchReplicaSpecs"]["Master"]["template"] if doc["kind"] == "PyTorchJob"
                    else doc["spec"].get("template"))
        if template is None:
            continue  # the headless Service of an indexed training stage
        init = template["spec"].get("initContainers", [])
        waited = set(re.findall(r"/runs/[^/]+/([^/]+)/manifest\.json", init[0]["command"][-1])) if init else set()
        waits[template["metadata"]["labels"]["distill/stage"]] = waited
    assert waits == {s.replace("_", "-"): {u for u in ups} for s, ups in expected.items()}
    if launch is not None:
        return
    order = [re.search(r"--stages (\S+)", line).group(1) for line in (tmp_path / "local" / "run.sh").read_text().splitlines()
             if "--stages" in line]
    first = {stage: order.index(stage) for stage in expected}
    assert all(first[u] < first[s] for s, ups in expected.items() for u in ups), order


def test_the_graph_oracle_sees_nested_inputs():
    graph = input_graph(REPO / "configs" / "recipes" / "demo.yaml")
    assert graph["teacher_finetune"] == {"wordnet"}, "data.source is an input"
    assert graph["task"] == {"wordnet", "teacher_finetune", "general", "augment"}


@pytest.mark.parametrize("args, expect", [
    (["--set", "launch.backend=lsf"], "launch.backend: expected one of 'slurm', 'k8s', 'local'"),
    (["--set", "launch.nodes=0"], "launch: nodes must be >= 1"),
    (["--set", "launch.image=null"], "launch.image: expected str, got None"),
    (["--set", "launch.stages.ghost.nodes=2"], "launch.stages.ghost: no such stage in this recipe"),
    (["--set", "launch.memory_per_task=big"], "memory_per_task 'big': expected a Kubernetes quantity"),
    (["--set", "launch.gpus=8"], "launch.gpus: unknown key"),
    (["--stages", "nope"], "--stages nope: not in this recipe"),
])
def test_bad_launch_values_are_one_line_exit_2(capsys, tmp_path, args, expect):
    status, _, err = _distill(capsys, "submit", str(RECIPES[0]), "--backend", "k8s", "--dry-run",
                              "--out", str(tmp_path / "out"), "--run-dir", str(tmp_path / "run"), *args)
    assert status == 2 and expect in err and len(err.strip().splitlines()) == 1, err


def test_missing_recipe_file_through_the_real_cli(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", str(tmp_path / "absent.yaml"),
                           "--backend", "slurm", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == f"distill: error: {tmp_path / 'absent.yaml'}: config file not found"
