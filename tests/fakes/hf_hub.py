"""Stands for the Hugging Face Hub: the part of its HTTP API that huggingface_hub's model_info, list_repo_tree,
get_paths_info, snapshot_download and hf_hub_download use. The real client talks to it through `HF_ENDPOINT`.

It serves one folder (the tiny model) as a repository at one commit, announces each file's hashes as the hub does
(LFS files: their sha256 in `lfs`; small git files: their git blob id), can be told to serve different bytes for
one file than it announced (`tamper`), and records every request (`calls`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")  # what a .gitattributes sends to LFS on the real hub


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHFHub:
    def __init__(self, repo_id: str, folder: Path):
        self.repo_id = repo_id
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
        """Serve other bytes for `name` than the hashes the listing announces (a corrupted mirror or a MITM)."""
        data = bytearray(self.files[name])
        data[len(data) // 2] ^= 0xFF
        self.tampered[name] = bytes(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- what the hub says about its files ------------------------------------------------------------------------

    def entry(self, name: str) -> dict:
        data = self.files[name]
        item = {"type": "file", "path": name, "size": len(data), "oid": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            sha = hashlib.sha256(data).hexdigest()
            item["oid"] = git_blob_id(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\n"
                                      f"size {len(data)}\n".encode())  # the pointer file's blob
            item["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 130}
        return item

    def sibling(self, name: str) -> dict:
        e = self.entry(name)
        out = {"rfilename": name, "size": e["size"], "blobId": e["oid"]}
        if "lfs" in e:
            out["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["lfs"]["size"], "pointerSize": 130}
        return out

    def model_info(self) -> dict:
        return {"_id": "fake", "id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "private": False,
                "gated": False, "disabled": False, "tags": [], "downloads": 0, "likes": 0,
                "siblings": [self.sibling(n) for n in self.files]}

    def served(self, name: str) -> bytes:
        return self.tampered.get(name, self.files[name])


def _handler(hub: FakeHFHub):
    repo = re.escape(hub.repo_id)
    info = re.compile(rf"^/api/models/{repo}(/revision/(?P<rev>[^/]+))?$")
    tree = re.compile(rf"^/api/models/{repo}/tree/(?P<rev>[^/]+)(/.*)?$")
    paths_info = re.compile(rf"^/api/models/{repo}/paths-info/(?P<rev>[^/]+)$")
    resolve = re.compile(rf"^/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _known(self, rev: str) -> bool:
            return unquote(rev) in ("main", hub.commit)

        def _json(self, data, status: int = 200) -> None:
            body = json.dumps(data).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Repo-Commit", hub.commit)
            self.end_headers()
            self.wfile.write(body)

        def _missing(self, what: str) -> None:
            body = json.dumps({"error": what}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RevisionNotFound" if "revision" in what else "EntryNotFound")
            self.send_header("X-Error-Message", what)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = urlparse(self.path).path
            hub.calls.append((self.command, path))
            m = resolve.match(path)
            if m:
                name = unquote(m["file"])
                if not self._known(m["rev"]):
                    return self._missing(f"revision {m['rev']} not found")
                if name not in hub.files:
                    return self._missing(f"{name} not found")
                entry, data = hub.entry(name), hub.served(name)
                self.send_response(200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                if "lfs" in entry:
                    self.send_header("ETag", f'"{entry["lfs"]["oid"]}"')
                    self.send_header("X-Linked-Etag", f'"{entry["lfs"]["oid"]}"')
                    self.send_header("X-Linked-Size", str(entry["size"]))
                else:
                    self.send_header("ETag", f'"{entry["oid"]}"')
                self.end_headers()
                if not head:
                    self.wfile.write(data)
                return None
            m = info.match(path)
            if m and not head:
                if m["rev"] and not self._known(m["rev"]):
                    return self._missing(f"revision {m['rev']} not found")
                return self._json(hub.model_info())
            m = tree.match(path)
            if m and not head:
                if not self._known(m["rev"]):
                    return self._missing(f"revision {m['rev']} not found")
                return self._json([hub.entry(n) for n in hub.files])
            return self._missing(f"no route for {self.command} {path}")

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

        def do_POST(self) -> None:
            path = urlparse(self.path).path
            hub.calls.append(("POST", path))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode()
            m = paths_info.match(path)
            if not m:
                return self._missing(f"no route for POST {path}")
            if raw.startswith("{"):
                wanted = json.loads(raw).get("paths", [])
            else:
                from urllib.parse import parse_qs

                wanted = parse_qs(raw).get("paths", [])
            return self._json([hub.entry(n) for n in wanted if n in hub.files])

    return Handler
