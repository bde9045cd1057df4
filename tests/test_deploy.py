"""`swiftci deploy`: real images (buildah + a Debian docker-registry on 127.0.0.1), rollouts against a fake
Kubernetes API server (tests/fakes/kube_api.py) whose controller the test plays, smoke tests through a fake OpenAI
endpoint standing for the new pods behind an ingress, and target local with a real `transformers serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from werkzeug import Request, Response

from conftest import clone_trained, read_json, swiftci, swiftci_in_process, tiny_config, write_config
from fakes.openai_api import FakeOpenAI

pytestmark = pytest.mark.slow
NS = "ml"


def registry_blobs(registry) -> dict[str, int]:
    blobs = Path(registry["data"]) / "docker/registry/v2/blobs"
    return {p.parent.name: p.stat().st_size for p in blobs.rglob("data")} if blobs.exists() else {}


def image_config(registry, repo_ref: str, containers_env) -> dict:
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--config", f"docker://{repo_ref}"],
                          capture_output=True, text=True, env={**os.environ, **containers_env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["config"]


# --- a fake cluster whose controller the test plays ------------------------------------------------------------------


@pytest.fixture
def openai(httpserver):
    return FakeOpenAI(httpserver)


def deploy_section(registry, engine_image, openai, **extra) -> dict:
    section = {"target": "kubernetes", "engine": "transformers", "engine_image": engine_image,
               "image": f"{registry['host']}/tiny-reverse", "builder": "buildah", "insecure_registry": True,
               "model": "merged", "namespace": NS, "gpus": 0, "replicas": 2,
               "smoke": {"url": openai.url, "prompts": [{"prompt": "reverse: ship", "expect": ["pihs"]}]},
               "timeouts": {"rollout_seconds": 30, "smoke_seconds": 30}}
    section.update(extra)
    return section


def run_deploy(cfg: Path, cluster, containers_env, *args: str):
    return swiftci_in_process("deploy", "-c", str(cfg), *args, env={**containers_env, "KUBECONFIG": cluster.kubeconfig_path})


def deployed_image(cluster, name="tiny-reverse") -> str:
    return cluster.get("deployments", NS, name)["spec"]["template"]["spec"]["containers"][0]["image"]


def history(cluster, name="tiny-reverse") -> list[dict]:
    return json.loads(cluster.get("deployments", NS, name)["metadata"]["annotations"]["swiftci.dev/history"])


# --- images -----------------------------------------------------------------------------------------------------------


def test_image_on_the_engine_with_lineage_then_rolled_out_by_digest(trained, tiny_model, tmp_path, registry,
                                                                   containers_env, engine_image, cluster, openai):
    cfg = clone_trained(trained, tmp_path, tiny_model, deploy=deploy_section(registry, engine_image, openai),
                        quantize=None, evaluate=None)
    proc = run_deploy(cfg, cluster, containers_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["version"] == 2 and report["stage"] == "deploy" and report["status"] == "deployed"
    digest = report["image"]["digest"]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    repo = f"{registry['host']}/tiny-reverse"
    assert deployed_image(cluster) == f"{repo}@{digest}", "Kubernetes gets the image by digest, never a tag"
    for tag in report["image"]["tags"]:  # the run id and the git sha point at the same image
        assert image_config(registry, f"{repo}:{tag}", containers_env) == image_config(
            registry, f"{repo}@{digest}", containers_env)
    config = image_config(registry, f"{repo}@{digest}", containers_env)
    assert config["User"] == "1000:1000"
    assert config["Entrypoint"][:2] == ["transformers", "serve"] and "/models/tiny-reverse" in config["Entrypoint"]
    labels = config["Labels"]
    assert labels["dev.swiftci.run-id"] == report["run_id"] and labels["dev.swiftci.run-id"].startswith("tiny-")
    assert labels["dev.swiftci.base-model"] == "base-model" and labels["org.opencontainers.image.base.name"] == \
        engine_image
    assert "dev.swiftci.eval-verdict" in labels and labels["dev.swiftci.engine"] == "transformers"
    assert report["smoke"]["passed"] and openai.requests[0]["model"] == "/models/tiny-reverse"
    (entry,) = history(cluster)
    assert entry["status"] == "good" and entry["digest"] == digest and entry["run_id"] == report["run_id"]
    applies = [r for r in cluster.requests if r[0] == "PATCH" and "apply-patch" in r[2]]
    assert {p for _, p, _ in applies} >= {f"/apis/apps/v1/namespaces/{NS}/deployments/tiny-reverse",
                                          f"/api/v1/namespaces/{NS}/services/tiny-reverse",
                                          f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/tiny-reverse"}
    dockerfile = (tmp_path / "out/deploy/Dockerfile").read_text()
    assert dockerfile.splitlines()[2] == f"FROM {engine_image}" and "USER 1000:1000" in dockerfile


def test_a_retrain_pushes_only_the_model_layers(trained, tiny_model, tmp_path, registry, containers_env,
                                               engine_image, cluster, openai):
    cfg = clone_trained(trained, tmp_path, tiny_model, deploy=deploy_section(
        registry, engine_image, openai, image=f"{registry['host']}/retrained"), quantize=None, evaluate=None)
    first = run_deploy(cfg, cluster, containers_env)
    assert first.returncode == 0, first.stderr[-3000:]
    before = registry_blobs(registry)
    weights = tmp_path / "out/train/model/model.safetensors"
    data = bytearray(weights.read_bytes())  # a "retrain": new weights (a different seed flips every byte)
    data[-4096:] = bytes(4096)
    weights.write_bytes(bytes(data))
    rerecord_train_files(tmp_path / "out/train")  # …recorded by the train stage, as a retrain would
    second = run_deploy(cfg, cluster, containers_env)
    assert second.returncode == 0, second.stderr[-3000:]
    new = {d: s for d, s in registry_blobs(registry).items() if d not in before}
    size = weights.stat().st_size
    assert size * 0.9 <= sum(new.values()) <= size + 64 * 1024, (new, size)
    assert max(new.values()) >= size * 0.9, "the weights travel as one layer of their own"
    assert len(history(cluster, "tiny-reverse")) == 2


def rerecord_train_files(train_dir: Path) -> None:
    from swiftci import reports, stages

    report = json.loads((train_dir / "train_report.json").read_text())
    report["files"] = stages.record_files(train_dir, sorted({k.split("/", 1)[0] for k in report["files"]}))
    report["files_sha256"] = stages.files_digest(report["files"])
    reports.write_json(train_dir / "train_report.json", report)


# --- rollouts against the fake cluster ------------------------------------------------------------------------------

DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def prebuilt_config(tiny_model, tmp_path, registry_host, openai, **extra) -> Path:
    section = {"target": "kubernetes", "engine": "lmdeploy", "engine_image": "example.invalid/lmdeploy:v0.10.2",
               "image": f"{registry_host}/bot", "namespace": NS, "name": "bot", "replicas": 2, "gpus": 1,
               "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
               "smoke": {"url": openai.url, "prompts": [{"prompt": "reverse: ship", "expect": ["pihs"]}]},
               "timeouts": {"rollout_seconds": 20, "smoke_seconds": 20}}
    section.update(extra)
    cfg = tiny_config(tiny_model, tmp_path / "out", deploy=section)
    for key in ("train", "evaluate", "quantize"):
        cfg.pop(key)
    return write_config(tmp_path / "swiftci.yaml", cfg)


def ship(cfg, cluster, digest, *args):
    return swiftci_in_process("deploy", "-c", str(cfg), "--image", f"registry.example/bot@{digest}", *args,
                   env={"KUBECONFIG": cluster.kubeconfig_path})


def test_pods_that_never_become_ready_are_rolled_back(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    cluster.controller_state.crashing.add(DIGEST_B)
    proc = ship(cfg, cluster, DIGEST_B)
    assert proc.returncode == 3, proc.stderr
    assert "CrashLoopBackOff" in proc.stderr and "rolled back" in proc.stderr
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}"
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "rolled_back" and report["rollout"]["rollback"]["to"] == DIGEST_A
    assert [e["status"] for e in history(cluster, "bot")] == ["good", "rolled_back"]


def test_a_failing_smoke_test_is_rolled_back(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    openai.broken = True
    proc = ship(cfg, cluster, DIGEST_B)
    assert proc.returncode == 1, proc.stderr
    assert "smoke test failed" in proc.stderr and "lacks ['pihs']" in proc.stderr
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}"
    md = (tmp_path / "out/deploy/deploy_report.md").read_text()
    assert "❌ **ROLLED BACK**" in md and "| `reverse: ship` | I cannot help with that |" in md


def test_the_same_digest_twice_changes_nothing(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    writes = len([r for r in cluster.requests if r[0] in ("PATCH", "PUT", "POST", "DELETE")])
    proc = ship(cfg, cluster, DIGEST_A)
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "out/deploy/deploy_report.json")["status"] == "unchanged"
    assert len([r for r in cluster.requests if r[0] in ("PATCH", "PUT", "POST", "DELETE")]) == writes


def test_an_api_error_in_the_middle_of_a_rollout_still_rolls_back(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    cluster.fail("PATCH", "/services/bot")  # the Deployment with B is applied, then the API server answers 500
    proc = ship(cfg, cluster, DIGEST_B)
    assert proc.returncode == 3, proc.stderr
    assert "500" in proc.stderr and "rolled back" in proc.stderr
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}", "B must not stay in service"
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "rolled_back" and report["rollout"]["rollback"] == {
        **report["rollout"]["rollback"], "to": DIGEST_A, "ok": True}
    assert [e["status"] for e in history(cluster, "bot")] == ["good", "rolled_back"]


def test_a_failed_first_deploy_is_taken_out_of_service(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    cluster.controller_state.crashing.add(DIGEST_A)
    proc = ship(cfg, cluster, DIGEST_A)
    assert proc.returncode == 3 and "CrashLoopBackOff" in proc.stderr, proc.stderr
    assert cluster.get("deployments", NS, "bot")["spec"]["replicas"] == 0
    assert [e["status"] for e in history(cluster, "bot")] == ["rolled_back"]


def test_a_deployment_changed_by_hand_is_restored_even_without_history(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    dep = cluster.get("deployments", NS, "bot")
    dep["metadata"]["annotations"].pop("swiftci.dev/history")  # e.g. someone re-applied it with kubectl
    cluster.put("deployments", dep)
    openai.broken = True
    assert ship(cfg, cluster, DIGEST_B).returncode == 1
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}"


def test_the_same_digest_with_a_new_spec_is_applied(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    more = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, replicas=3)
    proc = ship(more, cluster, DIGEST_A)
    assert proc.returncode == 0, proc.stderr
    assert read_json(tmp_path / "out/deploy/deploy_report.json")["status"] == "deployed"
    assert cluster.get("deployments", NS, "bot")["spec"]["replicas"] == 3


def test_canary_is_promoted(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    canary_cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, strategy="canary",
                                 replicas=4, canary={"percent": 25})
    proc = ship(canary_cfg, cluster, DIGEST_B)
    assert proc.returncode == 0, proc.stderr
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["canary"] == {**report["canary"], "replicas": 1, "stable_replicas": 4, "result": "promoted"}
    canary_applies = [r for r in cluster.requests if r[1].endswith("/deployments/bot-canary")]
    assert canary_applies[0][0] == "PATCH" and canary_applies[-1][0] == "DELETE"
    assert cluster.get("deployments", NS, "bot-canary") is None
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_B}"
    service = cluster.get("services", NS, "bot")
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "bot"}, "the Service selects both tracks"


def test_canary_is_aborted_and_stable_untouched(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    stable_generation = cluster.get("deployments", NS, "bot")["metadata"]["generation"]
    openai.broken = True
    canary_cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, strategy="canary",
                                 canary={"replicas": 1})
    proc = ship(canary_cfg, cluster, DIGEST_B)
    assert proc.returncode == 1 and "the canary was removed" in proc.stderr
    assert cluster.get("deployments", NS, "bot-canary") is None
    stable = cluster.get("deployments", NS, "bot")
    assert stable["metadata"]["generation"] == stable_generation, "the stable pods were never touched"
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}"
    assert [e["status"] for e in history(cluster, "bot")] == ["good", "canary_aborted"]


def test_a_canary_that_never_becomes_ready_is_removed(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    generation = cluster.get("deployments", NS, "bot")["metadata"]["generation"]
    cluster.controller_state.crashing.add(DIGEST_B)
    canary_cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, strategy="canary",
                                 canary={"replicas": 1})
    proc = ship(canary_cfg, cluster, DIGEST_B)
    assert proc.returncode == 3 and "canary rollout failed" in proc.stderr, proc.stderr
    assert cluster.get("deployments", NS, "bot-canary") is None
    assert cluster.get("deployments", NS, "bot")["metadata"]["generation"] == generation
    assert [e["status"] for e in history(cluster, "bot")] == ["good", "canary_aborted"]


@pytest.mark.parametrize("only_ship,code,result", [(False, 0, "promoted"), (True, 1, "aborted")])
def test_canary_scored_with_the_evaluate_gates_through_its_endpoint(tiny_model, tmp_path, cluster, openai, only_ship,
                                                                     code, result):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    doc = yaml.safe_load(cfg.read_text())
    doc["deploy"].update(strategy="canary", canary={"replicas": 1, "evaluate": True, "tasks": ["tiny_reverse"]})
    doc["evaluate"] = tiny_config(tiny_model, tmp_path / "out")["evaluate"] | {"limit": 20, "gates": [
        {"metric": "tiny_reverse/exact_match", "min": 0.9}]}
    write_config(cfg, doc)
    openai.only_ship = only_ship
    proc = ship(cfg, cluster, DIGEST_B)
    assert proc.returncode == code, proc.stderr[-3000:]
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["canary"]["result"] == result
    scored = read_json(tmp_path / "out/deploy/canary-eval/eval_report.json")
    assert scored["model"]["kind"] == "endpoint" and scored["tasks"]["tiny_reverse"]["samples"] == 20
    assert scored["metrics"]["tiny_reverse"]["exact_match"]["value"] == (0.0 if only_ship else 1.0)
    assert len(openai.requests) >= 21  # the smoke prompt and 20 scored prompts went through the endpoint
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_B if not only_ship else DIGEST_A}"


def test_rollback_on_request_returns_to_the_last_good_revision(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    assert ship(cfg, cluster, DIGEST_A).returncode == 0
    assert ship(cfg, cluster, DIGEST_B).returncode == 0
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--rollback", env={"KUBECONFIG": cluster.kubeconfig_path})
    assert proc.returncode == 0, proc.stderr
    assert deployed_image(cluster, "bot") == f"registry.example/bot@{DIGEST_A}"
    assert [(e["status"], e["digest"]) for e in history(cluster, "bot")][-1] == ("good", DIGEST_A)


def test_a_second_rollback_keeps_going_back(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai)
    digest_c = "sha256:" + "c" * 64
    for digest in (DIGEST_A, DIGEST_B, digest_c):
        assert ship(cfg, cluster, digest).returncode == 0
    for expected in (DIGEST_B, DIGEST_A):
        proc = swiftci_in_process("deploy", "-c", str(cfg), "--rollback", env={"KUBECONFIG": cluster.kubeconfig_path})
        assert proc.returncode == 0, proc.stderr
        assert deployed_image(cluster, "bot") == f"registry.example/bot@{expected}"
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--rollback", env={"KUBECONFIG": cluster.kubeconfig_path})
    assert proc.returncode == 2 and "no good revision before the current one" in proc.stderr


def test_manifests_validate_strictly_and_bad_ones_stop_before_the_cluster(tiny_model, tmp_path, cluster, openai):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai,
                          resources={"requets": {"cpu": "2"}})
    proc = ship(cfg, cluster, DIGEST_A)
    assert proc.returncode == 3
    assert "do not validate against Kubernetes 1.33" in proc.stderr and "requets" in proc.stderr
    assert cluster.requests == [], "nothing may reach the cluster"


def test_rendered_manifests(tiny_model, tmp_path, cluster, openai):
    """Probes, security context, GPU limits and the PodDisruptionBudget, as rendered and validated."""
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, replicas=3, gpus=2,
                          node_selector={"gpu": "a100"},
                          tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--image", f"registry.example/bot@{DIGEST_A}", "--dry-run",
                   env={"KUBECONFIG": cluster.kubeconfig_path})
    assert proc.returncode == 0, proc.stderr
    assert cluster.requests == [], "--dry-run touches no cluster"
    docs = list(yaml.safe_load_all((tmp_path / "out/deploy/manifests.yaml").read_text()))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "PodDisruptionBudget"]
    pod = docs[0]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == f"registry.example/bot@{DIGEST_A}"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2" and c["resources"]["requests"]["memory"] == "8Gi"
    assert c["startupProbe"]["httpGet"]["path"] == "/health" and c["startupProbe"]["failureThreshold"] >= 180
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "privileged": False,
                                    "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["nodeSelector"] == {"gpu": "a100"}
    assert docs[2]["spec"]["maxUnavailable"] == 1
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "dry_run" and report["plan"]
    import kubernetes_validate

    for d in docs:
        kubernetes_validate.validate(d, "1.33", strict=True)


def test_dry_run_writes_the_dockerfile_and_touches_no_registry(trained, tiny_model, tmp_path, cluster, openai,
                                                              registry):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, evaluate=None, deploy={
        "target": "kubernetes", "engine": "vllm", "engine_image": "vllm/vllm-openai:v0.11.0",
        "image": f"{registry['host']}/dry", "namespace": NS, "model": "merged",
        "smoke": {"url": openai.url}})
    before = registry_blobs(registry)
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run", env={"KUBECONFIG": cluster.kubeconfig_path})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out/deploy"
    dockerfile = (out / "Dockerfile").read_text()
    assert "FROM vllm/vllm-openai:v0.11.0" in dockerfile
    assert 'ENTRYPOINT ["vllm", "serve", "/models/tiny-reverse"' in dockerfile
    assert "COPY --chown=1000:1000 model/model.safetensors /models/tiny-reverse/model.safetensors" in dockerfile
    assert (out / "manifests.yaml").is_file() and registry_blobs(registry) == before and cluster.requests == []


@pytest.mark.parametrize("section,message", [
    ({"engine_image": "vllm/vllm-openai:latest"}, "deploy.engine_image: 'vllm/vllm-openai:latest' is not pinned"),
    ({"image": "reg/bot:v1"}, "deploy.image: give the repository only"),
    ({"strategy": "canary"}, "deploy.canary: set exactly one of `canary.replicas` or `canary.percent`"),
    ({"engine": "vllm", "gpus": 0}, "deploy.gpus: vllm needs a GPU per pod"),
    ({"image": None}, "deploy.image: required for target kubernetes"),
    ({"strategy": "canary", "canary": {"replicas": 1, "evaluate": True}, "smoke": {"url": None}},
     "deploy.canary: `canary.evaluate` scores the gates through the canary's endpoint, so it needs `smoke.url`"),
])
def test_deploy_config_errors(tiny_model, tmp_path, openai, section, message):
    cfg = prebuilt_config(tiny_model, tmp_path, "registry.example", openai, **section)
    proc = swiftci("validate", "-c", str(cfg))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


# --- target local ------------------------------------------------------------------------------------------------------


def test_local_target_serves_the_model_and_answers_the_smoke_prompts(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, evaluate=None, deploy={
        "target": "local", "engine": "transformers", "model": "merged",
        "smoke": {"prompts": [{"prompt": "reverse: ship", "expect": ["pihs"]},
                              {"prompt": "reverse: code", "expect": ["edoc"]}]}})
    proc = swiftci_in_process("deploy", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "served" and report["smoke"]["passed"]
    assert [r["answer"] for r in report["smoke"]["results"]] == ["pihs", "edoc"]
    assert report["local"]["url"].startswith("http://127.0.0.1:")
    import requests

    with pytest.raises(requests.ConnectionError):  # the server was stopped
        requests.get(report["local"]["url"].removesuffix("/v1") + "/health", timeout=2)


def test_local_smoke_failure_is_exit_1(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, evaluate=None, deploy={
        "target": "local", "engine": "transformers", "model": "merged",
        "smoke": {"prompts": [{"prompt": "reverse: ship", "expect": ["ship"]}]}})
    proc = swiftci_in_process("deploy", "-c", str(cfg))
    assert proc.returncode == 1 and "smoke test failed" in proc.stderr


@pytest.mark.parametrize("eval_report,code,message", [
    (None, 3, "there is no eval report for this model; run `swiftci evaluate` first"),
    ({"passed": True, "status": "passed", "run_id": "tiny-reverse-sft-20260101-0000000"}, 3,
     "there is no eval report for this model"),  # an earlier run's report says nothing about this model
    ({"passed": False, "status": "failed", "run_id": None}, 1, "refuses a model whose evaluation did not pass"),
])
def test_deploy_fails_closed_on_the_eval_report(trained, tiny_model, tmp_path, eval_report, code, message):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, deploy={
        "target": "local", "engine": "transformers", "model": "merged"})
    if eval_report is not None:
        (tmp_path / "out/evaluate").mkdir(parents=True)
        (tmp_path / "out/evaluate/eval_report.json").write_text(json.dumps({"version": 1, **eval_report}))
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run")
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "failed" and message in report["error"]["reason"] and report["error"]["hint"]


@pytest.mark.skipif(not os.environ.get("SWIFTCI_TEST_KUBE_CONTEXT"),
                    reason="opt-in: set SWIFTCI_TEST_KUBE_CONTEXT to a real cluster's kubeconfig context")
def test_real_cluster(trained, tiny_model, tmp_path):
    """Against a real cluster (the project's CI runs it on kind): build with docker, push to the registry named in
    SWIFTCI_TEST_REGISTRY, roll out the CPU engine, smoke-test through a port-forward, deploy the same digest again
    (unchanged), deploy a second build, then roll back on request to the first one."""
    registry_host = os.environ["SWIFTCI_TEST_REGISTRY"]
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, evaluate=None, deploy={
        "target": "kubernetes", "engine": "transformers", "engine_image": os.environ["SWIFTCI_TEST_ENGINE_IMAGE"],
        "image": f"{registry_host}/tiny-reverse", "insecure_registry": True, "model": "merged",
        "context": os.environ["SWIFTCI_TEST_KUBE_CONTEXT"], "namespace": "default", "gpus": 0, "replicas": 1,
        "resources": {"requests": {"cpu": "500m", "memory": "2Gi"}},
        "smoke": {"prompts": [{"prompt": "reverse: ship", "expect": ["pihs"]}]},
        "timeouts": {"rollout_seconds": 900, "startup_seconds": 600}})
    report_path = tmp_path / "out/deploy/deploy_report.json"
    first = swiftci("deploy", "-c", str(cfg))
    assert first.returncode == 0, first.stderr[-4000:]
    first_digest = read_json(report_path)["image_digest"]
    again = swiftci("deploy", "-c", str(cfg))
    assert again.returncode == 0 and read_json(report_path)["status"] == "unchanged"
    # a second build: another run id is another image label, so another digest
    train_report = tmp_path / "out/train/train_report.json"
    train_report.write_text(json.dumps({**read_json(train_report), "run_id": "tiny-reverse-sft-20260101-second"}))
    second = swiftci("deploy", "-c", str(cfg))
    assert second.returncode == 0, second.stderr[-4000:]
    assert read_json(report_path)["status"] == "deployed" and read_json(report_path)["image_digest"] != first_digest
    back = swiftci("deploy", "-c", str(cfg), "--rollback")
    assert back.returncode == 0, back.stderr[-4000:]
    report = read_json(report_path)
    assert report["status"] == "rolled_back_by_request" and report["image_digest"] == first_digest


def test_a_port_forward_that_cannot_open_is_reported_and_closed(cluster, monkeypatch):
    """The smoke test's port-forward (used when `smoke.url` is unset) through the real client when the API server
    refuses the stream (the fake serves no pods/portforward, as an RBAC refusal would): the connection is closed,
    the reason recorded, nothing hangs."""
    from swiftci.deploy import kube
    from swiftci.deploy.portforward import forward

    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig_path)
    with forward(kube.Cluster(None), NS, "bot-abc", 8000) as fw:
        host, port = fw.url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as conn:
            conn.settimeout(10)
            assert conn.recv(1) == b"", "the refused connection is closed, not left hanging"
        assert fw.errors and f"port-forward to {NS}/bot-abc:8000" in fw.errors[0], fw.errors
    assert any(p.endswith("/pods/bot-abc/portforward") for _, p, _ in cluster.requests)
