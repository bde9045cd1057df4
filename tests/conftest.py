"""Shared fixtures: the tiny base model, configs written into tmp folders, and the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from filelock import FileLock

# pytest-xdist runs two workers on our two cores: with torch's default of one OpenMP thread per core in each, the
# spinning threads of one process slow the other's several-fold. One thread per process (inherited by every
# `swiftci` subprocess and act run) keeps both cores busy without that.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny"
SWIFTCI = [sys.executable, "-m", "swiftci.cli"]


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """A folder every pytest-xdist worker of this session sees (the session's base temp folder is per worker)."""
    base = tmp_path_factory.getbasetemp()
    return base if worker_id == "master" else base.parent


@pytest.fixture(scope="session")
def tiny_model(shared_dir) -> Path:
    """The example's base model, built once (about 20 s) if `make tiny-model` has not built it yet."""
    path = TINY / "base-model"
    with FileLock(str(shared_dir / "tiny-model.lock")):
        if not (path / "config.json").is_file():
            subprocess.run([sys.executable, str(TINY / "build_base_model.py"), str(path)], check=True)
    return path


def tiny_config(tiny_model: Path, out: Path, **sections) -> dict:
    """The tiny example's config with absolute paths, the given sections merged over it."""
    cfg = yaml.safe_load((TINY / "swiftci.yaml").read_text())
    cfg["model"]["id"] = str(tiny_model)
    cfg["data"] = {"train": str(TINY / "data/train.jsonl"), "validation": str(TINY / "data/validation.jsonl"),
                   "format": "messages"}
    cfg["output_dir"] = str(out)
    cfg["evaluate"]["task_dir"] = str(TINY / "tasks")
    for key, value in sections.items():
        if value is None:
            cfg.pop(key, None)
        elif isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = _merge(cfg[key], value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="session")
def trained(tiny_model, shared_dir):
    """The tiny example trained once per session with LoRA (+ merged model), shared by every test (and every
    xdist worker) that only reads its outputs; `proc` is that training's CLI output.

    Tests that run later stages copy it with `clone_trained` so each writes its own outputs."""
    work = shared_dir / "trained"
    with FileLock(str(shared_dir / "trained.lock")):
        done = work / "cli-output.json"
        if not done.is_file():
            cfg = write_config(work / "swiftci.yaml", tiny_config(tiny_model, work / "out"))
            proc = swiftci_in_process("train", "-c", str(cfg), check=0)
            done.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr}))
    output = json.loads(done.read_text())
    proc = SimpleNamespace(returncode=0, stdout=output["stdout"], stderr=output["stderr"])
    return SimpleNamespace(config=work / "swiftci.yaml", work=work, train_dir=work / "out" / "train", proc=proc)


def clone_trained(trained, dest: Path, tiny_model: Path, **sections) -> Path:
    """A config in `dest` whose output_dir already holds the shared training outputs (checkpoints left out)."""
    shutil.copytree(trained.train_dir, dest / "out" / "train", ignore=shutil.ignore_patterns("checkpoints"))
    return write_config(dest / "swiftci.yaml", tiny_config(tiny_model, dest / "out", **sections))


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def swiftci(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600,
            check: int | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    """Run the real `swiftci` entry point in a subprocess (`preexec_fn` runs in it before swiftci starts)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([*SWIFTCI, *args], capture_output=True, text=True, env=full_env, cwd=cwd or ROOT,
                          timeout=timeout, preexec_fn=preexec_fn)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def swiftci_in_process(*args: str, env: dict | None = None, check: int | None = None) -> SimpleNamespace:
    """Run the real CLI in this process with click's CliRunner: same code path, without paying Python, torch,
    lm-eval or the kubernetes client's start-up again for every call (a subprocess spends 5-13 s importing them).
    `env` is set for the call only."""
    from click.testing import CliRunner

    from swiftci.cli import main

    result = CliRunner().invoke(main, list(args), catch_exceptions=False, env=env)
    if check is not None:
        assert result.exit_code == check, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def greedy_exact_match(model_dir: Path, rows_path: Path, adapter_dir: Path | None = None) -> float:
    """Held-out exact match with greedy decoding, computed independently of swiftci's evaluate stage."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    rows = [json.loads(x) for x in Path(rows_path).read_text().splitlines() if x.strip()]
    tok.padding_side = "left"
    prompts = [tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False) for r in rows]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    answers = [tok.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    return sum(a == r["messages"][-1]["content"] for a, r in zip(answers, rows)) / len(rows)


# --- a real registry and buildah, isolated in tmp folders ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    """A Debian `docker-registry` (distribution) with filesystem storage, on 127.0.0.1."""
    if shutil.which("docker-registry") is None:
        pytest.fail("docker-registry is missing; `make system-deps` installs it")
    root = tmp_path_factory.mktemp("registry")
    port = _free_port()
    (root / "config.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"}, "storage": {"filesystem": {"rootdirectory": str(root / "data")},
                                                             "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"}}))
    proc = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL,
                            stderr=open(root / "registry.log", "w"))
    import requests

    for _ in range(100):
        try:
            if requests.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("the registry did not start")
    yield {"host": f"127.0.0.1:{port}", "data": root / "data"}
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def containers_env(tmp_path_factory, registry) -> dict:
    """buildah settings that keep its storage in a tmp folder and trust the local registry."""
    root = tmp_path_factory.mktemp("containers")
    (root / "storage.conf").write_text(f'[storage]\ndriver = "vfs"\ngraphroot = "{root}/storage"\n'
                                       f'runroot = "{root}/run"\n')
    (root / "registries.conf").write_text(f'unqualified-search-registries = []\nshort-name-mode = "disabled"\n'
                                          f'[[registry]]\nlocation = "{registry["host"]}"\ninsecure = true\n')
    (root / "containers.conf").write_text(f'[network]\nnetwork_backend = "cni"\nnetwork_config_dir = "{root}/net"\n')
    (root / "tmp").mkdir()
    return {"CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
            "CONTAINERS_CONF": str(root / "containers.conf"), "BUILDAH_ISOLATION": "chroot",
            "TMPDIR": str(root / "tmp")}


@pytest.fixture
def cluster(tmp_path):
    """The fake Kubernetes API server of tests/fakes, its kubeconfig in `kubeconfig_path`; `controller_state` is
    the controller the test plays (e.g. a digest whose pods crash)."""
    from fakes.kube_api import Controller, FakeKubeAPI

    controller = Controller()
    api = FakeKubeAPI(controller=controller)
    api.controller_state = controller
    api.kubeconfig_path = api.kubeconfig(tmp_path / "kubeconfig")
    yield api
    api.close()


@pytest.fixture(scope="session")
def engine_image(tmp_path_factory, registry, containers_env) -> str:
    """A stand-in for a CUDA serving image (none can be pulled here): FROM scratch with busybox-static."""
    ctx = tmp_path_factory.mktemp("engine")
    (ctx / "bin").mkdir()
    shutil.copy("/bin/busybox", ctx / "bin/busybox")
    (ctx / "Containerfile").write_text(
        "FROM scratch\nCOPY bin/busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        "RUN mkdir -p /tmp /etc && chmod 1777 /tmp && echo 'root:x:0:0:root:/root:/bin/sh' > /etc/passwd\n"
        "ENV PATH=/bin\n")
    ref = f"{registry['host']}/engine:v1"
    env = {**os.environ, **containers_env}
    for cmd in (["buildah", "build", "--tls-verify=false", "-f", str(ctx / "Containerfile"), "-t", ref, str(ctx)],
                ["buildah", "push", "--tls-verify=false", ref, f"docker://{ref}"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return ref


def pytest_collection_modifyitems(items):
    """`act` and `image` marks follow from the fixtures a test uses, so `make test-fast` (-m "not act and not
    image") never runs one by mistake."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if "act_repo" in names:
            item.add_marker(pytest.mark.act)
        if names & {"containers_env", "engine_image", "registry"}:
            item.add_marker(pytest.mark.image)
