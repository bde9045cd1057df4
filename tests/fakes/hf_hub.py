"""Stands for the Hugging Face hub's file endpoint (`/<repo>/resolve/<revision>/<file>`), on pytest-httpserver:
serves the files it is given for one repository and records every path asked for, so a test can see that nothing
but config.json was fetched."""

from __future__ import annotations

import hashlib
import re

from werkzeug import Request, Response

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """One repository's files at one commit; any other path is a 404 (the hub's answer for a missing file)."""

    def __init__(self, httpserver, repo: str, files: dict[str, bytes]):
        self.repo, self.files = repo, files
        self.requested: list[str] = []
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self.handle)
        self.url = httpserver.url_for("/").rstrip("/")

    def handle(self, request: Request) -> Response:
        self.requested.append(f"{request.method} {request.path}")
        m = re.fullmatch(rf"/{re.escape(self.repo)}/resolve/([^/]+)/(.+)", request.path)
        if m is None or m.group(2) not in self.files:
            return Response("Entry not found", status=404, headers={"X-Error-Code": "EntryNotFound"})
        body = self.files[m.group(2)]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                   "Content-Length": str(len(body))}
        return Response(body, headers=headers,  # werkzeug sends no body to a HEAD, keeping its length
                        content_type="application/json")
