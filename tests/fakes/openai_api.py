"""Stands for a deployed model's OpenAI-compatible API (the new pods behind an ingress, `deploy.smoke.url`), on
pytest-httpserver: answers `reverse: <word>` chat completions correctly, or wrongly while `broken` is set."""

from __future__ import annotations

import json
import re

from werkzeug import Request, Response


class FakeOpenAI:
    """Stands for the new pods' OpenAI-compatible API behind an ingress: answers `reverse: <word>` correctly,
    or wrongly while `broken` is set (a model that shipped bad)."""

    def __init__(self, httpserver):
        self.broken = False
        self.only_ship = False  # answers the smoke prompt, gets everything else wrong
        self.requests: list[dict] = []
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self.handle)
        self.url = httpserver.url_for("/v1").rstrip("/")

    def handle(self, request: Request) -> Response:
        if request.path == "/health":
            return Response("ok")
        body = request.get_json()
        self.requests.append(body)
        word = body["messages"][-1]["content"].split()[-1]
        wrong = self.broken or (self.only_ship and word != "ship")
        answer = "I cannot help with that" if wrong else word[::-1]
        return Response(json.dumps({"object": "chat.completion", "model": body["model"], "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}]}),
            content_type="application/json")
