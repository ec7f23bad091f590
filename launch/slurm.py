"""Slurm backend: one readable sbatch script per stage, chained with --dependency=afterok.

Array stages become job arrays (one task per worker). Training stages run one srun task per rank across
the allocation; each task gets RANK / WORLD_SIZE / LOCAL_RANK from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID
and the rendezvous (MASTER_ADDR, MASTER_PORT) from the job's node list. srun forwards signals to every
rank, so a preemption signal reaches the trainers themselves; a rank that checkpointed exits 75 and the
script requeues the job, which resumes from that checkpoint.
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from launch.plan import Job, Plan, dns_name
from pipeline.config import ConfigError
from pipeline.manifest import atomic_write_text
from pipeline.train.preempt import EXIT_PREEMPTED

# Each srun task becomes one torch.distributed rank; the rendezvous address is the job's first node.
RANK_WRAPPER = 'export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; exec "$@"'

TRAINING_BODY = """\
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
echo "distill: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"

# Slurm signals this shell (--signal=B:USR1@N, or `scancel --batch --signal=USR1`); pass it on to srun,
# which forwards it to every rank. The ranks checkpoint at the next step and exit {preempted}.
signalled=0
preempting=0
forward() {{ signalled=1; preempting=1; kill -USR1 "$step" 2>/dev/null; }}
trap forward USR1 TERM

srun bash -c {wrapper} distill-rank \\
    {command} &
step=$!
# `wait` returns early (status > 128) when a trapped signal arrives: wait again for the real status.
while :; do signalled=0; wait "$step"; status=$?; [ "$signalled" = 1 ] && [ "$status" -gt 128 ] || break; done

# 75: the ranks checkpointed on the signal. Any other failure after a preemption signal (a rank still starting
# up, before its handler was installed) is requeued too: it resumes from the last regular checkpoint.
# `distill cancel` leaves a mark before it scancels (its SIGTERM looks like a preemption): then do not requeue.
if [ -e {cancelled}"$SLURM_JOB_ID" ]; then
    echo "distill: job $SLURM_JOB_ID cancelled by distill cancel (exit $status); not requeueing"
    exit "$status"
fi
if [ "$status" -eq {preempted} ] || {{ [ "$preempting" = 1 ] && [ "$status" -ne 0 ]; }}; then
    echo "distill: preempted (exit $status); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
"""


def _header(plan: Plan, job: Job, log_name: str) -> list[str]:
    launch = plan.launch
    lines = [f"--job-name={dns_name('distill', plan.run_name, job.stage)}",
             f"--output={plan.run_dir / 'launch' / 'slurm' / log_name}",
             "--open-mode=append",
             f"--time={job.time_limit}",
             f"--cpus-per-task={job.cpus_per_task}"]
    if job.kind == "array":
        lines += [f"--array=0-{job.workers - 1}", "--ntasks=1"]
    elif job.kind == "distributed":
        lines += [f"--nodes={job.nodes}", f"--ntasks-per-node={job.procs_per_node}",
                  f"--signal=B:USR1@{launch.signal_seconds}", "--requeue"]
    else:
        lines += ["--ntasks=1"]
    if job.gpus_per_node:
        lines.append(f"--gpus-per-node={job.gpus_per_node}")
    for key in ("partition", "account", "qos"):
        if getattr(launch, key):
            lines.append(f"--{key}={getattr(launch, key)}")
    lines += list(launch.sbatch_args)
    return [f"#SBATCH {line}" for line in lines]


def render(plan: Plan, job: Job) -> str:
    """The sbatch script of one stage."""
    launch = plan.launch
    log_name = f"{job.stage}-%A_%a.out" if job.kind == "array" else f"{job.stage}-%j.out"
    command = " ".join(shlex.quote(a) for a in plan.command(job))
    shape = {"array": f"array of {job.workers} workers", "single": "one process",
             "distributed": f"{job.nodes} node(s) x {job.procs_per_node} rank(s)"}[job.kind]
    lines = ["#!/bin/bash",
             f"# distill stage {job.stage!r} of run {plan.run_name!r}: {job.kind}, {shape}.",
             f"# Written by `distill submit`; jobs read the frozen recipe {plan.recipe_path}.",
             *_header(plan, job, log_name), "",
             "set -uo pipefail",
             f"cd {shlex.quote(launch.workdir or str(Path.cwd()))}"]
    lines += [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(launch.env.items())]
    if job.kind == "array":
        lines += [f"exec srun {command} \\",
                  f'    --worker "$SLURM_ARRAY_TASK_ID" --num-workers {job.workers}']
    elif job.kind == "distributed":
        lines.append(TRAINING_BODY.format(wrapper=shlex.quote(RANK_WRAPPER), command=command, preempted=EXIT_PREEMPTED,
                                          cancelled=shlex.quote(str(cancel_mark(plan.run_dir, "")))).rstrip())
    else:
        lines.append(f"exec srun {command}")
    return "\n".join(lines) + "\n"


def submit_script(plan: Plan, scripts: dict[str, Path]) -> str:
    """A shell script that submits the rendered jobs in order with their afterok dependencies."""
    lines = ["#!/bin/bash", f"# Submit run {plan.run_name!r} as chained Slurm jobs (what `distill submit` does).",
             "set -euo pipefail"]
    for job in plan.jobs:
        var = job.stage.replace("-", "_")
        dep = ":".join(f"${{{a.replace('-', '_')}}}" for a in job.after)
        flag = f" --dependency=afterok:{dep}" if dep else ""
        lines.append(f"{var}=$(sbatch --parsable{flag} {shlex.quote(str(scripts[job.stage]))})")
        lines.append(f'echo "{job.stage}: job ${var}"')
    return "\n".join(lines) + "\n"


def write(plan: Plan, out: Path) -> dict[str, Path]:
    """Write every stage's sbatch script and submit.sh into `out`; return the scripts by stage."""
    scripts = {}
    for i, job in enumerate(plan.jobs):
        path = Path(out) / f"{i:02d}-{job.stage}.sbatch"
        atomic_write_text(path, render(plan, job))
        scripts[job.stage] = path
    atomic_write_text(Path(out) / "submit.sh", submit_script(plan, scripts))
    (plan.run_dir / "launch" / "slurm").mkdir(parents=True, exist_ok=True)
    return scripts


def submit(plan: Plan, scripts: dict[str, Path], env: dict | None = None) -> dict[str, str]:
    """sbatch every script in order, chaining each on its upstream jobs; return job ids by stage."""
    ids: dict[str, str] = {}
    for job in plan.jobs:
        cmd = ["sbatch", "--parsable"]
        if job.after:
            cmd.append("--dependency=afterok:" + ":".join(ids[a] for a in job.after))
        cmd.append(str(scripts[job.stage]))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        except FileNotFoundError:
            raise ConfigError("sbatch not found: run `distill submit` on a Slurm login node, or use --dry-run") from None
        if done.returncode != 0:
            raise ConfigError(f"sbatch {scripts[job.stage].name} failed: {done.stderr.strip()}")
        ids[job.stage] = done.stdout.strip().split(";")[0]
    return ids


def job_states(ids: list[str], env: dict | None = None) -> dict[str, str]:
    """Current state of each job id (arrays: the distinct states of their tasks), or "unknown"."""
    states = {}
    for job_id in ids:
        try:
            out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                                 env=env, timeout=20)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            states[job_id] = "unknown"
            continue
        found = sorted({f.split("=", 1)[1] for line in out.stdout.splitlines()
                        for f in line.split() if f.startswith("JobState=")})
        states[job_id] = ",".join(found) or "unknown"
    return states


def log_path(plan: Plan, job: Job, job_id: str) -> str:
    """Where a submitted job's output goes (an array: one file per task, `_*`)."""
    name = f"{job.stage}-{job_id}_*.out" if job.kind == "array" else f"{job.stage}-{job_id}.out"
    return str(plan.run_dir / "launch" / "slurm" / name)


def cancel_mark(run_dir: Path, job_id: str) -> Path:
    """The file `distill cancel` writes before it scancels job `job_id`, so the job does not requeue itself."""
    return Path(run_dir) / "launch" / "slurm" / f".cancelled-{job_id}"


def cancel(ids: list[str], run_dir: Path, env: dict | None = None) -> None:
    """scancel the jobs (array jobs: every task); jobs that already ended are not an error."""
    for job_id in ids:
        atomic_write_text(cancel_mark(run_dir, job_id), "")
    try:
        done = subprocess.run(["scancel", *ids], capture_output=True, text=True, env=env, timeout=60)
    except FileNotFoundError:
        raise ConfigError("scancel not found: run `distill cancel` where Slurm's commands are (a login node)") from None
    errors = [line for line in done.stderr.splitlines()
              if line.strip() and "already completing or completed" not in line and "Invalid job id" not in line]
    if done.returncode != 0 and errors:
        raise ConfigError(f"scancel {' '.join(ids)} failed: {errors[0].strip()}")
