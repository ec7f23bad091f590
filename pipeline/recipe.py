"""A recipe: run settings, tracking, launch settings and an ordered set of stages, each validated by its type."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import registry
from pipeline.config import (
    ConfigError,
    Sources,
    apply_overrides,
    build,
    set_value,
    load_yaml,
    to_dict,
)
from pipeline.tracking import TrackingConfig


@dataclass(kw_only=True)
class RunSection:
    """Settings of the pipeline run as a whole."""

    name: str = "distill"
    """Run name: the default run directory is runs/<name>."""
    seed: int = 0
    """Seed from which stages derive theirs."""
    run_dir: str | None = None
    """Where stage outputs go; the CLI's --run-dir wins."""
    lock_lease_s: float = 600.0
    """A stage lock held from another host is taken over once its heartbeat is older than this (seconds);
    allow for clock skew between nodes. On the same host a dead pid frees the lock at once."""

    def __post_init__(self):
        if not 10 <= self.lock_lease_s <= 86400:
            raise ValueError(f"lock_lease_s must be between 10 and 86400 seconds, got {self.lock_lease_s}")


@dataclass(kw_only=True)
class StageEntry:
    """One stage of a recipe: its name (the directory it writes), type and validated config."""

    name: str
    spec: registry.StageSpec
    config: Any

    def input_fields(self) -> list[str]:
        """Config fields that name upstream outputs (`metadata={"input": True}`), nested ones as `a.b`, those of
        the i-th section of a list as `a.i.b`."""

        def walk(node: Any, prefix: str) -> list[str]:
            names = []
            for f in dataclasses.fields(node):
                value = getattr(node, f.name)
                if f.metadata.get("input"):
                    names.append(prefix + f.name)
                elif dataclasses.is_dataclass(value):
                    names += walk(value, f"{prefix}{f.name}.")
                elif isinstance(value, (list, tuple)):  # a list of sections (a team's members): `a.0.b`
                    for i, item in enumerate(value):
                        if dataclasses.is_dataclass(item):
                            names += walk(item, f"{prefix}{f.name}.{i}.")
            return names

        return walk(self.config, "")

    def input_ref(self, dotted: str) -> Any:
        """The value of input field `dotted` (e.g. `data.source`)."""
        node = self.config
        for part in dotted.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        return node

    def input_refs(self) -> dict[str, str]:
        """Input field -> reference, for every input field that is set: what this stage reads.

        The one definition of a stage's inputs: the runner resolves these, the launchers chain jobs on them.
        """
        refs = {name: self.input_ref(name) for name in self.input_fields()}
        return {name: str(ref) for name, ref in refs.items() if ref not in (None, "")}


@dataclass(kw_only=True)
class Recipe:
    """A validated recipe."""

    run: RunSection
    tracking: TrackingConfig
    launch: Any
    """The `launch:` section, validated by the class `registry.SECTIONS` names (launch.config.LaunchConfig)."""
    stages: dict[str, StageEntry]
    source: str
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def select(self, stages: list[str] | None) -> list[str]:
        """Stage names to run, in recipe order: all, or the named subset (an unknown name is a ConfigError)."""
        names = list(self.stages)
        if not stages:
            return names
        unknown = [s for s in stages if s not in self.stages]
        if unknown:
            raise ConfigError(f"{self.source}: --stages {','.join(unknown)}: not in this recipe (has: {', '.join(names)})")
        return [n for n in names if n in stages]

    def upstream(self, name: str) -> list[str]:
        """Stages of this recipe that stage `name` reads (its `@stage` inputs), in recipe order."""
        reads = {ref[1:] for ref in self.stages[name].input_refs().values() if ref.startswith("@")}
        return [s for s in self.stages if s in reads]

    def resolved(self) -> dict[str, Any]:
        """The fully resolved recipe as plain data (what `distill config` prints and the run dir keeps)."""
        return {
            "run": to_dict(self.run),
            "tracking": to_dict(self.tracking),
            "launch": to_dict(self.launch),
            "stages": {n: {"stage": e.spec.name, **to_dict(e.config)} for n, e in self.stages.items()},
        }


TOP_KEYS = {"run": RunSection, "tracking": TrackingConfig}


def parse(tree: dict, sources: Sources, origin: str) -> Recipe:
    """Validate a merged YAML tree into a Recipe; stage sections are validated by their stage type's Config."""
    known = set(TOP_KEYS) | {"launch", "stages"}
    for key in tree:
        if key not in known:
            where = sources.get((key,), origin)
            raise ConfigError(f"{where}: {key}: unknown key (known: {', '.join(sorted(known))})")
    run = build(RunSection, tree.get("run") or {}, sources, ("run",), origin)
    tracking = build(TrackingConfig, tree.get("tracking") or {}, sources, ("tracking",), origin)
    launch = build(registry.section("launch"), tree.get("launch") or {}, sources, ("launch",), origin)
    stages_tree = tree.get("stages")
    if not isinstance(stages_tree, dict) or not stages_tree:
        raise ConfigError(f"{sources.get(('stages',), origin)}: stages: expected a mapping of stage name -> config")
    stages = {}
    for name, body in stages_tree.items():
        where = sources.get(("stages", name), origin)
        if not isinstance(body, (dict, type(None))):
            raise ConfigError(f"{where}: stages.{name}: expected a mapping of config keys, got {body!r}")
        body = dict(body or {})
        stage_type = body.pop("stage", name)
        if not isinstance(stage_type, str):
            raise ConfigError(f"{where}: stages.{name}.stage: expected a stage type name, got {stage_type!r}")
        try:
            spec = registry.get(stage_type)
        except ConfigError as err:
            raise ConfigError(f"{where}: stages.{name}: {err}") from None
        config = build(spec.config_class, body, sources, ("stages", name), origin)
        stages[name] = StageEntry(name=name, spec=spec, config=config)
    return Recipe(run=run, tracking=tracking, launch=launch, stages=stages, source=origin, raw=tree)


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                values: list[tuple[str, Any, str]] | None = None) -> Recipe:
    """Load a recipe file with its includes, apply `--set` overrides, then parsed `values` (dotted key, value,
    the flag that set it: a sweep's `--vary`), and validate it."""
    tree, sources = load_yaml(path)
    apply_overrides(tree, sources, overrides or [])
    for dotted, value, source in values or []:
        set_value(tree, sources, dotted, value, source)
    return parse(tree, sources, str(path))


def load_stage_file(stage: str, path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """`distill stage NAME FILE`: FILE is a recipe (NAME picks its stage) or one stage's own config."""
    tree, sources = load_yaml(path)
    if "stages" not in tree:
        body_sources = {("stages", stage) + k: v for k, v in sources.items()}
        tree, sources = {"stages": {stage: tree}}, body_sources
    overrides = [o if o.split("=", 1)[0].startswith(("stages.", "run.", "tracking.", "launch.")) else f"stages.{stage}.{o}"
                 for o in overrides or []]
    apply_overrides(tree, sources, overrides)
    recipe = parse(tree, sources, str(path))
    if stage not in recipe.stages:
        raise ConfigError(f"{path}: stages.{stage}: no such stage in this recipe (has: {', '.join(recipe.stages)})")
    return recipe
