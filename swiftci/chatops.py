"""Chat-ops: commands in pull-request and issue comments, read without a shell.

`parse` is a pure function from a comment body and `chatops.allow_set` to a validated `Command` or a `Refusal`
whose message the workflow posts back. A command is one line of plain words — letters, digits and `._,:/+=@-` —
so `$(…)`, backticks, `${{ }}`, quotes, redirections, a second line with a second command and any character
outside that set are refused before anything looks at the words; `--set` takes only keys listed in
`chatops.allow_set`, with plain scalar values.

`decide` and `answer` are the workflow's two ends (workflows/chatops.yml): `decide` reacts 👀 at once, asks GitHub's
API whether the commenter may write to the repository (never the event's `author_association`), parses the body
and names the commit to run (a pull request's head, else the default branch); `answer` reacts 👍 or 👎 (GitHub's
reactions have no ✅/❌) and keeps one chat-ops comment per issue or pull request up to date with ✅ or ❌, the
command and the run link.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from swiftci import runinfo
from swiftci.errors import StageError, UsageError

PREFIX = "/swiftci"
USAGE = ("`/swiftci run [--set key=value …]`, `/swiftci evaluate`, `/swiftci deploy --dry-run` or "
         "`/swiftci deploy --rollback`")
WORD = re.compile(r"[A-Za-z0-9_.,:/+=@-]+", re.ASCII)
VALUE = re.compile(r"[A-Za-z0-9_.+-]{1,64}", re.ASCII)
MARKER = "<!-- swiftci-chatops -->"
WRITERS = ("admin", "write")  # GitHub's `permission`: maintain counts as write, triage as read


@dataclass(frozen=True)
class Command:
    name: str  # run | evaluate | deploy
    flags: tuple[str, ...] = ()  # deploy: ("--dry-run",) or ("--rollback",)
    overrides: tuple[str, ...] = ()  # run: "key=value", each key in chatops.allow_set

    @property
    def line(self) -> str:
        """The command as it will run, built from validated words only (safe to show and to log)."""
        return " ".join([PREFIX, self.name, *self.flags, *(w for o in self.overrides for w in ("--set", o))])

    @property
    def kind(self) -> str:
        """What the workflow does: `run`, `evaluate`, `dry-run` (pull-request runners) or `rollback` (default branch,
        deploy environment)."""
        if self.name == "deploy":
            return "rollback" if "--rollback" in self.flags else "dry-run"
        return self.name

    def to_json(self) -> dict:
        return {"version": 1, "ok": True, "command": self.name, "kind": self.kind, "flags": list(self.flags),
                "set": list(self.overrides), "line": self.line}


@dataclass(frozen=True)
class Refusal:
    message: str

    def to_json(self) -> dict:
        return {"version": 1, "ok": False, "message": self.message}


def parse(body: str, allow_set: list[str]) -> Command | Refusal:
    """A comment body -> the command it asks for, or why it is refused. Nothing here runs anything."""
    text = body.strip()
    if not text.startswith(PREFIX):
        return Refusal(f"not a swiftci command: a command comment starts with `{PREFIX}`; commands: {USAGE}")
    problems = []
    if any(c in text for c in "\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029"):
        problems.append("a command is one line, alone in its comment: nothing on a second line is run")
    words = text.split()
    unsafe = sorted({c for w in words for c in w if not WORD.fullmatch(c)})
    if unsafe:
        shown = " ".join(f"`{c}`" if c.isascii() and c.isprintable() and c != "`" else f"U+{ord(c):04X}"
                         for c in unsafe[:8]) + (" …" if len(unsafe) > 8 else "")
        problems.append(f"characters a command never needs ({shown}): commands are plain words of letters, digits "
                        "and `._,:/+=@-` — no shell, quotes, `$`, backticks or `${{ }}`")
    if problems:
        return Refusal("refused: " + "; ".join(problems))
    if words[0] != PREFIX:
        return Refusal(f"not a swiftci command: write `{PREFIX}` then a space; commands: {USAGE}")
    return _command(words[1:], allow_set)


def _command(words: list[str], allow_set: list[str]) -> Command | Refusal:
    if not words:
        return Refusal(f"which command? {USAGE}")
    name, rest = words[0], words[1:]
    if name == "evaluate":
        return Refusal(f"`evaluate` takes no arguments (got {len(rest)})") if rest else Command("evaluate")
    if name == "deploy":
        if rest in (["--dry-run"], ["--rollback"]):
            return Command("deploy", (rest[0],))
        return Refusal("`deploy` takes exactly one of `--dry-run` or `--rollback`")
    if name != "run":
        return Refusal(f"unknown command `{name[:40]}`; commands: {USAGE}")
    overrides, problems = [], []
    while rest:
        if rest[0] != "--set" or len(rest) < 2:
            problems.append(f"`run` takes only `--set key=value` pairs (got `{rest[0][:40]}`)")
            break
        problem = _override_problem(rest[1], allow_set, overrides)
        if problem:
            problems.append(problem)
        else:
            overrides.append(rest[1])
        rest = rest[2:]
    if problems:
        return Refusal("refused: " + "; ".join(problems))
    return Command("run", overrides=tuple(overrides))


def _override_problem(pair: str, allow_set: list[str], earlier: list[str]) -> str | None:
    key, sep, value = pair.partition("=")
    if not sep:
        return f"`--set {pair[:60]}`: expected key=value, e.g. `--set train.learning_rate=1e-4`"
    if key not in allow_set:
        allowed = ", ".join(f"`{k}`" for k in allow_set) if allow_set else "none: chatops.allow_set is empty"
        return f"`--set {key[:60]}` is not allowed from a comment (allowed: {allowed})"
    if not VALUE.fullmatch(value):
        return f"`--set {key}`: the value must be a plain number or word (letters, digits, `._+-`, up to 64)"
    if any(o.partition("=")[0] == key for o in earlier):
        return f"`--set {key}` is given twice"
    return None


# --- the workflow's two ends -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """The parts of an `issue_comment` event chat-ops reads; the commenter's rights are asked of the API."""

    repo: str
    number: int
    is_pull_request: bool
    comment_id: int
    body: str
    login: str
    sha: str  # the default branch's commit the workflow runs on

    @classmethod
    def from_actions(cls) -> Event:
        path = os.environ.get("GITHUB_EVENT_PATH")
        repo = os.environ.get("GITHUB_REPOSITORY")
        if not path or not Path(path).is_file() or not repo:
            raise UsageError("chatops: no GitHub Actions event here (GITHUB_EVENT_PATH, GITHUB_REPOSITORY); run it "
                             "in a workflow on `issue_comment`")
        event = json.loads(Path(path).read_text(encoding="utf-8"))
        issue, comment = event.get("issue") or {}, event.get("comment") or {}
        if not issue.get("number") or not comment.get("id"):
            raise UsageError("chatops: the event is no issue comment; trigger the workflow `on: issue_comment`")
        return cls(repo=repo, number=int(issue["number"]), is_pull_request=bool(issue.get("pull_request")),
                   comment_id=int(comment["id"]), body=comment.get("body") or "",
                   login=(comment.get("user") or {}).get("login") or "", sha=os.environ.get("GITHUB_SHA", ""))


@dataclass
class Decision:
    command: Command | None
    message: str = ""
    sha: str = ""
    outputs: dict[str, str] = field(default_factory=dict)


class GitHub:
    """The few REST calls chat-ops makes, with the sticky comment's retries and error handling."""

    def __init__(self, token: str, api_url: str | None = None):
        from swiftci import comment

        self._comment = comment
        self.base = (api_url or os.environ.get("GITHUB_API_URL") or "https://api.github.com").rstrip("/")
        self.token = token
        self.session = comment._session(token)

    def call(self, method: str, path: str, **kwargs):
        try:
            return self._comment._call(self.session, method, self.base + path, **kwargs)
        except self._comment._Forbidden as e:
            raise StageError(f"GitHub refused {method} {path} (403: {e}); give the job the permissions "
                             "workflows/chatops.yml sets") from None

    def react(self, repo: str, comment_id: int, content: str) -> None:
        self.call("POST", f"/repos/{repo}/issues/comments/{comment_id}/reactions", json={"content": content})

    def permission(self, repo: str, login: str) -> str:
        from urllib.parse import quote

        return self.call("GET", f"/repos/{repo}/collaborators/{quote(login, safe='')}/permission").json().get(
            "permission") or "none"

    def head_sha(self, repo: str, number: int) -> str:
        return self.call("GET", f"/repos/{repo}/pulls/{number}").json()["head"]["sha"]

    def answer(self, repo: str, number: int, body: str) -> None:
        self._comment.post(MARKER + "\n" + body, repo=repo, pr=number, token=self.token, api_url=self.base,
                           mark=MARKER)


def token_from_env() -> str:
    token = os.environ.get("GITHUB_TOKEN") or os.environ.get("GH_TOKEN")
    if not token:
        raise UsageError("chatops: no GITHUB_TOKEN in the environment; give the step `env: GITHUB_TOKEN: "
                         "${{ github.token }}` (issues: write, pull-requests: write)")
    return token


def decide(event: Event, allow_set: list[str], github: GitHub) -> Decision:
    """👀 at once; then the commenter's right to write (from the API), the command, and the commit it runs on."""
    github.react(event.repo, event.comment_id, "eyes")
    permission = github.permission(event.repo, event.login)
    if permission not in WRITERS:
        result: Command | Refusal = Refusal(
            f"refused: `{_inert(event.login)}` has {permission} access to this repository; chat-ops commands need "
            "write access")
    else:
        result = parse(event.body, allow_set)
    if isinstance(result, Refusal):
        github.react(event.repo, event.comment_id, "-1")
        github.answer(event.repo, event.number, f"❌ {_by(event)}\n\n{result.message}\n")
        return Decision(None, result.message, outputs={"ok": "false", "message": result.message})
    sha = event.sha
    if event.is_pull_request and result.kind != "rollback":
        sha = github.head_sha(event.repo, event.number)
    where = ("the default branch, in the deploy environment (its reviewers approve it)" if result.kind == "rollback"
             else f"commit `{sha[:7]}` on the pull-request runners")
    github.answer(event.repo, event.number, f"⏳ {_by(event)}: `{result.line}` runs on {where}"
                  + _link() + "\n")
    outputs = {"ok": "true", "kind": result.kind, "line": result.line, "set": "\n".join(result.overrides),
               "sha": sha, "number": str(event.number), "message": ""}
    return Decision(result, sha=sha, outputs=outputs)


def answer(event: Event, line: str, outcome: str, github: GitHub, details: str = "") -> None:
    """The end of a run: 👍 and ✅ when it succeeded, 👎 and ❌ otherwise, in the chat-ops comment."""
    ok = outcome == "success"
    github.react(event.repo, event.comment_id, "+1" if ok else "-1")
    verdict = "passed" if ok else f"failed ({_inert(outcome)})"
    text = f"{'✅' if ok else '❌'} {_by(event)}: `{_inert(line)}` {verdict}" + _link()
    if details:  # job outputs, which a pull request's code can influence: one inert line
        text += "\n\n" + " ".join(details.split())[:300].replace("<", "&lt;").replace("@", "@\u200b")
    github.answer(event.repo, event.number, text + "\n")


def _by(event: Event) -> str:
    return f"chat-ops command from `{_inert(event.login)}`"


def _inert(text: str) -> str:
    """A login or an outcome as it appears inside a code span: no backtick can close it, no line break."""
    return " ".join(str(text).replace("`", "'").split())[:100]


def _link() -> str:
    url = runinfo.run_url()
    return f" — [workflow run]({url})" if url else ""
