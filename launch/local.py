"""Local backend: the same plan as Slurm, with subprocesses on this machine.

Array stages start one process per worker (`--worker I --num-workers N`); training stages run under torchrun
with `procs_per_node` processes. A stage that exits 75 (preempted after a checkpoint) is rerun, as Slurm's
requeue would, up to `launch.max_requeues` times.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from launch.plan import Job, Plan
from pipeline import log
from pipeline.config import ConfigError
from pipeline.preempt import EXIT_PREEMPTED


def commands(plan: Plan, job: Job) -> list[list[str]]:
    """The processes that run one job here: one per array worker, or one torchrun."""
    python = sys.executable if plan.launch.python == "python" else plan.launch.python
    base = plan.command(job)
    base[0] = python
    if job.kind == "array":
        return [base + ["--worker", str(i), "--num-workers", str(job.workers)] for i in range(job.workers)]
    if job.kind == "distributed" and job.world_size > 1:
        if job.nodes > 1:
            raise ConfigError(f"launch.nodes={job.nodes} for stage {job.stage!r}: the local backend has one node")
        return [[python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(job.procs_per_node), *base[1:]]]
    return [base]


def _run_once(plan: Plan, job: Job, attempt: int) -> int:
    logs = plan.run_dir / "launch" / "local"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **plan.launch.env}
    procs = []
    for i, cmd in enumerate(commands(plan, job)):
        suffix = f"-{i}" if job.kind == "array" else ""
        handle = open(logs / f"{job.stage}{suffix}.log", "a")
        handle.write(f"# attempt {attempt}: {' '.join(cmd)}\n")
        handle.flush()
        procs.append((subprocess.Popen(cmd, cwd=plan.launch.workdir or None, env=env, stdout=handle,
                                       stderr=subprocess.STDOUT), handle))
    codes = []
    for proc, handle in procs:
        codes.append(proc.wait())
        handle.close()
    # Preempted wins over success (someone must rerun), any failure wins over both.
    failed = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
    return failed[0] if failed else (EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0)


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
