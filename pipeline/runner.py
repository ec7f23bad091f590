"""Run a recipe's stages in order: resolve inputs, skip finished work, run, write the manifest last."""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import threading
import time
from pathlib import Path

from pipeline import log
from pipeline.config import ConfigError, config_hash, dump_yaml, to_dict
from pipeline.context import ResolvedInput, RunContext
from pipeline.lock import clear_partial_writes, stage_lock
from pipeline.manifest import (
    MANIFEST,
    Manifest,
    ManifestError,
    atomic_write_text,
    disk_full,
    manifest_sha256,
)
from pipeline.provenance import git_commit
from pipeline.recipe import Recipe, StageEntry
from pipeline.refs import resolve_ref
from pipeline.tracking import NullTracker, make_tracker
from pipeline.world import World

STARTED = ".started.json"
"""Marker a stage directory gets when work starts: the fingerprint it started with."""
LOCK = ".lock"
"""Lock file in a stage directory: the workers of an array take turns to check and write the start marker."""


def resolve_inputs(entry: StageEntry, run_dir: Path, recipe: Recipe) -> dict[str, ResolvedInput]:
    """Resolve each input field of a stage to a finished upstream output."""
    resolved = {}
    for name, ref in entry.input_refs().items():
        try:
            path = resolve_ref(ref, run_dir, recipe.tracking)
        except ConfigError as err:
            raise ConfigError(f"stages.{entry.name}.{name}: {err}") from None
        try:
            manifest = Manifest.load(path)
        except ManifestError as err:
            raise ConfigError(f"stages.{entry.name}.{name}: {err}") from None
        resolved[name] = ResolvedInput(field=name, ref=ref, path=path, manifest=manifest, sha256=manifest_sha256(path))
    return resolved


def fingerprint(entry: StageEntry, inputs: dict[str, ResolvedInput]) -> dict:
    """What makes a stage's output what it is: its config hash and the hashes of its inputs' manifests."""
    return {"config_hash": config_hash(entry.config), "inputs": {k: v.sha256 for k, v in sorted(inputs.items())}}


def _matches(manifest: Manifest, fp: dict) -> bool:
    return manifest.config_hash == fp["config_hash"] and {i.name: i.sha256 for i in manifest.inputs} == fp["inputs"]


_IN_PROCESS: dict[str, threading.Lock] = {}
"""One thread lock per lock file, for workers that share a process."""


@contextlib.contextmanager
def exclusive_lock(path: Path, timeout_s: float | None = None, what: str = "another worker holds it"):
    """Hold an exclusive POSIX lock on `path` (created if missing) for the block; other processes wait.

    The kernel drops the lock when its holder dies, so a killed worker never leaves it held. POSIX (fcntl)
    locks also work across the nodes of an NFS, CephFS or Lustre (-o flock) shared volume. With `timeout_s`,
    waiting longer is a ConfigError naming the lock file and `what` its holder is doing.
    """
    def refuse():
        raise ConfigError(f"{path}: {what} for over {timeout_s:.0f} s")

    path.parent.mkdir(parents=True, exist_ok=True)
    # POSIX locks belong to a process: workers run as threads of one process also take a thread lock.
    local = _IN_PROCESS.setdefault(str(path.resolve()), threading.Lock())
    if not local.acquire(timeout=-1 if timeout_s is None else timeout_s):
        refuse()
    try:
        with open(path, "a") as handle:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.lockf(handle, fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        refuse()
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.lockf(handle, fcntl.LOCK_UN)
    finally:
        local.release()


def _prepare_dir(stage_dir: Path, fp: dict, force: bool, world: World) -> None:
    """Make `stage_dir` hold only work started with this fingerprint: wipe it when it holds other work.

    Whichever worker of an array gets the lock first starts the stage (wipes stale work, writes the start
    marker); the rest find the marker and join in, so the order in which a scheduler starts them does not
    matter. `--force` makes the main worker wipe even a matching start; its other workers should start after
    it (launchers never pass --force; deleting the stage directory is the order-free way to redo a stage).
    """
    marker = stage_dir / STARTED
    with exclusive_lock(stage_dir / LOCK):
        try:
            started = json.loads(marker.read_text()) if marker.is_file() else None
        except json.JSONDecodeError:
            started = None
        leftovers = [p for p in stage_dir.iterdir() if p.name != LOCK]
        if started == fp and not (force and world.is_main):
            return
        if leftovers:
            why = "--force" if force else ("config or inputs changed" if started else "unmarked earlier output")
            log.info(f"{stage_dir.name}: clearing earlier output ({why})")
            for path in leftovers:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        atomic_write_text(marker, json.dumps(fp, sort_keys=True))


def run_stage(recipe: Recipe, name: str, run_dir: Path, *, world: World, force: bool = False, tracker=None):
    """Run one stage of `recipe` into `run_dir/name`; return its Manifest, or None if only this worker's part ran."""
    entry = recipe.stages[name]
    stage_dir = Path(run_dir) / name
    inputs = resolve_inputs(entry, Path(run_dir), recipe)
    fp = fingerprint(entry, inputs)
    tracker = tracker or NullTracker()
    if (stage_dir / MANIFEST).is_file() and not force:
        try:
            existing = Manifest.load(stage_dir)
        except ManifestError:
            existing = None
        if existing is not None and _matches(existing, fp):
            log.info(f"{name}: done already (manifest matches config and inputs), skipping; --force redoes it")
            return existing
    (stage_dir / MANIFEST).unlink(missing_ok=True)  # stale (or --force): the stage is not done
    _prepare_dir(stage_dir, fp, force, world)
    if world.is_main and entry.spec.launch != "array":  # the stage lock is ours: no live writer owns a .tmp-*
        clear_partial_writes(stage_dir)
    if world.rank == 0:  # every array worker writes the same file: whichever starts first leaves it
        dump_yaml({"stage": entry.spec.name, **to_dict(entry.config)}, stage_dir / "config.yaml")
    ctx = RunContext(
        run_dir=Path(run_dir), stage_dir=stage_dir, name=name, stage=entry.spec.name, world=world,
        tracker=tracker, seed=recipe.run.seed, inputs=inputs, git_commit=git_commit(),
    )
    log.info(f"{name}: start ({entry.spec.name}, worker {world.worker}/{world.num_workers}, rank {world.rank}/{world.world_size})")
    tracker.start_stage(name, stage_dir, to_dict(entry.config), list(inputs.values()))
    try:
        manifest = entry.spec.run(entry.config, ctx)
    except BaseException as err:
        tracker.end_stage(None, status="FAILED")
        if (full := disk_full(err, stage_dir)) is not None:  # libraries' own errors name no file: name the stage
            raise full from None
        raise
    writes = entry.spec.launch == "array" or world.rank == 0
    if manifest is not None and writes:
        manifest.write(stage_dir)
        if entry.spec.after_manifest is not None:  # work files the complete stage no longer needs
            entry.spec.after_manifest(stage_dir)
        totals = manifest.totals()
        log.info(f"{name}: done, {totals['files']} files, {totals['bytes'] / 1e6:.1f} MB")
    elif manifest is None:
        log.info(f"{name}: worker {world.worker} finished its part; the stage completes when every worker has")
    if entry.spec.launch == "distributed":
        # Every rank starts the next stage only once rank 0 has written this one's manifest (its input there).
        from pipeline.train import dist

        dist.barrier()
    tracker.end_stage(manifest, status="FINISHED" if manifest is not None else "RUNNING")
    return manifest


def run_recipe(recipe: Recipe, run_dir: Path, *, stages: list[str] | None = None, world: World | None = None,
               force: bool = False) -> dict[str, Manifest | None]:
    """Run the recipe's stages in order (or the named subset); each stage's outputs feed the next."""
    world = world or World()
    run_dir = Path(run_dir)
    names = recipe.select(stages)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.rank == 0:  # not only worker 0: `distill status` works as soon as any worker has started
        dump_yaml(recipe.resolved(), run_dir / "config.yaml")
    tracker = make_tracker(recipe.tracking, run_dir, world.is_main)
    tracker.start_pipeline(recipe.run.name, run_dir, recipe.resolved())
    results: dict[str, Manifest | None] = {}
    status = "FAILED"
    try:
        for name in names:
            with stage_lock(run_dir, name, recipe.stages[name].spec.launch, world, recipe.run.lock_lease_s):
                results[name] = run_stage(recipe, name, run_dir, world=world, force=force, tracker=tracker)
            if results[name] is None:
                log.info(f"stopping after {name}: later stages need it complete")
                break
        status = "FINISHED"
    finally:
        tracker.end_pipeline(status)
    return results
