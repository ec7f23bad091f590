"""The launch plan: one job per stage, its shape (array / distributed / single) and the stages it waits for.

Every backend renders the same plan. Jobs run the recipe frozen into the run directory at submit time
(`<run_dir>/launch/recipe.yaml`), so a later edit of the recipe file cannot change a queued job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from launch.config import LaunchConfig
from pipeline.config import ConfigError
from pipeline.recipe import Recipe

LAUNCH_DIR = "launch"
"""Subdirectory of the run directory holding the frozen recipe, job scripts, logs and jobs.json."""


@dataclass(kw_only=True)
class Job:
    """One stage as a cluster job."""

    stage: str
    """Stage name in the recipe (its directory in the run)."""
    kind: str
    """"array", "distributed" or "single" (the stage module's LAUNCH)."""
    workers: int = 1
    """Array tasks (array stages only)."""
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time_limit: str = "24:00:00"
    memory_per_task: str = "8Gi"
    """Memory per process (Kubernetes)."""
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    after: list[str] = field(default_factory=list)
    """Stages of this plan that must finish first (from the stage's `@name` inputs)."""

    @property
    def world_size(self) -> int:
        """Training processes of a distributed job."""
        return self.nodes * self.procs_per_node


@dataclass(kw_only=True)
class Plan:
    """Jobs in recipe order plus what every job needs to run the CLI."""

    run_name: str
    run_dir: Path
    recipe_path: Path
    """The frozen recipe the jobs read."""
    launch: LaunchConfig
    jobs: list[Job]

    def distill_args(self, job: Job, *, recipe_path: str | None = None, run_dir: str | None = None) -> list[str]:
        """`distill` arguments that run `job`'s stage (worker flags are added by the backend)."""
        return ["run", str(recipe_path or self.recipe_path), "--stages", job.stage,
                "--run-dir", str(run_dir or self.run_dir)]

    def command(self, job: Job, **paths) -> list[str]:
        """The full command of one process of `job`: python -m <entry module> run ..."""
        return [self.launch.python, "-m", self.launch.entry_module, *self.distill_args(job, **paths)]


def build_plan(recipe: Recipe, run_dir: Path, stages: list[str] | None = None,
               launch: LaunchConfig | None = None) -> Plan:
    """One job per selected stage; dependencies only between selected stages (others must be done already)."""
    launch = launch or recipe.launch
    names = recipe.select(stages)
    from pipeline import registry

    unknown = [s for s in launch.stages if s not in recipe.stages and s not in registry.STAGES]
    if unknown:
        raise ConfigError(f"{recipe.source}: launch.stages.{unknown[0]}: no such stage in this recipe and no such "
                          f"stage type (stages: {', '.join(recipe.stages)})")
    jobs = []
    for name in names:
        kind = recipe.stages[name].spec.launch
        get = lambda key: launch.for_stage(name, key, recipe.stages[name].spec.name)  # noqa: E731 - override, else the section's
        jobs.append(Job(
            stage=name, kind=kind,
            workers=get("workers") if kind == "array" else 1,
            nodes=get("nodes") if kind == "distributed" else 1,
            procs_per_node=get("procs_per_node") if kind == "distributed" else 1,
            gpus_per_node=get("gpus_per_node"), cpus_per_task=get("cpus_per_task"), time_limit=get("time_limit"),
            memory_per_task=get("memory_per_task"), node_selector=get("node_selector"), tolerations=get("tolerations"),
            after=[u for u in recipe.upstream(name) if u in names],
        ))
    run_dir = Path(run_dir).resolve()
    return Plan(run_name=recipe.run.name, run_dir=run_dir, recipe_path=run_dir / LAUNCH_DIR / "recipe.yaml",
                launch=launch, jobs=jobs)


def freeze_recipe(recipe: Recipe, plan: Plan) -> Path:
    """Write the resolved recipe the jobs will run (with the run directory pinned) into the run directory."""
    from pipeline.manifest import atomic_write_text

    tree = recipe.resolved()
    tree["run"]["run_dir"] = str(plan.run_dir)
    atomic_write_text(plan.recipe_path, yaml.safe_dump(tree, sort_keys=False))
    return plan.recipe_path


def dns_name(*parts: str, limit: int = 63) -> str:
    """A Kubernetes/Slurm-friendly name: lowercase letters, digits and '-', at most `limit` characters."""
    text = "-".join(parts).lower()
    text = re.sub(r"[^a-z0-9-]+", "-", text).strip("-")
    text = re.sub(r"-{2,}", "-", text)
    return text[:limit].rstrip("-") or "distill"
