"""The `register` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.config import ConfigError
from pipeline.tracking.promote import parse_gate


@dataclass(kw_only=True)
class Config:
    """Register a model stage's output in the MLflow model registry."""

    model: str = field(default="@task", metadata={"input": True})
    """The model-producing stage output: `@stage`, a path, `runs:/ID` or `models:/NAME@ALIAS`."""
    name: str
    """Registered model name."""
    alias: str | None = None
    """Alias to point at the new version when the gates hold (e.g. champion); None registers only."""
    require: list[str] = field(default_factory=list)
    """Gates that must hold to move the alias, e.g. 'dev_acc>=0.99*teacher' (see `distill promote --help`)."""
    description: str = ""
    """Description stored with the version."""
    die_after_version: bool = field(default=False, metadata={"hash": False})
    """Test hook: SIGKILL this process right after the version is created (before anything records it)."""

    def __post_init__(self):
        if not self.name.strip():
            raise ValueError("name must not be empty")
        if self.alias is not None and (not self.alias or self.alias.isdigit() or self.alias == "latest"):
            raise ValueError(f"alias {self.alias!r}: must be a name (not a number, not 'latest')")
        for gate in self.require:
            try:
                parse_gate(gate)
            except ConfigError as err:
                raise ValueError(str(err)) from None
