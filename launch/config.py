"""The recipe's `launch:` section: where and how `distill submit` runs each stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

BACKENDS = ("slurm", "k8s", "local")


@dataclass(kw_only=True)
class Toleration:
    """A Kubernetes toleration: lets pods run on nodes with a matching taint (e.g. dedicated GPU pools)."""

    key: str | None = None
    """Taint key; null with operator Exists tolerates every taint."""
    operator: Literal["Exists", "Equal"] = "Equal"
    """Equal: the taint's value must equal `value`; Exists: any value."""
    value: str | None = None
    """Taint value (operator Equal)."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to tolerate; null tolerates every effect."""
    toleration_seconds: int | None = None
    """NoExecute only: how long a pod stays on a node after the taint appears."""

    def __post_init__(self):
        if self.operator == "Exists" and self.value is not None:
            raise ValueError(f"toleration {self.key!r}: operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError(f"toleration {self.key!r}: toleration_seconds needs effect NoExecute")


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
    memory_per_task: str | None = None
    """Memory per process, Kubernetes quantity (e.g. "16Gi")."""
    node_selector: dict[str, str] | None = None
    """Kubernetes node labels this stage's pods need (replaces the section's)."""
    tolerations: list[Toleration] | None = None
    """Kubernetes tolerations of this stage's pods (replace the section's)."""


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
    memory_per_task: str = "8Gi"
    """Memory per process (per array task, per training rank), a Kubernetes quantity: pods request it and are
    limited to it (times the ranks of a training pod). Slurm: add --mem to sbatch_args."""
    shm_size: str = "2Gi"
    """Size of the memory-backed /dev/shm of every pod (NCCL and DataLoader workers outgrow the 64 MB default);
    it counts against the pod's memory, so it is added to the memory request."""
    node_selector: dict[str, str] = field(default_factory=dict)
    """Kubernetes node labels every pod needs, e.g. {nvidia.com/gpu.product: NVIDIA-A100-SXM4-80GB}."""
    tolerations: list[Toleration] = field(default_factory=list)
    """Kubernetes tolerations of every pod, e.g. [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]."""
    image_pull_secrets: list[str] = field(default_factory=list)
    """Names of Secrets (kubernetes.io/dockerconfigjson) in the namespace for pulling a private image; the
    manifests carry only these names, never credentials."""
    stages: dict[str, StageLaunch] = field(default_factory=dict)
    """Per-stage overrides by stage name or stage type, e.g. {general: {nodes: 4}}; a shared launch file may name
    stage types a recipe does not use."""

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

        for where, quantity in [("memory_per_task", self.memory_per_task), ("shm_size", self.shm_size),
                                *((f"stages.{n}.memory_per_task", o.memory_per_task) for n, o in self.stages.items()
                                  if o.memory_per_task is not None)]:
            if quantity_bytes(quantity) is None:
                raise ValueError(f"{where} {quantity!r}: expected a Kubernetes quantity such as 16Gi or 512Mi")

    def for_stage(self, name: str, key: str, stage_type: str | None = None):
        """The value of `key` for stage `name`: its override (by name, else by stage type) if set, else the section's."""
        over = self.stages.get(name, self.stages.get(stage_type) if stage_type else None)
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


def quantity_bytes(text: str) -> int | None:
    """Bytes in a Kubernetes memory quantity ("16Gi", "512M", "1e9"), or None when it is not one."""
    from kubernetes.utils import parse_quantity

    try:
        value = parse_quantity(text)
    except (ValueError, TypeError):
        return None
    return int(value) if value > 0 else None


def format_bytes(n: int) -> str:
    """A byte count as the shortest exact Kubernetes quantity (Gi, Mi, Ki or plain bytes)."""
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)
