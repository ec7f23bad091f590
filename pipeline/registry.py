"""Stage name -> (Config class, run function), imported lazily so `distill --help` stays fast.

A stage module defines:
  Config               a dataclass (kw_only) with a docstring per field, validated at construction
  run(config, ctx)     returns the stage's Manifest, or None when this worker finished only its own part
  LAUNCH               "array" (split over independent workers), "distributed" (torch.distributed ranks)
                       or "single" (one process); the launchers read it
  verify(manifest, stage_dir)   optional, deeper checks than re-hashing, used by `distill verify`
  after_manifest(stage_dir)     optional, removes work files once the manifest is written (shard: its scan)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

from pipeline.config import ConfigError

STAGES: dict[str, str] = {
    "wordnet": "stages.wordnet",
    "shard": "stages.shard",
    "teacher_adapt": "stages.teacher_adapt",
    "cache": "stages.cache",
    "general": "stages.general",
    "teacher_finetune": "stages.teacher_finetune",
    "augment": "stages.augment",
    "task": "stages.task",
    "dynabert": "stages.dynabert",
    "fastbert": "stages.fastbert",
    "team": "stages.team",
    "register": "stages.register",
    "report": "stages.report",
    "prune": "stages.prune",
    "extract": "stages.extract",
}
"""Every stage type the pipeline knows, by the name recipes use."""


@dataclass(frozen=True)
class StageSpec:
    """A stage type resolved to its code."""

    name: str
    module: ModuleType

    @property
    def config_class(self) -> type:
        return self.module.Config

    @property
    def run(self) -> Callable[[Any, Any], Any]:
        return self.module.run

    @property
    def launch(self) -> str:
        return getattr(self.module, "LAUNCH", "single")

    @property
    def verify(self) -> Callable | None:
        return getattr(self.module, "verify", None)

    @property
    def after_manifest(self) -> Callable | None:
        return getattr(self.module, "after_manifest", None)


SECTIONS: dict[str, str] = {"launch": "launch.config:LaunchConfig"}
"""Recipe sections other subsystems own: key -> `module:Class` of the dataclass that validates the section."""

COMMANDS: list[str] = ["launch.cli", "pipeline.tracking.cli", "bench.cli", "publish.cli"]
"""Modules whose `add_parser(subparsers)` adds CLI verbs that live with their subsystem."""

STATUS_COLUMNS = "launch.jobs:job_columns"
"""`module:function` giving extra `distill status` columns (cluster job ids and states) for a run directory."""


def load_symbol(target: str) -> Any | None:
    """The object `module:name` names, or None when that module is not installed."""
    module, _, attr = target.partition(":")
    try:
        found = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and module.startswith(err.name):
            return None
        raise
    return getattr(found, attr)


def section(key: str) -> type:
    """The dataclass validating recipe section `key`."""
    found = load_symbol(SECTIONS[key])
    if found is None:
        raise ConfigError(f"recipe section {key!r} needs {SECTIONS[key]}, which is not installed")
    return found


def register(name: str, module: str) -> None:
    """Add a stage type (plugins and tests use this)."""
    STAGES[name] = module


def get(name: str) -> StageSpec:
    """Resolve a stage type name; an unknown one is a ConfigError listing the known names."""
    if name not in STAGES:
        raise ConfigError(f"unknown stage type {name!r} (known: {', '.join(STAGES)})")
    try:
        module = importlib.import_module(STAGES[name])
    except ModuleNotFoundError as err:
        if err.name == STAGES[name]:
            raise ConfigError(f"stage {name!r} is not available in this version ({STAGES[name]} is missing)") from None
        raise
    return StageSpec(name, module)
