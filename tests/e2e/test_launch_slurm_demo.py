"""The shipped demo recipe, reduced with --set, through the real single-node Slurm the suite starts.

Its pretraining half (wordnet -> shard -> teacher_adapt -> cache -> general) runs as chained sbatch jobs: shard
and cache as 2-task job arrays, general as a 2-rank srun job. Mid-training the test sends general the
preemption signal; the ranks checkpoint, exit 75, the job requeues itself, resumes, and every stage's manifest
lists the same files with the same sha256 as a local-backend run of the same reduced recipe.
(The task half of the demo is single-process stages; the shipped-recipe dry-run test covers its jobs.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.recipe import load_recipe
from tests.conftest import REPO
from tests.fixtures.slurm import slurm_cluster  # noqa: F401 - fixture
from tests.fixtures.wordnet import wordnet  # noqa: F401 - fixture

DEMO = REPO / "configs" / "recipes" / "demo.yaml"
STAGES = ["wordnet", "shard", "teacher_adapt", "cache", "general"]
REDUCED = [
    "tracking.enabled=false",
    "launch.workers=2", "launch.procs_per_node=2", "launch.time_limit=00:20:00",
    # Same thread count on both backends: float sums differ in their last bits with the number of threads.
    f"launch.python={sys.executable}", f"launch.workdir={REPO}", f"launch.env={{PYTHONPATH: {REPO}, OMP_NUM_THREADS: '1'}}",
    "stages.wordnet.max_train=200", "stages.wordnet.max_dev=50",
    "stages.shard.max_docs=400", "stages.shard.docs_per_shard=100", "stages.shard.max_seq_len=32",
    "stages.teacher_adapt.steps=2", "stages.teacher_adapt.batch_size=8", "stages.teacher_adapt.eval_samples=16",
    "stages.cache.k=8",
    "stages.general.student={init: teacher, num_layers: 1, layer_selection: uniform, keep_heads: 2, keep_intermediate: 64}",
    "stages.general.max_steps=60", "stages.general.batch_size=8", "stages.general.warmup_steps=2",
    "stages.general.eval_every=30", "stages.general.eval_batches=1", "stages.general.checkpoint_every=10",
]

pytestmark = pytest.mark.slow


def distill(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `distill` CLI (no toy stages) in a fresh interpreter."""
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    sets = [a for s in REDUCED for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--stages", ",".join(STAGES), *sets],
                          cwd=REPO, env=full, capture_output=True, text=True, timeout=900)


def outputs(run_dir: Path, stage: str) -> dict[str, str]:
    """path -> sha256 of a stage's outputs; the model card (README.md) quotes measured times, so it is left out."""
    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    return {o["path"]: o["sha256"] for o in manifest["outputs"] if not o["path"].endswith("model/README.md")}


def _scontrol(cluster, job: str) -> str:
    return subprocess.run(["scontrol", "-o", "show", "job", job], env=cluster.env, capture_output=True,
                          text=True).stdout


def test_reduced_demo_through_slurm_matches_local_run(slurm_cluster, wordnet, tmp_path):  # noqa: F811
    started = time.monotonic()
    local = distill("submit", str(DEMO), "--backend", "local", "--run-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stdout + local.stderr[-3000:]
    local_s = time.monotonic() - started

    run_dir = tmp_path / "slurm"
    done = distill("submit", str(DEMO), "--backend", "slurm", "--run-dir", str(run_dir), env=slurm_cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = {line.split(":")[0]: line.split()[-1] for line in done.stdout.splitlines() if ": slurm job " in line}
    assert list(ids) == STAGES
    # The afterok chain Slurm holds is the recipe's input graph (read while the first job still runs).
    recipe = load_recipe(DEMO)
    for stage in STAGES[1:]:
        dependency = _scontrol(slurm_cluster, ids[stage]).split("Dependency=")[1].split()[0]
        assert {d.split(":")[1].split("(")[0].split("_")[0] for d in dependency.split(",")} == \
            {ids[u] for u in recipe.upstream(stage)}, (stage, dependency)

    checkpoints = run_dir / "general" / "checkpoints"
    deadline = time.monotonic() + 600
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert checkpoints.is_dir(), f"general never checkpointed; see {run_dir / 'launch' / 'slurm'}"
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids["general"]], env=slurm_cluster.env, check=True)

    states = slurm_cluster.wait(list(ids.values()), timeout=600)
    assert set(states.values()) == {"COMPLETED"}, (states, slurm_cluster.root)
    for stage in STAGES:
        assert outputs(run_dir, stage) == outputs(tmp_path / "local", stage), f"{stage} differs from the local run"

    logs = run_dir / "launch" / "slurm"
    for stage in ("shard", "cache"):
        assert sorted(p.name for p in logs.glob(f"{stage}-*.out")) == [f"{stage}-{ids[stage]}_{i}.out" for i in (0, 1)]
    assert "Restarts=1" in _scontrol(slurm_cluster, ids["general"])
    log = (logs / f"general-{ids['general']}.out").read_text()
    assert "preempted (exit 75); requeueing job" in log and "restart 1" in log and "resumed from" in log, log[-3000:]
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(run_dir)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **slurm_cluster.env},
                            capture_output=True, text=True, timeout=120)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert rows["general"][-3:] == [f"slurm:{ids['general']}", "COMPLETED", str(logs / f"general-{ids['general']}.out")]
    print(f"\nreduced demo: local backend {local_s:.0f} s, Slurm {time.monotonic() - started - local_s:.0f} s")
