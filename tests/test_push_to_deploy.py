"""The headline path, run for real with act: workflows/push-to-deploy.yml copied, unchanged, into a model repository
(the tiny example), on pushes to its default branch. The pipeline trains, evaluates and quantizes; the deploy job
builds the image with buildah into a local registry, logs in with the workflow's registry inputs, reads the
kubeconfig from the `KUBECONFIG` secret and rolls out against the fake API server of tests/fakes, the smoke test
answered by a real `transformers serve` of the quantized model standing in for the vLLM pods (`smoke.url`; vLLM
cannot run on these CPU machines, and the OpenAI API it serves is the same).

What must not ship, in the same harness: a failing gate (no deploy job), a failing smoke test (rolled back, the
workflow fails with the deploy job's exit code), a workflow_dispatch and a push to another branch (no deploy job).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY
from test_actions import act, act_repo  # noqa: F401 (act_repo: the fixture, shared with test_actions)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NS = "ml"


class ModelRepo:
    """A model repository as a user sets it up: the workflow copied from workflows/, swiftci.yaml, data and tasks."""

    def __init__(self, root: Path, tiny_model: Path):
        self.root, self.tiny_model = root, tiny_model
        (root / ".github/workflows").mkdir(parents=True)
        shutil.copy(ROOT / "workflows/push-to-deploy.yml", root / ".github/workflows/swiftci.yml")
        shutil.copytree(TINY / "data", root / "data")
        shutil.copytree(TINY / "tasks", root / "tasks")
        self.git("init", "-q", "-b", "main")
        self.git("remote", "add", "origin", "https://github.com/acme/model-repo.git")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", *args],
                              cwd=self.root, check=True, capture_output=True, text=True).stdout.strip()

    def commit(self, config: dict, message: str) -> str:
        (self.root / "swiftci.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.git("add", "-A")
        self.git("commit", "-qm", message)
        return self.git("rev-parse", "HEAD")


def swiftci_yaml(tiny_model: Path, registry: dict, engine_image: str, smoke_url: str, *, lr: float = 2e-3,
                 gate_min: float = 0.0, expect: list[str] | None = None, stages=("evaluate", "quantize")) -> dict:
    cfg = yaml.safe_load((TINY / "swiftci.yaml").read_text())
    cfg["model"]["id"] = str(tiny_model)  # on a real runner: a hub id with a pinned revision
    cfg["train"].update(max_steps=30, save_steps=1000, learning_rate=lr)
    cfg["evaluate"].update(limit=10, gates=[{"metric": "tiny_reverse/exact_match", "min": gate_min}])
    cfg["quantize"].update(calibration={"samples": 16, "max_length": 64},
                           gates={"max_ppl_increase_pct": 1000, "reuse_eval_gates": False, "perplexity_samples": 10})
    for stage in ("evaluate", "quantize"):
        if stage not in stages:
            cfg.pop(stage)
    cfg["deploy"] = {"target": "kubernetes", "engine": "vllm", "engine_image": engine_image,
                     "image": f"{registry['host']}/tiny-reverse", "builder": "buildah", "insecure_registry": True,
                     "namespace": NS, "gpus": 1, "replicas": 1,
                     "smoke": {"url": smoke_url, "prompts": [{"prompt": "reverse: ship", "expect": expect or []}],
                               "latency_budget_ms": 30000},
                     "timeouts": {"rollout_seconds": 60, "smoke_seconds": 180, "startup_seconds": 120}}
    return cfg


class ServeWhatShips:
    """Stands in for the new pods' engine: whenever quantize hands a model to the store, a real `transformers serve`
    of a copy of it answers on `url` (the one before it is stopped), under the name vLLM pods serve it by (the
    deployment's name: a folder of that name in the server's working directory)."""

    def __init__(self, store: Path, work: Path):
        self.store, self.work = store, work
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.served: list[Path] = []
        self.proc: subprocess.Popen | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            for config in self.store.glob("acme/model-repo/*/quantize/model/config.json"):
                folder = config.parent
                if folder not in self.served and (folder.parent / "quantize_report.json").is_file():
                    self._serve(folder)

    def _serve(self, folder: Path) -> None:
        self.served.append(folder)
        cwd = self.work / f"served-{len(self.served)}"
        shutil.copytree(folder, cwd / "tiny-reverse")
        self.close_server()
        home = self.work / f"hf-home-{len(self.served)}"
        (home / "hub").mkdir(parents=True)
        cli = Path(sys.executable).parent / "transformers"
        self.proc = subprocess.Popen(
            [str(cli), "serve", "tiny-reverse", "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu"],
            env={**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
            stderr=open(self.work / f"serve-{len(self.served)}.log", "w"), start_new_session=True, cwd=cwd)

    def close_server(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.close_server()


def push_event(ref: str = "refs/heads/main") -> dict:
    return {"ref": ref, "repository": {"full_name": "acme/model-repo", "name": "model-repo", "owner": {"login": "acme"},
                                       "default_branch": "main", "private": True}}


def run_workflow(act_repo: Path, repo: ModelRepo, work: Path, cluster, containers_env, registry, store: Path,
                 event: str = "push", event_json: dict | None = None):
    return act(repo.root, work, event, ".github/workflows/swiftci.yml", event_json=event_json or push_event(),
               variables={"SWIFTCI_MODEL_STORE": str(store), "SWIFTCI_REGISTRY": registry["host"]},
               env={**containers_env},
               secrets={"KUBECONFIG": Path(cluster.kubeconfig_path).read_text(), "REGISTRY_TOKEN": "registry-token-9x8y",
                        "HF_TOKEN": "hf_not_needed_for_a_local_model_0000", "GITHUB_TOKEN": "ghs_readonly_token_00000"},
               platforms=("self-hosted", "gpu"), swiftci_repo=act_repo)


def live_image(cluster) -> str | None:
    dep = cluster.get("deployments", NS, "tiny-reverse")
    return dep["spec"]["template"]["spec"]["containers"][0]["image"] if dep else None


def registry_digest(registry: dict, tag: str, containers_env: dict) -> str:
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--format", "{{.Digest}}",
                           f"docker://{registry['host']}/tiny-reverse:{tag}"], capture_output=True, text=True,
                          env={**os.environ, **containers_env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_pushes_to_the_default_branch_ship_what_passed_and_nothing_else(act_repo, tiny_model, tmp_path, cluster,
                                                                       registry, containers_env, engine_image):
    store = tmp_path / "store"
    store.mkdir()
    repo = ModelRepo(tmp_path / "model-repo", tiny_model)
    serve = ServeWhatShips(store, tmp_path)
    try:
        # 1. a gate fails: the pipeline stops at evaluate, no deploy job runs, and the summary says why
        repo.commit(swiftci_yaml(tiny_model, registry, engine_image, serve.url, gate_min=1.1), "strict gate")
        code, log = run_workflow(act_repo, repo, tmp_path / "gate", cluster, containers_env, registry, store)
        assert code == 1, log[-6000:]
        assert "Summary - ### swiftci evaluate" in log and "❌ **FAIL** — 1 of 1 gates failed" in log
        assert "::group::swiftci deploy" not in log and live_image(cluster) is None
        assert not [r for r in cluster.requests if r[0] in ("PATCH", "PUT", "POST")], "nothing reached the cluster"

        # 2. every gate passes: train → evaluate → quantize → deploy, by digest, smoke-tested by the real server
        sha = repo.commit(swiftci_yaml(tiny_model, registry, engine_image, serve.url), "lenient gates")
        code, log = run_workflow(act_repo, repo, tmp_path / "ship", cluster, containers_env, registry, store)
        assert code == 0, log[-8000:]
        for stage in ("train", "evaluate", "quantize", "deploy"):
            assert f"Summary - ### swiftci {stage}" in log, stage
        assert "✅ **DEPLOYED**" in log
        digest = registry_digest(registry, sha, containers_env)  # the image is tagged with the commit
        assert live_image(cluster) == f"{registry['host']}/tiny-reverse@{digest}"
        assert "registry-token-9x8y" not in log
        (report_path,) = (tmp_path / "ship/artifacts").glob("swiftci-reports-deploy-*/deploy_report.json")
        report = json.loads(report_path.read_text())
        assert report["status"] == "deployed" and report["image_digest"] == digest
        (quantized,) = store.glob(f"acme/model-repo/*-{sha[:7]}-*/quantize/quantize_report.json")
        assert image_label(registry, digest, containers_env, "dev.swiftci.model-sha256") == \
            json.loads(quantized.read_text())["files_sha256"], "the image holds the files quantize handed on"
        assert serve.served, "the smoke test was answered by the served quantized model"

        # 3. a new model whose smoke test fails: rolled back to the one before, and the workflow fails with exit 1
        repo.commit(swiftci_yaml(tiny_model, registry, engine_image, serve.url, lr=1e-3, expect=["zzzz"]), "bad")
        code, log = run_workflow(act_repo, repo, tmp_path / "smoke", cluster, containers_env, registry, store)
        assert code == 1, log[-6000:]
        assert "smoke test failed" in log and "rolled back" in log and "exit-code=1" in log
        assert live_image(cluster) == f"{registry['host']}/tiny-reverse@{digest}", "the earlier release serves again"
        history = json.loads(cluster.get("deployments", NS, "tiny-reverse")["metadata"]["annotations"][
            "swiftci.dev/history"])
        assert [e["status"] for e in history] == ["good", "rolled_back"]
    finally:
        serve.close()


def image_label(registry: dict, digest: str, containers_env: dict, label: str) -> str:
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{registry['host']}/tiny-reverse@{digest}"],
                          capture_output=True, text=True, env={**os.environ, **containers_env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["Labels"][label]


def test_a_dispatch_or_a_push_to_another_branch_deploys_nothing(act_repo, tiny_model, tmp_path, cluster, registry,
                                                                containers_env, engine_image):
    """act runs a workflow whatever its `branches:` filter says: the deploy job's own condition is what is tested."""
    store = tmp_path / "store"
    store.mkdir()
    repo = ModelRepo(tmp_path / "model-repo", tiny_model)
    repo.commit(swiftci_yaml(tiny_model, registry, engine_image, "http://127.0.0.1:9/v1", stages=()), "train only")
    for name, event, ref in (("dispatch", "workflow_dispatch", "refs/heads/main"),
                             ("feature", "push", "refs/heads/feature")):
        code, log = run_workflow(act_repo, repo, tmp_path / name, cluster, containers_env, registry, store, event=event,
                                 event_json=push_event(ref))
        assert code == 0, log[-6000:]
        assert "Summary - ### swiftci train" in log and "::group::swiftci deploy" not in log, name
    assert live_image(cluster) is None and not [r for r in cluster.requests if r[0] in ("PATCH", "PUT", "POST")]
