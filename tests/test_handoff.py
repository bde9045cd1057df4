"""What crosses a stage or a job is verified, never trusted for where it lies: file records bind the bytes each
stage hands on (a changed file is refused with exit 3, naming it), job outputs anchor the records (`--expect`), and
the store a pipeline hands models through is keyed so that no two runs share a folder and a forged key removes
nothing."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import ROOT, clone_trained, read_json, swiftci_in_process, tiny_config, write_config
from swiftci import config as configlib
from swiftci import ghactions
from swiftci.data import sha256_file

HANDOFF = ROOT / "actions" / "handoff" / "handoff.sh"


def shippable(trained, tiny_model, tmp_path):
    """The shared trained model, evaluated (an eval report that passed and names the train record it checked), set
    up to deploy the merged model locally."""
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=None, deploy={
        "target": "local", "engine": "transformers", "model": "merged"})
    train_report = read_json(tmp_path / "out/train/train_report.json")
    (tmp_path / "out/evaluate").mkdir(parents=True)
    (tmp_path / "out/evaluate/eval_report.json").write_text(json.dumps({
        "version": 2, "stage": "evaluate", "status": "passed", "passed": True, "run_id": train_report["run_id"],
        "verified": {"train": train_report["files_sha256"]}, "metrics": {}, "gates": []}))
    return cfg, train_report


def test_train_records_every_file_it_hands_on(trained):
    from swiftci import stages

    report = read_json(trained.train_dir / "train_report.json")
    files = report["files"]
    assert {p.split("/")[0] for p in files} == {"adapter", "model"}
    assert "model/model.safetensors" in files and "adapter/adapter_model.safetensors" in files
    assert files["model/model.safetensors"] == sha256_file(trained.train_dir / "model/model.safetensors")
    assert report["files_sha256"] == stages.files_digest(files)
    assert not [p for p in files if p.startswith("checkpoints")]


def test_a_model_file_changed_after_evaluation_is_never_shipped(trained, tiny_model, tmp_path):
    cfg, train_report = shippable(trained, tiny_model, tmp_path)
    ok = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run", "--expect", f"train={train_report['files_sha256']}")
    assert ok.returncode == 0, ok.stderr
    shipped = read_json(tmp_path / "out/deploy/deploy_report.json")["model"]
    assert shipped["evaluated_sha256"] == train_report["files_sha256"] and len(shipped["sha256"]) == 64

    with open(tmp_path / "out/train/model/model.safetensors", "r+b") as f:  # one byte, after evaluation
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run")
    assert proc.returncode == 3, proc.stderr
    assert "train/model/model.safetensors has sha256" in proc.stderr and "refusing to load it" in proc.stderr
    report = read_json(tmp_path / "out/deploy/deploy_report.json")
    assert report["status"] == "failed" and report["error"]["kind"] == "ContentMismatch"


def test_a_file_slipped_into_the_model_folder_is_refused(trained, tiny_model, tmp_path):
    cfg, _ = shippable(trained, tiny_model, tmp_path)
    (tmp_path / "out/train/model/extra_layers.py").write_text("import os\n")
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run")
    assert proc.returncode == 3 and "train/model/extra_layers.py was not written by the stage" in proc.stderr


def test_a_rewritten_record_is_caught_by_the_job_outputs_digest(trained, tiny_model, tmp_path):
    """Whoever can write the files can write the report beside them: the digest from the train job's output is
    what the record must match."""
    from swiftci import stages

    cfg, train_report = shippable(trained, tiny_model, tmp_path)
    model = tmp_path / "out/train/model/model.safetensors"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")
    files = {**train_report["files"], "model/model.safetensors": sha256_file(model)}
    forged = {**train_report, "files": files, "files_sha256": stages.files_digest(files)}
    (tmp_path / "out/train/train_report.json").write_text(json.dumps(forged))
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run", "--expect", f"train={train_report['files_sha256']}")
    assert proc.returncode == 3, proc.stderr
    assert "is not the one the train job handed on" in proc.stderr
    bad = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run", "--expect", "train=abc")
    assert bad.returncode == 2 and "--expect train=abc: expected STAGE=SHA256" in bad.stderr


def test_evaluate_refuses_a_changed_adapter_before_loading_anything(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model)
    (tmp_path / "out/train/adapter/adapter_config.json").write_text("{}")
    proc = swiftci_in_process("evaluate", "-c", str(cfg))
    assert proc.returncode == 3, proc.stderr
    assert "train/adapter/adapter_config.json has sha256" in proc.stderr


def test_deploy_refuses_an_eval_report_of_another_train_output(trained, tiny_model, tmp_path):
    cfg, _ = shippable(trained, tiny_model, tmp_path)
    report = read_json(tmp_path / "out/evaluate/eval_report.json")
    report["verified"] = {"train": "0" * 64}
    (tmp_path / "out/evaluate/eval_report.json").write_text(json.dumps(report))
    proc = swiftci_in_process("deploy", "-c", str(cfg), "--dry-run")
    assert proc.returncode == 3 and "scored a different train output" in proc.stderr


# --- the store between jobs ------------------------------------------------------------------------------------


def test_two_configs_with_the_same_name_on_one_commit_never_share_a_store_folder(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    monkeypatch.setenv("GITHUB_WORKSPACE", str(tmp_path))
    keys = set()
    for folder in ("models/a", "models/b"):
        cfg = configlib.load(write_config(tmp_path / folder / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out")))
        keys.add(ghactions.store_key(cfg, "tiny-reverse-sft-20261202-abc1234"))
    monkeypatch.setenv("GITHUB_RUN_ID", "4243")  # another workflow run on the same commit (a schedule, a re-push)
    keys.add(ghactions.store_key(cfg, "tiny-reverse-sft-20261202-abc1234"))
    assert len(keys) == 3 and all(k.startswith("tiny-reverse-sft-20261202-abc1234-424") for k in keys)
    assert ghactions.store_key(cfg, "") == ""


def handoff(action: str, *stages: str, key: str, store, out, fresh: bool = False):
    env = {**os.environ, "STORE": str(store), "REPO": "acme/model-repo", "KEY": key, "OUT_DIR": str(out),
           "FRESH": "true" if fresh else "false"}
    return subprocess.run(["bash", str(HANDOFF), action, *stages], env=env, capture_output=True, text=True)


def test_handoff_moves_outputs_and_replaces_a_rerun(tmp_path):
    store, out, back = tmp_path / "store", tmp_path / "out", tmp_path / "back"
    (out / "train/adapter").mkdir(parents=True)
    (out / "train/adapter/w.safetensors").write_text("w")
    (out / "train/checkpoints/checkpoint-1").mkdir(parents=True)
    run = store / "acme/model-repo/run-1-4242-abc"
    (run / "quantize").mkdir(parents=True)  # an earlier attempt of this run
    assert handoff("put", "train", key="run-1-4242-abc", store=store, out=out, fresh=True).returncode == 0
    assert (run / "train/adapter/w.safetensors").read_text() == "w" and not (run / "train/checkpoints").exists()
    assert not (run / "quantize").exists(), "a re-run leaves nothing of the earlier attempt"
    assert handoff("get", "train", key="run-1-4242-abc", store=store, out=back).returncode == 0
    assert (back / "train/adapter/w.safetensors").read_text() == "w"
    missing = handoff("get", "evaluate", key="run-1-4242-abc", store=store, out=back)
    assert missing.returncode == 2 and "is model-store mounted on this runner" in missing.stderr


@pytest.mark.parametrize("key", ["..", "../../victim", "a/../../victim", "run-1/../../victim", "", "-rf",
                                 "Run-1", "run-1 ../victim", "run..1", "run-1\n/", "$(touch pwned)"])
def test_a_forged_store_key_removes_nothing(tmp_path, key):
    store, out = tmp_path / "store", tmp_path / "out"
    (out / "train").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("keep")
    (store / "acme/model-repo").mkdir(parents=True)
    proc = handoff("put", "train", key=key, store=store, out=out, fresh=True)
    assert proc.returncode != 0
    assert (victim / "keep").read_text() == "keep" and not (tmp_path / "pwned").exists()
    assert not any((store / "acme/model-repo").iterdir()), "nothing was written or removed in the store"
