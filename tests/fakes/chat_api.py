"""Stands for where `swiftci bot` posts its follow-ups: Slack's `response_url` and Discord's interaction webhook
(`PATCH /webhooks/{application id}/{token}/messages/@original`). Records each request; answers as they do."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from werkzeug import Request, Response

PATHS = re.compile(r"^/(slack|discord)/.*")


@dataclass
class FakeChat:
    received: list[dict] = field(default_factory=list)  # {method, path, json}

    def install(self, httpserver) -> str:
        """Registered before any catch-all handler on the same server (the first matching handler answers)."""
        httpserver.expect_request(PATHS).respond_with_handler(self.handle)
        return httpserver.url_for("/").rstrip("/")

    def handle(self, request: Request) -> Response:
        self.received.append({"method": request.method, "path": request.path, "json": request.get_json()})
        if request.path.startswith("/slack/"):
            return Response("ok", status=200, content_type="text/plain")
        return Response(json.dumps({"id": "1", "content": request.get_json().get("content")}), status=200,
                        content_type="application/json")
