"""`distill sweep`: run the variants of a recipe (the product of `--vary` lists), sharing every stage whose config,
inputs and seed are the same, and compare them.

A sweep directory holds:
  sweep.yaml            the plan, written first: recipe, --set, --vary, each variant's values and stage directories
  stages/NAME-KEY/      one stage directory per distinct stage; KEY hashes the stage type, its config hash, the
                        run seed and the keys of the stages it reads, so it is known before anything runs
  variants/V/           each variant's run directory: config.yaml, a link NAME -> ../../stages/NAME-KEY per stage,
                        and .locks -> ../../.locks, so `distill run|status|verify` work on it as on any run
  .locks/               the sweep's own lock and the stage locks every variant shares
  mlflow.db             the store (unless tracking.uri or MLFLOW_TRACKING_URI names another)
  sweep.md, sweep.json, sweep.png   the comparison, written once every variant is done

The runner is unchanged: each variant is a plain `run_recipe` whose links lead to the shared directories, so a
stage another variant finished is skipped by its manifest, and an unfinished one resumes from its checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.config import ConfigError, config_hash, parse_value
from pipeline.lock import LOCKS, acquire
from pipeline.manifest import MANIFEST, atomic_write_text
from pipeline.recipe import Recipe, load_recipe
from pipeline.sweep_table import OUTPUTS, PLAN, clear_table, describe, scores, write_plan, write_table
from pipeline.tracking import make_tracker
from pipeline.tracking.store import sqlite_uri
from pipeline.train.preempt import Preempted

@dataclass(kw_only=True)
class Axis:
    """One `--vary`: a dotted recipe key and its values, or a bundle (a name without dots) whose values each set
    several keys together; `labels` name the values in tables and tags."""

    key: str
    raw: list[str]
    labels: list[str]
    choices: list[list[tuple[str, Any]]]
    """Per value, the (dotted key, parsed value) pairs it sets."""

    @property
    def label(self) -> str:
        """The key's last part (`objective` for `stages.task.objective`): a column name."""
        return self.key.rsplit(".", 1)[-1]

    @property
    def keys(self) -> set[str]:
        """Every dotted key this axis sets."""
        return {key for choice in self.choices for key, _ in choice}


@dataclass(kw_only=True)
class Variant:
    """One point of the product: its name, the raw value per varied key, its recipe and stage keys."""

    name: str
    values: dict[str, str]
    recipe: Recipe
    keys: dict[str, str]
    """Stage name -> its directory name in `stages/` (NAME-KEY)."""


def split_values(raw: str) -> list[str]:
    """Split `V1,V2,...` at the commas outside brackets and quotes, so flow lists and maps stay whole."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(raw):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"" and raw[:i].rstrip()[-1:] in ("", "[", "{", ":", ","):  # opens a YAML quoted string
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(raw[start:i])
            start = i + 1
    parts.append(raw[start:])
    return [p.strip() for p in parts]


def _bundle_value(name: str, raw: str) -> tuple[str, list[tuple[str, Any]]]:
    """(label, pairs) of one value of bundle `name`: a mapping of dotted keys, with an optional `label`."""
    value = parse_value(raw)
    if not isinstance(value, dict) or not value or any("." not in str(k) for k in value if k != "label"):
        raise ConfigError(f"--vary {name}={raw}: a bundle (a name without dots) takes mappings of dotted keys, "
                          "e.g. {label: none, stages.task.student: null} ({label: base} alone: the recipe as is)")
    label = value.pop("label", None)
    pairs = [(str(k), v) for k, v in value.items()]
    return str(label) if label is not None else ";".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in pairs), pairs


def parse_axes(vary: list[str], overrides: list[str]) -> list[Axis]:
    """The `--vary` flags as axes; a missing `=`, an empty value, a repeated key or one also `--set` is refused."""
    if not vary:
        raise ConfigError("distill sweep: give at least one --vary KEY=V1,V2")
    set_keys = {o.split("=", 1)[0].strip() for o in overrides}
    axes: list[Axis] = []
    for item in vary:
        if "=" not in item:
            raise ConfigError(f"--vary {item}: expected KEY=V1,V2,... e.g. --vary stages.task.objective=tinybert,pkd")
        key, raw = (part.strip() for part in item.split("=", 1))
        values = split_values(raw)
        if not raw or "" in values:
            raise ConfigError(f"--vary {item}: empty value list (or an empty value between commas); quote an "
                              "empty string as ''")
        if "." in key:
            labels, choices = values, [[(key, parse_value(v))] for v in values]
        else:
            labels, choices = (list(x) for x in zip(*(_bundle_value(key, v) for v in values)))
        axis = Axis(key=key, raw=values, labels=labels, choices=choices)
        if len(set(labels)) != len(labels):
            raise ConfigError(f"--vary {item}: a value is listed twice")
        if key in {a.key for a in axes} or axis.keys & {k for a in axes for k in a.keys}:
            raise ConfigError(f"--vary {key}: sets a key another --vary sets; list all its values in one --vary")
        if axis.keys & set_keys:
            raise ConfigError(f"--vary {key}: {', '.join(sorted(axis.keys & set_keys))} also given with --set; "
                              "a key is either fixed or varied")
        axes.append(axis)
    return axes


def _check_key(resolved: dict, key: str, flag: str) -> None:
    """A ConfigError unless `key` names a value of the resolved recipe (every known key is there, defaults too)."""
    node, seen = resolved, []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(seen) or "the recipe"
            known = ", ".join(sorted(node)) if isinstance(node, dict) else "nothing: it is a value"
            raise ConfigError(f"--vary {flag}: {key}: unknown key ({where} has {known})" if flag != key else
                              f"--vary {key}: unknown key ({where} has {known})")
        node, seen = node[part], seen + [part]


def stage_keys(recipe: Recipe) -> dict[str, str]:
    """Stage name -> `NAME-KEY`, KEY a hash of what makes the stage's output what it is, known before it runs.

    The runner's fingerprint hashes the input manifests, which exist only once the inputs ran; here an `@stage`
    input stands for that stage's key instead, so equal keys mean equal fingerprints. The run seed is in the
    key because stages derive their seeds from it.
    """
    keys: dict[str, str] = {}
    for name, entry in recipe.stages.items():
        inputs = {field: keys.get(ref[1:], ref) if ref.startswith("@") else ref
                  for field, ref in sorted(entry.input_refs().items())}
        blob = json.dumps({"stage": entry.spec.name, "config_hash": config_hash(entry.config),
                           "seed": recipe.run.seed, "inputs": inputs}, sort_keys=True)
        keys[name] = f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    return keys


def _variant_name(index: int, axes: list[Axis], raw: tuple[str, ...]) -> str:
    slug = "_".join(f"{a.label}-{v}" for a, v in zip(axes, raw))
    return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9.+-]+", "_", slug).strip("_")[:80]


def plan(recipe_path: str, axes: list[Axis], overrides: list[str], stages: list[str] | None,
         sweep_dir: Path) -> tuple[Recipe, list[Variant], list[str]]:
    """Validate every variant before anything runs: the base recipe, each variant's recipe and stage keys.

    Two variants with the same keys for every selected stage mean a varied key changes nothing they compute
    (a value that does not affect the output, or a stage not selected): refused, naming the key.
    """
    base = load_recipe(recipe_path, overrides)
    names = base.select(stages)
    resolved = base.resolved()
    for axis in axes:
        for key in sorted(axis.keys):
            _check_key(resolved, key, axis.key)
    variants = []
    for index, combo in enumerate(itertools.product(*(range(len(a.choices)) for a in axes)), 1):
        values = [(key, value, f"--vary {a.key}={a.raw[i]}") for a, i in zip(axes, combo) for key, value in a.choices[i]]
        recipe = load_recipe(recipe_path, overrides, values)
        if recipe.tracking.enabled and not (recipe.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
            # One store for the sweep, so the variants' runs can nest under the sweep's run.
            recipe.tracking = dataclasses.replace(recipe.tracking, uri=sqlite_uri(sweep_dir))
        raw = tuple(a.labels[i] for a, i in zip(axes, combo))
        variants.append(Variant(name=_variant_name(index, axes, raw), values=dict(zip((a.key for a in axes), raw)),
                                recipe=recipe, keys=stage_keys(recipe)))
    for variant in variants:
        for name in names:
            missing = [up for up in variant.recipe.upstream(name) if up not in names
                       and not (sweep_dir / "stages" / variant.keys[up] / MANIFEST).is_file()]
            if missing:
                raise ConfigError(f"--stages: {name} reads @{missing[0]}, which is not among the stages run and not "
                                  f"done in {sweep_dir} for variant {variant.name}; add {missing[0]} to --stages")
    seen: dict[tuple, Variant] = {}
    for variant in variants:
        same = seen.setdefault(tuple(variant.keys[n] for n in names), variant)
        if same is not variant:
            key = next(k for k in variant.values if variant.values[k] != same.values[k])
            raise ConfigError(f"--vary {key}: values {same.values[key]} and {variant.values[key]} give the same "
                              f"config to every stage run ({', '.join(names)}): the key changes nothing there")
    return base, variants, names


def _link(variant_dir: Path, name: str, target: Path) -> None:
    """Make `variant_dir/name` a relative link to `target` (re-pointed when the recipe changed since)."""
    link = variant_dir / name
    rel = os.path.relpath(target, variant_dir)
    if link.is_symlink():
        if os.readlink(link) == rel:
            return
        link.unlink()
    elif link.exists():
        raise ConfigError(f"{link}: a real directory where the sweep keeps a link to a shared stage directory; "
                          "move it out of the sweep directory")
    os.symlink(rel, link)


def link_variant(sweep_dir: Path, variant: Variant, names: list[str]) -> Path:
    """The variant's run directory, each stage run linked to its shared directory (created empty if new); a
    stage not run is linked only when another sweep here finished it."""
    variant_dir = sweep_dir / "variants" / variant.name
    variant_dir.mkdir(parents=True, exist_ok=True)
    for name, key in variant.keys.items():
        target = sweep_dir / "stages" / key
        if name in names:
            target.mkdir(parents=True, exist_ok=True)  # the runner's lock file goes inside: a link must not dangle
        if target.is_dir():
            _link(variant_dir, name, target)
    _link(variant_dir, LOCKS, sweep_dir / LOCKS)
    return variant_dir


def _run_variant(tracker, sweep_dir: Path, variant: Variant, names: list[str], keep_going: bool) -> str | None:
    """Run one variant under the sweep's run; with `keep_going`, a failure is returned as one line, not raised."""
    from pipeline.runner import run_recipe

    variant_dir = link_variant(sweep_dir, variant, names)
    tracker.nest(variant_dir, f"{variant.recipe.run.name}/{variant.name}",
                 {"distill.sweep.variant": variant.name, **{f"distill.sweep.{k}": v for k, v in variant.values.items()}})
    try:
        run_recipe(variant.recipe, variant_dir, stages=names)
    except Preempted:
        raise
    except Exception as err:  # noqa: BLE001 - --keep-going: the table names the failure, the file keeps the trace
        if not keep_going:
            raise
        atomic_write_text(variant_dir / "sweep_error.txt", traceback.format_exc())
        reason = (str(err).splitlines() or [type(err).__name__])[0][:300]
        log.warn(f"sweep: variant {variant.name} failed ({reason}); going on (trace: {variant_dir}/sweep_error.txt)")
        return reason
    (variant_dir / "sweep_error.txt").unlink(missing_ok=True)
    return None


def run_sweep(recipe_path: str, vary: list[str], *, overrides: list[str] | None = None, sweep_dir: Path | None = None,
              stages: list[str] | None = None, score_stage: str | None = None, keep_going: bool = False,
              dry_run: bool = False) -> dict:
    """Run every variant, one after another in this process; return the comparison (what sweep.json holds, and
    `sweep_dir`), or with `dry_run` only the plan (`plan`: what `describe` prints)."""
    overrides = list(overrides or [])
    axes = parse_axes(vary, overrides)
    base_run = load_recipe(recipe_path, overrides).run
    sweep_dir = Path(sweep_dir or base_run.run_dir or Path("runs") / f"{base_run.name}-sweep")
    base, variants, names = plan(recipe_path, axes, overrides, stages, sweep_dir)
    if score_stage is not None and score_stage not in names:
        raise ConfigError(f"--score-stage {score_stage}: not among the stages run ({', '.join(names)})")
    if dry_run:
        return {"sweep_dir": str(sweep_dir), "plan": describe(sweep_dir, variants, names)}
    sweep_dir.mkdir(parents=True, exist_ok=True)
    held = acquire(sweep_dir / LOCKS / "sweep.lock", base.run.lock_lease_s)
    try:
        clear_table(sweep_dir)  # a table from an earlier sweep here must not pass for this one's
        write_plan(sweep_dir, recipe_path, overrides, axes, names, variants)
        log.info(describe(sweep_dir, variants, names))
        tracker = make_tracker(variants[0].recipe.tracking, sweep_dir, True)
        tracker.start_pipeline(f"{base.run.name}-sweep", sweep_dir, base.resolved())
        tracker.log_artifact(sweep_dir / PLAN)
        tracker.set_tags({"distill.sweep.vary": json.dumps({a.key: a.labels for a in axes})[:5000]})
        status, failed = "FAILED", {}
        try:
            for number, variant in enumerate(variants, 1):
                log.info(f"sweep: variant {number}/{len(variants)} {variant.name}")
                if (reason := _run_variant(tracker, sweep_dir, variant, names, keep_going)) is not None:
                    failed[variant.name] = reason
            table = write_table(sweep_dir, axes, variants, names, score_stage, failed)
            for row in table["variants"]:  # MLflow's run comparison lines the variants up on these
                tracker.log_nested_metrics(sweep_dir / "variants" / row["variant"], scores(row))
            for name in OUTPUTS:
                if (sweep_dir / name).is_file():
                    tracker.log_artifact(sweep_dir / name)
            status = "FAILED" if failed else "FINISHED"
        finally:
            tracker.end_pipeline(status)
    finally:
        held.release()
    return {**table, "sweep_dir": str(sweep_dir)}
