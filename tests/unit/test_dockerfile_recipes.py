"""The image can run what we ship: every package and path a shipped recipe names is installed by the Dockerfile,
or is data the user mounts at the place docs/launch.md names (and the recipe then fails in one line without it).

No Docker engine runs here, so the Dockerfile is parsed, not built. Which Debian package provides an absolute
path is asked of dpkg on this machine (WordNet is installed for the demo tests), not written down twice.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from pipeline.assets import PACKAGES
from pipeline.recipe import load_recipe
from tests.conftest import REPO
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture
from tests.unit.test_dockerfile import instructions

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def _installed(ops) -> tuple[set[str], set[str]]:
    """(pip distributions, apt packages) the Dockerfile's RUN lines install."""
    pip, apt = set(), set()
    for op, rest in ops:
        if op != "RUN":
            continue
        for command in re.split(r"&&|;", rest):
            words = shlex.split(command)
            for tool, names in (("pip", pip), ("apt-get", apt)):
                if tool in words and "install" in words[words.index(tool):]:
                    args = words[words.index("install", words.index(tool)) + 1:]
                    names.update(w.split("==")[0] for w in args if not w.startswith("-") and w != "." and
                                 "${" not in w.split("==")[0])
    return pip, apt


def _strings(node) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _final_workdir(ops) -> str:
    return [rest for op, rest in ops if op == "WORKDIR"][-1]


@pytest.fixture(scope="module")
def dockerfile():
    ops = instructions((REPO / "Dockerfile").read_text())
    return ops, *_installed(ops)


def test_parser_reads_the_install_lines(dockerfile):
    _, pip, apt = dockerfile
    assert "torch" in pip and "wordnet-base" in apt


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_package_and_path_a_recipe_needs_is_in_the_image(dockerfile, wordnet, recipe):  # noqa: F811
    ops, pip, apt = dockerfile
    copied = {rest.split()[0].rstrip("/") for op, rest in ops if op == "COPY"}
    workdir = Path(_final_workdir(ops))
    docs = (REPO / "docs" / "launch.md").read_text()
    needs = _strings(load_recipe(recipe).resolved()["stages"])
    assert needs, recipe
    for value in needs:
        if value.startswith("pkg:"):
            package = value[4:].split("/")[0]
            assert PACKAGES.get(package, package) in pip, f"{recipe.name}: {value}: the image does not install {package}"
        elif value.startswith("/"):
            owner = subprocess.run(["dpkg", "-S", value], capture_output=True, text=True)
            assert owner.returncode == 0, f"{recipe.name}: {value}: no Debian package provides it here"
            owners = owner.stdout.split(":")[0].split(", ")  # a directory may belong to several packages
            assert set(owners) & apt, f"{recipe.name}: {value} comes from {owners}, none of which the Dockerfile installs"
        elif "/" in value and not value.startswith("@") and "://" not in value and " " not in value:
            inside = (workdir / value).resolve()
            if value.split("/")[0] in copied:
                assert (REPO / value).exists(), f"{recipe.name}: {value}: copied into the image but not in the repo"
            else:
                # User data: docs/launch.md must say where to mount it (its folder, as the container sees it).
                assert f":{inside.parent}" in docs, f"{recipe.name}: {value} ({inside}) is neither in the image nor documented"


def test_offline_non_root_and_runs_from_the_repo_layout(dockerfile):
    ops, _, _ = dockerfile
    env = " ".join(rest for op, rest in ops if op == "ENV")
    assert "HF_HUB_OFFLINE=1" in env and "TRANSFORMERS_OFFLINE=1" in env
    # `distill run configs/recipes/demo.yaml` resolves from the final WORKDIR, where configs/ was copied.
    assert _final_workdir(ops) == "/opt/distill" and ("WORKDIR", "/opt/distill") in ops[:ops.index(("COPY", "configs ./configs"))]
    users = [rest for op, rest in ops if op == "USER"]
    assert users[-1] == "distill" and "chown -R distill:distill /opt/distill" in " ".join(r for op, r in ops if op == "RUN")


def test_missing_mounted_data_fails_in_one_line(tmp_path):
    """What the sst2 recipe does in a container started without its data volume."""
    done = subprocess.run(
        ["python", "-m", "pipeline.cli", "run", str(REPO / "configs" / "recipes" / "sst2.yaml"), "--run-dir",
         str(tmp_path / "run"), "--stages", "teacher_finetune", "--set", "tracking.enabled=false",
         "--set", f"stages.teacher_finetune.data.train={tmp_path}/absent/train.tsv"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(REPO), "PATH": str(Path(__import__("sys").executable).parent) + ":/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("distill: error:")]
    assert errors == [f"distill: error: {tmp_path}/absent/train.tsv: task data file not found "
                      "(set train/dev to an existing .tsv, .csv or .jsonl)"]
    assert "Traceback" not in done.stderr
