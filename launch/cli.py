"""`distill submit` (a recipe's stages as Slurm / Kubernetes jobs or local subprocesses) and `distill cancel`."""

from __future__ import annotations

import argparse
from pathlib import Path

from launch.config import BACKENDS


def add_parser(subparsers) -> None:
    """Add the `submit` and `cancel` verbs to the `distill` parser."""
    p = subparsers.add_parser("submit", help="submit a recipe's stages to Slurm, Kubernetes or local processes")
    p.add_argument("recipe")
    p.add_argument("--backend", choices=BACKENDS, help="where to run (default: the recipe's launch.backend)")
    p.add_argument("--stages", help="comma-separated subset of the recipe's stages")
    p.add_argument("--dry-run", action="store_true", help="write the job scripts/manifests, submit nothing")
    p.add_argument("--out", help="where job scripts/manifests go (default: <run dir>/launch/<backend>)")
    p.add_argument("--run-dir", help="run directory (default: run.run_dir or runs/<run.name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set launch.nodes=4 (repeatable)")
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("cancel", help="cancel the cluster jobs of a submitted run's unfinished stages")
    p.add_argument("run_dir", help="the run directory `distill submit` wrote (it holds launch/jobs.json)")
    p.set_defaults(func=cmd_cancel)


def cmd_cancel(args: argparse.Namespace) -> int:
    """scancel / delete the jobs of every stage without a manifest; finished stages stay as they are."""
    from launch.jobs import cancel_run

    for line in cancel_run(Path(args.run_dir)):
        print(line)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Build the plan, freeze the recipe into the run directory, then write and (unless --dry-run) submit."""
    from launch.jobs import record_jobs
    from launch.plan import build_plan, freeze_recipe
    from pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    backend = args.backend or recipe.launch.backend
    run_dir = Path(args.run_dir or recipe.run.run_dir or Path("runs") / recipe.run.name)
    stages = [s for s in (args.stages or "").split(",") if s]
    plan = build_plan(recipe, run_dir, stages)
    freeze_recipe(recipe, plan)
    out = Path(args.out) if args.out else plan.run_dir / "launch" / backend
    out.mkdir(parents=True, exist_ok=True)
    if backend == "slurm":
        return _slurm(plan, out, args.dry_run, record_jobs)
    if backend == "k8s":
        return _k8s(recipe, plan, out, args.dry_run, record_jobs)
    return _local(plan, out, args.dry_run, record_jobs)


def _slurm(plan, out: Path, dry_run: bool, record_jobs) -> int:
    from launch import slurm

    scripts = slurm.write(plan, out)
    if dry_run:
        print(f"wrote {len(scripts)} sbatch scripts and submit.sh to {out} (dry run: nothing submitted)")
        return 0
    ids = slurm.submit(plan, scripts)
    record_jobs(plan.run_dir, "slurm", {j.stage: {"id": ids[j.stage], "kind": j.kind, "script": str(scripts[j.stage]),
                                                  "log": slurm.log_path(plan, j, ids[j.stage])} for j in plan.jobs})
    for job in plan.jobs:
        print(f"{job.stage}: slurm job {ids[job.stage]}")
    print(f"follow it with `distill status {plan.run_dir}`; stop it with `distill cancel {plan.run_dir}`")
    return 0


def _k8s(recipe, plan, out: Path, dry_run: bool, record_jobs) -> int:
    from launch import k8s, k8s_cluster

    files = k8s.write(recipe, plan, out)
    if dry_run or not k8s_cluster.kubeconfig_present():
        why = "dry run" if dry_run else "no kubeconfig found"
        print(f"wrote {len(files)} Kubernetes manifests to {out} ({why}: nothing submitted)")
        return 0
    names = k8s_cluster.apply(files, plan.launch.namespace)
    record_jobs(plan.run_dir, "k8s", {j.stage: {"id": names[j.stage], "kind": j.kind,
                                                "log": k8s_cluster.log_command(names[j.stage], plan.launch.namespace)}
                                      for j in plan.jobs}, namespace=plan.launch.namespace)
    for job in plan.jobs:
        print(f"{job.stage}: kubernetes {names[job.stage]}")
    print(f"follow it with `distill status {plan.run_dir}`; stop it with `distill cancel {plan.run_dir}`")
    return 0


def _local(plan, out: Path, dry_run: bool, record_jobs) -> int:
    import shlex

    from launch import local
    from pipeline.manifest import atomic_write_text

    lines = ["#!/bin/bash", "set -euo pipefail"]
    for job in plan.jobs:
        cmds = [" ".join([*(f"{k}={v}" for k, v in extra.items()), *map(shlex.quote, cmd)])
                for cmd, extra in local.commands(plan, job)]
        lines += [c + " &" for c in cmds] + ["wait"] if len(cmds) > 1 else cmds
    atomic_write_text(out / "run.sh", "\n".join(lines) + "\n")
    if dry_run:
        print(f"wrote {out / 'run.sh'} (dry run: nothing run)")
        return 0
    results = local.run_plan(plan)
    logs = {j.stage: str(plan.run_dir / "launch" / "local" / (f"{j.stage}-*.log" if j.kind == "array" else f"{j.stage}.log"))
            for j in plan.jobs}
    record_jobs(plan.run_dir, "local", {s: {"id": "local", "log": logs[s], **r} for s, r in results.items()})
    failed = [s for s, r in results.items() if r["state"] != "COMPLETED"]
    for stage, result in results.items():
        print(f"{stage}: {result['state']} after {result['attempts']} attempt(s)")
    return 1 if failed else 0
