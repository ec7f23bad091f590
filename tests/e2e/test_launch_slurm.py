"""`distill submit --backend slurm` against a real single-node Slurm (slurmctld + slurmd on localhost).

The demo recipe's array stage runs as a 2-task job array and its training stage as a 2-rank srun job chained
with --dependency=afterok. While training runs, the test sends it the preemption signal: the ranks checkpoint,
exit 75, the job requeues itself, resumes from the checkpoint and ends bit-identical to the local run.
(One Slurm run covers both, to keep the suite's time down.)
"""

from __future__ import annotations

import json
import subprocess
import time

from tests.fixtures.slurm import slurm_cluster  # noqa: F401 - fixture
from tests.fixtures.toy_launch import local_reference, outputs, submit  # noqa: F401 - fixture


def _job_ids(stdout: str) -> dict[str, str]:
    return {line.split(":")[0]: line.split()[-1] for line in stdout.splitlines() if ": slurm job " in line}


def _scontrol(cluster, job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True, text=True).stdout


def test_chained_jobs_survive_preemption_and_match_local_run(slurm_cluster, local_reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    recipe = local_reference.parent / "recipe.yaml"
    # Slow steps (not part of the config hash) leave time to signal the training job mid-run.
    done = submit("submit", str(recipe), "--backend", "slurm", "--run-dir", str(run_dir),
                  "--set", "stages.train.step_sleep=0.05", env=slurm_cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = _job_ids(done.stdout)
    assert set(ids) == {"items", "train"}
    assert f"afterok:{ids['items']}" in _scontrol(slurm_cluster, ids["train"])

    step_file = run_dir / "train" / "checkpoint" / "step.json"
    deadline = time.monotonic() + 240
    while not step_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert step_file.is_file(), f"training never checkpointed; see {run_dir / 'launch' / 'slurm'}"
    # What Slurm does at --signal=B:USR1@N: signal the batch shell, which forwards it to the ranks.
    subprocess.run(["scancel", "--batch", "--signal=USR1", ids["train"]], env=slurm_cluster.env, check=True)

    states = slurm_cluster.wait(list(ids.values()), timeout=300)
    assert states == {ids["items"]: "COMPLETED", ids["train"]: "COMPLETED"}, (states, slurm_cluster.root)
    for stage in ("items", "train"):
        assert outputs(run_dir, stage) == outputs(local_reference, stage), stage

    logs = run_dir / "launch" / "slurm"
    assert sorted(p.name for p in logs.glob("items-*.out")) == [f"items-{ids['items']}_{i}.out" for i in (0, 1)]
    assert "Restarts=1" in _scontrol(slurm_cluster, ids["train"])
    log = (logs / f"train-{ids['train']}.out").read_text()
    assert "preempted (exit 75); requeueing job" in log and "restart 1" in log, log
    stopped = int(log.split("preempted at step ")[1].split(",")[0])
    assert 0 < stopped < 200 and f"resumed from checkpoint at step {stopped}" in log
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["metrics"]["resumed_from"] == stopped and train["extra"]["world_size"] == 2

    status = submit("status", str(run_dir), env=slurm_cluster.env)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert rows["train"][-3:] == [f"slurm:{ids['train']}", "COMPLETED", str(logs / f"train-{ids['train']}.out")]
    assert rows["items"][-3:] == [f"slurm:{ids['items']}", "COMPLETED", str(logs / f"items-{ids['items']}_*.out")]


def test_cancel_stops_unfinished_stages_and_leaves_finished_ones(slurm_cluster, local_reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    recipe = local_reference.parent / "recipe.yaml"
    done = submit("submit", str(recipe), "--backend", "slurm", "--run-dir", str(run_dir),
                  "--set", "stages.train.step_sleep=0.5", env=slurm_cluster.env)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = _job_ids(done.stdout)
    deadline = time.monotonic() + 120
    while not (run_dir / "train" / ".started.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (run_dir / "items" / "manifest.json").is_file() and slurm_cluster.job_state(ids["train"]) == "RUNNING"
    before = outputs(run_dir, "items")
    cancel = submit("cancel", str(run_dir), env=slurm_cluster.env)
    assert cancel.returncode == 0, cancel.stderr
    assert cancel.stdout.splitlines() == ["items: finished, left as it is", f"train: cancelled slurm job {ids['train']}"]
    states = slurm_cluster.wait(list(ids.values()), timeout=60)
    assert states == {ids["items"]: "COMPLETED", ids["train"]: "CANCELLED"}
    assert outputs(run_dir, "items") == before and not (run_dir / "train" / "manifest.json").exists()
    status = submit("status", str(run_dir), env=slurm_cluster.env)
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[1:]}
    assert rows["train"][-3:-1] == [f"slurm:{ids['train']}", "CANCELLED"], status.stdout
