"""Stage name -> (Config class, run function), imported lazily so `distill --help` stays fast.

A stage module defines:
  Config               a dataclass (kw_only) with a docstring per field, validated at construction
  run(config, ctx)     returns the stage's Manifest, or None when this worker finished only its own part
  LAUNCH               "array" (split over independent workers), "distributed" (torch.distributed ranks)
                       or "single" (one process); the launchers read it
  verify(manifest, stage_dir)   optional, deeper checks than re-hashing, used by `distill verify`
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
    "register": "stages.register",
    "report": "stages.report",
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
