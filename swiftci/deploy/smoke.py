"""The smoke test of a new deployment: its health endpoint answers, and each configured prompt gets an answer
through the OpenAI-compatible chat API that contains the expected substrings, within the latency budget."""

from __future__ import annotations

import base64
import mimetypes
import time

from swiftci.config import SmokeConfig, SmokePromptConfig


def wait_healthy(base_url: str, timeout: float, is_alive=lambda: True) -> None:
    """Poll GET /health until it answers 200; raise TimeoutError (or RuntimeError when the server died)."""
    import requests

    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive():
            raise RuntimeError("the server exited before it became healthy")
        try:
            if requests.get(f"{root}/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{root}/health did not answer 200 within {timeout:.0f} s")


def _content(p: SmokePromptConfig) -> str | list[dict]:
    """The user message: the prompt, or (with an image) OpenAI's content parts with the image as a data: URL."""
    if p.image is None:
        return p.prompt
    path = p.image
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    url = f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": p.prompt}]


def run(base_url: str, model: str, smoke: SmokeConfig, timeout: float) -> dict:
    """Send every smoke prompt; returns {"passed", "results": [{prompt, answer, latency_ms, passed, reason}]}."""
    import requests

    url = base_url.rstrip("/")
    url = url if url.endswith("/v1") else f"{url}/v1"
    deadline = time.monotonic() + timeout
    results = []
    for p in smoke.prompts:
        result = {"prompt": p.prompt, "expect": p.expect, "answer": None, "latency_ms": None, "passed": False,
                  "reason": ""}
        results.append(result)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            result["reason"] = "no time left in deploy.timeouts.smoke_seconds"
            continue
        t0 = time.monotonic()
        try:
            resp = requests.post(f"{url}/chat/completions", timeout=min(remaining, smoke.latency_budget_ms / 1000 + 30),
                                 json={"model": model, "messages": [{"role": "user", "content": _content(p)}],
                                       "max_tokens": smoke.max_tokens, "temperature": 0})
        except requests.RequestException as e:
            result["reason"] = f"request failed: {type(e).__name__}"
            continue
        latency = (time.monotonic() - t0) * 1000
        result["latency_ms"] = round(latency, 1)
        if resp.status_code != 200:
            result["reason"] = f"HTTP {resp.status_code}: {resp.text[:200]}"
            continue
        try:
            answer = resp.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            result["reason"] = f"not an OpenAI chat completion: {resp.text[:200]}"
            continue
        result["answer"] = answer
        usage = resp.json().get("usage") if isinstance(resp.json(), dict) else None
        result["prompt_tokens"] = usage.get("prompt_tokens") if isinstance(usage, dict) else None  # images count
        missing = [e for e in p.expect if e not in answer]
        if missing:
            result["reason"] = f"answer {answer[:120]!r} lacks {missing}"
        elif latency > smoke.latency_budget_ms:
            result["reason"] = f"answered in {latency:.0f} ms, over the {smoke.latency_budget_ms} ms budget"
        else:
            result["passed"], result["reason"] = True, "ok"
    return {"passed": all(r["passed"] for r in results), "results": results}
