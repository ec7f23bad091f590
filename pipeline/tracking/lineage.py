"""Lineage between stage outputs and MLflow runs, and resolving `runs:/` and `models:/` references.

Every tracked stage directory keeps its MLflow run id in `.mlflow_run_id`; the same file is logged with the
manifest, so a downloaded copy still names the run it came from. Lineage follows manifests' inputs back to
the corpus; a reference into MLflow resolves to a directory holding a manifest, checked before it is used.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest, ManifestError, manifest_sha256
from pipeline.tracking.base import TrackingConfig
from pipeline.tracking.store import StoreUnreachable, connect, store_uri

RUN_ID_FILE = ".mlflow_run_id"
"""File in a stage (or run) directory naming its MLflow run, so a resumed stage continues that run."""


def read_run_id(directory: Path) -> str | None:
    """The MLflow run id recorded in `directory`, if any."""
    path = Path(directory) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def input_tags(rows: list[dict]) -> dict[str, str]:
    """Tags linking a stage run to each input it consumed: reference, manifest hash, path, stage and run."""
    tags = {}
    for row in rows:
        key = f"distill.input.{row['field']}"
        tags.update({f"{key}.ref": row["ref"], f"{key}.manifest_sha256": row["sha256"],
                     f"{key}.path": str(Path(row["path"]).resolve())})
        if run_id := read_run_id(Path(row["path"])):
            tags[f"{key}.run_id"] = run_id
        try:
            tags[f"{key}.stage"] = Manifest.load(Path(row["path"])).stage
        except ManifestError:
            pass
    return tags


def lineage_chain(path: Path, _seen: set | None = None) -> list[dict]:
    """The output at `path` and everything upstream of it, nearest first, following manifests' inputs."""
    seen = set() if _seen is None else _seen
    path = Path(path)
    if path.resolve() in seen or not (path / MANIFEST).is_file():
        return []
    seen.add(path.resolve())
    try:
        manifest = Manifest.load(path)
    except ManifestError:
        return []
    chain = [{"name": manifest.name, "stage": manifest.stage, "path": str(path.resolve()),
              "manifest_sha256": manifest_sha256(path), "run_id": read_run_id(path), "metrics": manifest.metrics}]
    for upstream in manifest.inputs:
        chain += lineage_chain(Path(upstream.path), seen)
    return chain


def _local_path(artifact_uri: str) -> Path | None:
    """The filesystem path of a local artifact location, or None when the store is remote."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(artifact_uri)
    return None


def _fetch(client, uri: str, run_id: str, sub: str, run_dir: Path, ref: str) -> Path:
    """A directory holding the run's artifacts under `sub`: in place when local, else downloaded once."""
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - not found and bad id look the same to the user
        raise ConfigError(f"input {ref!r}: run {run_id} not found in {uri}") from None
    local = _local_path(run.info.artifact_uri)
    if local is not None:
        return local / sub
    target = Path(run_dir) / ".resolved" / "runs" / run_id / sub
    if (target / MANIFEST).is_file():
        return target
    import mlflow

    target.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename, so an interrupted download never looks complete.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=sub or None, dst_path=tmp,
                                                      tracking_uri=uri)
        except Exception as err:  # noqa: BLE001
            raise ConfigError(f"input {ref!r}: download from {uri} failed: {str(err).splitlines()[0][:200]}") from None
        os.replace(got, target)
    return target


def _check(path: Path, run, ref: str) -> Path:
    """The directory whose manifest matches the run's record: the artifacts, or the large output left in place."""
    recorded = run.data.tags.get("distill.manifest_sha256")
    if not (path / MANIFEST).is_file():
        raise ConfigError(f"input {ref!r}: {path} has no {MANIFEST} (was the run made by distill?)")
    if recorded and manifest_sha256(path) != recorded:
        raise ConfigError(f"input {ref!r}: {path}/{MANIFEST} does not match the hash the run recorded")
    manifest = Manifest.load(path)
    if all((path / out.path).is_file() for out in manifest.outputs):
        try:
            manifest.verify(path)
        except ManifestError as err:
            raise ConfigError(f"input {ref!r}: {err}") from None
        return path
    # Shards and caches are not copied into the artifact store: follow the URI the run recorded.
    output_uri = run.data.tags.get("distill.output.uri", "")
    elsewhere = _local_path(output_uri) if output_uri else None
    if elsewhere is None or not (elsewhere / MANIFEST).is_file() or manifest_sha256(elsewhere) != recorded:
        raise ConfigError(f"input {ref!r}: outputs are not in the artifact store and {output_uri or 'no output URI'}"
                          " does not hold the recorded manifest (copy the stage directory there)")
    return elsewhere


def resolve_mlflow_uri(ref: str, tracking_config, run_dir: Path) -> Path:
    """The checked directory (holding manifest.json) that `runs:/ID[/path]` or `models:/NAME@ALIAS|/VERSION` names."""
    tracking_config = tracking_config or TrackingConfig()
    uri = store_uri(tracking_config.uri, run_dir)
    try:
        client = connect(uri, tracking_config.timeout_s)
    except StoreUnreachable as err:
        raise ConfigError(f"input {ref!r}: {err}") from None
    sub = ""
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        try:
            if "@" in body:
                name, alias = body.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = body.partition("/")
                version = client.get_model_version(name, number)
        except Exception:  # noqa: BLE001
            raise ConfigError(f"input {ref!r}: no such registered model version in {uri}") from None
        run_id = version.run_id
        sub = version.tags.get("distill.artifact_path", "")
    else:
        run_id, _, sub = ref[len("runs:/"):].partition("/")
    sub = sub.strip("/")
    path = _fetch(client, uri, run_id, sub, Path(run_dir), ref)
    return _check(path, client.get_run(run_id), ref)
