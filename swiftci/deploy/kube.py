"""Kubernetes: render the manifests, validate them against the real schemas, apply them with server-side apply
(field manager `swiftci`), watch the rollout, and keep the deploy history in the Deployment's annotations.

Labels: `app.kubernetes.io/name: <name>` is what the Service selects; `swiftci.dev/track: stable|canary` splits
the stable Deployment from `<name>-canary`, so a canary takes its share of traffic by pod count.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from swiftci.config import DeployConfig
from swiftci.deploy.image import ENGINES, USER
from swiftci.errors import StageError, UsageError

MANAGER = "swiftci"
NAME_LABEL = "app.kubernetes.io/name"
TRACK_LABEL = "swiftci.dev/track"
REVISION_LABEL = "swiftci.dev/revision"
HISTORY = "swiftci.dev/history"
DIGEST = "swiftci.dev/image-digest"
RUN_ID = "swiftci.dev/run-id"
VERDICT = "swiftci.dev/eval-verdict"
SPEC_HASH = "swiftci.dev/spec-sha256"  # what re-deploying compares, beside the digest: a changed spec is a change
HISTORY_KEEP = 20
# Probe timings. Not settings: `deploy.timeouts.startup_seconds` sets how long a model may take to load (the startup
# probe's failure threshold follows from it); after that, readiness gates traffic within seconds and liveness
# restarts a server that has not answered for a minute.
STARTUP_PERIOD_SECONDS = 10
READINESS = {"periodSeconds": 5, "failureThreshold": 3}
LIVENESS = {"periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5}
BAD_WAITING = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "CreateContainerConfigError",
               "CreateContainerError", "InvalidImageName", "RunContainerError"}


@dataclass
class Release:
    """What is being deployed: the image by digest and where it came from."""

    image: str  # repository@sha256:…
    digest: str
    run_id: str | None
    eval_verdict: str | None

    @property
    def revision(self) -> str:
        return self.digest.split(":", 1)[-1][:12]


# --- manifests ------------------------------------------------------------------------------------------------


def deployment(dc: DeployConfig, name: str, release: Release, history: list[dict], *, track: str = "stable",
               replicas: int | None = None) -> dict:
    engine = ENGINES[dc.engine]
    deploy_name = name if track == "stable" else f"{name}-{track}"
    labels = {NAME_LABEL: name, TRACK_LABEL: track, "app.kubernetes.io/managed-by": MANAGER}
    pod_labels = {NAME_LABEL: name, TRACK_LABEL: track, REVISION_LABEL: release.revision}
    resources: dict[str, dict[str, str]] = {k: dict(v) for k, v in dc.resources.items()}
    if dc.gpus:
        resources.setdefault("limits", {})["nvidia.com/gpu"] = str(dc.gpus)
    probe = {"httpGet": {"path": engine.health, "port": "http"}}
    uid, gid = (int(x) for x in USER.split(":"))
    annotations = {DIGEST: release.digest, RUN_ID: release.run_id or "", VERDICT: release.eval_verdict or "",
                   HISTORY: history_json(history)}
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": deploy_name, "namespace": dc.namespace, "labels": labels, "annotations": annotations},
        "spec": {
            "replicas": replicas if replicas is not None else dc.replicas,
            "revisionHistoryLimit": 10,
            "progressDeadlineSeconds": dc.timeouts.startup_seconds + 300,
            "selector": {"matchLabels": {NAME_LABEL: name, TRACK_LABEL: track}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {RUN_ID: release.run_id or ""}},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": gid, "fsGroup": gid,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    **({"nodeSelector": dict(dc.node_selector)} if dc.node_selector else {}),
                    **({"tolerations": list(dc.tolerations)} if dc.tolerations else {}),
                    "containers": [{
                        "name": "server",
                        "image": release.image,
                        "imagePullPolicy": "IfNotPresent",
                        "ports": [{"name": "http", "containerPort": dc.port, "protocol": "TCP"}],
                        "resources": resources,
                        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                            "capabilities": {"drop": ["ALL"]}},
                        # model loading can take many minutes: the startup probe allows for it, then readiness
                        # gates traffic and liveness restarts a hung server
                        "startupProbe": {**probe, "periodSeconds": STARTUP_PERIOD_SECONDS, "failureThreshold": max(
                            1, math.ceil(dc.timeouts.startup_seconds / STARTUP_PERIOD_SECONDS))},
                        "readinessProbe": {**probe, **READINESS},
                        "livenessProbe": {**probe, **LIVENESS},
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "shm", "mountPath": "/dev/shm"}],
                    }],
                    "volumes": [{"name": "tmp", "emptyDir": {}},
                                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": dc.shm_size}}],
                },
            },
        },
    }
    spec = json.dumps(manifest["spec"], sort_keys=True).encode()
    annotations[SPEC_HASH] = hashlib.sha256(spec).hexdigest()
    return manifest


def history_json(history: list[dict]) -> str:
    return json.dumps(history[-HISTORY_KEEP:], separators=(",", ":"))


def service(dc: DeployConfig, name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": dc.namespace,
                     "labels": {NAME_LABEL: name, "app.kubernetes.io/managed-by": MANAGER}},
        "spec": {"type": "ClusterIP", "selector": {NAME_LABEL: name},
                 "ports": [{"name": "http", "port": dc.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def pod_disruption_budget(dc: DeployConfig, name: str) -> dict:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": name, "namespace": dc.namespace,
                     "labels": {NAME_LABEL: name, "app.kubernetes.io/managed-by": MANAGER}},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": {NAME_LABEL: name, TRACK_LABEL: "stable"}}},
    }


def stable_manifests(dc: DeployConfig, name: str, release: Release, history: list[dict],
                     replicas: int | None = None) -> list[dict]:
    out = [deployment(dc, name, release, history, replicas=replicas), service(dc, name)]
    if dc.replicas > 1:
        out.append(pod_disruption_budget(dc, name))
    return out


def canary_replicas(dc: DeployConfig) -> int:
    if dc.canary.replicas is not None:
        return dc.canary.replicas
    return max(1, math.ceil(dc.replicas * dc.canary.percent / 100))


def validate(manifests: list[dict], version: str) -> None:
    """Check every manifest against the real Kubernetes schemas (strict: unknown fields are errors)."""
    import kubernetes_validate

    problems = []
    for m in manifests:
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            problems.append(f"{m['kind']}/{m['metadata']['name']}: {where}: {e.message}")
        except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
            raise UsageError(f"deploy.kubernetes_version: no schema for {version} ({e})") from None
    if problems:
        raise StageError("the rendered manifests do not validate against Kubernetes "
                         f"{version}:\n" + "\n".join(problems))


def history_entry(release: Release, status: str, **extra: Any) -> dict:
    return {"revision": release.revision, "digest": release.digest, "image": release.image,
            "run_id": release.run_id, "eval_verdict": release.eval_verdict, "status": status,
            "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra}


# --- the cluster ------------------------------------------------------------------------------------------------

PATHS = {
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Service": "/api/v1/namespaces/{ns}/services",
    "PodDisruptionBudget": "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
}


def load_client(context: str | None, *, needed_by: str, setting: str, action: str):
    """The official `kubernetes` client module, its config loaded from KUBECONFIG (or the default file) at
    `context`; the pod's own service account only when neither was asked for. `needed_by`, `setting` and `action`
    name, in the messages, what needs the client, the config key of the context and the action with a
    `kubeconfig` input."""
    try:
        from kubernetes import client, config
    except ImportError:
        raise UsageError(f"{needed_by} needs the kubernetes client: pip install 'swiftci[deploy]'") from None
    try:
        # KUBECONFIG read now: the client reads it once, when it is imported
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, context=context)
    except Exception as kube_error:  # noqa: BLE001
        # the pod's own service account only when nothing else was asked for: a requested context or
        # kubeconfig that fails to load must never silently act on the runner's own cluster
        if context or os.environ.get("KUBECONFIG"):
            raise UsageError(f"{setting}: cannot load the kubeconfig"
                             f"{f' context {context!r}' if context else ''} ({kube_error})") from None
        try:
            config.load_incluster_config()
        except Exception:  # noqa: BLE001
            raise UsageError(f"{setting}: no kubeconfig ({kube_error}) and not inside a cluster; set "
                             f"KUBECONFIG or give the {action} action a `kubeconfig`") from None
    return client


class Cluster:
    """The few API calls a rollout needs, through the official `kubernetes` client."""

    def __init__(self, context: str | None):
        client = load_client(context, needed_by="deploy.target: kubernetes", setting="deploy.context",
                             action="deploy")
        self.client = client
        self.api = client.ApiClient()
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)

    def _raw(self, method: str, path: str, *, query: list | None = None, body: Any = None,
             content_type: str | None = None) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        method_, url, headers, body_, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=query or [], header_params=headers, body=body,
            auth_settings=["BearerToken"])
        try:
            resp = self.api.call_api(method_, url, header_params=headers, body=body_, _request_timeout=60)
            resp.read()
        except ApiException as e:
            if e.status == 404:
                return None
            raise StageError(f"Kubernetes API {method} {path}: {e.status} {e.reason}: {(e.body or '')[:300]}") \
                from None
        if resp.status == 404:
            return None
        if resp.status >= 400:
            raise StageError(f"Kubernetes API {method} {path}: {resp.status}: {resp.data[:300]!r}")
        return json.loads(resp.data) if resp.data else {}

    def apply(self, obj: dict) -> dict:
        """Server-side apply, field manager `swiftci`, taking ownership of conflicting fields."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        path = PATHS[obj["kind"]].format(ns=ns) + f"/{name}"
        result = self._raw("PATCH", path, query=[("fieldManager", MANAGER), ("force", "true")], body=obj,
                           content_type="application/apply-patch+yaml")
        if result is None:
            raise StageError(f"server-side apply of {obj['kind']}/{name} was refused (404)")
        return result

    def annotate(self, kind: str, ns: str, name: str, annotations: dict[str, str]) -> None:
        """Set annotations with a JSON merge patch: nothing else of the object changes."""
        path = PATHS[kind].format(ns=ns) + f"/{name}"
        if self._raw("PATCH", path, body={"metadata": {"annotations": annotations}},
                     content_type="application/merge-patch+json") is None:
            raise StageError(f"{kind}/{name} disappeared before its history could be recorded")

    def get(self, kind: str, ns: str, name: str) -> dict | None:
        return self._raw("GET", PATHS[kind].format(ns=ns) + f"/{name}")

    def delete(self, kind: str, ns: str, name: str) -> bool:
        return self._raw("DELETE", PATHS[kind].format(ns=ns) + f"/{name}") is not None

    def pods(self, ns: str, selector: dict[str, str]) -> list[dict]:
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in selector.items()))]
        items = (self._raw("GET", f"/api/v1/namespaces/{ns}/pods", query=query) or {}).get("items") or []
        # a selector the server ignores must not make us judge someone else's pods
        return [p for p in items if all((p.get("metadata", {}).get("labels") or {}).get(k) == v
                                        for k, v in selector.items())]

    def wait_rollout(self, ns: str, name: str, generation: int, replicas: int, revision: str,
                     timeout: float) -> tuple[bool, str]:
        """Watch the Deployment until every replica runs the new template, it stops progressing, or its pods
        crash. Returns (ok, reason)."""
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        # what a watch raises when the API server drops it, times it out or expires its resourceVersion (410)
        WATCH_DROPPED = (ApiException, HTTPError, OSError, ValueError)  # noqa: N806
        deadline = time.monotonic() + timeout
        last_pod_check = 0.0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, f"rollout did not finish within {timeout:.0f} s (deploy.timeouts.rollout_seconds)"
            state = self.get("Deployment", ns, name)
            if state is None:
                return False, f"Deployment {ns}/{name} disappeared during the rollout"
            verdict = _rollout_verdict(state, generation, replicas)
            if verdict is not None:
                return verdict
            if time.monotonic() - last_pod_check >= 1:
                crash = self._crashing(ns, name, revision)
                if crash:
                    return False, crash
                last_pod_check = time.monotonic()
            w = watch.Watch()
            try:
                for event in w.stream(self.apps.list_namespaced_deployment, ns,
                                      field_selector=f"metadata.name={name}",
                                      timeout_seconds=max(1, min(5, int(remaining)))):
                    obj = self.api.sanitize_for_serialization(event["object"])
                    if (obj.get("metadata") or {}).get("name") != name:
                        continue
                    verdict = _rollout_verdict(obj, generation, replicas)
                    if verdict is not None:
                        w.stop()
                        return verdict
                    if time.monotonic() - last_pod_check >= 1:
                        crash = self._crashing(ns, name, revision)
                        if crash:
                            w.stop()
                            return False, crash
                        last_pod_check = time.monotonic()
                    if time.monotonic() > deadline:
                        w.stop()
                        break
            except WATCH_DROPPED:  # the connection or the watch ended early: re-open it; the deadline still holds
                time.sleep(0.5)

    def _crashing(self, ns: str, name: str, revision: str) -> str | None:
        base = name.removesuffix("-canary")
        for pod in self.pods(ns, {NAME_LABEL: base, REVISION_LABEL: revision}):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in BAD_WAITING:
                    return (f"pod {pod['metadata']['name']} is in {waiting['reason']}"
                            + (f": {waiting['message'][:200]}" if waiting.get("message") else ""))
                if (cs.get("restartCount") or 0) >= 3:
                    return f"pod {pod['metadata']['name']} restarted {cs['restartCount']} times"
        return None


def _rollout_verdict(dep: dict, generation: int, replicas: int) -> tuple[bool, str] | None:
    status = dep.get("status") or {}
    if (status.get("observedGeneration") or 0) < generation:
        return None  # the controller has not seen this spec yet: older conditions are about the old one
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("status") == "False":
            return False, f"rollout stopped progressing: {cond.get('reason')}: {cond.get('message', '')}"[:300]
    if ((status.get("updatedReplicas") or 0) >= replicas and (status.get("availableReplicas") or 0) >= replicas
            and (status.get("replicas") or 0) <= replicas):
        return True, "all replicas updated and available"
    return None
