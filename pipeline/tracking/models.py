"""Model versions and aliases in the tracking store: what the register stage asks of the Tracker.

A stage gets this through `tracker.model_registry()`, never by reaching into the tracker's client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST, manifest_sha256
from pipeline.secrets import scrub
from pipeline.tracking.lineage import read_run_id
from pipeline.tracking.promote import promote


class ModelRegistry:
    """Registers model folders as versions of named models and moves aliases behind promotion gates."""

    def __init__(self, client, tracker):
        self._client = client
        self._tracker = tracker

    def source_run(self, stage_dir: Path, model_dir: str) -> str:
        """The run holding the model in full: the upstream stage's, else the current stage's after logging it."""
        upstream = read_run_id(stage_dir)
        if upstream:
            try:
                if self._client.get_run(upstream).data.tags.get("distill.model_dir") == model_dir:
                    return upstream
            except Exception:  # noqa: BLE001 - a run from another store: log the model here instead
                pass
        self._tracker.log_artifact(stage_dir / MANIFEST)
        self._tracker.log_artifact(stage_dir / model_dir, model_dir)
        self._tracker.set_tags({"distill.model_dir": model_dir, "distill.manifest_sha256": manifest_sha256(stage_dir)})
        return self._tracker.stage_run

    def create_version(self, name: str, run_id: str, tags: dict[str, str], description: str | None):
        """A new version of model `name` (created if missing) pointing at `runs:/run_id`.

        Idempotent: a version of `name` from the same run and the same input manifest (a rerun after a kill)
        is returned instead of adding a second one.
        """
        for found in self._client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
            if found.tags.get("distill.manifest_sha256") == tags.get("distill.manifest_sha256"):
                return found
        try:
            self._client.create_registered_model(name)
        except Exception:  # noqa: BLE001 - it exists already; a real store error shows up on the next call
            pass
        return self._client.create_model_version(name, source=f"runs:/{run_id}", run_id=run_id, tags=scrub(tags),
                                                 description=description)

    def promote(self, name: str, version: Any, alias: str, gates: list[str]) -> str:
        """Move `alias` to `version` when every gate holds (PromotionRefused otherwise)."""
        return promote(self._client, name, version, alias, gates)
