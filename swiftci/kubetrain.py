"""The train stage on a cluster (`train.launcher: kubernetes`): render the job for the training engine the cluster
already runs, check it against that engine's published schema, submit it, stream rank 0's log, follow the job to
its end, and leave a report where the later stages look.

Two engines:
  Kubeflow Trainer v2  a `TrainJob` (trainer.kubeflow.org/v1alpha1) referring to a ClusterTrainingRuntime
                       (`torch-distributed`), which runs `numNodes` pods of a JobSet and gives each the PET_*
                       environment torchrun reads (nodes, processes per node, node rank, master address).
  training operator    a `PyTorchJob` (kubeflow.org/v1): one Master and `num_nodes - 1` Workers, the same PET_*
                       environment.

Every node runs `torchrun --module swiftci train -c <config on the volume> --on local`: the ordinary local train
stage, one process per GPU, rank 0 writing the model, run.json and train_report.json into the output folder on the
model-store volume. Here, `<output_dir>/train/` gets the manifest that was submitted (`trainjob.yaml` or
`pytorchjob.yaml`) and a train_report.json that says the launcher, the job, its final status and where on the
volume the model and the job's own report lie (when this machine mounts the volume where the pods do, the folders
are one and the job's own report stays the stage's); `--dry-run` writes the manifest only and calls no API.

Exit codes are a local run's: 0 when the job completes, 3 when it fails (with its condition's message), cannot
start, or is not done within `train.kubernetes.timeouts.follow_seconds`, 4 when rank 0 stopped on divergence.
"""

from __future__ import annotations

import copy
import hashlib
import json
import posixpath
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from swiftci import reports, runinfo, stages
from swiftci.config import Config
from swiftci.errors import EXIT_DIVERGED, StageError, UsageError

CRDS = Path(__file__).parent / "crds"
MANAGER = "swiftci"  # the runtime patch's owner, and the jobs' managed-by label
CONTAINER = {"trainjob": "node", "pytorchjob": "pytorch"}  # the container each engine runs the trainer in
POLL_SECONDS = 1.0
UNREACHABLE_SECONDS = 300  # how long a followed job may go without an answer from the API server
# a rank-0 pod waiting for one of these will not start by itself: the job fails now rather than at the timeout
STUCK_WAITING = {"ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError"}


@dataclass(frozen=True)
class Api:
    """One custom resource: where it lives in the API, the conditions that end it, the labels of its rank-0 pod."""

    name: str  # train.kubernetes.api
    group: str
    version: str
    plural: str
    kind: str
    crd: str  # the vendored CRD file whose schema checks the manifest
    done: str  # the condition type of success
    rank0: tuple[tuple[str, str], ...]  # labels of the rank-0 pod, besides the job's name label
    job_label: str  # the label that carries the job's name

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"


TRAINJOB = Api("trainjob", "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob",
               "trainer.kubeflow.org_trainjobs.yaml", done="Complete",
               rank0=(("jobset.sigs.k8s.io/replicatedjob-name", "node"), ("jobset.sigs.k8s.io/job-index", "0"),
                      ("batch.kubernetes.io/job-completion-index", "0")),
               job_label="jobset.sigs.k8s.io/jobset-name")
PYTORCHJOB = Api("pytorchjob", "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "kubeflow.org_pytorchjobs.yaml",
                 done="Succeeded", rank0=(("training.kubeflow.org/replica-type", "master"),
                                          ("training.kubeflow.org/replica-index", "0")),
                 job_label="training.kubeflow.org/job-name")
APIS = {a.name: a for a in (TRAINJOB, PYTORCHJOB)}


# --- the manifest ------------------------------------------------------------------------------------------------


def job_name(cfg: Config, run_id: str, resume: bool = False) -> str:
    """`<run name>-<8 hex>`: the same commit, config and day give the same name, so a rerun of a CI job finds the
    job it submitted before instead of training twice."""
    digest = hashlib.sha256(json.dumps([run_id, cfg.fingerprint(), resume]).encode()).hexdigest()
    return f"{cfg.name}-{digest[:8]}"


def remote_config(cfg: Config) -> str:
    """The config file's path in the pods."""
    volume = cfg.train.kubernetes.volume
    return posixpath.join(volume.mount_path, volume.config or Path(cfg.source).name)


def remote_stage_dir(cfg: Config) -> str:
    """Where the job writes the train stage's folder: the config's output_dir, resolved beside it on the volume."""
    out = str(cfg.output_dir)
    base = out if posixpath.isabs(out) else posixpath.join(posixpath.dirname(remote_config(cfg)), out)
    return posixpath.normpath(posixpath.join(base, "train"))


def command(cfg: Config, resume: bool) -> list[str]:
    """What every node runs: torchrun (sized by the runtime's PET_* environment) starting the local train stage."""
    return ["torchrun", "--module", "swiftci", "train", "-c", remote_config(cfg), "--on", "local",
            *(["--resume"] if resume else [])]


def environment(cfg: Config) -> list[dict]:
    """The training processes' environment: the commit (so the job's run id is this run's) and the user's."""
    git = runinfo.git_commit(cfg.resolve("."))
    env = {**({"GITHUB_SHA": git["sha"]} if git["sha"] else {}),
           **({"GITHUB_REPOSITORY": git["repository"]} if git["repository"] else {}),
           "PYTHONUNBUFFERED": "1", **cfg.train.kubernetes.env}
    return [{"name": k, "value": str(v)} for k, v in env.items()]


def resources(cfg: Config) -> dict:
    kc = cfg.train.kubernetes
    requests = {k: v for k, v in (("cpu", kc.cpu), ("memory", kc.memory)) if v}
    limits = {}
    if kc.gpus_per_node:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(kc.gpus_per_node)
    return {**({"requests": requests} if requests else {}), **({"limits": limits} if limits else {})}


def labels(cfg: Config, run_id: str) -> dict[str, str]:
    return {"app.kubernetes.io/managed-by": MANAGER, "app.kubernetes.io/name": cfg.name,
            "swiftci.dev/run-id": run_id[:63]}


def render(cfg: Config, run_id: str, resume: bool = False) -> dict:
    """The job manifest for train.kubernetes.api."""
    kc = cfg.train.kubernetes
    meta = {"name": job_name(cfg, run_id, resume), "namespace": kc.namespace, "labels": labels(cfg, run_id)}
    volume = {"name": "model-store", "persistentVolumeClaim": {"claimName": kc.volume.claim}}
    mount = {"name": "model-store", "mountPath": kc.volume.mount_path}
    if kc.api == "trainjob":
        return trainjob(cfg, meta, resume, volume, mount)
    return pytorchjob(cfg, meta, resume, volume, mount)


def trainjob(cfg: Config, meta: dict, resume: bool, volume: dict, mount: dict) -> dict:
    """A Kubeflow Trainer v2 TrainJob. The volume, its mount and the service account reach the runtime's `node`
    pods through a runtime patch (spec.runtimePatches, owned by `swiftci`): the runtime's own template stays
    the cluster's."""
    kc = cfg.train.kubernetes
    pod: dict[str, Any] = {"volumes": [volume], "containers": [{"name": CONTAINER["trainjob"], "volumeMounts": [mount]}]}
    if kc.service_account:
        pod["serviceAccountName"] = kc.service_account
    patch = {"manager": MANAGER, "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
        {"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]}}}}
    return {
        "apiVersion": TRAINJOB.api_version,
        "kind": TRAINJOB.kind,
        "metadata": meta,
        "spec": {
            "runtimeRef": {"name": kc.runtime, "kind": "ClusterTrainingRuntime", "apiGroup": TRAINJOB.group},
            "trainer": {"image": kc.image, "command": command(cfg, resume), "env": environment(cfg),
                        "numNodes": kc.num_nodes, "numProcPerNode": kc.procs_per_node,
                        "resourcesPerNode": resources(cfg)},
            "runtimePatches": [patch],
        },
    }


def pytorchjob(cfg: Config, meta: dict, resume: bool, volume: dict, mount: dict) -> dict:
    """A training-operator PyTorchJob: a Master and `num_nodes - 1` Workers of the same pod."""
    kc = cfg.train.kubernetes
    container = {"name": CONTAINER["pytorchjob"], "image": kc.image, "command": command(cfg, resume),
                 "env": environment(cfg), "resources": resources(cfg), "volumeMounts": [mount]}
    pod: dict[str, Any] = {"containers": [container], "volumes": [volume]}
    if kc.service_account:
        pod["serviceAccountName"] = kc.service_account
    specs = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": {"spec": pod}}}
    if kc.num_nodes > 1:
        specs["Worker"] = {"replicas": kc.num_nodes - 1, "restartPolicy": "Never",
                           "template": {"spec": copy.deepcopy(pod)}}
    return {"apiVersion": PYTORCHJOB.api_version, "kind": PYTORCHJOB.kind, "metadata": meta,
            "spec": {"nprocPerNode": str(kc.procs_per_node), "pytorchReplicaSpecs": specs,
                     "runPolicy": {"cleanPodPolicy": "None"}}}


# --- the published schema ----------------------------------------------------------------------------------------


def crd_schema(api: Api) -> dict:
    """The openAPIV3Schema of the vendored CRD (swiftci/crds, README there names the release), made strict: where
    the CRD lists an object's properties and allows nothing else, unknown fields are errors, as the API server's
    pruning would silently drop them."""
    crd = yaml.safe_load((CRDS / api.crd).read_text(encoding="utf-8"))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == api.version)
    return _strict(version["schema"]["openAPIV3Schema"])


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and \
            not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def validate(manifest: dict, api: Api) -> None:
    """Check the manifest against its engine's published schema; a problem is a bug in swiftci or a field the
    release does not know (exit 3, each problem with its path)."""
    import jsonschema

    body = {k: v for k, v in manifest.items() if k != "metadata"}  # metadata is the API server's ObjectMeta
    validator = jsonschema.Draft7Validator(crd_schema(api))
    problems = [f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
                for e in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path)))]
    if problems:
        raise StageError(f"the {api.kind} does not validate against the CRD in swiftci/crds/{api.crd}:\n"
                         + "\n".join(problems[:20]))


def write_manifest(cfg: Config, manifest: dict) -> Path:
    path = cfg.stage_dir("train") / f"{manifest['kind'].lower()}.yaml"
    reports.write_text(path, yaml.safe_dump(manifest, sort_keys=False))
    return path


def dry_run(cfg: Config) -> Path:
    """Render, validate and write the manifest; submit nothing."""
    run_id = runinfo.run_id(cfg.name, cfg.train.method, cfg.resolve("."))
    manifest = render(cfg, run_id)
    validate(manifest, APIS[cfg.train.kubernetes.api])
    return write_manifest(cfg, manifest)


# --- the cluster -------------------------------------------------------------------------------------------------


class Cluster:
    """The API calls a training job needs, through the official `kubernetes` client. Its config loads as the deploy
    stage's does (swiftci/deploy/kube.py): KUBECONFIG or the default file, in-cluster only when neither was asked
    for."""

    def __init__(self, context: str | None):
        from swiftci.deploy.kube import load_client

        client = load_client(context, needed_by="train.launcher: kubernetes", setting="train.kubernetes.context",
                             action="train")
        self.api = client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    def create(self, api: Api, manifest: dict, timeout: float) -> tuple[dict, bool]:
        """(the job, whether this call created it): a job of the same name is followed, not submitted twice. A
        busy API server (429, 5xx, a dropped connection) is retried until `timeout`."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        ns = manifest["metadata"]["namespace"]
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.custom.create_namespaced_custom_object(
                    api.group, api.version, ns, api.plural, manifest, _request_timeout=30), True
            except ApiException as e:
                if e.status == 409:
                    return self.job(api, ns, manifest["metadata"]["name"]), False
                if e.status not in (429, 500, 502, 503, 504) or time.monotonic() > deadline:
                    raise StageError(_api_problem(e, api, ns), kind="SubmitFailed") from None
            except (HTTPError, OSError) as e:
                if time.monotonic() > deadline:
                    raise StageError(f"could not reach the Kubernetes API to submit the {api.kind}: {e}",
                                     kind="SubmitFailed") from None
            time.sleep(1)

    def job(self, api: Api, ns: str, name: str) -> dict:
        with _transient():
            return self.custom.get_namespaced_custom_object(api.group, api.version, ns, api.plural, name,
                                                            _request_timeout=30)

    def rank0_pod(self, api: Api, ns: str, name: str) -> dict | None:
        selector = {api.job_label: name, **dict(api.rank0)}
        with _transient():
            resp = self.core.list_namespaced_pod(ns, label_selector=",".join(f"{k}={v}" for k, v in selector.items()),
                                                 _request_timeout=30, _preload_content=False)
        items = json.loads(resp.data).get("items") or []  # as the server sent them: we read a few status fields
        # a selector the server ignored must not make us read someone else's pod
        items = [p for p in items if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())]
        return max(items, key=lambda p: p["metadata"].get("creationTimestamp") or "", default=None)


class Unreachable(StageError):
    """The API server did not answer, or answered 429/5xx: worth asking again while a job runs."""


@contextmanager
def _transient() -> Iterator[None]:
    """Turn a busy or unreachable API server into Unreachable, a 404 into "the job is gone", other refusals into
    StageError."""
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as e:
        if e.status in (429, 500, 502, 503, 504):
            raise Unreachable(f"Kubernetes API: {e.status} {e.reason}") from None
        if e.status == 404:
            raise StageError("the job disappeared while it was followed (deleted?)", kind="JobDeleted") from None
        raise StageError(f"Kubernetes API: {e.status} {e.reason}: {(e.body or '')[:300]}") from None
    except (HTTPError, OSError) as e:
        raise Unreachable(f"Kubernetes API unreachable: {type(e).__name__}: {e}") from None


def _api_problem(e: Any, api: Api, ns: str) -> str:
    try:
        message = json.loads(e.body).get("message")
    except (TypeError, ValueError):
        message = None
    if e.status == 404:
        return (f"the cluster has no {api.kind} API ({api.api_version}) in namespace {ns}: install "
                f"{'Kubeflow Trainer v2' if api is TRAINJOB else 'the Kubeflow training operator'}, or set "
                "train.kubernetes.api to the engine it runs")
    return f"Kubernetes API: {e.status} {e.reason}: {message or (e.body or '')[:300]}"


# --- following the job -------------------------------------------------------------------------------------------


class LogStream:
    """Rank 0's log, streamed to our stdout by a thread (`follow=true`) while the main thread follows the job."""

    def __init__(self, cluster: Cluster, ns: str, pod: str, container: str):
        self.cluster, self.ns, self.pod, self.container = cluster, ns, pod, container
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            resp = self.cluster.core.read_namespaced_pod_log(self.pod, self.ns, container=self.container,
                                                             follow=True, _preload_content=False)
            for line in resp.stream():  # urllib3 chunks, not lines: split them ourselves
                sys.stdout.write(line.decode("utf-8", "replace"))
                sys.stdout.flush()
        except Exception as e:  # noqa: BLE001 — a lost log must never fail a training that goes on
            print(f"warning: rank 0's log stopped ({type(e).__name__}: {e}); the job is still followed",
                  file=sys.stderr, flush=True)

    def finish(self, timeout: float = 10) -> None:
        self.thread.join(timeout)


@dataclass
class Outcome:
    """How the job ended: `ok` or `failed`, the condition's reason and message, rank 0's exit code if known."""

    status: str
    reason: str
    message: str
    exit_code: int | None = None


def verdict(api: Api, job: dict) -> Outcome | None:
    """The job's end from its status conditions, or None while it runs."""
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") == api.done:
            return Outcome("ok", cond.get("reason") or api.done, cond.get("message") or "")
        if cond.get("type") == "Failed":
            return Outcome("failed", cond.get("reason") or "Failed", cond.get("message") or "")
    return None


def stuck(pod: dict | None) -> str | None:
    """Why rank 0's container cannot start, when it cannot by itself."""
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_WAITING:
            return f"pod {pod['metadata']['name']}: {waiting['reason']}: {waiting.get('message') or ''}".strip(": ")
    return None


def exit_code(pod: dict | None, container: str) -> int | None:
    for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if cs.get("name") == container and "exitCode" in terminated:
            return int(terminated["exitCode"])
    return None


def follow(cluster: Cluster, api: Api, cfg: Config, name: str) -> Outcome:
    """Stream rank 0's log and poll the job until a condition ends it or follow_seconds pass."""
    kc = cfg.train.kubernetes
    ns, container = kc.namespace, CONTAINER[api.name]
    deadline = time.monotonic() + kc.timeouts.follow_seconds
    log: LogStream | None = None
    pod = None
    answered = time.monotonic()
    try:
        while True:
            try:
                outcome = verdict(api, cluster.job(api, ns, name))
                pod = cluster.rank0_pod(api, ns, name) or pod
                answered = time.monotonic()
            except Unreachable as e:  # an API server restarting or overloaded: the job goes on without us
                if time.monotonic() - answered > UNREACHABLE_SECONDS:
                    raise StageError(f"{e}, for {UNREACHABLE_SECONDS} s while following {api.kind} {ns}/{name}; "
                                     "it may still be running", kind="ApiUnreachable") from None
                time.sleep(POLL_SECONDS)
                continue
            started = (pod or {}).get("status", {}).get("phase") in ("Running", "Succeeded", "Failed")
            if log is None and started:  # a pod that already ended gives its whole log, then the stream ends
                log = LogStream(cluster, ns, pod["metadata"]["name"], container)
            if outcome is not None:
                outcome.exit_code = exit_code(pod, container)
                return outcome
            problem = stuck(pod)
            if problem:
                return Outcome("failed", "CannotStart", problem)
            if time.monotonic() > deadline:
                raise StageError(
                    f"{api.kind} {ns}/{name} did not finish within {kc.timeouts.follow_seconds} s "
                    "(train.kubernetes.timeouts.follow_seconds); it is left running — follow it with `kubectl get "
                    f"{api.plural} -n {ns} {name}`, or delete it", kind="FollowTimeout")
            time.sleep(POLL_SECONDS)
    finally:
        if log is not None:
            log.finish()


# --- the stage ---------------------------------------------------------------------------------------------------


def run(cfg: Config, *, resume: bool = False) -> dict:
    """Submit the job, follow it, write the report here; raise StageError (exit 3, or 4 on divergence) when the
    job fails."""
    kc = cfg.train.kubernetes
    api = APIS[kc.api]
    started = time.monotonic()
    run_id = runinfo.run_id(cfg.name, cfg.train.method, cfg.resolve("."))
    manifest = render(cfg, run_id, resume)
    validate(manifest, api)
    stage = cfg.stage_dir("train")
    write_manifest(cfg, manifest)
    name, ns = manifest["metadata"]["name"], kc.namespace
    job = {"api": api.api_version, "kind": api.kind, "name": name, "namespace": ns,
           "manifest": f"{api.kind.lower()}.yaml"}
    cluster = Cluster(kc.context)  # a kubeconfig that cannot load is exit 2, before anything is submitted
    _write(cfg, reports.new_report("train", stages.RUNNING, run_id=run_id, launcher="kubernetes", job=job))
    try:
        created, new = cluster.create(api, manifest, kc.timeouts.submit_seconds)
        print(f"{api.kind} {ns}/{name} {'submitted' if new else 'already exists (same commit and config): following it'}"
              f" — {kc.num_nodes} node(s) × {kc.procs_per_node} process(es); rank 0's log follows", flush=True)
        job["uid"] = (created.get("metadata") or {}).get("uid")
        outcome = follow(cluster, api, cfg, name)
    except StageError as e:
        raise _fail(cfg, run_id, job, started, e) from None
    except Exception as e:  # the client or the network: the report must not stay "running"
        raise _fail(cfg, run_id, job, started, StageError(f"following the {api.kind} failed: {type(e).__name__}: "
                                                          f"{e}")) from e
    job.update(status=outcome.status, reason=outcome.reason, message=outcome.message,
               rank0_exit_code=outcome.exit_code)
    if outcome.status != "ok":
        error = StageError(f"{api.kind} {ns}/{name} failed: {outcome.reason}: {outcome.message}".rstrip(": "),
                           kind="JobFailed", hint=f"read rank 0's log above and the job's report on the volume "
                           f"({remote_stage_dir(cfg)}/{stages.TRAIN.report}); a rerun of the same commit and config "
                           f"follows this same job: to train again, `kubectl delete {api.plural} -n {ns} {name}`")
        if outcome.exit_code == EXIT_DIVERGED:  # the training stopped on a NaN/exploding loss, as a local run would
            error.exit_code, error.kind = EXIT_DIVERGED, "Diverged"
        raise _fail(cfg, run_id, job, started, error)
    report = reports.new_report("train", "ok", run_id=run_id, launcher="kubernetes", job=job,
                                method=cfg.train.method, tuner=cfg.train.tuner, base_model=cfg.model.id,
                                metrics={"wall_seconds": round(time.monotonic() - started, 2)}, outputs={},
                                remote=remote_outputs(cfg))
    _write(cfg, report)
    print(f"{api.kind} {ns}/{name}: {outcome.reason}; the model and the job's report are on volume "
          f"{kc.volume.claim} at {remote_stage_dir(cfg)}", flush=True)
    return report


def remote_outputs(cfg: Config) -> dict:
    """Where the job's outputs lie: the stage folder on the model-store volume (its own report, run.json, the
    model or adapter)."""
    volume, folder = cfg.train.kubernetes.volume, remote_stage_dir(cfg)
    return {"volume": volume.claim, "mount_path": volume.mount_path, "stage_dir": folder,
            "report": posixpath.join(folder, stages.TRAIN.report), "lineage": posixpath.join(folder, "run.json")}


def _fail(cfg: Config, run_id: str, job: dict, started: float, e: StageError) -> StageError:
    report = reports.new_report("train", "failed", run_id=run_id, launcher="kubernetes", job=job,
                                error=stages.error(str(e), e.kind, e.hint),
                                metrics={"wall_seconds": round(time.monotonic() - started, 2)},
                                remote=remote_outputs(cfg))
    _write(cfg, report)
    return e


def _write(cfg: Config, report: dict) -> None:
    """The launcher's report in the local stage folder — unless that folder is the job's own (a runner that mounts
    the model store where the pods do): there the job's report, with the model's file record, is the stage's."""
    if str(cfg.stage_dir("train").resolve()) == remote_stage_dir(cfg):
        return
    reports.write_json(stages.report_path(cfg, "train"), report)
    reports.write_text(stages.markdown_path(cfg, "train"), markdown(report))


def markdown(report: dict) -> str:
    job = report.get("job") or {}
    where = f"`{job.get('kind')}` `{job.get('namespace')}/{job.get('name')}`"
    status = report.get("status")
    if status == stages.RUNNING:
        return f"### swiftci train\n\n⏳ **RUNNING** on Kubernetes — {where}, run `{report.get('run_id')}`\n"
    if status != "ok":
        reason = (report.get("error") or {}).get("reason", "the job did not finish")
        return f"### swiftci train\n\n❌ **FAILED** on Kubernetes — {where}: {reason}\n"
    remote = report.get("remote") or {}
    return (f"### swiftci train\n\n✅ **OK** on Kubernetes — {where}, run `{report.get('run_id')}`\n\n"
            f"The model, run.json and the job's own report are on volume `{remote.get('volume')}` at "
            f"`{remote.get('stage_dir')}`.\n")
