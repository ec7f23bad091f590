"""Kubernetes backend: manifests built from the official client's typed models, written to the run directory.

- the frozen recipe travels in a ConfigMap mounted at /etc/distill;
- run directories live on a ReadWriteMany PVC mounted at `launch.mount_path`;
- array stages are Indexed Jobs (JOB_COMPLETION_INDEX is the worker index);
- training stages are Kubeflow PyTorchJobs (typed models of the `kubeflow-training` SDK), or, for clusters
  without the operator, an Indexed Job + headless Service whose pod 0 is the rendezvous; either way each pod
  starts its ranks with `launch.ranks` (as srun does on Slurm), which keeps a preempted rank's exit 75;
- pods run as the image's non-root user, with CPU/memory/GPU requests = limits, a memory-backed /dev/shm,
  node selectors, tolerations and image pull secrets (by name) from the `launch:` section;
- Kubernetes has no job dependencies: a stage's pods start with an init container that waits until its
  upstream stages' manifest.json files exist on the shared volume;
- a preempted pod (exit 75 after a checkpoint, or evicted: DisruptionTarget) is retried without counting
  as a failure, and resumes from its checkpoint.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml
from kubernetes import client as k8s

from launch.config import format_bytes, quantity_bytes, time_seconds
from launch.plan import Job, Plan, dns_name
from pipeline.manifest import atomic_write_text
from pipeline.train.preempt import EXIT_PREEMPTED

RECIPE_MOUNT = "/etc/distill"
MASTER_PORT = 29500
RUN_AS_UID = 1000
"""The non-root user of the image the Dockerfile builds."""


def pod_run_dir(plan: Plan) -> str:
    """The run directory as the pods see it, on the shared volume."""
    return plan.launch.k8s_run_dir or f"{plan.launch.mount_path.rstrip('/')}/runs/{plan.run_name}"


def _names(plan: Plan, job: Job) -> str:
    return dns_name("distill", plan.run_name, job.stage, limit=52)  # Job names leave room for pod suffixes


def _command(plan: Plan, job: Job) -> list[str]:
    return plan.command(job, recipe_path=f"{RECIPE_MOUNT}/recipe.yaml", run_dir=pod_run_dir(plan))


def _wait_upstream(plan: Plan, job: Job) -> list[k8s.V1Container]:
    if not job.after:
        return []
    checks = " && ".join(f"[ -f {shlex.quote(f'{pod_run_dir(plan)}/{a}/manifest.json')} ]" for a in job.after)
    return [k8s.V1Container(
        name="wait-upstream", image=plan.launch.image, command=["sh", "-c", f"until {checks}; do sleep 10; done"],
        resources=k8s.V1ResourceRequirements(requests={"cpu": "10m", "memory": "32Mi"},
                                             limits={"cpu": "100m", "memory": "64Mi"}),
        security_context=_container_security(),
        volume_mounts=[k8s.V1VolumeMount(name="runs", mount_path=plan.launch.mount_path)])]


def _container_security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(allow_privilege_escalation=False,
                                 capabilities=k8s.V1Capabilities(drop=["ALL"]))


def resources(plan: Plan, job: Job) -> k8s.V1ResourceRequirements:
    """Requests = limits (Guaranteed QoS): CPUs and memory per process times the pod's processes, plus /dev/shm
    (a memory-backed volume counts against the pod's memory); GPUs as nvidia.com/gpu."""
    procs = job.procs_per_node if job.kind == "distributed" else 1
    memory = quantity_bytes(job.memory_per_task) * procs + quantity_bytes(plan.launch.shm_size)
    amounts = {"cpu": str(job.cpus_per_task * procs), "memory": format_bytes(memory)}
    if job.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(job.gpus_per_node)
    return k8s.V1ResourceRequirements(requests=dict(amounts), limits=dict(amounts))


def _tolerations(job: Job) -> list[k8s.V1Toleration] | None:
    return [k8s.V1Toleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                             toleration_seconds=t.toleration_seconds) for t in job.tolerations] or None


def _pod(plan: Plan, job: Job, command: list[str], restart: str = "Never", subdomain: str | None = None):
    launch = plan.launch
    container = k8s.V1Container(
        name="distill", image=launch.image, command=command,
        env=[k8s.V1EnvVar(name=k, value=str(v)) for k, v in sorted({"PYTHONUNBUFFERED": "1", **launch.env}.items())],
        resources=resources(plan, job), security_context=_container_security(),
        volume_mounts=[k8s.V1VolumeMount(name="runs", mount_path=launch.mount_path),
                       k8s.V1VolumeMount(name="recipe", mount_path=RECIPE_MOUNT, read_only=True),
                       k8s.V1VolumeMount(name="shm", mount_path="/dev/shm")])
    volumes = [k8s.V1Volume(name="runs", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=launch.pvc)),
               k8s.V1Volume(name="recipe", config_map=k8s.V1ConfigMapVolumeSource(name=configmap_name(plan))),
               k8s.V1Volume(name="shm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=launch.shm_size))]
    spec = k8s.V1PodSpec(containers=[container], init_containers=_wait_upstream(plan, job) or None,
                         volumes=volumes, restart_policy=restart, subdomain=subdomain,
                         service_account_name=launch.service_account,
                         node_selector=dict(job.node_selector) or None, tolerations=_tolerations(job),
                         image_pull_secrets=[k8s.V1LocalObjectReference(name=n) for n in launch.image_pull_secrets] or None,
                         # The image's user (Dockerfile: uid 1000); fs_group makes the shared volume writable to it.
                         security_context=k8s.V1PodSecurityContext(run_as_non_root=True, run_as_user=RUN_AS_UID,
                                                                   run_as_group=RUN_AS_UID, fs_group=RUN_AS_UID),
                         termination_grace_period_seconds=launch.signal_seconds)
    labels = {"app.kubernetes.io/name": "distill", "distill/run": dns_name(plan.run_name), "distill/stage": dns_name(job.stage)}
    return k8s.V1PodTemplateSpec(metadata=k8s.V1ObjectMeta(labels=labels), spec=spec)


def _failure_policy() -> k8s.V1PodFailurePolicy:
    # Preempted pods are retried without using up backoffLimit: they resume from their checkpoint.
    return k8s.V1PodFailurePolicy(rules=[
        k8s.V1PodFailurePolicyRule(action="Ignore", on_exit_codes=k8s.V1PodFailurePolicyOnExitCodesRequirement(
            container_name="distill", operator="In", values=[EXIT_PREEMPTED])),
        k8s.V1PodFailurePolicyRule(action="Ignore", on_pod_conditions=[
            k8s.V1PodFailurePolicyOnPodConditionsPattern(type="DisruptionTarget", status="True")]),
    ])


def _job(plan: Plan, job: Job, name: str, template, completions: int) -> k8s.V1Job:
    spec = k8s.V1JobSpec(template=template, completions=completions, parallelism=completions,
                         completion_mode="Indexed" if completions > 1 or job.kind != "single" else "NonIndexed",
                         backoff_limit=2 * completions, pod_failure_policy=_failure_policy(),
                         active_deadline_seconds=time_seconds(job.time_limit))
    return k8s.V1Job(api_version="batch/v1", kind="Job", spec=spec,
                     metadata=k8s.V1ObjectMeta(name=name, namespace=plan.launch.namespace, labels=template.metadata.labels))


def _ranks(plan: Plan, job: Job, extra: list[str]) -> list[str]:
    """The node's ranks started by `launch.ranks` (not torchrun, whose agent turns a rank's exit 75 into 1)."""
    command = _command(plan, job)
    return [command[0], "-m", "launch.ranks", "--nnodes", str(job.nodes), "--nproc-per-node", str(job.procs_per_node),
            *extra, "--", *command]


def training_indexed(plan: Plan, job: Job) -> list:
    """A training stage as a headless Service + Indexed Job; pod 0 hosts the rendezvous."""
    name = _names(plan, job)
    master = f"{name}-0.{name}.{plan.launch.namespace}.svc"
    # The node rank comes from JOB_COMPLETION_INDEX, which launch.ranks reads itself.
    argv = _ranks(plan, job, ["--master-addr", master, "--master-port", str(MASTER_PORT)])
    template = _pod(plan, job, argv, subdomain=name)
    service = k8s.V1Service(api_version="v1", kind="Service", metadata=k8s.V1ObjectMeta(
        name=name, namespace=plan.launch.namespace, labels=template.metadata.labels),
        spec=k8s.V1ServiceSpec(cluster_ip="None", selector={"job-name": name},
                               ports=[k8s.V1ServicePort(name="rendezvous", port=MASTER_PORT)]))
    return [service, _job(plan, job, name, template, job.nodes)]


def training_pytorchjob(plan: Plan, job: Job):
    """A training stage as a Kubeflow PyTorchJob; launch.ranks reads the operator's PET_* rendezvous variables."""
    from kubeflow.training import constants, models

    # OnFailure restarts a preempted (exit 75) container in place; it resumes from its checkpoint.
    template = _pod(plan, job, _ranks(plan, job, []), restart="OnFailure")
    replicas = {"Master": models.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="OnFailure", template=template)}
    if job.nodes > 1:
        replicas["Worker"] = models.KubeflowOrgV1ReplicaSpec(replicas=job.nodes - 1, restart_policy="OnFailure",
                                                              template=template)
    spec = models.KubeflowOrgV1PyTorchJobSpec(
        pytorch_replica_specs=replicas, nproc_per_node=str(job.procs_per_node),
        run_policy=models.KubeflowOrgV1RunPolicy(backoff_limit=3, clean_pod_policy="None",
                                                 active_deadline_seconds=time_seconds(job.time_limit)))
    return models.KubeflowOrgV1PyTorchJob(
        api_version=constants.API_VERSION, kind=constants.PYTORCHJOB_KIND, spec=spec,
        metadata=k8s.V1ObjectMeta(name=_names(plan, job), namespace=plan.launch.namespace,
                                  labels=template.metadata.labels))


def configmap_name(plan: Plan) -> str:
    """Name of the ConfigMap holding the frozen recipe."""
    return dns_name("distill", plan.run_name, "recipe")


def recipe_configmap(recipe, plan: Plan) -> k8s.V1ConfigMap:
    """The resolved recipe, with the run directory the pods use, as a ConfigMap."""
    tree = recipe.resolved()
    tree["run"]["run_dir"] = pod_run_dir(plan)
    return k8s.V1ConfigMap(api_version="v1", kind="ConfigMap", data={"recipe.yaml": yaml.safe_dump(tree, sort_keys=False)},
                           metadata=k8s.V1ObjectMeta(name=configmap_name(plan), namespace=plan.launch.namespace))


def objects(recipe, plan: Plan) -> dict[str, list]:
    """Typed objects by file stem: the ConfigMap first, then each stage's Job / Service / PyTorchJob."""
    out = {"00-recipe": [recipe_configmap(recipe, plan)]}
    for i, job in enumerate(plan.jobs, start=1):
        if job.kind == "distributed":
            objs = [training_pytorchjob(plan, job)] if plan.launch.k8s_training == "pytorchjob" else training_indexed(plan, job)
        else:
            command = _command(plan, job) + (["--num-workers", str(job.workers)] if job.kind == "array" else [])
            objs = [_job(plan, job, _names(plan, job), _pod(plan, job, command), job.workers)]
        out[f"{i:02d}-{job.stage}"] = objs
    return out


def to_dicts(objs: list) -> list[dict]:
    """Plain dicts of typed models (camelCase keys, no nulls), as the API server takes them."""
    return [k8s.ApiClient().sanitize_for_serialization(o) for o in objs]


def write(recipe, plan: Plan, out: Path) -> dict[str, Path]:
    """Write one multi-document YAML file per stage (plus the ConfigMap) into `out`."""
    files = {}
    for stem, objs in objects(recipe, plan).items():
        path = Path(out) / f"{stem}.yaml"
        atomic_write_text(path, yaml.safe_dump_all(to_dicts(objs), sort_keys=False))
        files[stem] = path
    return files
