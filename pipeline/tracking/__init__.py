"""Experiment tracking. The runner calls a Tracker; only rank zero ever gets a real one.

  base            TrackingConfig, the Tracker interface and NullTracker (records nothing)
  store           the one place that turns a config or a URI into a reachable MLflow client
  mlflow_tracker  parent run per pipeline, nested run per stage, offline journal and replay
  lineage         stage outputs <-> MLflow runs; `runs:/` and `models:/` references
  models          model versions and aliases behind the Tracker (what the register stage uses)
  promote         promotion gates and moving an alias
  cli             `distill promote`, `distill track replay`
  plots           the PNGs logged beside the numbers
"""

from __future__ import annotations

from pathlib import Path

from pipeline.tracking.base import NullTracker, TrackingConfig

__all__ = ["NullTracker", "TrackingConfig", "make_tracker"]


def make_tracker(config: TrackingConfig, run_dir: Path, is_main: bool):
    """The tracker for this process: a real one on the main process when tracking is enabled."""
    if not (config.enabled and is_main):
        return NullTracker()
    from pipeline.tracking.mlflow_tracker import (
        MlflowTracker,  # the MLflow dependency stays out of the hot import path
    )

    return MlflowTracker(config, run_dir)
