"""target: local — serve the model here with `transformers serve` on an OpenAI-compatible API, run the smoke
prompts through it, report, and stop the server. What `make demo` ends with."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from swiftci.config import DeployConfig
from swiftci.deploy import smoke
from swiftci.errors import StageError, UsageError


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _transformers_cli() -> str:
    beside = Path(sys.executable).parent / "transformers"
    found = str(beside) if beside.is_file() else shutil.which("transformers")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        found = None
    if not found:
        raise UsageError("deploy.target: local serves with `transformers serve`, which needs transformers[serving]: "
                         "pip install 'swiftci[deploy]'")
    return found


def serve_and_smoke(model_dir: Path, dc: DeployConfig, out: Path) -> dict:
    """Start the server, wait until healthy, run the smoke prompts, stop it. Returns the local section of the
    report; raises StageError when the server never became healthy."""
    cli = _transformers_cli()
    host = dc.local.host
    port = dc.local.port or _free_port(host)
    base_url = f"http://{host}:{port}/v1"
    hf_home = Path(tempfile.mkdtemp(prefix="swiftci-serve-"))
    (hf_home / "hub").mkdir()  # transformers serve lists models from HF_HOME/hub
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    log_path = out / "serve.log"
    cmd = [cli, "serve", str(model_dir), "--host", host, "--port", str(port), "--device", dc.local.device]
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        try:
            smoke.wait_healthy(base_url, dc.timeouts.startup_seconds, is_alive=lambda: server.poll() is None)
        except (TimeoutError, RuntimeError) as e:
            tail = log_path.read_text()[-1500:]
            raise StageError(f"transformers serve did not become healthy: {e}\n{tail}") from None
        ready_seconds = time.monotonic() - started
        result = smoke.run(base_url, str(model_dir), dc.smoke, dc.timeouts.smoke_seconds)
    finally:
        _stop(server)
        shutil.rmtree(hf_home, ignore_errors=True)
    return {"url": base_url, "engine": "transformers", "command": " ".join(cmd[1:]),
            "ready_seconds": round(ready_seconds, 2), "smoke": result, "log": log_path.name}


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
