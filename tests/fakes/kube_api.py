"""Stands for a Kubernetes API server (no real one can run on our machines), for the deploy tests.

A threaded HTTP server speaking the part of the API that `swiftci deploy`, `swiftci train --on kubernetes` and the
official `kubernetes` client use: namespaced Deployments, Services, PodDisruptionBudgets, Pods (and their logs,
`follow=true` streaming until the pod ends), Kubeflow Trainer v2 TrainJobs and training-operator PyTorchJobs; GET, list (labelSelector, fieldSelector on
metadata.name), watch (?watch=true with timeoutSeconds), server-side apply (PATCH application/apply-patch+yaml,
which creates missing objects), merge PATCH, PATCH on /status, DELETE; uid, resourceVersion and generation
bookkeeping (generation moves only when the spec changes); `fail()` injects error answers.

It runs no controllers: a test passes `controller`, a function called after every Deployment write, to play the
Deployment controller and the kubelet (set .status, create pods with container states), and `job_controller`, called
after a TrainJob or PyTorchJob is created, to play the training engine (`TrainingController`: pods labelled as JobSet
or the training operator label them, log lines, then Complete/Succeeded or Failed conditions).

Why not kmock (evaluated first, v0.8): its Kubernetes emulator returns 404 for a server-side apply that creates an
object, does not route PUT, ignores labelSelector and timeoutSeconds (a watch with a timeout never ends) and drops
watch events for objects stored without metadata.namespace; fixing that meant subclassing name-mangled internals.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

KINDS = {  # plural -> (apiVersion, kind)
    "deployments": ("apps/v1", "Deployment"),
    "services": ("v1", "Service"),
    "poddisruptionbudgets": ("policy/v1", "PodDisruptionBudget"),
    "pods": ("v1", "Pod"),
    "trainjobs": ("trainer.kubeflow.org/v1alpha1", "TrainJob"),  # Kubeflow Trainer v2
    "pytorchjobs": ("kubeflow.org/v1", "PyTorchJob"),  # the Kubeflow training operator
}
JOBS = ("trainjobs", "pytorchjobs")
PATH = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/(?P<version>[^/]+))/namespaces/(?P<ns>[^/]+)/"
                  r"(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|log))?$")


def _merge(base: dict, patch: dict) -> dict:
    """Recursive merge; lists are replaced whole (close to SSA for the fields swiftci owns)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _matches(obj: dict, label_selector: str | None, field_selector: str | None) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    for term in filter(None, (label_selector or "").split(",")):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    for term in filter(None, (field_selector or "").split(",")):
        k, _, v = term.partition("=")
        if k == "metadata.name" and obj["metadata"]["name"] != v:
            return False
    return True


class FakeKubeAPI:
    def __init__(self, controller: Callable[[FakeKubeAPI, dict], None] | None = None,
                 job_controller: Callable[[FakeKubeAPI, str, dict], None] | None = None):
        self.objects: dict[tuple[str, str, str], dict] = {}
        self.logs: dict[tuple[str, str], list[str]] = {}  # (namespace, pod) -> the lines its container wrote
        self.events: list[tuple[str, str, dict]] = []  # (plural, type, object)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        # injected failures: a request whose method and path match answers `code` instead, `times` times
        # (an overloaded or restarting API server, an admission webhook that times out)
        self.faults: list[dict] = []
        self.controller = controller
        self.job_controller = job_controller  # called (plural, job) after a TrainJob or PyTorchJob is created
        self.lock = threading.Condition()
        self._rv = itertools.count(1000)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                fake._dispatch(self, "GET")

            def do_PATCH(self):
                fake._dispatch(self, "PATCH")

            def do_POST(self):
                fake._dispatch(self, "POST")

            def do_PUT(self):
                fake._dispatch(self, "PUT")

            def do_DELETE(self):
                fake._dispatch(self, "DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}]}))
        return str(path)

    def fail(self, method: str, path: str, *, code: int = 500, times: int = 1) -> None:
        """Answer the next `times` requests of `method` whose path contains `path` with `code`."""
        with self.lock:
            self.faults.append({"method": method, "path": path, "code": code, "times": times})

    # Test-side helpers (they go through the same bookkeeping and watch events as API calls) -----------------

    def get(self, plural: str, ns: str, name: str) -> dict | None:
        with self.lock:
            obj = self.objects.get((plural, ns, name))
            return copy.deepcopy(obj) if obj else None

    def put(self, plural: str, obj: dict, *, status_only: bool = False) -> dict:
        """Create or update an object as a controller or the kubelet would, status included."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        with self.lock:
            if not status_only and "status" in obj and (plural, ns, name) not in self.objects:
                self._write(plural, ns, name, obj, apply=True, status_only=False, run_controller=False)
                status_only = True
            return self._write(plural, ns, name, obj, apply=True, status_only=status_only, run_controller=False)

    def remove(self, plural: str, ns: str, name: str) -> None:
        with self.lock:
            obj = self.objects.pop((plural, ns, name), None)
            if obj is not None:
                self._event(plural, "DELETED", obj)

    def log(self, ns: str, pod: str, line: str) -> None:
        """A line the pod's container writes (a following log reader gets it at once)."""
        with self.lock:
            self.logs.setdefault((ns, pod), []).append(line)
            self.lock.notify_all()

    def list(self, plural: str, ns: str, label_selector: str | None = None) -> list[dict]:
        with self.lock:
            return [copy.deepcopy(o) for (p, n, _), o in self.objects.items()
                    if p == plural and n == ns and _matches(o, label_selector, None)]

    # The API --------------------------------------------------------------------------------------------------

    def _event(self, plural: str, kind: str, obj: dict) -> None:
        self.events.append((plural, kind, copy.deepcopy(obj)))
        self.lock.notify_all()

    def _write(self, plural: str, ns: str, name: str, body: dict, *, apply: bool, status_only: bool,
               run_controller: bool = True) -> dict:
        key = (plural, ns, name)
        old = self.objects.get(key)
        if old is None:
            if status_only or not apply:
                raise KeyError(name)
            api_version, kind = KINDS[plural]
            obj = _merge({"apiVersion": api_version, "kind": kind}, body)
            obj["metadata"].update(name=name, namespace=ns, uid=str(uuid.uuid4()), generation=1,
                                   creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            obj.pop("status", None)
            event = "ADDED"
        elif status_only:
            obj = copy.deepcopy(old)
            obj["status"] = _merge(old.get("status") or {}, body.get("status") or {})
            event = "MODIFIED"
        else:
            patch = {k: v for k, v in body.items() if k != "status"}
            obj = _merge(old, patch)
            if obj.get("spec") != old.get("spec"):
                obj["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
            event = "MODIFIED"
        obj["metadata"]["resourceVersion"] = str(next(self._rv))
        self.objects[key] = obj
        self._event(plural, event, obj)
        result = copy.deepcopy(obj)
        if run_controller and plural == "deployments" and self.controller is not None and not status_only:
            threading.Thread(target=self.controller, args=(self, copy.deepcopy(obj)), daemon=True).start()
        if run_controller and plural in JOBS and event == "ADDED" and self.job_controller is not None:
            threading.Thread(target=self.job_controller, args=(self, plural, copy.deepcopy(obj)), daemon=True).start()
        return result

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        ctype = h.headers.get("Content-Type", "")
        self.requests.append((method, url.path, ctype))
        with self.lock:
            fault = next((f for f in self.faults if f["method"] == method and f["path"] in url.path
                          and f["times"] > 0), None)
            if fault is not None:
                fault["times"] -= 1
        if fault is not None:
            return self._send(h, fault["code"], self._status(fault["code"], "InternalError", "injected fault"))
        if url.path in ("/version", "/version/"):
            return self._send(h, 200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake"})
        m = PATH.match(url.path)
        if not m or m["plural"] not in KINDS:
            return self._send(h, 404, self._status(404, "NotFound", f"no route for {url.path}"))
        plural, ns, name, sub = m["plural"], m["ns"], m["name"], m["sub"]
        body = json.loads(raw) if raw else {}
        if method == "GET" and plural == "pods" and sub == "log":
            return self._log(h, ns, name, query)
        with self.lock:
            if method == "GET" and name is None and query.get("watch") in ("true", "1"):
                return self._watch(h, plural, ns, query)
            if method == "GET" and name is None:
                items = [o for (p, n, _), o in self.objects.items()
                         if p == plural and n == ns and _matches(o, query.get("labelSelector"),
                                                                 query.get("fieldSelector"))]
                api_version, kind = KINDS[plural]
                return self._send(h, 200, {"apiVersion": api_version, "kind": f"{kind}List",
                                           "metadata": {"resourceVersion": str(next(self._rv))}, "items": items})
            key = (plural, ns, name)
            if method == "GET":
                obj = self.objects.get(key)
                return self._send(h, 200, obj) if obj else self._send(h, 404, self._status(404, "NotFound", name))
            if method == "DELETE":
                obj = self.objects.pop(key, None)
                if obj is None:
                    return self._send(h, 404, self._status(404, "NotFound", name))
                self._event(plural, "DELETED", obj)
                return self._send(h, 200, self._status(200, "Success", name))
            if method == "POST" and name is None:
                name = body["metadata"]["name"]
                if (plural, ns, name) in self.objects:
                    return self._send(h, 409, self._status(409, "AlreadyExists", name))
                return self._send(h, 201, self._write(plural, ns, name, body, apply=True, status_only=False))
            if method in ("PATCH", "PUT"):
                apply = "apply-patch" in ctype or method == "PUT"
                if "apply-patch" in ctype and not query.get("fieldManager"):
                    return self._send(h, 400, self._status(400, "BadRequest", "fieldManager is required"))
                try:
                    obj = self._write(plural, ns, name, body, apply=apply, status_only=sub == "status")
                except KeyError:
                    return self._send(h, 404, self._status(404, "NotFound", name))
                return self._send(h, 200, obj)
        return self._send(h, 405, self._status(405, "MethodNotAllowed", method))

    def _watch(self, h: BaseHTTPRequestHandler, plural: str, ns: str, query: dict) -> None:
        """Stream events as JSON lines: ADDED for what exists, then changes, until timeoutSeconds."""
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 3600)
        sel, fsel = query.get("labelSelector"), query.get("fieldSelector")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        pending = [("ADDED", o) for (p, n, _), o in self.objects.items()
                   if p == plural and n == ns and _matches(o, sel, fsel)]
        seen = len(self.events)
        try:
            while True:
                for kind, obj in pending:
                    line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
                    h.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
                h.wfile.flush()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.lock.wait(timeout=min(remaining, 0.5))
                pending = [(kind, obj) for p, kind, obj in self.events[seen:]
                           if p == plural and obj["metadata"]["namespace"] == ns and _matches(obj, sel, fsel)]
                seen = len(self.events)
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _log(self, h: BaseHTTPRequestHandler, ns: str, pod: str, query: dict) -> None:
        """GET .../pods/NAME/log: the lines so far; with follow=true, streamed until the pod has ended."""
        with self.lock:
            if ("pods", ns, pod) not in self.objects:
                return self._send(h, 404, self._status(404, "NotFound", pod))
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        try:
            while True:
                with self.lock:
                    lines = self.logs.get((ns, pod), [])[sent:]
                    phase = ((self.objects.get(("pods", ns, pod)) or {}).get("status") or {}).get("phase")
                    ended = query.get("follow") != "true" or phase in ("Succeeded", "Failed", None)
                    if not lines and not ended:
                        self.lock.wait(timeout=0.5)
                        continue
                for line in lines:
                    data = (line + "\n").encode()
                    h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                h.wfile.flush()
                sent += len(lines)
                if ended and not lines:
                    break
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict:
        return {"apiVersion": "v1", "kind": "Status", "status": "Failure" if code >= 400 else "Success",
                "reason": reason, "message": message, "code": code}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)


class Controller:
    """Plays the Deployment controller and the kubelet: pods of an image in `crashing` crash-loop and never
    become available; other images roll out."""

    def __init__(self):
        self.crashing: set[str] = set()

    def __call__(self, api: FakeKubeAPI, dep: dict) -> None:
        time.sleep(0.2)
        ns, name = dep["metadata"]["namespace"], dep["metadata"]["name"]
        spec = dep["spec"]
        replicas = spec.get("replicas", 1)
        labels = spec["template"]["metadata"]["labels"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        track_sel = ",".join(f"{k}={v}" for k, v in spec["selector"]["matchLabels"].items())
        old = [p for p in api.list("pods", ns, track_sel)
               if p["metadata"]["labels"].get("swiftci.dev/revision") != labels.get("swiftci.dev/revision")]
        crashing = any(d in image for d in self.crashing)
        for i in range(replicas if not crashing else 1):
            state = ({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
                     if crashing else {"running": {"startedAt": "2026-11-23T00:00:00Z"}})
            api.put("pods", {"metadata": {"name": f"{name}-{labels['swiftci.dev/revision']}-{i}", "namespace": ns,
                                          "labels": labels},
                             "spec": {"containers": [{"name": "server", "image": image}]},
                             "status": {"phase": "Running",
                                        "containerStatuses": [{"name": "server", "ready": not crashing,
                                                               "restartCount": 4 if crashing else 0,
                                                               "state": state}]}})
        if crashing:  # maxUnavailable 0: the old pods keep serving, the new one never becomes available
            status = {"observedGeneration": dep["metadata"]["generation"], "replicas": len(old) + 1,
                      "updatedReplicas": 1, "availableReplicas": len(old), "readyReplicas": len(old)}
        else:
            for p in old:
                api.remove("pods", ns, p["metadata"]["name"])
            status = {"observedGeneration": dep["metadata"]["generation"], "replicas": replicas,
                      "updatedReplicas": replicas, "readyReplicas": replicas, "availableReplicas": replicas,
                      "conditions": [{"type": "Available", "status": "True"}]}
        current = api.get("deployments", ns, name)
        if current is not None and current["metadata"]["generation"] == dep["metadata"]["generation"]:
            api.put("deployments", {"metadata": {"name": name, "namespace": ns}, "status": status},
                    status_only=True)


RANK0_LABELS = {  # what the engines put on a job's pods (JobSet and the Job controller; the training operator)
    "trainjobs": lambda job, rank: {"jobset.sigs.k8s.io/jobset-name": job, "jobset.sigs.k8s.io/replicatedjob-name": "node",
                                    "jobset.sigs.k8s.io/job-index": "0", "batch.kubernetes.io/job-completion-index":
                                    str(rank)},
    "pytorchjobs": lambda job, rank: {"training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type":
                                      "master" if rank == 0 else "worker", "training.kubeflow.org/replica-index":
                                      "0" if rank == 0 else str(rank - 1)},
}


class TrainingController:
    """Plays Kubeflow Trainer v2 (or the training operator) and the kubelet for a submitted job: one pod per node,
    each writing its log lines, then the job's end as the engine reports it — `outcome` `succeeded`, `failed`
    (rank 0 exits `exit_code`, the job gets a Failed condition with `message`), `hang` (runs forever) or
    `cannot_start` (the pods wait in ImagePullBackOff, as the engines leave them)."""

    def __init__(self, outcome: str = "succeeded", *, lines: int = 5, message: str = "", exit_code: int = 1,
                 nodes: int = 2):
        self.outcome, self.lines, self.message, self.exit_code, self.nodes = outcome, lines, message, exit_code, nodes

    def __call__(self, api: FakeKubeAPI, plural: str, job: dict) -> None:
        ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
        container = "node" if plural == "trainjobs" else "pytorch"
        time.sleep(0.2)
        pods = [f"{name}-node-0-{rank}" for rank in range(self.nodes)]
        for rank, pod in reversed(list(enumerate(pods))):  # pods start in no particular order: rank 0 is not first
            api.put("pods", {"metadata": {"name": pod, "namespace": ns, "labels": RANK0_LABELS[plural](name, rank)},
                             "spec": {"containers": [{"name": container}]},
                             "status": {"phase": "Running", "containerStatuses": [self._container(container, {
                                 "running": {"startedAt": "2026-12-03T00:00:00Z"}})]}})
        if self.outcome == "cannot_start":  # an image that cannot be pulled: the pods wait, the job never ends
            for pod in pods:
                api.put("pods", {"metadata": {"name": pod, "namespace": ns}, "status": {
                    "phase": "Pending", "containerStatuses": [self._container(container, {"waiting": {
                        "reason": "ImagePullBackOff", "message": "Back-off pulling image"}})]}}, status_only=True)
            return
        running = "Running" if plural == "pytorchjobs" else "Created"
        self._condition(api, plural, ns, name, running, "JobRunning", "the job is running")
        for step in range(1, self.lines + 1):
            for rank, pod in enumerate(pods):
                api.log(ns, pod, f"rank {rank}: step {step}/{self.lines} loss {1.0 / step:.4f}")
            time.sleep(0.05)
        if self.outcome == "hang":
            return
        failed = self.outcome == "failed"
        code = self.exit_code if failed else 0
        for rank, pod in enumerate(pods):
            api.put("pods", {"metadata": {"name": pod, "namespace": ns}, "status": {
                "phase": "Failed" if failed and rank == 0 else "Succeeded", "containerStatuses": [
                    self._container(container, {"terminated": {"exitCode": code if rank == 0 else 0}})]}},
                    status_only=True)
        if failed:
            self._condition(api, plural, ns, name, "Failed", "FailedJobs", self.message)
        else:
            done = "Complete" if plural == "trainjobs" else "Succeeded"
            self._condition(api, plural, ns, name, done, "JobsCompleted", "the job completed")

    @staticmethod
    def _container(name: str, state: dict) -> dict:
        return {"name": name, "image": "acme/swiftci-train:0.1.0", "imageID": "", "ready": "running" in state,
                "restartCount": 0, "state": state}

    @staticmethod
    def _condition(api: FakeKubeAPI, plural: str, ns: str, name: str, kind: str, reason: str, message: str) -> None:
        current = api.get(plural, ns, name) or {}
        conditions = [c for c in (current.get("status") or {}).get("conditions") or [] if c["type"] != kind]
        conditions.append({"type": kind, "status": "True", "reason": reason, "message": message})
        api.put(plural, {"metadata": {"name": name, "namespace": ns}, "status": {"conditions": conditions}},
                status_only=True)
