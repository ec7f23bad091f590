"""Model versions and aliases in the tracking store: what the register stage and `distill register` ask for.

A version's source is the MLflow Model a run logged (`runs:/RUN/model`), so `mlflow.pyfunc.load_model`,
`mlflow models serve` and `mlflow.evaluate` take `models:/NAME@ALIAS` as they take any MLflow Model; the
manifest and lineage stay at the run's root, where `models:/` references of our own recipes look. Each version
carries `distill.registered_by`, a key naming who registered it (the register stage's run, or the registered
folder's manifest hash), so registering again after a kill finds that version instead of adding one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.manifest import MANIFEST, Manifest, manifest_sha256
from pipeline.secrets import scrub
from pipeline.tracking.lineage import lineage_chain, read_run_id
from pipeline.tracking.promote import promote

REGISTERED_BY = "distill.registered_by"
"""Version tag holding the key of the registration that made it (idempotent reruns)."""


def version_tags(stage_dir: Path) -> dict[str, str]:
    """What a version records of the stage output it came from: metrics, manifest hash, stage, lineage."""
    manifest, chain = Manifest.load(stage_dir), lineage_chain(stage_dir)
    return {
        "distill.metrics": json.dumps(manifest.metrics, sort_keys=True),
        "distill.manifest_sha256": manifest_sha256(stage_dir),
        "distill.stage": manifest.stage,
        "distill.lineage": " <- ".join(f"{c['name']}({c['stage']})" for c in chain)[:5000],
        "distill.lineage_runs": json.dumps([c["run_id"] for c in chain])[:5000],
    }


class ModelRegistry:
    """Registers model folders as versions of named models and moves aliases behind promotion gates.

    `own_run` gives the run to log a model into when no run of this store logged it already (the register
    stage's run; for `distill register`, a run made for the purpose).
    """

    def __init__(self, client, own_run: Callable[[], str]):
        self._client = client
        self._own_run = own_run

    def source_run(self, stage_dir: Path, model_dir: str) -> str:
        """The run holding the model in full: the upstream stage's, else `own_run` after logging it there."""
        upstream = read_run_id(stage_dir)
        if upstream:
            try:
                if self._client.get_run(upstream).data.tags.get("distill.model_dir") == model_dir:
                    return upstream
            except Exception:  # noqa: BLE001 - a run from another store: log the model here instead
                pass
        run_id = self._own_run()
        self._client.log_artifact(run_id, str(stage_dir / MANIFEST))
        self._client.log_artifacts(run_id, str(stage_dir / model_dir), model_dir)
        self._client.set_tag(run_id, "distill.model_dir", model_dir)
        self._client.set_tag(run_id, "distill.manifest_sha256", manifest_sha256(stage_dir))
        return run_id

    def find(self, name: str, key: str):
        """The version of `name` registered under `key`, or None (only when the store says there is none: any
        other store error propagates, since guessing "none" would register a duplicate)."""
        try:
            self._client.get_registered_model(name)
        except Exception as err:  # noqa: BLE001 - MlflowException carries the reason as an error code
            if getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        found = [v for v in self._client.search_model_versions(f"name='{name}'") if v.tags.get(REGISTERED_BY) == key]
        return min(found, key=lambda v: int(v.version)) if found else None

    def register(self, name: str, stage_dir: Path, model_dir: str, key: str, tags: dict[str, str],
                 description: str | None) -> tuple[Any, bool]:
        """(version, created): the version registered under `key`, made now (pointing at the MLflow Model
        `runs:/RUN/<model_dir>`) unless an earlier attempt made it."""
        existing = self.find(name, key)
        if existing is not None:
            return existing, False
        run_id = self.source_run(Path(stage_dir), model_dir)
        try:
            self._client.create_registered_model(name)
        except Exception:  # noqa: BLE001 - it exists already; a real store error shows up on the next call
            pass
        version = self._client.create_model_version(
            name, source=f"runs:/{run_id}/{model_dir}", run_id=run_id, tags={**scrub(tags), REGISTERED_BY: key},
            description=description)
        return version, True

    def promote(self, name: str, version: Any, alias: str, gates: list[str]) -> str:
        """Move `alias` to `version` when every gate holds (PromotionRefused otherwise)."""
        return promote(self._client, name, version, alias, gates)
