"""Stands for GitHub's REST API, the parts swiftci uses: issue comments on a pull request (`swiftci comment`), and
for chat-ops comment reactions, a commenter's permission, a pull request's head and workflow dispatches, and for
`swiftci last-green` the repository, workflow runs, their artifacts (with GitHub's sha256 digest) and the artifact
zip, served as GitHub does: a 302 to a storage URL that wants no token.

A real localhost HTTP server (pytest-httpserver) that keeps comments in memory, checks the bearer token, paginates
like GitHub (Link header), and can be told to fail the next requests (5xx, 403, rate limits) to test retries.
Comments carry their author (`user`: login and type); the token posts as `identity` — by default the Actions bot,
whose `GET /user` is refused with 403 as GitHub does for installation tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from werkzeug import Request, Response

LIST = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/issues/(?P<pr>\d+)/comments$")
ONE = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/issues/comments/(?P<id>\d+)$")
REACTIONS = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/issues/comments/(?P<id>\d+)/reactions$")
PERMISSION = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/collaborators/(?P<login>[^/]+)/permission$")
PULL = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/pulls/(?P<number>\d+)$")
REPO = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)$")
RUNS = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/runs$")
RUN_ARTIFACTS = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/runs/(?P<run>\d+)/artifacts$")
ARTIFACT_ZIP = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/artifacts/(?P<id>\d+)/zip$")
BLOB = re.compile(r"^/_blob/(?P<id>\d+)$")
DISPATCH = re.compile(r"^/repos/(?P<repo>[^/]+/[^/]+)/actions/workflows/(?P<workflow>[^/]+)/dispatches$")
REACTION_CONTENT = {"+1", "-1", "laugh", "confused", "heart", "hooray", "rocket", "eyes"}


@dataclass
class FakeGitHub:
    token: str
    comments: dict[int, dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    fail_next: list[tuple[int, dict]] = field(default_factory=list)  # (status, headers) served before real answers
    page_size: int = 30
    next_id: int = 1000
    identity: dict = field(default_factory=lambda: {"login": "github-actions[bot]", "type": "Bot"})
    permissions: dict[str, str] = field(default_factory=dict)  # login -> admin | write | read; others: read
    heads: dict[int, str] = field(default_factory=dict)  # pull request number -> head sha
    reactions: list[tuple[int, str]] = field(default_factory=list)  # (comment id, content)
    dispatches: list[dict] = field(default_factory=list)  # {repo, workflow, ref, inputs}
    legacy_dispatch: bool = False  # answer like a GitHub Enterprise Server without `return_run_details`
    default_branch: str = "main"
    runs: list[dict] = field(default_factory=list)  # {id, head_sha, head_branch, event, status, conclusion, created_at}
    artifacts: dict[int, dict] = field(default_factory=dict)  # id -> {run, name, zip: bytes, digest, expired}

    def add_run(self, run_id: int, *, branch: str = "main", event: str = "push", conclusion: str = "success",
                created_at: str = "2026-12-01T10:00:00Z", head_sha: str | None = None) -> None:
        self.runs.append({"id": run_id, "head_sha": head_sha or f"{run_id:040x}", "head_branch": branch,
                          "event": event, "status": "completed", "conclusion": conclusion, "created_at": created_at,
                          "html_url": f"https://github.example/o/r/actions/runs/{run_id}"})

    def add_artifact(self, run_id: int, name: str, files: dict[str, bytes], *, digest: str | None = "auto",
                     expired: bool = False) -> int:
        """A zip of `files`; digest "auto" is the zip's real sha256 (what upload-artifact v4.4+ records)."""
        import hashlib
        import io
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for member, body in files.items():
                z.writestr(member, body)
        data = buf.getvalue()
        aid = 5000 + len(self.artifacts)
        self.artifacts[aid] = {"run": run_id, "name": name, "zip": data, "expired": expired,
                               "digest": f"sha256:{hashlib.sha256(data).hexdigest()}" if digest == "auto" else digest}
        return aid

    def install(self, httpserver) -> str:
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self.handle)
        return httpserver.url_for("/").rstrip("/")

    def for_pr(self, pr: int) -> list[dict]:
        return [c for c in self.comments.values() if c["pr"] == pr]

    def handle(self, request: Request) -> Response:
        self.requests.append((request.method, request.path))
        if self.fail_next:
            status, headers = self.fail_next.pop(0)
            return Response(json.dumps({"message": "injected failure"}), status=status, headers=headers,
                            content_type="application/json")
        if m := BLOB.match(request.path):  # the storage behind the 302: a signed URL, no token wanted
            if "Authorization" in request.headers:
                return self._json({"message": "token sent to storage"}, 400)
            return Response(self.artifacts[int(m["id"])]["zip"], status=200, content_type="application/zip")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json({"message": "Bad credentials"}, 401)
        if request.path == "/user":
            if self.identity["type"] == "Bot":
                return self._json({"message": "Resource not accessible by integration"}, 403)
            return self._json(self.identity, 200)
        if answer := self._chatops(request):
            return answer
        if answer := self._runs(request):
            return answer
        if m := LIST.match(request.path):
            pr = int(m["pr"])
            if request.method == "GET":
                mine = sorted(self.for_pr(pr), key=lambda c: c["id"])
                per_page = min(int(request.args.get("per_page", self.page_size)), self.page_size)
                page = int(request.args.get("page", 1))
                chunk = mine[(page - 1) * per_page: page * per_page]
                headers = {}
                if page * per_page < len(mine):
                    nxt = request.base_url + f"?per_page={per_page}&page={page + 1}"
                    headers["Link"] = f'<{nxt}>; rel="next"'
                return self._json([self._public(c) for c in chunk], 200, headers)
            if request.method == "POST":
                self.next_id += 1
                c = {"id": self.next_id, "pr": pr, "body": request.get_json()["body"], "repo": m["repo"],
                     "user": dict(self.identity)}
                self.comments[c["id"]] = c
                return self._json(self._public(c), 201)
        if m := ONE.match(request.path):
            c = self.comments.get(int(m["id"]))
            if c is None:
                return self._json({"message": "Not Found"}, 404)
            if request.method == "PATCH":
                c["body"] = request.get_json()["body"]
                return self._json(self._public(c), 200)
            if request.method == "DELETE":
                del self.comments[c["id"]]
                return Response(status=204)
        return self._json({"message": "Not Found"}, 404)

    def _chatops(self, request: Request) -> Response | None:
        if (m := REACTIONS.match(request.path)) and request.method == "POST":
            content = request.get_json()["content"]
            if content not in REACTION_CONTENT:  # GitHub's own list: there is no ✅ or ❌
                return self._json({"message": "Validation Failed"}, 422)
            self.reactions.append((int(m["id"]), content))
            return self._json({"id": len(self.reactions), "content": content}, 201)
        if (m := PERMISSION.match(request.path)) and request.method == "GET":
            return self._json({"permission": self.permissions.get(m["login"], "read"),
                               "user": {"login": m["login"]}}, 200)
        if (m := PULL.match(request.path)) and request.method == "GET":
            sha = self.heads.get(int(m["number"]))
            if sha is None:
                return self._json({"message": "Not Found"}, 404)
            return self._json({"number": int(m["number"]), "head": {"sha": sha}}, 200)
        if (m := DISPATCH.match(request.path)) and request.method == "POST":
            body = request.get_json()
            if self.legacy_dispatch and "return_run_details" in body:
                return self._json({"message": "Invalid request. \"return_run_details\" is not a permitted key."}, 422)
            self.dispatches.append({"repo": m["repo"], "workflow": m["workflow"], "ref": body["ref"],
                                    "inputs": body.get("inputs") or {}})
            if not body.get("return_run_details"):
                return Response(status=204)
            run = 9000 + len(self.dispatches)
            return self._json({"workflow_run_id": run,
                               "run_url": f"{request.host_url}repos/{m['repo']}/actions/runs/{run}",
                               "html_url": f"https://github.example/{m['repo']}/actions/runs/{run}"}, 200)
        return None

    def _runs(self, request: Request) -> Response | None:
        if request.method != "GET":
            return None
        if REPO.match(request.path):
            return self._json({"full_name": REPO.match(request.path)["repo"], "default_branch": self.default_branch},
                              200)
        if RUNS.match(request.path):
            a = request.args
            runs = [r for r in self.runs
                    if (not a.get("branch") or r["head_branch"] == a["branch"])
                    and (not a.get("event") or r["event"] == a["event"])
                    and (not a.get("status") or a["status"] in (r["status"], r["conclusion"]))]
            runs.sort(key=lambda r: r["created_at"], reverse=True)  # newest first, as GitHub lists them
            runs = runs[: int(a.get("per_page", 30))]
            return self._json({"total_count": len(runs), "workflow_runs": runs}, 200)
        if m := RUN_ARTIFACTS.match(request.path):
            listed = [{"id": aid, "name": x["name"], "size_in_bytes": len(x["zip"]), "expired": x["expired"],
                       "digest": x["digest"],
                       "archive_download_url": f"{request.host_url}repos/{m['repo']}/actions/artifacts/{aid}/zip"}
                      for aid, x in self.artifacts.items() if x["run"] == int(m["run"])]
            return self._json({"total_count": len(listed), "artifacts": listed}, 200)
        if m := ARTIFACT_ZIP.match(request.path):
            if int(m["id"]) not in self.artifacts:
                return self._json({"message": "Not Found"}, 404)
            # another host name for the same server, as GitHub's storage is another host: clients drop the token
            host = request.host.replace("localhost", "127.0.0.1") if "localhost" in request.host \
                else request.host.replace("127.0.0.1", "localhost")
            return Response(status=302, headers={"Location": f"http://{host}/_blob/{m['id']}"})
        return None

    @staticmethod
    def _public(c: dict) -> dict:
        return {"id": c["id"], "body": c["body"], "user": c.get("user", {"login": "someone", "type": "User"}),
                "html_url": f"https://github.example/{c['repo']}/pull/{c['pr']}#issuecomment-{c['id']}"}

    @staticmethod
    def _json(data, status: int, headers: dict | None = None) -> Response:
        return Response(json.dumps(data), status=status, headers=headers or {}, content_type="application/json")
