"""What `distill submit` launched (`<run_dir>/launch/jobs.json`): the job columns of `distill status`, and
`distill cancel`.

Each stage's entry names its backend, the cluster job (a Slurm job id; Kubernetes `Kind/name` objects, comma
separated), where its log is, and the last state `distill` itself saw. `distill status` asks the scheduler for
the live state; `distill cancel` stops the jobs of every stage that has not finished (no manifest.json) and
leaves finished stages as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.context import now
from pipeline.manifest import MANIFEST, atomic_write_text

JOBS = "jobs.json"


def jobs_path(run_dir: Path) -> Path:
    """Where a run's job record lives."""
    return Path(run_dir) / "launch" / JOBS


def load_jobs(run_dir: Path) -> dict:
    """The job record of a run ({} when nothing was submitted)."""
    path = jobs_path(run_dir)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def record_jobs(run_dir: Path, backend: str, jobs: dict[str, dict], **run: str) -> None:
    """Add or replace the entries of `jobs` (stage -> {id, kind, log, state?}) for `backend`; `run` keeps
    run-wide facts (the Kubernetes namespace)."""
    record = load_jobs(run_dir)
    stages = record.get("stages", {})
    for stage, entry in jobs.items():
        stages[stage] = {"backend": backend, "submitted": now(), **entry}
    record = {**record, **run, "stages": stages}
    atomic_write_text(jobs_path(run_dir), json.dumps(record, indent=2, sort_keys=True))


def live_states(record: dict) -> dict[str, str]:
    """Stage -> state as its scheduler reports it now (Slurm: scontrol; Kubernetes: the API), where it can."""
    stages = record.get("stages", {})
    states: dict[str, str] = {}
    slurm_ids = {s: e["id"] for s, e in stages.items() if e.get("backend") == "slurm" and e.get("id")}
    if slurm_ids:
        from launch.slurm import job_states

        found = job_states(sorted(set(slurm_ids.values())))
        states.update({s: found.get(i, "unknown") for s, i in slurm_ids.items()})
    k8s_ids = {s: e["id"] for s, e in stages.items() if e.get("backend") == "k8s" and e.get("id")}
    if k8s_ids:
        from launch import k8s_cluster

        states.update(k8s_cluster.object_states(k8s_ids, record.get("namespace", "default")))
    return states


def job_columns(run_dir: Path) -> dict[str, dict[str, str]]:
    """Extra `distill status` columns, column -> stage -> value: the cluster job, its live state, its log."""
    record = load_jobs(run_dir)
    stages = record.get("stages", {})
    if not stages:
        return {}
    live = live_states(record)
    job, state, logs = {}, {}, {}
    for stage, entry in stages.items():
        job[stage] = f"{entry.get('backend')}:{entry.get('id', '-')}"
        seen = live.get(stage, "unknown")
        state[stage] = entry.get("state", "unknown") if seen == "unknown" else seen
        logs[stage] = entry.get("log", "")
    return {"job": job, "job state": state, "log": logs}


def cancel_run(run_dir: Path, *, k8s_api=None) -> list[str]:
    """Cancel the jobs of every unfinished stage of a submitted run; return one line per stage saying what happened.

    `k8s_api` replaces the Kubernetes clients (tests); by default they come from the kubeconfig.
    """
    run_dir = Path(run_dir)
    record = load_jobs(run_dir)
    stages = record.get("stages", {})
    if not stages:
        raise ConfigError(f"{jobs_path(run_dir)}: no submitted jobs to cancel (submit with `distill submit`)")
    todo = {s: e for s, e in stages.items() if not (run_dir / s / MANIFEST).is_file()}
    slurm_ids = sorted({e["id"] for e in todo.values() if e.get("backend") == "slurm"})
    if slurm_ids:
        from launch.slurm import cancel

        cancel(slurm_ids, run_dir)  # one scancel for all: downstream jobs must not start in between
    lines, cancelled = [], []
    for stage, entry in stages.items():
        backend = entry.get("backend")
        if stage not in todo:
            lines.append(f"{stage}: finished, left as it is")
        elif backend == "slurm":
            lines.append(f"{stage}: cancelled slurm job {entry['id']}")
            cancelled.append(stage)
        elif backend == "k8s":
            from launch import k8s_cluster

            deleted = k8s_cluster.delete_objects(entry["id"], record.get("namespace", "default"), api=k8s_api)
            lines.append(f"{stage}: deleted {', '.join(deleted) or 'nothing (already gone)'}")
            cancelled.append(stage)
        else:
            lines.append(f"{stage}: local runs in the foreground of `distill submit`; stop that with Ctrl-C")
    if cancelled:
        record = load_jobs(run_dir)
        for stage in cancelled:
            record["stages"][stage].update(state="CANCELLED", cancelled=now())
        atomic_write_text(jobs_path(run_dir), json.dumps(record, indent=2, sort_keys=True))
    return lines
