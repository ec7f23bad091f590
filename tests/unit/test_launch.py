"""The launch plan, its Slurm scripts and local commands, the launch: config section and the job record."""

from __future__ import annotations

import subprocess

import pytest
import yaml

from launch import local, slurm
from launch.config import LaunchConfig, time_seconds
from launch.jobs import job_columns, record_jobs
from launch.ranks import wait_ranks
from launch.plan import build_plan, dns_name, freeze_recipe
from pipeline.config import ConfigError, config_hash
from pipeline.recipe import load_recipe

RECIPE = """
run: {name: Toy_Run, seed: 1}
launch:
  workers: 3
  procs_per_node: 2
  nodes: 2
  cpus_per_task: 4
  partition: gpu
  account: kd
  env: {OMP_NUM_THREADS: "4"}
  sbatch_args: ["--exclusive"]
  stages:
    train: {nodes: 1, time_limit: "2-00:00:00"}
stages:
  items: {stage: toy_array, items: 4}
  numbers: {count: 2}
  total: {numbers: "@numbers"}
  train: {stage: toy_train, data: "@items", steps: 5}
"""


@pytest.fixture(autouse=True)
def toy_types():
    from pipeline import registry

    registry.register("toy_array", "tests.fixtures.toy_array")
    registry.register("toy_train", "tests.fixtures.toy_train")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE)
    return load_recipe(path)


def test_plan_shapes_and_dependencies(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    jobs = {j.stage: j for j in plan.jobs}
    assert [j.stage for j in plan.jobs] == ["items", "numbers", "total", "train"]
    assert (jobs["items"].kind, jobs["items"].workers, jobs["items"].nodes) == ("array", 3, 1)
    assert (jobs["numbers"].kind, jobs["numbers"].workers) == ("single", 1)
    # Per-stage override: train on 1 node x 2 ranks, 2 days; others keep the section's values.
    assert (jobs["train"].kind, jobs["train"].nodes, jobs["train"].world_size) == ("distributed", 1, 2)
    assert jobs["train"].time_limit == "2-00:00:00" and jobs["items"].time_limit == "24:00:00"
    assert jobs["total"].after == ["numbers"] and jobs["train"].after == ["items"] and jobs["items"].after == []
    subset = build_plan(recipe, tmp_path / "run", ["train"])
    assert [j.stage for j in subset.jobs] == ["train"] and subset.jobs[0].after == []
    with pytest.raises(ConfigError, match="--stages nope: not in this recipe"):
        build_plan(recipe, tmp_path / "run", ["nope"])


def test_frozen_recipe_reloads_with_the_same_config_hashes(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    frozen = load_recipe(freeze_recipe(recipe, plan))
    assert frozen.run.run_dir == str((tmp_path / "run").resolve())
    for name, entry in recipe.stages.items():
        assert config_hash(frozen.stages[name].config) == config_hash(entry.config), name
    assert frozen.launch == recipe.launch


@pytest.mark.parametrize("body, expect", [
    ("launch: {nodes: 0}\n", "launch: nodes must be >= 1"),
    ("launch: {backend: lsf}\n", "launch.backend: expected one of"),
    ("launch: {time_limit: soon}\n", "time_limit 'soon'"),
    ("launch: {gpus: 8}\n", "launch.gpus: unknown key"),
    ("launch: {stages: {numbers: {workers: 0}}}\n", "stages.numbers.workers must be >= 1"),
])
def test_bad_launch_section_is_one_line_error(tmp_path, body, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(body + "stages:\n  numbers: {}\n")
    with pytest.raises(ConfigError, match=expect) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_override_for_a_stage_not_in_the_recipe(tmp_path, recipe):
    recipe.launch.stages["ghost"] = recipe.launch.stages["train"]
    with pytest.raises(ConfigError, match="launch.stages.ghost: no such stage"):
        build_plan(recipe, tmp_path)


def test_time_seconds():
    assert time_seconds("1-02:03:04") == 93784
    assert time_seconds("02:00:00") == 7200 and time_seconds("10:30") == 630 and time_seconds("15") == 900


def test_dns_name():
    assert dns_name("distill", "Toy_Run", "teacher_adapt") == "distill-toy-run-teacher-adapt"
    assert len(dns_name("x" * 100)) == 63


def _sbatch_lines(script: str) -> list[str]:
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_slurm_array_script(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    script = slurm.render(plan, plan.jobs[0])
    lines = _sbatch_lines(script)
    assert "--array=0-2" in lines and "--ntasks=1" in lines and "--cpus-per-task=4" in lines
    assert "--partition=gpu" in lines and "--account=kd" in lines and "--exclusive" in lines
    assert f"--output={plan.run_dir}/launch/slurm/items-%A_%a.out" in lines
    assert not any(line.startswith(("--signal", "--requeue")) for line in lines)
    assert '--worker "$SLURM_ARRAY_TASK_ID" --num-workers 3' in script
    assert "export OMP_NUM_THREADS=4" in script
    assert f"run {plan.recipe_path} --stages items --run-dir {plan.run_dir}" in script


def test_slurm_training_script(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run", launch=LaunchConfig(nodes=4, procs_per_node=8, gpus_per_node=8,
                                                                    signal_seconds=300))
    script = slurm.render(plan, plan.jobs[-1])
    lines = _sbatch_lines(script)
    assert {"--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=B:USR1@300", "--requeue"} <= set(lines)
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in script
    assert "RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID" in script
    assert "trap forward USR1 TERM" in script and 'if [ "$status" -eq 75 ] || ' in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert f'if [ -e {plan.run_dir}/launch/slurm/.cancelled-"$SLURM_JOB_ID" ]; then' in script  # distill cancel's mark
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_slurm_write_chains_with_afterok(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run")
    scripts = slurm.write(plan, tmp_path / "out")
    assert sorted(p.name for p in scripts.values()) == ["00-items.sbatch", "01-numbers.sbatch", "02-total.sbatch",
                                                        "03-train.sbatch"]
    submit = (tmp_path / "out" / "submit.sh").read_text()
    assert f"items=$(sbatch --parsable {scripts['items']})" in submit
    assert f"total=$(sbatch --parsable --dependency=afterok:${{numbers}} {scripts['total']})" in submit
    assert f"train=$(sbatch --parsable --dependency=afterok:${{items}} {scripts['train']})" in submit
    for path in [*scripts.values(), tmp_path / "out" / "submit.sh"]:
        assert subprocess.run(["bash", "-n", str(path)]).returncode == 0, path


def test_local_commands(recipe, tmp_path):
    plan = build_plan(recipe, tmp_path / "run", launch=LaunchConfig(workers=2, procs_per_node=2))
    jobs = {j.stage: j for j in plan.jobs}
    array = local.commands(plan, jobs["items"])
    assert [cmd[-4:] for cmd, _ in array] == [["--worker", "0", "--num-workers", "2"], ["--worker", "1", "--num-workers", "2"]]
    ranks = local.commands(plan, jobs["train"], port=1234)
    assert [env["RANK"] for _, env in ranks] == ["0", "1"]
    assert all(env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "1234" for _, env in ranks)
    assert local.commands(plan, jobs["numbers"])[0][1] == {}
    multi = build_plan(recipe, tmp_path / "run", launch=LaunchConfig(nodes=2, procs_per_node=2))
    with pytest.raises(ConfigError, match="local backend has one node"):
        local.commands(multi, multi.jobs[-1])


def test_job_record_feeds_status_columns(tmp_path):
    assert job_columns(tmp_path) == {}
    record_jobs(tmp_path, "local", {"items": {"id": "local", "state": "COMPLETED"}})
    record_jobs(tmp_path, "local", {"train": {"id": "local", "state": "FAILED"}})
    columns = job_columns(tmp_path)
    assert columns["job"] == {"items": "local:local", "train": "local:local"}
    assert columns["job state"] == {"items": "COMPLETED", "train": "FAILED"}


def test_submit_dry_run_cli(tmp_path, capsys):
    from tests.fixtures.toy_launch import submit_in_process

    (tmp_path / "recipe.yaml").write_text(RECIPE)
    status, out, err = submit_in_process(capsys, "submit", str(tmp_path / "recipe.yaml"), "--backend", "slurm",
                                         "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert status == 0, err
    assert "nothing submitted" in out
    written = sorted(p.name for p in (tmp_path / "run" / "launch" / "slurm").iterdir())
    assert "submit.sh" in written and "03-train.sbatch" in written
    assert yaml.safe_load((tmp_path / "run" / "launch" / "recipe.yaml").read_text())["stages"]["train"]["steps"] == 5
    status, _, err = submit_in_process(capsys, "submit", str(tmp_path / "recipe.yaml"), "--backend", "slurm",
                                       "--dry-run", "--set", "launch.nodes=-1")
    assert status == 2 and "launch: nodes must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_local_failed_rank_stops_the_others():
    import sys
    import time

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    failing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    start = time.monotonic()
    codes = wait_ranks([sleeper, failing])
    assert codes[1] == 3 and codes[0] != 0 and time.monotonic() - start < 120


def test_overrides_by_stage_type_and_for_types_a_recipe_does_not_use(recipe, tmp_path):
    from launch.config import StageLaunch

    # A shared launch file names stage types: `toy_train` reaches the stage named `train`; `general` (a known
    # type this recipe does not use) is ignored; a name that is neither stays an error (see above).
    recipe.launch.stages = {"toy_train": StageLaunch(nodes=3), "general": StageLaunch(nodes=5)}
    jobs = {j.stage: j for j in build_plan(recipe, tmp_path / "run").jobs}
    assert jobs["train"].nodes == 3 and jobs["items"].nodes == 1
    recipe.launch.stages["train"] = StageLaunch(nodes=2)  # the stage's own name wins over its type
    assert {j.stage: j for j in build_plan(recipe, tmp_path / "run").jobs}["train"].nodes == 2
