"""The recipe's `launch:` section: where and how `distill submit` runs each stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKENDS = ("slurm", "k8s", "local")


@dataclass(kw_only=True)
class StageLaunch:
    """Per-stage overrides of the cluster settings (unset fields keep the section's values)."""

    nodes: int | None = None
    """Nodes for this stage's training job."""
    procs_per_node: int | None = None
    """Training processes per node."""
    gpus_per_node: int | None = None
    """GPUs per node."""
    cpus_per_task: int | None = None
    """CPUs per process."""
    workers: int | None = None
    """Tasks of this stage's array job."""
    time_limit: str | None = None
    """Wall-clock limit, Slurm syntax (HH:MM:SS or D-HH:MM:SS)."""


@dataclass(kw_only=True)
class LaunchConfig:
    """Cluster settings shared by the Slurm, Kubernetes and local backends."""

    backend: Literal["slurm", "k8s", "local"] = "local"
    """Default backend of `distill submit` (its --backend wins)."""
    nodes: int = 1
    """Nodes of a distributed (training) stage."""
    procs_per_node: int = 1
    """Training processes per node (one per GPU on GPU nodes)."""
    gpus_per_node: int = 0
    """GPUs requested per node (0 on CPU clusters)."""
    cpus_per_task: int = 1
    """CPUs per process (per array task, per training rank)."""
    workers: int = 1
    """Tasks of an array stage (shard, cache, augment): one worker each."""
    time_limit: str = "24:00:00"
    """Wall-clock limit of each job, Slurm syntax (HH:MM:SS or D-HH:MM:SS)."""
    partition: str | None = None
    """Slurm partition."""
    account: str | None = None
    """Slurm account."""
    qos: str | None = None
    """Slurm quality of service."""
    signal_seconds: int = 120
    """Seconds before the time limit (Slurm) or deletion (Kubernetes grace period) to ask for a checkpoint."""
    max_requeues: int = 3
    """How often the local backend reruns a preempted stage (Slurm requeues with no cap; Jobs retry)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra `#SBATCH` lines, e.g. ["--constraint=a100", "--exclusive"]."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables of every job."""
    python: str = "python"
    """Python interpreter on the cluster nodes (with distill installed)."""
    entry_module: str = "pipeline.cli"
    """Module run with `python -m` to get the `distill` CLI (tests use one that registers toy stages)."""
    workdir: str | None = None
    """Directory jobs start in (default: where `distill submit` ran)."""
    image: str = "distill:latest"
    """Container image (built from the Dockerfile) for Kubernetes."""
    namespace: str = "default"
    """Kubernetes namespace."""
    pvc: str = "distill-runs"
    """PersistentVolumeClaim (ReadWriteMany) shared by all pods; run directories live on it."""
    mount_path: str = "/mnt/distill"
    """Where pods mount the PVC."""
    k8s_run_dir: str | None = None
    """Run directory as pods see it (default: <mount_path>/runs/<run.name>)."""
    k8s_training: Literal["pytorchjob", "indexed"] = "pytorchjob"
    """Training stages as a Kubeflow PyTorchJob, or an Indexed Job + headless Service for clusters without it."""
    service_account: str | None = None
    """Kubernetes service account of the pods."""
    stages: dict[str, StageLaunch] = field(default_factory=dict)
    """Per-stage overrides by stage name, e.g. {general: {nodes: 4}}."""

    def __post_init__(self):
        for name in ("nodes", "procs_per_node", "cpus_per_task", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.gpus_per_node < 0 or self.signal_seconds < 0 or self.max_requeues < 0:
            raise ValueError("gpus_per_node, signal_seconds and max_requeues must be >= 0")
        if not _valid_time(self.time_limit):
            raise ValueError(f"time_limit {self.time_limit!r}: expected HH:MM:SS or D-HH:MM:SS")
        for name, over in self.stages.items():
            for key in ("nodes", "procs_per_node", "cpus_per_task", "workers"):
                if getattr(over, key) is not None and getattr(over, key) < 1:
                    raise ValueError(f"stages.{name}.{key} must be >= 1")
            if over.time_limit is not None and not _valid_time(over.time_limit):
                raise ValueError(f"stages.{name}.time_limit {over.time_limit!r}: expected HH:MM:SS or D-HH:MM:SS")

    def for_stage(self, name: str, key: str):
        """The value of `key` for stage `name`: its override if set, else the section's."""
        over = self.stages.get(name)
        value = getattr(over, key, None) if over is not None else None
        return getattr(self, key) if value is None else value


def _valid_time(text: str) -> bool:
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    return (not days or days.isdigit()) and 1 <= len(parts) <= 3 and all(p.isdigit() for p in parts)


def time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit (D-HH:MM:SS, HH:MM:SS, MM:SS or MM)."""
    days, _, clock = text.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    if len(parts) == 1:
        parts = [0, parts[0], 0]  # a bare number is minutes in Slurm
    while len(parts) < 3:
        parts.insert(0, 0)
    hours, minutes, seconds = parts
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
