"""The Tracker interface: what the runner and stages call. `NullTracker` implements it by doing nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError


@dataclass(kw_only=True)
class TrackingConfig:
    """Where and whether runs are tracked."""

    enabled: bool = False
    """Track runs in MLflow."""
    uri: str | None = None
    """MLflow tracking URI; None means MLFLOW_TRACKING_URI if set, else sqlite in the run directory."""
    experiment: str = "distill"
    """MLflow experiment name."""
    required: bool = True
    """When the server cannot be reached: fail (True) or buffer metrics to a file and go on (False)."""
    timeout_s: float = 10.0
    """How long to try reaching a tracking server before giving up."""
    locked_retry_s: float = 60.0
    """How long to keep retrying, with backoff, a call refused with "database is locked" (another run writing
    the same sqlite store) before failing with advice to run a tracking server."""

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not 0 <= self.locked_retry_s <= 3600:
            raise ValueError(f"locked_retry_s must be between 0 and 3600, got {self.locked_retry_s}")


class NullTracker:
    """A tracker that records nothing: non-zero ranks and runs with tracking disabled."""

    def start_pipeline(self, name: str, run_dir: Path, config: dict[str, Any]) -> None:
        """Open the run that groups this pipeline's stages."""

    def end_pipeline(self, status: str = "FINISHED") -> None:
        """Close the pipeline's run."""

    def nest(self, run_dir: Path, name: str, tags: dict[str, str]) -> None:
        """Open the pipeline run of another run directory as a child of this one (a sweep's variants)."""

    def log_nested_metrics(self, run_dir: Path, metrics: dict[str, float]) -> None:
        """Record metrics on the pipeline run of a nested run directory (a sweep variant's scores)."""

    def start_stage(self, name: str, stage_dir: Path, config: dict[str, Any], inputs: list) -> None:
        """Open (or reopen, on resume) a stage's run."""

    def end_stage(self, manifest: Any, status: str = "FINISHED") -> None:
        """Close a stage's run, attaching its manifest."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record scalar metrics at a step."""

    def log_params(self, params: dict[str, Any]) -> None:
        """Record parameters of the current stage."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Attach a file or folder to the current stage's run."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Tag the current stage's run."""

    def log_model_run(self, role: str, model_dir: Path, metrics: dict[str, float], params: dict[str, Any]) -> None:
        """Record a model the current stage measured but did not train (a task stage's teacher) as a run of its
        own beside the stage's, with `metrics` and `params`, and the model (by reference when a tracked stage
        logged it already)."""

    def model_registry(self):
        """The model registry of the store (`pipeline.tracking.models.ModelRegistry`); ConfigError without one."""
        raise ConfigError("registering needs tracking.enabled: true and a reachable store")


class Recording:
    """A tracker that keeps every `log_metrics` call (name -> [(step, value)]) and passes everything on to
    `inner`: what lets a stage draw its own curves whether or not MLflow is on."""

    def __init__(self, inner: Any):
        self.inner = inner if inner is not None else NullTracker()
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Record, then forward."""
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.history.setdefault(name, []).append((step if step is not None else 0, float(value)))
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
