"""Kubernetes backend, the API side: create a run's objects, report their states, delete them (`distill cancel`).

`launch.k8s` renders the manifests; this module is the only one that talks to an API server. Every function
takes `api` (an object with `batch`, `core` and `custom` clients) so tests can stand in a fake server; by
default the clients come from the kubeconfig or the in-cluster service account.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from kubernetes import client as k8s


def kubeconfig_present() -> bool:
    """True when the client can reach a cluster: a kubeconfig file or an in-cluster service account."""
    path = Path(os.environ.get("KUBECONFIG", "~/.kube/config")).expanduser()
    return path.is_file() or "KUBERNETES_SERVICE_HOST" in os.environ


def _clients(api=None):
    """(batch, core, custom) API clients: `api`'s (tests pass a fake API server) or from the kubeconfig."""
    if api is not None:
        return api.batch, api.core, api.custom
    from kubernetes import config

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    client = k8s.ApiClient()
    return k8s.BatchV1Api(client), k8s.CoreV1Api(client), k8s.CustomObjectsApi(client)


def apply(files: dict[str, Path], namespace: str) -> dict[str, str]:
    """Create every object with the Kubernetes client; returns, per stage, its objects as `Kind/name,...`."""
    from kubernetes import utils
    from kubeflow.training import constants

    _, _, custom = _clients()
    names: dict[str, list[str]] = {}
    for stem, path in files.items():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["kind"] == constants.PYTORCHJOB_KIND:
                custom.create_namespaced_custom_object(
                    constants.GROUP, constants.VERSION, namespace, constants.PYTORCHJOB_PLURAL, doc)
            else:
                utils.create_from_dict(custom.api_client, doc, namespace=namespace)
            names.setdefault(stem.split("-", 1)[1], []).append(f"{doc['kind']}/{doc['metadata']['name']}")
    return {stage: ",".join(objs) for stage, objs in names.items() if stage != "recipe"}


def log_command(ids: str, namespace: str) -> str:
    """The command that shows a stage's log (pods keep it; the shared volume does not)."""
    kind, _, name = next(i for i in ids.split(",") if not i.startswith("Service/")).partition("/")
    selector = "training.kubeflow.org/job-name" if kind == "PyTorchJob" else "job-name"
    return f"kubectl logs -n {namespace} -l {selector}={name} --prefix"


def _job_state(status) -> str:
    if status is None:
        return "PENDING"
    conditions = {c.type: c.status for c in status.conditions or []}
    if conditions.get("Complete") == "True":
        return "COMPLETED"
    if conditions.get("Failed") == "True":
        return "FAILED"
    return "RUNNING" if status.active else "PENDING"


def object_states(ids: dict[str, str], namespace: str, api=None) -> dict[str, str]:
    """Stage -> state of its Job or PyTorchJob as the API server reports it ("unknown" without a cluster)."""
    from kubernetes.client.exceptions import ApiException
    from kubeflow.training import constants

    if api is None and not kubeconfig_present():
        return {stage: "unknown" for stage in ids}
    batch, _, custom = _clients(api)
    states = {}
    for stage, objs in ids.items():
        kind, _, name = next(i for i in objs.split(",") if not i.startswith("Service/")).partition("/")
        try:
            if kind == constants.PYTORCHJOB_KIND:
                found = custom.get_namespaced_custom_object(constants.GROUP, constants.VERSION, namespace,
                                                            constants.PYTORCHJOB_PLURAL, name)
                conditions = [c for c in (found.get("status") or {}).get("conditions", []) if c.get("status") == "True"]
                states[stage] = {"Succeeded": "COMPLETED", "Failed": "FAILED", "Running": "RUNNING",
                                 "Restarting": "RESTARTING"}.get(conditions[-1]["type"] if conditions else "", "PENDING")
            else:
                states[stage] = _job_state(batch.read_namespaced_job_status(name, namespace).status)
        except ApiException as err:
            states[stage] = "GONE" if err.status == 404 else "unknown"
    return states


def delete_objects(ids: str, namespace: str, api=None) -> list[str]:
    """Delete a stage's objects (`Kind/name,...`) and, in the background, their pods; return what was deleted."""
    from kubernetes.client.exceptions import ApiException
    from kubeflow.training import constants

    batch, core, custom = _clients(api)
    deleted = []
    for obj in ids.split(","):
        kind, _, name = obj.partition("/")
        try:
            if kind == constants.PYTORCHJOB_KIND:
                custom.delete_namespaced_custom_object(constants.GROUP, constants.VERSION, namespace,
                                                       constants.PYTORCHJOB_PLURAL, name,
                                                       body=k8s.V1DeleteOptions(propagation_policy="Background"))
            elif kind == "Job":
                batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
            elif kind == "Service":
                core.delete_namespaced_service(name, namespace)
            else:
                continue
        except ApiException as err:
            if err.status == 404:
                continue
            raise
        deleted.append(obj)
    return deleted
