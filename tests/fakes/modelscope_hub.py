"""Stands for the ModelScope hub: the part of its `/api/v1` HTTP API that the modelscope SDK's snapshot_download and
file listing use (revisions, `repo/files` with each file's `Sha256`, `repo?FilePath=` downloads). The real SDK talks
to it through `MODELSCOPE_ENDPOINT`.

It serves one folder (the tiny model) as a repository, can be told to serve different bytes for one file than its
listing announces (`tamper`), and records every request (`calls`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse


class FakeModelScope:
    def __init__(self, repo_id: str, folder: Path, revision: str = "master"):
        self.repo_id = repo_id
        self.revision = revision
        self.files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        self.commit = hashlib.sha1(b"".join(self.files.values())).hexdigest()
        self.tampered: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def tamper(self, name: str) -> None:
        data = bytearray(self.files[name])
        data[len(data) // 2] ^= 0xFF
        self.tampered[name] = bytes(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def listing(self) -> list[dict]:
        return [{"Name": name, "Path": name, "Type": "blob", "Size": len(data), "Revision": self.commit,
                 "Sha256": hashlib.sha256(data).hexdigest(), "IsLFS": name.endswith(".safetensors"),
                 "CommitId": self.commit, "CommittedDate": 1764720000}
                for name, data in self.files.items()]

    def served(self, name: str) -> bytes:
        return self.tampered.get(name, self.files[name])


def _handler(hub: FakeModelScope):
    base = re.escape(f"/api/v1/models/{hub.repo_id}")
    files = re.compile(rf"^{base}/repo/files$")
    repo = re.compile(rf"^{base}/repo$")
    revisions = re.compile(rf"^{base}/revisions$")
    info = re.compile(rf"^{base}$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _json(self, data, status: int = 200) -> None:
            body = json.dumps({"Code": status, "Success": status == 200, "Message": "success" if status == 200
                               else "not found", "RequestId": "fake", "Data": data}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            hub.calls.append((self.command, url.path + (f"?{url.query}" if url.query else "")))
            known = query.get("Revision", hub.revision) in (hub.revision, hub.commit)
            if files.match(url.path):
                return self._json({"Files": hub.listing()} if known else None, 200 if known else 404)
            if repo.match(url.path):
                name = query.get("FilePath", "")
                if not known or name not in hub.files:
                    return self._json(None, 404)
                data = hub.served(name)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                return None
            if revisions.match(url.path):
                rev = {"Revision": hub.revision, "CreatedAt": 1764720000, "CommitId": hub.commit}
                return self._json({"RevisionMap": {"Branches": [rev], "Tags": []}})
            if info.match(url.path):
                return self._json({"Id": 1, "Name": hub.repo_id.split("/")[1], "Path": hub.repo_id.split("/")[0],
                                   "Revision": hub.revision, "LatestCommitId": hub.commit})
            return self._json(None, 404)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

    return Handler
