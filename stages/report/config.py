"""The `report` stage's typed config: every field documented, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class Config:
    """What to summarise."""

    task: str = field(default="@task", metadata={"input": True})
    """The task stage whose evaluation (teacher vs student) is summarised."""
    register: str | None = field(default=None, metadata={"input": True})
    """The register stage that registered the student (gives `registered_model`); None: not registered."""
    general: str | None = field(default=None, metadata={"input": True})
    """The general-distillation stage, for its held-out MLM figures; None: left out."""
