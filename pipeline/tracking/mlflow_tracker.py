"""MLflow tracking on the main process: one parent run per run directory, one nested run per stage.

The default store is an embedded sqlite database in the run directory (`sqlite:///RUN_DIR/mlflow.db`, artifacts
in `RUN_DIR/mlartifacts`); `tracking.uri` or `MLFLOW_TRACKING_URI` points at a server instead. A server is
probed before use, so a dead one fails within `tracking.timeout_s`; with `tracking.required: false` every call is
journaled to `RUN_DIR/mlflow_buffer.jsonl` instead and replayed at the next start (or `distill track replay`).
Run ids live in `.mlflow_run_id` files, so a resumed stage continues its own run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from pipeline import log
from pipeline.config import ConfigError
from pipeline.manifest import MANIFEST, Manifest, atomic_write_text, manifest_sha256
from pipeline.provenance import git_commit
from pipeline.secrets import scrub
from pipeline.tracking.base import NullTracker, TrackingConfig
from pipeline.tracking.lineage import (
    RUN_ID_FILE,
    input_tags,
    lineage_chain,
    read_run_id,
)
from pipeline.tracking.plots import log_stage_plots
from pipeline.tracking.store import (
    StoreLocked,
    StoreUnreachable,
    connect,
    retry_locked,
    store_uri,
)

BUFFER = "mlflow_buffer.jsonl"
"""Journal of tracker calls made while the server was unreachable."""


def system_tags() -> dict[str, str]:
    """Where the run ran: host, Python, torch and MLflow versions."""
    import mlflow

    tags = {"distill.host": socket.gethostname(), "distill.python": platform.python_version(),
            "distill.platform": platform.platform(), "distill.mlflow": mlflow.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for package in ("torch", "transformers", "deepspeed"):
        try:  # the installed version, without paying for importing it in stages that do not use it
            tags[f"distill.{package}"] = version(package)
        except PackageNotFoundError:
            pass
    return tags


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested config as dotted MLflow params (values cut to MLflow's 6000-character limit)."""
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(tree)[:6000] if not isinstance(tree, str) else tree[:6000]}


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class MlflowTracker(NullTracker):
    """Records a pipeline run in MLflow; offline (journaling to a file) when the server is down and not required."""

    def __init__(self, config: TrackingConfig, run_dir: Path):
        self.config = config
        self.run_dir = Path(run_dir)
        self.uri = store_uri(config.uri, run_dir)
        self.buffer: Path | None = None
        self.client = None
        self.parent: str | None = None
        self.stage_run: str | None = None
        self.stage_dir: Path | None = None
        self._pipeline_args: dict | None = None
        self._stage_args: dict | None = None
        self._replaying = False
        problem = None
        try:
            def open_store():
                self.client = connect(self.uri, config.timeout_s)
                return self._experiment()

            self.experiment_id = retry_locked(open_store, self.uri, config.locked_retry_s, "opening the experiment")
        except StoreLocked as err:
            if config.required:
                raise
            problem, self.client = str(err), None
        except StoreUnreachable:
            problem, self.client = f"no answer within {config.timeout_s:g} s", None
        except Exception as err:  # noqa: BLE001 - a bad store (auth, permissions) reads like a dead one
            problem, self.client = str(err).splitlines()[0][:300], None
        if problem is None:
            return
        if config.required:
            raise ConfigError(f"tracking.uri {self.uri}: {problem}; start the server, fix tracking.uri, or set "
                              "tracking.required: false to buffer metrics and replay them later")
        self.buffer = self.run_dir / BUFFER
        log.warn(f"tracking store {self.uri}: {problem}; buffering to {self.buffer} (replayed at the next start, "
                 f"or run `distill track replay {self.run_dir}`)")

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.config.experiment)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (self.run_dir.resolve() / "mlartifacts").as_uri()
        try:
            return self.client.create_experiment(self.config.experiment, artifact_location=location)
        except Exception:  # noqa: BLE001 - another run sharing the store created it first
            found = self.client.get_experiment_by_name(self.config.experiment)
            if found is None:
                raise
            return found.experiment_id

    # -- offline journal ---------------------------------------------------------------------------------

    def _journal(self, op: str, **args: Any) -> None:
        args.setdefault("time_ms", int(time.time() * 1000))
        self.buffer.parent.mkdir(parents=True, exist_ok=True)
        with open(self.buffer, "a") as handle:
            handle.write(json.dumps(scrub({"op": op, **args}), default=str) + "\n")

    def replay(self) -> int:
        """Send a journal left by an offline run to the (now reachable) server; return how many calls were sent.

        Exactly once, however often a replay is interrupted: `mlflow_buffer.jsonl.sent` records how many
        journal lines have been sent, written after each one; a later replay skips those, re-entering the runs
        they opened from the id files. A call cut off between sending and recording is sent again with the
        same timestamps, which the store keeps once (a metric is keyed by name, step, time and value; params,
        tags and artifacts are set, not added).
        """
        path = self.run_dir / BUFFER
        if self.client is None or not path.is_file():
            return 0
        progress = path.with_name(f"{BUFFER}.sent")
        done = int(progress.read_text() or 0) if progress.is_file() else 0
        events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self._replaying = True  # a failing call raises (the journal stays) instead of journaling itself
        try:
            for index, event in enumerate(events):
                op = event.pop("op")
                if index < done:
                    self._restore(op, event)
                elif op == "end_stage":
                    stage_dir = Path(event["stage_dir"])
                    manifest = Manifest.load(stage_dir) if (stage_dir / MANIFEST).is_file() else None
                    self.end_stage(manifest, event["status"], time_ms=event.get("time_ms"))
                else:
                    getattr(self, op)(**event)
                if index >= done:
                    atomic_write_text(progress, f"{index + 1}\n")
        finally:
            self._replaying = False
        os.replace(path, path.with_name(f"{BUFFER}.replayed-{int(time.time())}"))
        progress.unlink(missing_ok=True)
        log.info(f"replayed {len(events) - done} buffered tracking calls to {self.uri}"
                 + (f" ({done} sent by an earlier, interrupted replay)" if done else ""))
        return len(events) - done

    def _restore(self, op: str, event: dict) -> None:
        """Re-enter the state an already-sent journal call left, without sending it again."""
        if op == "start_pipeline":
            self._pipeline_args = {k: event[k] for k in ("name", "run_dir", "config")}
            self.parent = read_run_id(Path(event["run_dir"]))
        elif op == "start_stage":
            self._stage_args = {k: event[k] for k in ("name", "stage_dir", "config", "inputs")}
            self.stage_dir, self.stage_run = Path(event["stage_dir"]), read_run_id(Path(event["stage_dir"]))
        elif op == "end_stage":
            self.stage_run, self._stage_args = None, None
        elif op == "end_pipeline":
            self._pipeline_args = None

    # -- online helpers ----------------------------------------------------------------------------------

    def _call(self, op: str, args: dict[str, Any], online) -> Any:
        """Do a tracking call, or journal it while offline.

        A store that fails mid-run stops the run when tracking is required; otherwise the tracker goes offline
        and journals this call and the rest, after re-opening calls for the pipeline and the current stage
        (their id files make the replay continue the same runs).
        """
        if self.buffer is None:
            try:
                return retry_locked(online, self.uri, self.config.locked_retry_s, op)
            except Exception as err:  # noqa: BLE001 - any store error is reported the same way
                if self._replaying:
                    raise
                reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
                if isinstance(err, StoreLocked) and self.config.required:
                    raise
                if self.config.required:
                    raise ConfigError(f"tracking.uri {self.uri}: {op} failed: {reason}") from None
                self.buffer = self.run_dir / BUFFER
                log.warn(f"tracking {op} failed ({reason}); training goes on, tracking calls go to {self.buffer}")
                if self._pipeline_args and op != "start_pipeline":
                    self._journal("start_pipeline", **self._pipeline_args)
                if self._stage_args and op not in ("start_pipeline", "start_stage"):
                    self._journal("start_stage", **self._stage_args)
        return self._journal(op, **args)

    def _reopen(self, id_file: Path) -> str | None:
        """The run recorded in `id_file` if this store still has it, set running again."""
        run_id = read_run_id(id_file.parent)
        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - another store, or the run was purged
            return None
        if run.info.lifecycle_stage == "deleted":
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def _open(self, id_file: Path, name: str, tags: dict[str, str]) -> tuple[str, bool]:
        run_id = self._reopen(id_file)
        if run_id is not None:
            return run_id, True
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=scrub(tags)).info.run_id
        atomic_write_text(id_file, run_id + "\n")
        return run_id, False

    def _log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # A resumed run keeps the params it has; MLflow refuses to change a logged param.
        have = self.client.get_run(run_id).data.params
        fresh = [Param(k, str(v)) for k, v in scrub(flatten(params)).items() if k not in have]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(run_id, params=fresh[start:start + 100])

    def _log_metrics(self, metrics: dict[str, Any], step: int | None, stamp: int | None = None) -> None:
        from mlflow.entities import Metric

        run_id = self.stage_run or self.parent
        stamp = stamp or int(time.time() * 1000)
        batch = [Metric(k, v, stamp, int(step or 0)) for k, v in _numeric(metrics).items()]
        if run_id and batch:
            self.client.log_batch(run_id, metrics=batch)

    # -- the Tracker interface ---------------------------------------------------------------------------

    def start_pipeline(self, name: str, run_dir: Path, config: dict[str, Any], time_ms: int | None = None) -> None:
        """Open (or reopen) the run directory's parent run, after replaying any offline journal."""
        if self.buffer is None and self.client is not None and not self._replaying:
            try:
                self.replay()
            except Exception as err:  # noqa: BLE001 - the journal is kept for the next try
                if self.config.required:
                    raise ConfigError(f"tracking.uri {self.uri}: replaying {BUFFER} failed: {err}") from None
                log.warn(f"replaying {BUFFER} failed ({str(err)[:200]}); it is kept for the next start")
        self._pipeline_args = {"name": name, "run_dir": str(run_dir), "config": config}  # after the replay's own

        def start():
            tags = {"distill.run_dir": str(Path(run_dir).resolve()), **system_tags()}
            if commit := git_commit():
                tags["mlflow.source.git.commit"] = commit
            self.parent, _ = self._open(Path(run_dir) / RUN_ID_FILE, name, tags)
            self._log_params(self.parent, {"run": config.get("run", {}), "tracking": config.get("tracking", {})})
            if (Path(run_dir) / "config.yaml").is_file():
                self.client.log_artifact(self.parent, str(Path(run_dir) / "config.yaml"))

        self._call("start_pipeline", dict(self._pipeline_args), start)

    def end_pipeline(self, status: str = "FINISHED", time_ms: int | None = None) -> None:
        """Close the parent run."""
        self._call("end_pipeline", {"status": status},
                   lambda: self.parent and self.client.set_terminated(self.parent, status))
        self._pipeline_args = None

    def nest(self, run_dir: Path, name: str, tags: dict[str, str]) -> None:
        """Open (or reopen) the pipeline run of `run_dir` as a child of this pipeline's run, with `tags`; the
        tracker that then runs `run_dir` continues it through its run id file (a sweep's variants)."""
        if self.client is None or self.buffer is not None or self.parent is None:
            log.warn(f"tracking is offline: the run of {run_dir} is not nested under this one")
            return

        def open_child():
            run_id, _ = self._open(Path(run_dir) / RUN_ID_FILE, name, {"mlflow.parentRunId": self.parent, **tags})
            for key, value in scrub(tags).items():  # a reopened run gets today's values
                self.client.set_tag(run_id, key, str(value))

        retry_locked(open_child, self.uri, self.config.locked_retry_s, "nest")

    def log_nested_metrics(self, run_dir: Path, metrics: dict[str, float]) -> None:
        """Record `metrics` on the run `nest` opened for `run_dir`, so MLflow's run comparison lines the variants up."""
        from mlflow.entities import Metric

        run_id = read_run_id(Path(run_dir))
        batch = [Metric(k, v, int(time.time() * 1000), 0) for k, v in _numeric(metrics).items()]
        if self.client is None or self.buffer is not None or run_id is None or not batch:
            return
        retry_locked(lambda: self.client.log_batch(run_id, metrics=batch), self.uri, self.config.locked_retry_s,
                     "log_nested_metrics")

    def start_stage(self, name: str, stage_dir: Path, config: dict[str, Any], inputs: list,
                    time_ms: int | None = None) -> None:
        """Open (or continue, on resume) the stage's nested run; tag what it consumed."""
        rows = [i if isinstance(i, dict) else {"field": i.field, "ref": i.ref, "path": str(i.path), "sha256": i.sha256}
                for i in inputs]
        self.stage_dir = Path(stage_dir)
        self._stage_args = {"name": name, "stage_dir": str(stage_dir), "config": config, "inputs": rows}

        def start():
            tags = {"distill.stage": name, "distill.stage_dir": str(Path(stage_dir).resolve()), **input_tags(rows)}
            if self.parent:
                tags["mlflow.parentRunId"] = self.parent
            self.stage_run, resumed = self._open(Path(stage_dir) / RUN_ID_FILE, name, tags)
            if resumed:
                self.client.set_tag(self.stage_run, "distill.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
            self._log_params(self.stage_run, config)
            if (Path(stage_dir) / "config.yaml").is_file():
                self.client.log_artifact(self.stage_run, str(Path(stage_dir) / "config.yaml"))
            chain = [link for row in rows for link in lineage_chain(Path(row["path"]))]
            if chain:
                self.client.log_dict(self.stage_run, chain, "lineage.json")
                path = " <- ".join([name] + list(dict.fromkeys(f"{c['name']}({c['stage']})" for c in chain)))
                self.client.set_tag(self.stage_run, "distill.lineage", path[:5000])

        self._call("start_stage", dict(self._stage_args), start)

    def end_stage(self, manifest: Any, status: str = "FINISHED", time_ms: int | None = None) -> None:
        """Attach the manifest, its metrics, the model (in full) and plots; close the stage's run."""
        stamp = time_ms or int(time.time() * 1000)  # journaled, so a replayed call logs the same metric points

        def finish():
            if self.stage_run is None:
                return
            if manifest is not None:
                self._finish(manifest, stamp)
            if status != "RUNNING":
                self.client.set_terminated(self.stage_run, status, end_time=stamp)

        self._call("end_stage", {"stage_dir": str(self.stage_dir), "status": status, "time_ms": stamp}, finish)
        self.stage_run, self._stage_args = None, None

    def _finish(self, manifest: Manifest, stamp: int) -> None:
        stage_dir = self.stage_dir
        run_id = self.stage_run
        self._log_metrics(manifest.metrics, None, stamp)
        totals = manifest.totals()
        # Large outputs stay where they are: the run records where and which (URI + manifest hash).
        self.client.set_tag(run_id, "distill.output.uri", stage_dir.resolve().as_uri())
        self.client.set_tag(run_id, "distill.manifest_sha256", manifest_sha256(stage_dir))
        self.client.set_tag(run_id, "distill.output.files", str(totals["files"]))
        self.client.set_tag(run_id, "distill.output.bytes", str(totals["bytes"]))
        self.client.log_artifact(run_id, str(stage_dir / MANIFEST))
        self.client.log_artifact(run_id, str(stage_dir / RUN_ID_FILE))
        model_dir = manifest.extra.get("model_dir")
        if model_dir and (stage_dir / model_dir).is_dir():
            self.client.log_artifacts(run_id, str(stage_dir / model_dir), model_dir)
            self.client.set_tag(run_id, "distill.model_dir", model_dir)
        log_stage_plots(self.client, run_id, manifest.metrics)

    def _current(self) -> str | None:
        return self.stage_run or self.parent

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, time_ms: int | None = None) -> None:
        """Record scalar metrics of the current stage at `step`."""
        stamp = time_ms or int(time.time() * 1000)
        self._call("log_metrics", {"metrics": _numeric(metrics), "step": step, "time_ms": stamp},
                   lambda: self._log_metrics(metrics, step, stamp))

    def log_params(self, params: dict[str, Any], time_ms: int | None = None) -> None:
        """Record parameters of the current stage (ones already logged are kept)."""
        self._call("log_params", {"params": params},
                   lambda: self._current() and self._log_params(self._current(), params))

    def log_artifact(self, path: Path, artifact_path: str | None = None, time_ms: int | None = None) -> None:
        """Attach a file or a folder to the current stage's run."""

        def send():
            log_one = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
            if self._current():
                log_one(self._current(), str(path), artifact_path)

        self._call("log_artifact", {"path": str(path), "artifact_path": artifact_path}, send)

    def set_tags(self, tags: dict[str, str], time_ms: int | None = None) -> None:
        """Tag the current stage's run."""
        tags = scrub(tags)
        self._call("set_tags", {"tags": tags},
                   lambda: self._current() and [self.client.set_tag(self._current(), k, str(v)) for k, v in tags.items()])

    def log_model_run(self, role: str, model_dir: Path, metrics: dict[str, float], params: dict[str, Any],
                      time_ms: int | None = None) -> None:
        """A run `<stage>/<role>` under the pipeline's run: metrics, params, and the model, referenced when the
        stage that saved it logged it into this store (tag `distill.model_uri`), else logged in full."""
        stage, stage_run = (self._stage_args or {}).get("name", "stage"), self.stage_run

        def send():
            from mlflow.entities import Metric

            tags = {"distill.role": role, "distill.compared_with": stage_run or "",
                    "distill.model_path": str(Path(model_dir).resolve())}
            if self.parent:
                tags["mlflow.parentRunId"] = self.parent
            run_id = self._reuse(f"{stage}/{role}", stage_run) or self.client.create_run(
                self.experiment_id, run_name=f"{stage}/{role}", tags=tags).info.run_id
            self._log_params(run_id, params)
            stamp = time_ms or int(time.time() * 1000)
            self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, 0) for k, v in _numeric(metrics).items()])
            uri = self._model_uri(Path(model_dir))
            if uri is None:  # a folder no tracked stage logged (e.g. teacher_path): log it here
                uri = f"runs:/{run_id}/model"
                self.client.log_artifacts(run_id, str(model_dir), "model")
            self.client.set_tag(run_id, "distill.model_uri", uri)
            self.client.set_terminated(run_id, "FINISHED")

        self._call("log_model_run", {"role": role, "model_dir": str(model_dir), "metrics": _numeric(metrics),
                                     "params": params}, send)

    def _reuse(self, name: str, stage_run: str | None) -> str | None:
        """The `<stage>/<role>` run an earlier attempt of this stage made, so a rerun does not add another."""
        if not stage_run:
            return None
        found = self.client.search_runs([self.experiment_id], f"tags.`distill.compared_with` = '{stage_run}'")
        return next((r.info.run_id for r in found if r.info.run_name == name), None)

    def _model_uri(self, model_dir: Path) -> str | None:
        """`runs:/ID/model` when the stage directory holding `model_dir` logged it into this store."""
        upstream = read_run_id(model_dir.parent)
        if not upstream:
            return None
        try:
            logged = self.client.get_run(upstream).data.tags.get("distill.model_dir")
        except Exception:  # noqa: BLE001 - a run id from another store
            return None
        return f"runs:/{upstream}/{logged}" if logged == model_dir.name else None

    def model_registry(self):
        """The store's model registry, bound to the current stage's run; ConfigError while offline."""
        if self.client is None or self.stage_run is None:
            return super().model_registry()
        from pipeline.tracking.models import ModelRegistry

        return ModelRegistry(self.client, lambda: self.stage_run)
