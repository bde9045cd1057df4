"""train.launcher: kubernetes — the job manifests against the engines' published CRD schemas, and submit / follow /
fail / time out against the fake API server of tests/fakes (the real `kubernetes` client, over HTTP)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import read_json, swiftci_in_process, tiny_config, write_config

from swiftci import config, kubetrain, stages
from swiftci.errors import StageError

KUBE = {"launcher": "kubernetes", "kubernetes": {
    "namespace": "training", "image": "acme/swiftci-train:0.1.0", "num_nodes": 2, "gpus_per_node": 8,
    "cpu": "16", "memory": "200Gi", "service_account": "trainer", "env": {"HF_HOME": "/workspace/.cache"},
    "volume": {"claim": "model-store", "mount_path": "/workspace", "config": "tiny/swiftci.yaml"}}}


@pytest.fixture
def kube(tmp_path):
    """The fake API server; a test sets `job_controller` to the engine's behaviour it wants."""
    from fakes.kube_api import FakeKubeAPI

    api = FakeKubeAPI()
    api.kubeconfig_path = api.kubeconfig(tmp_path / "kubeconfig")
    yield api
    api.close()


def kube_config(tmp_path: Path, tiny_model: Path, api: str = "trainjob", **kubernetes) -> Path:
    train = {**KUBE, "kubernetes": {**KUBE["kubernetes"], "api": api, **kubernetes}}
    cfg = tiny_config(tiny_model, tmp_path / "out", train=train, evaluate=None, quantize=None, deploy=None)
    cfg["output_dir"] = "out"  # relative: on the volume it lies beside the config too
    return write_config(tmp_path / "swiftci.yaml", cfg)


def train(cfg: Path, kube, *args: str):
    return swiftci_in_process("train", "-c", str(cfg), *args, env={"KUBECONFIG": kube.kubeconfig_path})


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_dry_run_writes_manifests_that_validate_and_calls_no_api(tmp_path, tiny_model, kube, api):
    cfg = kube_config(tmp_path, tiny_model, api)
    proc = train(cfg, kube, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path / "out" / "train" / f"{'trainjob' if api == 'trainjob' else 'pytorchjob'}.yaml"
    assert f"manifest: {path}" in proc.stdout
    manifest = yaml.safe_load(path.read_text())
    kubetrain.validate(manifest, kubetrain.APIS[api])  # the published schema, unknown fields refused
    assert kube.requests == []  # nothing submitted, not even a read
    assert not (tmp_path / "out" / "train" / "train_report.json").exists()
    command = ["torchrun", "--module", "swiftci", "train", "-c", "/workspace/tiny/swiftci.yaml", "--on", "local"]
    gpus = {"requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"}, "limits": {"nvidia.com/gpu": "8"}}
    volume = {"name": "model-store", "persistentVolumeClaim": {"claimName": "model-store"}}
    mount = {"name": "model-store", "mountPath": "/workspace"}
    assert manifest["metadata"]["namespace"] == "training"
    assert manifest["metadata"]["name"].startswith("tiny-reverse-") and len(manifest["metadata"]["name"]) == 21
    if api == "trainjob":
        assert manifest["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and manifest["kind"] == "TrainJob"
        spec = manifest["spec"]
        assert spec["runtimeRef"] == {"name": "torch-distributed", "kind": "ClusterTrainingRuntime",
                                      "apiGroup": "trainer.kubeflow.org"}
        trainer = spec["trainer"]
        assert (trainer["image"], trainer["command"], trainer["numNodes"], trainer["numProcPerNode"]) == (
            "acme/swiftci-train:0.1.0", command, 2, 8)
        assert trainer["resourcesPerNode"] == gpus
        assert {"name": "HF_HOME", "value": "/workspace/.cache"} in trainer["env"]
        [patch] = spec["runtimePatches"]
        [job] = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
        pod = job["template"]["spec"]["template"]["spec"]
        assert (patch["manager"], job["name"]) == ("swiftci", "node")
        assert pod == {"volumes": [volume], "containers": [{"name": "node", "volumeMounts": [mount]}],
                       "serviceAccountName": "trainer"}
    else:
        assert manifest["apiVersion"] == "kubeflow.org/v1" and manifest["kind"] == "PyTorchJob"
        spec = manifest["spec"]
        assert spec["nprocPerNode"] == "8"
        replicas = spec["pytorchReplicaSpecs"]
        assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 1)
        for replica in replicas.values():
            pod = replica["template"]["spec"]
            [container] = pod["containers"]
            assert (container["name"], container["command"], container["resources"]) == ("pytorch", command, gpus)
            assert (pod["volumes"], container["volumeMounts"], pod["serviceAccountName"]) == (
                [volume], [mount], "trainer")


@pytest.mark.parametrize("api", ["trainjob", "pytorchjob"])
def test_a_field_the_published_schema_does_not_know_is_refused(tmp_path, tiny_model, api):
    cfg = config.load(kube_config(tmp_path, tiny_model, api))
    manifest = kubetrain.render(cfg, "tiny-reverse-sft-20261203-abcdef0")
    kubetrain.validate(manifest, kubetrain.APIS[api])
    pod = (manifest["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
           ["template"]["spec"]["template"]["spec"] if api == "trainjob"
           else manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"])
    pod["volumes"][0]["persistentVolumeClaim"]["claim"] = "typo"
    with pytest.raises(StageError, match=r"volumes\.0\.persistentVolumeClaim: Additional properties are not "
                                         r"allowed \('claim' was unexpected\)"):
        kubetrain.validate(manifest, kubetrain.APIS[api])


def test_submit_and_follow_to_success(tmp_path, tiny_model, kube):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("succeeded", lines=4, nodes=2)
    cfg = kube_config(tmp_path, tiny_model, "trainjob")
    proc = train(cfg, kube, "--on", "kubernetes")
    assert proc.returncode == 0, proc.stderr
    for step in range(1, 5):  # rank 0's log, streamed; never another rank's
        assert f"rank 0: step {step}/4" in proc.stdout
    assert "rank 1:" not in proc.stdout
    report = read_json(tmp_path / "out" / "train" / "train_report.json")
    submitted = yaml.safe_load((tmp_path / "out" / "train" / "trainjob.yaml").read_text())
    name = submitted["metadata"]["name"]
    assert (report["status"], report["launcher"], report["job"]["name"], report["job"]["status"]) == (
        "ok", "kubernetes", name, "ok")
    assert report["remote"] == {"volume": "model-store", "mount_path": "/workspace",
                                "stage_dir": "/workspace/tiny/out/train",
                                "report": "/workspace/tiny/out/train/train_report.json",
                                "lineage": "/workspace/tiny/out/train/run.json"}
    assert kube.get("trainjobs", "training", name)["spec"] == submitted["spec"]
    assert [r[:2] for r in kube.requests if r[0] == "POST"] == [
        ("POST", "/apis/trainer.kubeflow.org/v1alpha1/namespaces/training/trainjobs")]
    # the finish notification names the job, and claims no loss it did not see
    from swiftci.notify import finish_message

    fields = dict(finish_message(config.load(cfg), {"train": report}).fields)
    assert fields["job"] == f"TrainJob training/{name}" and "loss" not in fields
    # a later stage on this machine is told where the model is
    with pytest.raises(StageError, match="volume model-store at /workspace/tiny/out/train"):
        stages.produced(config.load(cfg), "train")


@pytest.mark.parametrize("rank0_exit, expected", [(1, 3), (4, 4)])
def test_a_failed_job_fails_the_run_with_its_message(tmp_path, tiny_model, kube, rank0_exit, expected):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("failed", lines=2, exit_code=rank0_exit,
                                             message="jobset node failed: pod tiny-node-0-0 exited")
    cfg = kube_config(tmp_path, tiny_model, "pytorchjob", num_nodes=1)
    proc = train(cfg, kube, "--on", "kubernetes")
    assert proc.returncode == expected, proc.stderr
    assert "rank 0: step 2/2" in proc.stdout
    assert "failed: FailedJobs: jobset node failed: pod tiny-node-0-0 exited" in proc.stderr
    report = read_json(tmp_path / "out" / "train" / "train_report.json")
    assert (report["status"], report["job"]["status"], report["job"]["rank0_exit_code"]) == (
        "failed", "failed", rank0_exit)
    assert report["error"]["kind"] == ("Diverged" if expected == 4 else "JobFailed")


def test_a_job_that_does_not_end_in_time_fails_the_run(tmp_path, tiny_model, kube):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("hang", lines=1)
    cfg = kube_config(tmp_path, tiny_model, "trainjob", timeouts={"follow_seconds": 2})
    proc = train(cfg, kube)
    assert proc.returncode == 3, proc.stderr
    assert "did not finish within 2 s (train.kubernetes.timeouts.follow_seconds); it is left running" in proc.stderr
    report = read_json(tmp_path / "out" / "train" / "train_report.json")
    assert (report["status"], report["error"]["kind"]) == ("failed", "FollowTimeout")


def test_an_api_server_that_blinks_while_the_job_runs_does_not_fail_it(tmp_path, tiny_model, kube):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("succeeded", lines=3)
    kube.fail("POST", "/trainjobs", code=503, times=2)  # submitting is retried too
    kube.fail("GET", "/trainjobs/", code=503, times=3)
    kube.fail("GET", "/pods", code=500, times=2)
    proc = train(kube_config(tmp_path, tiny_model, "trainjob"), kube)
    assert proc.returncode == 0, proc.stderr
    assert "rank 0: step 3/3" in proc.stdout
    assert [f["times"] for f in kube.faults] == [0, 0, 0]  # every injected failure was met


def test_a_kubeconfig_that_cannot_load_exits_2_before_anything_is_written(tmp_path, tiny_model, kube):
    cfg = kube_config(tmp_path, tiny_model, "trainjob")
    proc = swiftci_in_process("train", "-c", str(cfg), env={"KUBECONFIG": str(tmp_path / "missing")})
    assert proc.returncode == 2, proc.stderr
    assert "train.kubernetes.context: cannot load the kubeconfig" in proc.stderr
    assert not (tmp_path / "out" / "train" / "train_report.json").exists()


def test_a_rerun_follows_the_job_it_submitted_before(tmp_path, tiny_model, kube):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("succeeded", lines=1)
    cfg = kube_config(tmp_path, tiny_model, "trainjob")
    assert train(cfg, kube).returncode == 0
    proc = train(cfg, kube)
    assert proc.returncode == 0, proc.stderr
    assert "already exists (same commit and config): following it" in proc.stdout
    assert len([r for r in kube.requests if r[0] == "POST"]) == 2  # the second POST answered 409
    assert len(kube.list("trainjobs", "training")) == 1


def test_a_job_whose_pods_cannot_start_fails_at_once(tmp_path, tiny_model, kube):
    from fakes.kube_api import TrainingController

    kube.job_controller = TrainingController("cannot_start")
    cfg = kube_config(tmp_path, tiny_model, "trainjob")  # follow_seconds: a day; this must not wait for it
    proc = train(cfg, kube)
    assert proc.returncode == 3, proc.stderr
    assert "failed: CannotStart: pod " in proc.stderr and "ImagePullBackOff: Back-off pulling image" in proc.stderr


@pytest.mark.parametrize("kubernetes, message", [
    ({"image": None}, "train.kubernetes.image: required for train.launcher: kubernetes"),
    ({"volume": None}, "train.kubernetes.volume: required for train.launcher: kubernetes"),
    ({"image": "acme/swiftci-train:latest"}, "train.kubernetes.image: 'acme/swiftci-train:latest' is not pinned"),
    ({"env": {"PET_NNODES": "4"}}, "train.kubernetes.env: PET_NNODES are set by the training runtime"),
    ({"num_proc_per_node": 16}, "train.kubernetes.num_proc_per_node: 16 processes would share 8 GPU(s)"),
    ({"volume": {"claim": "model-store", "mount_path": "workspace"}},
     "train.kubernetes.volume.mount_path: must be an absolute path"),
])
def test_a_bad_cluster_config_exits_2_naming_the_field(tmp_path, tiny_model, kube, kubernetes, message):
    cfg = kube_config(tmp_path, tiny_model, "trainjob", **kubernetes)
    proc = train(cfg, kube)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert kube.requests == []


def test_dry_run_needs_the_kubernetes_launcher(tmp_path, tiny_model, kube):
    cfg = kube_config(tmp_path, tiny_model, "trainjob")
    proc = train(cfg, kube, "--on", "local", "--dry-run")
    assert proc.returncode == 2
    assert "--dry-run renders the cluster job; add --on kubernetes" in proc.stderr


def train_step(tmp_path: Path, **env: str):
    """The Train step of actions/train as a composite action runs it (bash -eo pipefail), with a stand-in `swiftci`
    that records its arguments and the kubeconfig it was given."""
    import os
    import stat
    import subprocess

    from conftest import ROOT

    action = yaml.safe_load((ROOT / "actions" / "train" / "action.yml").read_text())
    step = next(s for s in action["runs"]["steps"] if s.get("id") == "run")
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "swiftci"
    stub.write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$RUNNER_TEMP/args"\n'
                    'cp "$KUBECONFIG" "$RUNNER_TEMP/seen-kubeconfig"\nstat -c %a "$KUBECONFIG" > "$RUNNER_TEMP/mode"\n'
                    'echo "$KUBECONFIG" > "$RUNNER_TEMP/path"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "runner").mkdir()
    full = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "GITHUB_ACTION_PATH": str(ROOT / "actions" / "train"),
            "GITHUB_OUTPUT": str(tmp_path / "output"), "RUNNER_TEMP": str(tmp_path / "runner"),
            "SWIFTCI_CONFIG": "swiftci.yaml", "SWIFTCI_SET": "", "SWIFTCI_OUTPUT_DIR": "", "SWIFTCI_RESUME": "false",
            **env}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], env=full,
                          capture_output=True, text=True, cwd=tmp_path)
    runner = tmp_path / "runner"
    return proc, runner


def test_the_train_action_hands_a_kubeconfig_secret_over_masked_in_a_private_file(tmp_path):
    secret = "apiVersion: v1\nusers:\n- name: ci\n  user:\n    token: sk-cluster-token-5f4e3d\n"
    proc, runner = train_step(tmp_path, SWIFTCI_LAUNCHER="kubernetes", KUBECONFIG_DATA=secret)
    assert proc.returncode == 0, proc.stderr
    assert runner.joinpath("args").read_text().split("\n")[:4] == ["train", "-c", "swiftci.yaml", "--on"]
    assert "kubernetes" in runner.joinpath("args").read_text().split("\n")
    assert runner.joinpath("seen-kubeconfig").read_text().rstrip("\n") == secret.rstrip("\n")
    assert runner.joinpath("mode").read_text().strip() == "600"
    assert "::add-mask::    token: sk-cluster-token-5f4e3d" in proc.stdout
    assert not Path(runner.joinpath("path").read_text().strip()).exists()  # removed when the step ends


def test_the_train_action_takes_a_kubeconfig_path_as_it_is(tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\n")
    proc, runner = train_step(tmp_path, SWIFTCI_LAUNCHER="", KUBECONFIG_DATA=str(kubeconfig))
    assert proc.returncode == 0, proc.stderr
    assert runner.joinpath("path").read_text().strip() == str(kubeconfig)
    assert "--on" not in runner.joinpath("args").read_text().split("\n")
    assert "::add-mask::" not in proc.stdout
