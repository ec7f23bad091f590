"""`distill submit --backend local`: the plan run as subprocesses (array workers, training ranks), and rerun on 75."""

from __future__ import annotations

import json
import shutil

from tests.fixtures.toy_launch import (  # noqa: F401
    local_reference,
    outputs,
    submit,
    submit_in_process,
    write_recipe,
)

STAGES = ("items", "train")


def test_local_backend_runs_the_plan(local_reference):  # noqa: F811
    run_dir = local_reference
    for stage in STAGES:
        assert (run_dir / stage / "manifest.json").is_file(), stage
    items = json.loads((run_dir / "items" / "manifest.json").read_text())
    assert items["metrics"] == {"items": 5, "workers": 2}
    # Both array workers ran and logged, and each wrote only its own items.
    logs = [(run_dir / "launch" / "local" / f"items-{i}.log").read_text() for i in range(2)]
    assert "worker 0/2" in logs[0] and "worker 1/2" in logs[1]
    train = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert train["extra"]["world_size"] == 2 and train["metrics"]["resumed_from"] == 0
    assert train["metrics"]["loss"] < 0.01, "the toy regression did not train"
    jobs = json.loads((run_dir / "launch" / "jobs.json").read_text())["stages"]
    assert {s: jobs[s]["state"] for s in STAGES} == {s: "COMPLETED" for s in STAGES}
    status = submit("status", str(run_dir))
    assert status.returncode == 0
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert rows["train"].split()[-3:] == ["local:local", "COMPLETED", str(run_dir / "launch" / "local" / "train.log")]
    assert rows["items"].split()[-1] == str(run_dir / "launch" / "local" / "items-*.log")


def test_local_preempted_stage_is_rerun_and_resumes(local_reference, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    shutil.copytree(local_reference, run_dir)
    shutil.rmtree(run_dir / "train")
    recipe = run_dir / "launch" / "recipe.yaml"
    done = submit("submit", str(recipe), "--backend", "local", "--run-dir", str(run_dir), "--stages", "train",
                  "--set", "stages.train.preempt_at=70")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "train: COMPLETED after 2 attempt(s)" in done.stdout
    log = (run_dir / "launch" / "local" / "train.log").read_text()
    assert "preempted at step 70" in log and "resumed from checkpoint at step 70" in log
    manifest = json.loads((run_dir / "train" / "manifest.json").read_text())
    assert manifest["metrics"]["resumed_from"] == 70
    assert outputs(run_dir, "train") == outputs(local_reference, "train"), "resumed run differs from uninterrupted"


def test_dry_run_writes_the_commands_and_runs_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    status, _, err = submit_in_process(capsys, "submit", str(write_recipe(tmp_path)), "--backend", "local",
                                       "--dry-run", "--run-dir", str(run_dir), "--out", str(tmp_path / "plan"))
    assert status == 0, err
    script = (tmp_path / "plan" / "run.sh").read_text().splitlines()
    assert sum("--stages items" in line and line.endswith("&") for line in script) == 2
    ranks = [line for line in script if "--stages train" in line]
    assert [line.split()[0] for line in ranks] == ["RANK=0", "RANK=1"] and "WORLD_SIZE=2" in ranks[1]
    assert not (run_dir / "items").exists() and not (run_dir / "launch" / "jobs.json").exists()
