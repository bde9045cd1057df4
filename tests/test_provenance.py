"""Provenance: hash-checked downloads from fake Hugging Face and ModelScope hubs (the real clients talk to them over
HTTP), fetch for air-gapped runners, model and data pins, `--like` drift checks and `swiftci diff`.

Every hub test runs `swiftci` in a subprocess with an environment built here, not inherited: its own HF_HOME and
MODELSCOPE_CACHE, the fake's endpoint, and no HF_HUB_OFFLINE unless the test sets it. (huggingface_hub reads
HF_ENDPOINT and HF_HUB_OFFLINE once, at import: in-process runs under pytest-xdist would see another test's.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, SWIFTCI, TINY, read_json, swiftci_in_process, tiny_config, write_config

from fakes.hf_hub import FakeHFHub
from fakes.modelscope_hub import FakeModelScope

REPO = "acme/tiny-reverse"
GOLDEN = ROOT / "tests" / "golden"
DIFF_RUNS = ROOT / "tests" / "data" / "diff"
ISOLATED = ("HF_", "HUGGINGFACE_", "MODELSCOPE_", "TRANSFORMERS_", "XDG_CACHE_HOME")


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_cli(*args: str, env: dict, check: int | None = None) -> subprocess.CompletedProcess:
    """The real `swiftci` in a subprocess whose hub settings are exactly `env` (nothing inherited)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(ISOLATED)}
    proc = subprocess.run([*SWIFTCI, *args], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env={**base, "PYTHONUNBUFFERED": "1", **env})
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def small_data(folder: Path, rows: int = 32) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = (TINY / "data/train.jsonl").read_text().splitlines()[:rows]
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def small_config(tmp_path: Path, tiny_model: Path, model: dict | None = None, **extra) -> Path:
    """A training of two steps on 32 rows, no other stage."""
    train = small_data(tmp_path / "data")
    cfg = tiny_config(tiny_model, tmp_path / "out", evaluate=None, quantize=None, deploy=None,
                      data={"train": str(train), "validation": None, "format": "messages"},
                      train={"epochs": 1, "batch_size": 16, "logging_steps": 1, "save_steps": 100}, **extra)
    cfg["data"].pop("validation")
    if model is not None:
        cfg["model"] = model
    return write_config(tmp_path / "swiftci.yaml", cfg)


@pytest.fixture
def hf(tiny_model):
    hub = FakeHFHub(REPO, tiny_model)
    yield hub
    hub.close()


@pytest.fixture
def modelscope(tiny_model):
    hub = FakeModelScope(REPO, tiny_model)
    yield hub
    hub.close()


def hf_env(tmp_path: Path, hub: FakeHFHub, **extra: str) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"), **extra}


def ms_env(tmp_path: Path, hub: FakeModelScope, **extra: str) -> dict:
    return {"MODELSCOPE_ENDPOINT": hub.url, "MODELSCOPE_CACHE": str(tmp_path / "ms-cache"),
            "HF_HOME": str(tmp_path / "hf-home"), **extra}


def cached_bytes(root: Path) -> set[str]:
    """sha256 of every file under a cache folder."""
    return {sha256(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


# --- Hugging Face -----------------------------------------------------------------------------------------------


def test_fetch_then_an_offline_run_checks_the_cache_and_calls_no_hub(hf, tiny_model, tmp_path):
    cfg = small_config(tmp_path, tiny_model, model={"id": REPO, "revision": "main"})
    fetched = run_cli("fetch", "-c", str(cfg), env=hf_env(tmp_path, hf), check=0)
    assert f"model {REPO}@{hf.commit} (huggingface): 6 files downloaded and checked" in fetched.stdout
    assert any(path.startswith(f"/{REPO}/resolve/") for _, path in hf.calls)

    hf.calls.clear()
    run_cli("train", "-c", str(cfg), env=hf_env(tmp_path, hf, HF_HUB_OFFLINE="1"), check=0)
    assert hf.calls == [], "an offline run after fetch must not call the hub"
    base = read_json(tmp_path / "out/train/run.json")["base_model"]
    assert base["source"] == "huggingface" and base["revision_resolved"] == hf.commit
    assert base["files"] == {p.name: sha256(p) for p in tiny_model.iterdir() if p.is_file()}


def test_a_pinned_commit_checked_once_needs_no_hub_call_again(hf, tiny_model, tmp_path):
    cfg = small_config(tmp_path, tiny_model, model={"id": REPO, "revision": hf.commit})
    run_cli("fetch", "-c", str(cfg), env=hf_env(tmp_path, hf), check=0)
    hf.calls.clear()
    again = run_cli("fetch", "-c", str(cfg), env=hf_env(tmp_path, hf), check=0)
    assert hf.calls == [] and "checked in the cache (no hub call)" in again.stdout

    cached = next((tmp_path / "hf-home/hub").rglob("snapshots/*/config.json")).resolve()
    cached.write_text(cached.read_text().replace("128", "256", 1))  # the cache changed on disk since the check
    proc = run_cli("fetch", "-c", str(cfg), env=hf_env(tmp_path, hf, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 3 and "config.json does not match the hub's sha256 checked at download" in proc.stderr
    assert not cached.exists() and hf.calls == []


@pytest.mark.parametrize("name, record", [("model.safetensors", "LFS sha256"), ("config.json", "git blob id")])
def test_a_tampered_download_is_exit_3_deleted_and_never_loaded(hf, tiny_model, tmp_path, name, record):
    cfg = small_config(tmp_path, tiny_model, model={"id": REPO, "revision": "main"})
    hf.tamper(name)
    proc = run_cli("train", "-c", str(cfg), env=hf_env(tmp_path, hf))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{name} does not match the hub's {record}" in proc.stderr
    assert any(path.endswith(f"/resolve/{hf.commit}/{name}") for _, path in hf.calls), "it was downloaded"
    cache = tmp_path / "hf-home/hub"
    assert hashlib.sha256(hf.tampered[name]).hexdigest() not in cached_bytes(cache), "the bad bytes were deleted"
    assert not list(cache.rglob(f"snapshots/*/{name}"))
    assert not (tmp_path / "out/train/adapter").exists() and "train: ok" not in proc.stdout, "nothing trained"


def test_model_pins_for_hub_ids_and_local_folders(hf, tiny_model, tmp_path):
    weights = sha256(tiny_model / "model.safetensors")
    wrong = "0" * 64
    hub_model = {"id": REPO, "revision": "main", "sha256": {"model.safetensors": wrong}}
    proc = run_cli("fetch", "-c", str(small_config(tmp_path / "a", tiny_model, model=hub_model)),
                   env=hf_env(tmp_path, hf))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"model.sha256: model.safetensors of {REPO} changed: pinned {wrong}, found {weights}" in proc.stderr

    manifest = tmp_path / "model.sha256"  # sha256sum's own format
    manifest.write_text(f"{weights}  model.safetensors\n{sha256(tiny_model / 'config.json')}  config.json\n")
    pinned = {"id": REPO, "revision": "main", "sha256": str(manifest)}
    run_cli("fetch", "-c", str(small_config(tmp_path / "b", tiny_model, model=pinned)), env=hf_env(tmp_path, hf),
            check=0)

    local = {"id": str(tiny_model), "sha256": {"config.json": wrong}}
    proc = swiftci_in_process("train", "-c", str(small_config(tmp_path / "c", tiny_model, model=local)))
    assert proc.returncode == 2 and "model.sha256: config.json" in proc.stderr and wrong in proc.stderr
    assert not (tmp_path / "c/out/train/train_report.json").exists(), "failed before the stage started"


# --- ModelScope -------------------------------------------------------------------------------------------------


def test_modelscope_download_is_checked_and_works_offline_after(modelscope, tiny_model, tmp_path):
    cfg = small_config(tmp_path, tiny_model, model={"id": REPO, "source": "modelscope", "revision": "master"})
    fetched = run_cli("fetch", "-c", str(cfg), env=ms_env(tmp_path, modelscope), check=0)
    assert f"model {REPO}@master (modelscope): 6 files downloaded and checked" in fetched.stdout
    assert any("/repo/files" in path for _, path in modelscope.calls)

    modelscope.calls.clear()
    offline = run_cli("fetch", "-c", str(cfg), env=ms_env(tmp_path, modelscope, HF_HUB_OFFLINE="1"), check=0)
    assert modelscope.calls == [] and "checked in the cache (no hub call)" in offline.stdout

    pinned = {"id": REPO, "source": "modelscope", "revision": "master", "sha256": {"config.json": "1" * 64}}
    proc = run_cli("fetch", "-c", str(small_config(tmp_path / "p", tiny_model, model=pinned)),
                   env=ms_env(tmp_path, modelscope, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2 and "model.sha256: config.json" in proc.stderr


def test_modelscope_tampered_download_is_exit_3(modelscope, tiny_model, tmp_path):
    cfg = small_config(tmp_path, tiny_model, model={"id": REPO, "source": "modelscope", "revision": "master"})
    modelscope.tamper("model.safetensors")
    proc = run_cli("train", "-c", str(cfg), env=ms_env(tmp_path, modelscope))
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "model.safetensors" in proc.stderr and "Sha256" in proc.stderr
    bad = hashlib.sha256(modelscope.tampered["model.safetensors"]).hexdigest()
    assert bad not in cached_bytes(tmp_path / "ms-cache")
    assert not (tmp_path / "out/train/adapter").exists()


# --- data pins ------------------------------------------------------------------------------------------------


def test_a_changed_data_file_fails_before_training(tiny_model, tmp_path):
    train = small_data(tmp_path / "data")
    pinned = sha256(train)
    cfg = small_config(tmp_path, tiny_model)
    raw = json.loads(json.dumps(__import__("yaml").safe_load(cfg.read_text())))
    raw["data"]["sha256"] = {str(train): pinned}
    write_config(cfg, raw)
    swiftci_in_process("validate", "-c", str(cfg), check=0)
    train.write_text(train.read_text().replace("reverse", "Reverse", 1))
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"data.sha256: {train} changed: pinned {pinned}, now {sha256(train)}" in proc.stderr
    assert not (tmp_path / "out/train/train_report.json").exists()
    validate = swiftci_in_process("validate", "-c", str(cfg))
    assert validate.returncode == 2 and f"data.sha256: {train} changed" in validate.stderr


def test_evaluate_records_the_task_files_it_read(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train=None, quantize=None, deploy=None,
        evaluate={"tasks": ["tiny_reverse"], "baseline": "none", "gates": [], "limit": 8}))
    swiftci_in_process("evaluate", "-c", str(cfg), "--model", str(tiny_model), check=0)
    inputs = read_json(tmp_path / "out/evaluate/eval_report.json")["inputs"]
    tasks = TINY / "tasks"
    assert inputs == {f"{tasks}/{p.name}": sha256(p) for p in sorted(tasks.iterdir()) if p.is_file()}


# --- environment record and drift -----------------------------------------------------------------------------


def test_like_strict_and_lenient(tiny_model, tmp_path):
    cfg = small_config(tmp_path, tiny_model)
    swiftci_in_process("train", "-c", str(cfg), check=0)
    record = read_json(tmp_path / "out/train/run.json")
    env = record["environment"]
    assert env["python"] and env["torch"]["version"] and "cuda" in env["torch"] and "cudnn" in env["torch"]
    assert set(env["packages"]) >= {"transformers", "peft", "trl", "accelerate", "deepspeed", "bitsandbytes",
                                    "lm-eval", "gptqmodel"}
    assert env["gpu"] == {"model": None, "count": 0}  # this CPU machine
    assert record["base_model"]["files"]["model.safetensors"] == sha256(tiny_model / "model.safetensors")

    earlier = tmp_path / "earlier-run.json"
    transformers_now = env["packages"]["transformers"]
    record["environment"]["packages"]["transformers"] = "4.0.0"
    earlier.write_text(json.dumps(record))
    same = swiftci_in_process("train", "-c", str(cfg), "--like", str(earlier), "--strict")
    assert same.returncode == 2 and "differs from" in same.stderr and "in 1 way(s)" in same.stderr

    data = tmp_path / "data/train.jsonl"
    old_hash = sha256(data)
    data.write_text(data.read_text().replace("reverse", "Reverse", 1))
    strict = swiftci_in_process("train", "-c", str(cfg), "--like", str(earlier), "--strict")
    assert strict.returncode == 2, strict.stdout + strict.stderr
    assert "in 2 way(s)" in strict.stderr
    assert f"environment.packages.transformers: 4.0.0 → {transformers_now}" in strict.stderr
    assert f"data.{data}: {old_hash} → {sha256(data)}" in strict.stderr
    assert read_json(tmp_path / "out/train/train_report.json")["run_id"] == record["run_id"], "nothing ran"

    lenient = swiftci_in_process("train", "-c", str(cfg), "--like", str(earlier), check=0)
    assert f"warning: differs from {earlier}: environment.packages.transformers" in lenient.stderr + lenient.stdout
    recorded = read_json(tmp_path / "out/train/run.json")["reproduce"]
    assert recorded["from"] == str(earlier) and recorded["strict"] is False
    assert {d["what"] for d in recorded["differences"]} == {"environment.packages.transformers", f"data.{data}"}

    usage = swiftci_in_process("train", "-c", str(cfg), "--strict")
    assert usage.returncode == 2 and "--strict: only with --like" in usage.stderr


# --- swiftci diff -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, golden", [("md", "diff.md"), ("text", "diff.txt"), ("json", "diff.json")])
def test_diff_golden(fmt, golden, monkeypatch):
    monkeypatch.chdir(ROOT)
    proc = swiftci_in_process("diff", "tests/data/diff/a", "tests/data/diff/b/train/run.json", "--format", fmt,
                              check=0)
    if os.environ.get("SWIFTCI_UPDATE_GOLDEN"):
        (GOLDEN / golden).write_text(proc.stdout)
    assert proc.stdout == (GOLDEN / golden).read_text()


def test_the_sticky_comment_says_what_changed_since_the_last_green_run(tiny_model, tmp_path, monkeypatch):
    for var in ("GITHUB_EVENT_PATH", "GITHUB_TOKEN", "GITHUB_EVENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    shutil.copytree(DIFF_RUNS / "b", tmp_path / "out")
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out"))
    swiftci_in_process("comment", "-c", str(cfg), "--since", str(DIFF_RUNS / "a"), check=0)
    body = (tmp_path / "out/comment.md").read_text()
    assert "What changed since the last green run on the default branch" in body
    assert "| train.learning_rate | 0.002 | 0.001 | ≠ |" in body
    assert "| packages.transformers | 5.23.0 | 5.24.0 | ≠ |" in body
    assert "#### Since the last green run on the default branch" in body, "and the guard's table"
