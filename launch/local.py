"""Local backend: the same plan as Slurm, with subprocesses on this machine.

Array stages start one process per worker (`--worker I --num-workers N`). Training stages start one process
per rank with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, as the Slurm backend's srun
tasks get them (and as torchrun would, without its agent: torchrun turns a rank's exit status 75 into 1,
which would hide a preemption). A stage that exits 75 (preempted after a checkpoint) is rerun, as Slurm's
requeue would, up to `launch.max_requeues` times.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from launch.plan import Job, Plan
from launch.ranks import combined_status, wait_ranks
from pipeline import log
from pipeline.config import ConfigError
from pipeline.train.preempt import EXIT_PREEMPTED


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def commands(plan: Plan, job: Job, port: int = 29500) -> list[tuple[list[str], dict[str, str]]]:
    """The processes that run one job here, each with its extra environment: one per worker or per rank."""
    cmd = plan.command(job)
    if plan.launch.python == "python":
        cmd[0] = sys.executable
    if job.kind == "array":
        return [(cmd + ["--worker", str(i), "--num-workers", str(job.workers)], {}) for i in range(job.workers)]
    if job.kind == "distributed" and job.world_size > 1:
        if job.nodes > 1:
            raise ConfigError(f"launch.nodes={job.nodes} for stage {job.stage!r}: the local backend has one node")
        n = job.procs_per_node
        return [(cmd, {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}) for r in range(n)]
    return [(cmd, {})]


def _run_once(plan: Plan, job: Job, attempt: int) -> int:
    logs = plan.run_dir / "launch" / "local"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.launch.env}
    procs = []
    for i, (cmd, extra) in enumerate(commands(plan, job, _free_port())):
        suffix = f"-{i}" if job.kind == "array" else ("" if i == 0 else f"-rank{i}")
        handle = open(logs / f"{job.stage}{suffix}.log", "a")
        handle.write(f"# attempt {attempt}: {' '.join(cmd)}\n")
        handle.flush()
        procs.append((subprocess.Popen(cmd, cwd=plan.launch.workdir or None, env={**env, **extra}, stdout=handle,
                                       stderr=subprocess.STDOUT), handle))
    codes = wait_ranks([proc for proc, _ in procs])
    for _, handle in procs:
        handle.close()
    return combined_status(codes)  # preempted wins over success (someone must rerun), a failure over both


def run_plan(plan: Plan) -> dict[str, dict]:
    """Run every job in order; stop at the first failure. Returns stage -> {state, exit_code, attempts}."""
    results: dict[str, dict] = {}
    for job in plan.jobs:
        attempt, code = 0, EXIT_PREEMPTED
        while code == EXIT_PREEMPTED and attempt <= plan.launch.max_requeues:
            attempt += 1
            log.info(f"{job.stage}: local {job.kind} job, attempt {attempt}")
            code = _run_once(plan, job, attempt)
        state = "COMPLETED" if code == 0 else ("PREEMPTED" if code == EXIT_PREEMPTED else "FAILED")
        results[job.stage] = {"state": state, "exit_code": code, "attempts": attempt}
        if code != 0:
            log.info(f"{job.stage}: {state} (exit {code}); see {plan.run_dir / 'launch' / 'local'}")
            break
    return results
