"""The deploy stage: ship the model that passed its gates.

target local — serve it here with `transformers serve`, run the smoke prompts through the OpenAI API, stop.
target kubernetes —
1. pick the model (the quantized one when the quantize stage passed, else the merged/full model) and refuse to
   ship one whose evaluation did not pass;
2. render the Dockerfile (engine image untouched, model in its own layers) and the manifests, and validate the
   manifests against the real Kubernetes schemas before touching anything (`--dry-run` stops here);
3. build, push under the run id and the git sha, and record the digest — Kubernetes gets the image by digest;
4. apply (server-side apply), watch the rollout, smoke-test the new pods; on a rollout timeout, a crash loop or a
   failed smoke test, roll back to the previous good revision and exit non-zero with the reason.
   `strategy: canary` puts a `<name>-canary` Deployment behind the same Service first, smoke-tests it, then
   promotes or removes it. Re-deploying the digest that already runs changes nothing.

Deploy history (revision, digest, run id, eval verdict, outcome) lives in the Deployment's annotations;
`swiftci deploy --rollback` returns to the last good revision before the current one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from swiftci import reports, runinfo, stages
from swiftci.config import Config, DeployConfig
from swiftci.deploy import image as imagelib
from swiftci.deploy import kube, smoke
from swiftci.errors import GateFailed, StageError, SwiftCIError, UsageError

STAGE = "deploy"


def run(cfg: Config, *, dry_run: bool = False, rollback: bool = False, image: str | None = None) -> dict:
    dc = cfg.deploy
    if dc is None:
        raise UsageError(f"{cfg.source}: no `deploy` section; add one (see examples/tiny/swiftci.yaml)")
    out = cfg.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lineage = _lineage(cfg)
    head = reports.new_report(STAGE, stages.RUNNING, target=dc.target, engine=dc.engine, run_id=lineage["run_id"],
                              eval_verdict=lineage["eval_verdict"])
    _write(out, head)
    try:
        if rollback:
            result = _rollback(cfg, dc)
        elif dc.target == "local":
            result = _local(cfg, dc, out, lineage, dry_run=dry_run)
        else:
            result = _kubernetes(cfg, dc, out, lineage, dry_run=dry_run, prebuilt=image)
    except Exception as e:
        # how far the deploy got (a strategy's error carries it), so a failure still records it
        got = e.details if isinstance(e, SwiftCIError) else {}
        _write(out, {**head, "status": "failed", **got, "error": stages.error_of(e),
                     "wall_seconds": round(time.monotonic() - started, 2)})
        if isinstance(e, SwiftCIError):
            raise
        raise StageError(f"deploy failed: {type(e).__name__}: {e}") from e
    report = {**head, **result, "wall_seconds": round(time.monotonic() - started, 2)}
    _write(out, report)
    return report


def _reason(e: BaseException) -> str:
    """Our own errors already read as a sentence; anything else gets its type."""
    return str(e) if isinstance(e, SwiftCIError) else f"{type(e).__name__}: {e}"


def _failing(e: SwiftCIError, got: dict) -> SwiftCIError:
    """`e`, carrying what had been done before it (a strategy's partial result, for the report)."""
    e.details = {**got, **e.details}
    return e


# --- what ships -------------------------------------------------------------------------------------------------


def _lineage(cfg: Config) -> dict:
    """What this run made, from the earlier stages' reports (a report of another run says nothing about it)."""
    train = stages.read_report(cfg, "train") or {}
    ev, quant = stages.this_runs_report(cfg, "evaluate") or {}, stages.this_runs_report(cfg, "quantize") or {}
    verdict = ("passed" if ev.get("passed") else "failed") if ev else None
    try:
        base = reports.read_json(cfg.stage_dir("train") / "run.json").get("base_model") or {}
    except (OSError, ValueError):
        base = {}
    return {"run_id": train.get("run_id"), "eval_verdict": verdict, "eval": ev, "quantize": quant,
            "git": runinfo.git_commit(cfg.resolve(".")),
            "base_revision": base.get("revision_resolved") or base.get("sha256") or cfg.model.revision}


@dataclass
class Shipment:
    """The model folder that ships, what kind it is, the digest of its files (checked against the stage that made
    it), and the digest of what the evaluate gates scored (the same bytes, or the record they were checked in)."""

    path: Path
    kind: str
    sha256: str | None
    evaluated_sha256: str | None


def model_to_ship(cfg: Config, dc: DeployConfig, lineage: dict) -> Shipment:
    """Fails closed: a model whose evaluation or quantization gate failed never ships, nor one whose files are not
    the ones that were evaluated (exit 3, naming the file)."""
    if cfg.evaluate is not None and not lineage["eval"]:
        raise StageError("deploy: the config has an evaluate section but there is no eval report for this model; "
                         "run `swiftci evaluate` first (deploy never ships an unevaluated model)")
    if cfg.evaluate is not None and lineage["eval"].get("passed") is not True:
        state = lineage["eval"].get("status", "missing")
        raise GateFailed(f"deploy refuses a model whose evaluation did not pass (eval report: {state}); "
                         "run `swiftci evaluate` and fix what it reports")
    quant = lineage["quantize"]
    if dc.model == "quantized" or (dc.model == "auto" and cfg.quantize is not None):
        if not quant:
            raise StageError("deploy.model: there is no quantize report; run `swiftci quantize` first, or ship "
                             "`model: merged`")
        if quant.get("passed") is not True:
            raise GateFailed(f"deploy.model: the quantized model has not passed its gates (quantize report: "
                             f"{quant.get('status', 'missing')}); run `swiftci quantize`, or ship `model: merged`")
        shipped = stages.produced(cfg, "quantize", prefer=("model",))
        source = (quant.get("verified") or {}).get("train")
        if source is not None and source != (stages.read_report(cfg, "train") or {}).get("files_sha256"):
            raise StageError("deploy: the quantized model was made from another train output than this run's; "
                             "refusing to ship it", kind="ContentMismatch")
        evaluated = (quant.get("eval") or {}).get("model_sha256") or _evaluated_train_record(cfg, lineage)
        if (quant.get("eval") or {}).get("model_sha256") not in (None, shipped.sha256):
            raise StageError("deploy: the quantized model's files are not the ones its eval gates scored; refusing "
                             "to ship them", kind="ContentMismatch")
        return Shipment(shipped.path, f"quantized ({quant.get('method', '?')} {quant.get('bits', '?')}-bit)",
                        shipped.sha256, evaluated)
    if cfg.train is None and cfg.model_local_path is not None:
        return Shipment(cfg.model_local_path, "base", None, None)
    try:
        shipped = stages.produced(cfg, "train", prefer=("model",))
    except StageError as e:
        if e.kind == "ContentMismatch":
            raise
        raise UsageError("deploy.model: there is no full model to ship; set `train.merge: true` (or add a quantize "
                         "section) and train again") from None
    outputs = (stages.read_report(cfg, "train") or {}).get("outputs") or {}
    return Shipment(shipped.path, "merged" if "adapter" in outputs else "full", shipped.sha256,
                    _evaluated_train_record(cfg, lineage))


def _evaluated_train_record(cfg: Config, lineage: dict) -> str | None:
    """The train record the evaluate stage checked its files against; it must be the one deploy ships from."""
    if not lineage["eval"]:
        return None
    evaluated = (lineage["eval"].get("verified") or {}).get("train")
    recorded = (stages.read_report(cfg, "train") or {}).get("files_sha256")
    if evaluated != recorded:
        raise StageError("deploy: the eval report scored a different train output than the one that would ship "
                         f"(checked {str(evaluated)[:12]}…, now {str(recorded)[:12]}…); refusing to ship it",
                         kind="ContentMismatch")
    return evaluated


def _quantization(model_dir: Path) -> str | None:
    config = json.loads((model_dir / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


# --- target: local ------------------------------------------------------------------------------------------------


def _local(cfg: Config, dc: DeployConfig, out: Path, lineage: dict, *, dry_run: bool) -> dict:
    """Serve here with `transformers serve`, run the smoke prompts, stop; or, with --dry-run, say so."""
    from swiftci.deploy import local

    ship = model_to_ship(cfg, dc, lineage)
    shipped = {"model": _model_fields(cfg, ship)}
    if dry_run:
        return {**shipped, "status": "dry_run",
                "plan": [f"serve {_rel(cfg, ship.path)} with transformers serve on {dc.local.host}",
                         f"send {len(dc.smoke.prompts)} smoke prompt(s) through the OpenAI API, then stop"]}
    served = local.serve_and_smoke(ship.path, dc, out)
    result = {**shipped, "local": served, "smoke": served["smoke"]}
    if not served["smoke"]["passed"]:
        failed = [r for r in served["smoke"]["results"] if not r["passed"]]
        raise GateFailed("smoke test failed: " + "; ".join(f"{r['prompt']!r}: {r['reason']}" for r in failed),
                         details=result)
    return {**result, "status": "served"}


# --- target: kubernetes -------------------------------------------------------------------------------------------


def _kubernetes(cfg: Config, dc: DeployConfig, out: Path, lineage: dict, *, dry_run: bool,
                prebuilt: str | None) -> dict:
    """Render and validate the manifests; unless --dry-run, build and push the image (or take --image), then roll
    it out with the configured strategy. Returns the report's deploy fields."""
    name = dc.name or cfg.name
    result: dict = {"name": name, "namespace": dc.namespace, "strategy": dc.strategy}
    if prebuilt is not None:
        if "@sha256:" not in prebuilt:
            raise UsageError("--image: give a digest reference, e.g. registry/repo@sha256:…")
        repository, digest = prebuilt.split("@", 1)
        result["image"] = {"repository": repository, "digest": digest, "ref": prebuilt, "built": False}
    else:
        result.update(_image_context(cfg, dc, out, name, lineage))
        repository, digest = dc.image, None
    manifests = _validated_manifests(dc, name, repository, digest, lineage["run_id"], lineage["eval_verdict"])
    reports.write_text(out / "manifests.yaml", yaml.safe_dump_all(manifests, sort_keys=False))
    result["manifests"] = "manifests.yaml"
    if dry_run:
        return {**result, "status": "dry_run", "plan": _plan(dc, manifests, result["image"], prebuilt)}
    if digest is None:
        result["image"].update(_build(cfg, dc, out, repository, result["image"]["tags"]))
        digest = result["image"]["digest"]
    result["image_digest"] = digest
    release = kube.Release(image=f"{repository}@{digest}", digest=digest, run_id=lineage["run_id"],
                           eval_verdict=lineage["eval_verdict"])
    try:
        return {**result, **_roll_out(cfg, dc, name, release, out)}
    except SwiftCIError as e:
        raise _failing(e, result) from None


def _image_context(cfg: Config, dc: DeployConfig, out: Path, name: str, lineage: dict) -> dict:
    """The Dockerfile and build context of the model that ships (the engine image untouched, weights in their own
    layers), the packed files checked once more against what was evaluated; returns the report's model and image
    fields. The image's labels carry both digests."""
    ship = model_to_ship(cfg, dc, lineage)
    quantization = _quantization(ship.path)
    git_sha = lineage["git"].get("sha")
    labels = _labels(cfg, dc, name, lineage, git_sha, quantization, ship)
    text = imagelib.dockerfile(dc.engine, dc.engine_image, name, dc.port, labels,
                               imagelib.weight_files(ship.path), quantization)
    imagelib.build_context(ship.path, out / "context", text)
    packed = imagelib.packed_digest(out / "context", ship.path.name)
    if ship.sha256 is not None and packed != ship.sha256:
        raise StageError("deploy: the files packed into the image are not the ones that were checked; refusing to "
                         "build it", kind="ContentMismatch")
    reports.write_text(out / "Dockerfile", text)
    tags = [t for t in (lineage["run_id"], git_sha) if t] or ["latest-build"]
    return {"model": {**_model_fields(cfg, ship), "quantization": quantization},
            "image": {"repository": dc.image, "tags": tags, "dockerfile": "Dockerfile", "built": True}}


def _model_fields(cfg: Config, ship: Shipment) -> dict:
    return {"path": _rel(cfg, ship.path), "kind": ship.kind, "sha256": ship.sha256,
            "evaluated_sha256": ship.evaluated_sha256}


def _validated_manifests(dc: DeployConfig, name: str, repository: str, digest: str | None, run_id: str | None,
                         verdict: str | None) -> list[dict]:
    """The manifests a rollout applies, validated against the real Kubernetes schemas before anything is built."""
    pending = kube.Release(image=f"{repository}@{digest or 'sha256:' + '0' * 64}", digest=digest or "sha256:pending",
                           run_id=run_id, eval_verdict=verdict)
    manifests = kube.stable_manifests(dc, name, pending, [])
    if dc.strategy == "canary":
        manifests.append(kube.deployment(dc, name, pending, [], track="canary", replicas=kube.canary_replicas(dc)))
    kube.validate(manifests, dc.kubernetes_version)
    return manifests


def _plan(dc: DeployConfig, manifests: list[dict], image: dict, prebuilt: str | None) -> list[str]:
    plan = [f"build {dc.engine} image FROM {dc.engine_image} with the model in its own layers"
            if prebuilt is None else f"deploy the prebuilt image {prebuilt}",
            f"push {image['repository']}:{', '.join(image['tags'])} and deploy it by digest" if prebuilt is None else "",
            f"server-side apply {', '.join(m['kind'] + '/' + m['metadata']['name'] for m in manifests)} "
            f"in namespace {dc.namespace}",
            f"strategy {dc.strategy}: wait for the rollout, smoke-test {len(dc.smoke.prompts)} prompt(s), roll back "
            "on failure"]
    return [p for p in plan if p]


def _build(cfg: Config, dc: DeployConfig, out: Path, repository: str, tags: list[str]) -> dict:
    """Build and push the image; returns its digest and how it was built."""
    builder = imagelib.pick_builder(dc.builder)
    t0 = time.monotonic()
    stamp = runinfo.git(cfg.resolve("."), "log", "-1", "--format=%ct")
    imagelib.login(builder, repository, dc.insecure_registry)
    digest = imagelib.build_and_push(builder, out / "context", repository, tags, dc.insecure_registry,
                                     timestamp=int(stamp) if stamp and stamp.isdigit() else 0)
    return {"digest": digest, "ref": f"{repository}@{digest}", "builder": builder,
            "build_seconds": round(time.monotonic() - t0, 2)}


def _roll_out(cfg: Config, dc: DeployConfig, name: str, release: kube.Release, out: Path) -> dict:
    """Nothing when this digest already runs with this spec; else the configured strategy."""
    cluster = kube.Cluster(dc.context)
    current = cluster.get("Deployment", dc.namespace, name)
    history = _history(current)
    wanted = kube.deployment(dc, name, release, history)
    if (current is not None and _digest_of(current) == release.digest
            and _annotation(current, kube.SPEC_HASH) == wanted["metadata"]["annotations"][kube.SPEC_HASH]):
        return {"status": "unchanged", "history": history,
                "rollout": {"result": "unchanged",
                            "reason": f"{release.digest[:19]}… already runs with this spec; nothing applied"}}
    if dc.strategy == "canary":
        return _canary(cfg, cluster, dc, name, release, history, out, current)
    return _rolling(cluster, dc, name, release, history, current=current)


def _labels(cfg: Config, dc: DeployConfig, name: str, lineage: dict, git_sha: str | None,
            quantization: str | None, ship: Shipment) -> dict[str, str]:
    repo = lineage["git"].get("repository")
    base_model = Path(cfg.model.id).name if cfg.model_is_local else cfg.model.id  # never a local path
    labels = {
        "org.opencontainers.image.title": name,
        "org.opencontainers.image.base.name": dc.engine_image,
        "org.opencontainers.image.description": f"{base_model} fine-tuned by swiftci, served by {dc.engine}",
        "dev.swiftci.run-id": lineage["run_id"] or "",
        "dev.swiftci.base-model": base_model,
        "dev.swiftci.base-revision": lineage["base_revision"] or "",
        "dev.swiftci.eval-verdict": lineage["eval_verdict"] or "not evaluated",
        "dev.swiftci.quantization": quantization or "none",
        "dev.swiftci.engine": dc.engine,
        "dev.swiftci.model-sha256": ship.sha256 or "",
        "dev.swiftci.evaluated-sha256": ship.evaluated_sha256 or "",
    }
    if git_sha:
        labels["org.opencontainers.image.revision"] = git_sha
    if repo:
        labels["org.opencontainers.image.source"] = f"https://github.com/{repo}"
    return labels


def _history(deployment: dict | None) -> list[dict]:
    if deployment is None:
        return []
    raw = ((deployment.get("metadata") or {}).get("annotations") or {}).get(kube.HISTORY)
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _annotation(deployment: dict, key: str) -> str | None:
    return ((deployment.get("metadata") or {}).get("annotations") or {}).get(key)


def _digest_of(deployment: dict) -> str | None:
    return _annotation(deployment, kube.DIGEST)


def _previous_good(history: list[dict], not_digest: str) -> kube.Release | None:
    for entry in reversed(history):
        if entry.get("status") == "good" and entry.get("digest") != not_digest:
            return kube.Release(image=entry["image"], digest=entry["digest"], run_id=entry.get("run_id"),
                                eval_verdict=entry.get("eval_verdict"))
    return None


def _apply_stable(cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release,
                  history: list[dict], *, replicas: int | None = None) -> tuple[bool, str, float]:
    t0 = time.monotonic()
    manifests = kube.stable_manifests(dc, name, release, history, replicas=replicas)
    kube.validate(manifests, dc.kubernetes_version)
    applied = [cluster.apply(m) for m in manifests]
    generation = applied[0].get("metadata", {}).get("generation") or 1
    want = dc.replicas if replicas is None else replicas
    ok, reason = cluster.wait_rollout(dc.namespace, name, generation, want, release.revision,
                                      dc.timeouts.rollout_seconds)
    return ok, reason, time.monotonic() - t0


def _record(cluster: kube.Cluster, dc: DeployConfig, name: str, history: list[dict]) -> None:
    """Write the outcome into the Deployment's history annotation only (a merge patch: no spec is touched)."""
    cluster.annotate("Deployment", dc.namespace, name, {kube.HISTORY: kube.history_json(history)})


def _smoke(cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release, track: str) -> dict:
    served = imagelib.served_model_name(dc.engine, name)
    if dc.smoke.url:
        smoke.wait_healthy(dc.smoke.url, dc.timeouts.smoke_seconds)
        return smoke.run(dc.smoke.url, served, dc.smoke, dc.timeouts.smoke_seconds)
    from swiftci.deploy.portforward import forward

    pods = [p for p in cluster.pods(dc.namespace, {kube.NAME_LABEL: name, kube.TRACK_LABEL: track,
                                                   kube.REVISION_LABEL: release.revision})
            if (p.get("status") or {}).get("phase") == "Running"]
    if not pods:
        return {"passed": False, "results": [], "reason": "no running pod of the new revision to smoke-test"}
    with forward(cluster, dc.namespace, pods[0]["metadata"]["name"], dc.port) as fw:
        try:
            smoke.wait_healthy(fw.url, dc.timeouts.smoke_seconds)
            result = smoke.run(fw.url, served, dc.smoke, dc.timeouts.smoke_seconds)
        except Exception as e:  # noqa: BLE001 - the port-forward's own failure is the likelier cause: name it
            if not fw.errors:
                raise
            raise StageError(f"smoke test could not reach the pod: {e}; {fw.errors[-1]}") from None
        if not result["passed"] and fw.errors:
            result["reason"] = " ".join(p for p in (result.get("reason") or "", fw.errors[-1]) if p)
        return result


def _smoke_failure(result: dict) -> str:
    failed = "; ".join(f"{r['prompt']!r}: {r['reason']}" for r in result.get("results") or [] if not r["passed"])
    return "smoke test failed: " + " ".join(p for p in (failed, result.get("reason") or "") if p)


def _release_of(deployment: dict) -> kube.Release:
    """What a live Deployment runs, from its pod template and annotations."""
    annotations = (deployment.get("metadata") or {}).get("annotations") or {}
    image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    digest = annotations.get(kube.DIGEST) or (image.split("@", 1)[1] if "@" in image else image)
    return kube.Release(image=image, digest=digest, run_id=annotations.get(kube.RUN_ID) or None,
                        eval_verdict=annotations.get(kube.VERDICT) or None)


@dataclass
class Attempt:
    """How a new revision (or a canary) fared: its rollout, its smoke test, and why it must not stay (None: it
    passed); `gate` when that was a quality gate (the smoke test, the canary's eval gates), not the rollout."""

    rollout: dict
    smoke: dict | None = None
    why: str | None = None
    gate: bool = False

    def fields(self) -> dict:
        return {"smoke": self.smoke} if self.smoke is not None else {}


def _rolling(cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release, history: list[dict], *,
             current: dict | None, smoke_test: bool = True) -> dict:
    """Apply, watch, smoke-test; on ANY failure on the way — rollout, crash loop, smoke test, an API or network
    error — return to what served before and raise with the reason (its details: how far the deploy got)."""
    previous = _previous_good(history, release.digest)
    if previous is None and current is not None and _digest_of(current) != release.digest:
        previous = _release_of(current)  # it served before but its history has no good entry: restore it anyway
    attempt = _attempt(cluster, dc, name, release, history, smoke_test)
    result = {"previous_digest": previous.digest if previous else None, "rollout": attempt.rollout,
              **attempt.fields()}
    if attempt.why is None:
        final = history + [kube.history_entry(release, "good")]
        _record(cluster, dc, name, final)
        return {**result, "status": "deployed", "history": final}
    failed = history + [kube.history_entry(release, "rolled_back", reason=attempt.why[:300])]
    back = _restore(cluster, dc, name, release, previous, failed)
    result = {**result, "status": "rolled_back", "history": failed, "rollout": {**attempt.rollout, "rollback": back}}
    if not back["ok"]:
        raise StageError(f"{attempt.why}; the rollback did not finish either: {back['reason']}",
                         details={**result, "status": "failed"})
    if attempt.gate:
        raise GateFailed(f"{attempt.why}; rolled back", details=result)
    raise StageError(f"rollout failed and was rolled back: {attempt.why}", details=result)


def _attempt(cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release, history: list[dict],
             smoke_test: bool) -> Attempt:
    """Apply the new revision, wait for its rollout, smoke-test it."""
    attempt = Attempt({"result": "failed", "reason": "", "revision": release.revision})
    try:
        ok, reason, seconds = _apply_stable(cluster, dc, name, release, history + [
            kube.history_entry(release, "deploying")])
        attempt.rollout.update(result="rolled out" if ok else "failed", reason=reason, seconds=round(seconds, 2))
        if not ok:
            attempt.why = reason
        elif smoke_test:
            attempt.smoke = _smoke(cluster, dc, name, release, "stable")
            if not attempt.smoke["passed"]:
                attempt.why, attempt.gate = _smoke_failure(attempt.smoke), True
    except Exception as e:  # noqa: BLE001 - whatever broke, the new revision must not stay in service
        attempt.why = _reason(e)
    return attempt


def _restore(cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release,
             previous: kube.Release | None, history: list[dict]) -> dict:
    """Put back what served before `release`, or scale `release` to 0 when nothing did."""
    try:
        if previous is not None:
            ok, reason, seconds = _apply_stable(cluster, dc, name, previous, history)
            return {"to": previous.digest, "run_id": previous.run_id, "ok": ok, "reason": reason,
                    "seconds": round(seconds, 2)}
        cluster.apply(kube.deployment(dc, name, release, history, replicas=0))
        return {"to": None, "ok": True, "reason": "no earlier revision: scaled to 0 replicas"}
    except Exception as e:  # noqa: BLE001 - a rollback that fails is reported beside the first failure
        return {"to": previous.digest if previous else None, "ok": False, "reason": f"{type(e).__name__}: {e}"}


def _canary(cfg: Config, cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release,
            history: list[dict], out: Path, current: dict | None) -> dict:
    """`<name>-canary` beside the stable pods, behind the same Service; promoted when it passes, and removed in
    every case once the decision is made (also when anything fails on the way)."""
    replicas = kube.canary_replicas(dc)
    manifest = kube.deployment(dc, name, release, history, track="canary", replicas=replicas)
    kube.validate([manifest], dc.kubernetes_version)
    canary = {"replicas": replicas, "stable_replicas": dc.replicas, "result": "pending"}
    cluster.apply(kube.service(dc, name))
    try:
        trial = _try_canary(cfg, cluster, dc, name, release, manifest, out)
        canary.update(trial.rollout)
        if trial.why is not None:
            aborted = history + [kube.history_entry(release, "canary_aborted", reason=trial.why[:300])]
            if current is not None:  # recorded on the stable Deployment, whose spec and pods stay untouched
                _record(cluster, dc, name, aborted)
            canary["result"] = "aborted"
            got = {"status": "canary_aborted", "history": aborted, "canary": canary, **trial.fields()}
            error = GateFailed if trial.gate else StageError
            raise error(f"{trial.why}; the canary was removed and the stable pods were never touched", details=got)
        canary["result"] = "promoting"
        # the canary already answered the smoke prompts with this very image: the stable rollout is watched
        # (and rolled back on failure) without sending them again through an endpoint that may be the canary's
        try:
            promoted = _rolling(cluster, dc, name, release, history, current=current, smoke_test=False)
        except SwiftCIError as e:
            raise _failing(e, {"canary": canary, **trial.fields()}) from None
        canary["result"] = "promoted"
        return {**promoted, "canary": canary, **trial.fields()}
    finally:
        try:
            cluster.delete("Deployment", dc.namespace, f"{name}-canary")
        except Exception as e:  # noqa: BLE001 - say so: a leftover canary keeps taking traffic
            canary["cleanup"] = f"could not delete {name}-canary: {type(e).__name__}: {e}"


def _try_canary(cfg: Config, cluster: kube.Cluster, dc: DeployConfig, name: str, release: kube.Release,
                manifest: dict, out: Path) -> Attempt:
    """Apply the canary, wait for it, smoke-test it, and score the eval gates through it when asked."""
    trial = Attempt({})
    try:
        applied = cluster.apply(manifest)
        ok, reason = cluster.wait_rollout(dc.namespace, f"{name}-canary", applied["metadata"].get("generation") or 1,
                                          kube.canary_replicas(dc), release.revision, dc.timeouts.rollout_seconds)
        trial.rollout.update(rollout=reason, ok=ok)
        if not ok:
            trial.why = f"canary rollout failed: {reason}"
            return trial
        trial.smoke = _smoke(cluster, dc, name, release, "canary")
        if not trial.smoke["passed"]:
            trial.why, trial.gate = f"canary {_smoke_failure(trial.smoke)}", True
        elif dc.canary.evaluate:
            scored = _score_canary(cfg, dc, name, out, dc.smoke.url)
            trial.rollout["evaluate"] = {"passed": scored["passed"], "gates": scored["gates"]}
            if not scored["passed"]:
                trial.why, trial.gate = "canary eval gates failed: " + "; ".join(
                    f"{g['metric']} {g['reason']}" for g in scored["gates"] if not g["passed"]), True
    except Exception as e:  # noqa: BLE001 - the caller removes the canary whatever happened
        trial.why = _reason(e)
    return trial


def _score_canary(cfg: Config, dc: DeployConfig, name: str, out: Path, base_url: str) -> dict:
    """The evaluate gates, re-scored through the canary's OpenAI API; the offline eval report is the baseline."""
    from swiftci import evaluate

    ev = cfg.evaluate
    tasks = dc.canary.tasks or ev.tasks
    scoped = cfg.model_copy(update={"evaluate": ev.model_copy(update={
        "tasks": tasks, "gates": [g for g in ev.gates if g.task in tasks]})})
    offline = stages.report_path(cfg, "evaluate")
    try:
        return evaluate.run(scoped, baseline=str(offline) if offline.is_file() else "none",
                            out_dir=out / "canary-eval",
                            endpoint=(base_url, imagelib.served_model_name(dc.engine, name)))
    except GateFailed as e:
        return e.details


# --- rollback ---------------------------------------------------------------------------------------------------


def _rollback(cfg: Config, dc: DeployConfig) -> dict:
    """Return to the last good revision deployed BEFORE the current one was first deployed (so a second
    --rollback keeps going back instead of returning to where the first one came from)."""
    if dc.target != "kubernetes":
        raise UsageError("--rollback: only target kubernetes keeps a deploy history")
    name = dc.name or cfg.name
    cluster = kube.Cluster(dc.context)
    current = cluster.get("Deployment", dc.namespace, name)
    if current is None:
        raise UsageError(f"--rollback: there is no Deployment {dc.namespace}/{name} to roll back")
    history = _history(current)
    result = {"name": name, "namespace": dc.namespace, "strategy": "rollback", "history": history}
    target = _before_current(history, _digest_of(current) or "")
    if target is None:
        raise UsageError(f"--rollback: the history of {name} has no good revision before the current one",
                         details=result)
    entries = history + [kube.history_entry(target, "deploying", rollback=True)]
    ok, reason, seconds = _apply_stable(cluster, dc, name, target, entries)
    result.update(image_digest=target.digest, rollout={"result": "rolled back" if ok else "failed", "reason": reason,
                                                       "seconds": round(seconds, 2), "revision": target.revision})
    if not ok:
        raise StageError(f"rollback to {target.revision} did not finish: {reason}", details=result)
    final = history + [kube.history_entry(target, "good", rollback=True)]
    _record(cluster, dc, name, final)
    return {**result, "status": "rolled_back_by_request", "history": final}


def _before_current(history: list[dict], current_digest: str) -> kube.Release | None:
    goods = [i for i, e in enumerate(history) if e.get("digest") == current_digest and e.get("status") == "good"]
    # where the current revision was last deployed as itself; if it only ever came back by a rollback, where it did
    first = next((i for i in reversed(goods) if not history[i].get("rollback")), goods[-1] if goods else len(history))
    return _previous_good(history[:first], current_digest)


# --- reports ----------------------------------------------------------------------------------------------------


def _rel(cfg: Config, path: Path) -> str:
    try:
        return str(path.resolve().relative_to(cfg.resolve(".").resolve()))
    except ValueError:
        return path.name


def _write(out: Path, report: dict) -> None:
    reports.write_json(out / stages.DEPLOY.report, report)
    reports.write_text(out / stages.DEPLOY.markdown, render_markdown(report))


ICON = {"deployed": "✅", "served": "✅", "unchanged": "✅", "dry_run": "📝", "rolled_back_by_request": "↩️",
        "running": "⏳", "rolled_back": "❌", "canary_aborted": "❌", "failed": "❌"}


def render_markdown(report: dict) -> str:
    status = report.get("status", "?")
    lines = [f"### swiftci deploy — {report.get('target')}", "",
             f"{ICON.get(status, '')} **{status.replace('_', ' ').upper()}**"
             + (f" — {stages.failure_reason(report)}" if stages.failure_reason(report) else "")]
    rows = []
    if report.get("model"):
        rows.append(("model", f"`{report['model']['path']}` ({report['model']['kind']})"))
    img = report.get("image") or {}
    if img.get("digest"):
        rows.append(("image", f"`{img.get('repository')}@{img['digest']}`"))
    if img.get("tags"):
        rows.append(("tags", ", ".join(f"`{t}`" for t in img["tags"])))
    if report.get("name"):
        rows.append(("Kubernetes", f"`{report.get('namespace')}/{report['name']}` · {report.get('strategy')}"))
    rollout = report.get("rollout") or {}
    if rollout:
        rows.append(("rollout", f"{rollout.get('result')} — {rollout.get('reason')}"))
        back = rollout.get("rollback")
        if back:
            rows.append(("rollback", f"to `{(back.get('to') or 'nothing')[:19]}` — {back.get('reason')}"))
    if report.get("canary"):
        c = report["canary"]
        rows.append(("canary", f"{c.get('replicas')} pod(s) beside {c.get('stable_replicas')} stable — "
                               f"{c.get('result', 'pending')}"))
    local = report.get("local")
    if local:
        rows.append(("served", f"{local['url']} (ready in {local['ready_seconds']} s)"))
    if rows:
        lines += ["", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    sm = report.get("smoke")
    if sm and sm.get("results"):
        lines += ["", "| smoke prompt | answer | latency | |", "|---|---|---:|:-:|"]
        for r in sm["results"]:
            answer = (r.get("answer") or "").replace("|", "\\|").replace("\n", " ")[:80]
            lat = f"{r['latency_ms']:.0f} ms" if r.get("latency_ms") is not None else "—"
            lines.append(f"| `{r['prompt'][:60]}` | {answer or r.get('reason', '')} | {lat} | "
                         f"{'✅' if r['passed'] else '❌'} |")
    plan = report.get("plan")
    if plan:
        lines += ["", "Plan (nothing was built or applied):", *[f"1. {p}" for p in plan]]
    return "\n".join(lines) + "\n"
