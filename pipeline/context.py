"""RunContext: everything a stage may know besides its config, built by the runner."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import config_hash, to_dict
from pipeline.manifest import InputRef, Manifest, OutputFile
from pipeline.world import World


def now() -> str:
    """UTC time stamp in ISO format."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass(kw_only=True)
class ResolvedInput:
    """An upstream stage output this stage reads."""

    field: str
    ref: str
    path: Path
    manifest: Manifest
    sha256: str


@dataclass(kw_only=True)
class RunContext:
    """What the runner hands a stage: where to write, who it is, what it reads, how to track."""

    run_dir: Path
    stage_dir: Path
    name: str
    """Name of this stage in the recipe (the stage directory's name)."""
    stage: str
    """Registered stage type."""
    world: World = field(default_factory=World)
    tracker: Any = None
    seed: int = 0
    """The recipe's run seed; stages derive their own seeds from it."""
    inputs: dict[str, ResolvedInput] = field(default_factory=dict)
    started: str = field(default_factory=now)
    git_commit: str | None = None

    def input_dir(self, field_name: str) -> Path:
        """Directory of the upstream output named by config field `field_name`."""
        return self.inputs[field_name].path

    def input_manifest(self, field_name: str) -> Manifest:
        """Manifest of the upstream output named by config field `field_name`."""
        return self.inputs[field_name].manifest

    def manifest(
        self,
        config: Any,
        outputs: list[OutputFile],
        metrics: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Build this stage's manifest; the runner writes it after `run` returns."""
        return Manifest(
            stage=self.stage,
            name=self.name,
            config_hash=config_hash(config),
            config=to_dict(config),
            version=__version__,
            git_commit=self.git_commit,
            inputs=[
                InputRef(name=i.field, ref=i.ref, path=str(i.path), sha256=i.sha256) for i in self.inputs.values()
            ],
            outputs=sorted(outputs, key=lambda o: o.path),
            metrics=metrics or {},
            extra=extra or {},
            started=self.started,
            finished=now(),
        )
