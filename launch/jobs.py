"""What `distill submit` launched: `<run_dir>/launch/jobs.json`, and the job columns of `distill status`."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.context import now
from pipeline.manifest import atomic_write_text

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


def record_jobs(run_dir: Path, backend: str, jobs: dict[str, dict]) -> None:
    """Add or replace the entries of `jobs` (stage -> {id, kind, script, state?}) for `backend`."""
    record = load_jobs(run_dir)
    stages = record.get("stages", {})
    for stage, entry in jobs.items():
        stages[stage] = {"backend": backend, "submitted": now(), **entry}
    atomic_write_text(jobs_path(run_dir), json.dumps({"stages": stages}, indent=2, sort_keys=True))


def job_columns(run_dir: Path) -> dict[str, dict[str, str]]:
    """Extra `distill status` columns: column name -> stage -> value (backend job ids and their states)."""
    stages = load_jobs(run_dir).get("stages", {})
    if not stages:
        return {}
    slurm_ids = [e["id"] for e in stages.values() if e.get("backend") == "slurm" and e.get("id")]
    live = {}
    if slurm_ids:
        from launch.slurm import job_states

        live = job_states(slurm_ids)
    job, state = {}, {}
    for stage, entry in stages.items():
        job[stage] = f"{entry.get('backend')}:{entry.get('id', '-')}"
        state[stage] = live.get(entry.get("id"), entry.get("state", "unknown"))
    return {"job": job, "job state": state}
