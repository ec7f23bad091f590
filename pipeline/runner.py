"""Run a recipe's stages in order: resolve inputs, skip finished work, run, write the manifest last."""

from __future__ import annotations

import json
import shutil
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


def resolve_inputs(entry: StageEntry, run_dir: Path, recipe: Recipe) -> dict[str, ResolvedInput]:
    """Resolve each input field of a stage to a finished upstream output."""
    resolved = {}
    for name in entry.input_fields():
        ref = entry.input_ref(name)
        if ref in (None, ""):
            continue
        try:
            path = resolve_ref(str(ref), run_dir, recipe.tracking)
        except ConfigError as err:
            raise ConfigError(f"stages.{entry.name}.{name}: {err}") from None
        try:
            manifest = Manifest.load(path)
        except ManifestError as err:
            raise ConfigError(f"stages.{entry.name}.{name}: {err}") from None
        resolved[name] = ResolvedInput(field=name, ref=str(ref), path=path, manifest=manifest, sha256=manifest_sha256(path))
    return resolved


def fingerprint(entry: StageEntry, inputs: dict[str, ResolvedInput]) -> dict:
    """What makes a stage's output what it is: its config hash and the hashes of its inputs' manifests."""
    return {"config_hash": config_hash(entry.config), "inputs": {k: v.sha256 for k, v in sorted(inputs.items())}}


def _matches(manifest: Manifest, fp: dict) -> bool:
    return manifest.config_hash == fp["config_hash"] and {i.name: i.sha256 for i in manifest.inputs} == fp["inputs"]


def _prepare_dir(stage_dir: Path, fp: dict, force: bool, world: World) -> None:
    """Make `stage_dir` hold only work started with this fingerprint: wipe it when it holds other work.

    The main worker decides; other workers wait until the marker shows the same fingerprint.
    """
    marker = stage_dir / STARTED
    if world.is_main:
        stale = force
        if marker.is_file():
            try:
                stale = stale or json.loads(marker.read_text()) != fp
            except json.JSONDecodeError:
                stale = True
        elif stage_dir.exists() and any(stage_dir.iterdir()):
            stale = True
        if stale and stage_dir.exists():
            log.info(f"{stage_dir.name}: clearing earlier output ({'--force' if force else 'config or inputs changed'})")
            shutil.rmtree(stage_dir)
        stage_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(fp, sort_keys=True))
        return
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if marker.is_file() and json.loads(marker.read_text() or "null") == fp:
            return
        time.sleep(0.5)
    raise RuntimeError(f"{stage_dir}: the main worker did not prepare this directory within 300 s")


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
    if world.is_main:
        (stage_dir / MANIFEST).unlink(missing_ok=True)
    _prepare_dir(stage_dir, fp, force, world)
    if world.is_main and entry.spec.launch != "array":  # the stage lock is ours: no live writer owns a .tmp-*
        clear_partial_writes(stage_dir)
    if world.is_main:
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
        totals = manifest.totals()
        log.info(f"{name}: done, {totals['files']} files, {totals['bytes'] / 1e6:.1f} MB")
    elif manifest is None:
        log.info(f"{name}: worker {world.worker} finished its part; the stage completes when every worker has")
    tracker.end_stage(manifest, status="FINISHED" if manifest is not None else "RUNNING")
    return manifest


def run_recipe(recipe: Recipe, run_dir: Path, *, stages: list[str] | None = None, world: World | None = None,
               force: bool = False) -> dict[str, Manifest | None]:
    """Run the recipe's stages in order (or the named subset); each stage's outputs feed the next."""
    world = world or World()
    run_dir = Path(run_dir)
    names = recipe.select(stages)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:
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
