"""Comment commands: `swiftci chatops parse` on good and hostile bodies, `chatops.allow_set` checked at load, and
the workflow's two ends (`decide`, `answer`) against the fake GitHub API of tests/fakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, swiftci_in_process
from fakes.github_api import FakeGitHub
from test_actions import act, act_repo  # noqa: F401 (act_repo: the fixture, shared with test_actions)

TOKEN = "ghs_chatops_token_1a2b3c4d"
ALLOW = ["train.learning_rate", "train.max_steps"]
HEAD = "c0ffee0000000000000000000000000000000001"
DEFAULT = "d00d000000000000000000000000000000000002"


@pytest.fixture
def cfg(tmp_path) -> Path:
    path = tmp_path / "swiftci.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": {"id": "acme/base"},
                                    "notify": {"slack": {"token": "${UNSET_IN_THIS_JOB}", "channel": "C1"}},
                                    "chatops": {"allow_set": ALLOW}}))
    return path


def parse(cfg: Path, body: str):
    proc = swiftci_in_process("chatops", "parse", "-c", str(cfg), "--body", body)
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("body,expected", [
    ("/swiftci run", {"command": "run", "kind": "run", "flags": [], "set": [], "line": "/swiftci run"}),
    ("  /swiftci run --set train.learning_rate=1e-4 --set train.max_steps=5\n",
     {"command": "run", "kind": "run", "flags": [], "set": ["train.learning_rate=1e-4", "train.max_steps=5"],
      "line": "/swiftci run --set train.learning_rate=1e-4 --set train.max_steps=5"}),
    ("/swiftci evaluate", {"command": "evaluate", "kind": "evaluate", "flags": [], "set": [],
                           "line": "/swiftci evaluate"}),
    ("/swiftci deploy --dry-run", {"command": "deploy", "kind": "dry-run", "flags": ["--dry-run"], "set": [],
                                   "line": "/swiftci deploy --dry-run"}),
    ("/swiftci deploy --rollback", {"command": "deploy", "kind": "rollback", "flags": ["--rollback"], "set": [],
                                    "line": "/swiftci deploy --rollback"}),
])
def test_commands_parse_to_json(cfg, body, expected):
    """Only the chatops section is read: the job that parses has none of notify's secrets."""
    code, out = parse(cfg, body)
    assert code == 0 and out == {"version": 1, "ok": True, **expected}


SAFE = "commands are plain words of letters, digits and `._,:/+=@-` — no shell, quotes, `$`, backticks or `${{ }}`"


@pytest.mark.parametrize("body,message", [
    ("/swiftci run $(touch /tmp/pwned)", f"refused: characters a command never needs (`$` `(` `)`): {SAFE}"),
    ("/swiftci run `touch /tmp/pwned`", f"refused: characters a command never needs (U+0060): {SAFE}"),
    ("/swiftci run ${{ secrets.GITHUB_TOKEN }}", f"refused: characters a command never needs (`$` `{{` `}}`): {SAFE}"),
    ("/swiftci run --set train.max_steps=5;id", f"refused: characters a command never needs (`;`): {SAFE}"),
    ("/swiftci run --set 'train.max_steps=5'", f"refused: characters a command never needs (`'`): {SAFE}"),
    ("/swiftci run\u00a0--set\u200btrain.max_steps=5", f"refused: characters a command never needs (U+200B): {SAFE}"),
    ("/swiftci evaluate\n/swiftci deploy --rollback",
     "refused: a command is one line, alone in its comment: nothing on a second line is run"),
    ("/swiftci evaluate\r\nrm -rf /", "refused: a command is one line, alone in its comment: nothing on a second "
                                      "line is run"),
    ("/swiftci run --set deploy.image=evil/image",
     "refused: `--set deploy.image` is not allowed from a comment (allowed: `train.learning_rate`, `train.max_steps`)"),
    ("/swiftci run --set train.max_steps=5 --set train.max_steps=6", "refused: `--set train.max_steps` is given twice"),
    ("/swiftci run --set train.learning_rate=a/b", "refused: `--set train.learning_rate`: the value must be a plain "
                                                   "number or word (letters, digits, `._+-`, up to 64)"),
    ("/swiftci run --reuse", "refused: `run` takes only `--set key=value` pairs (got `--reuse`)"),
    ("/swiftci deploy", "`deploy` takes exactly one of `--dry-run` or `--rollback`"),
    ("/swiftci deploy --dry-run --rollback", "`deploy` takes exactly one of `--dry-run` or `--rollback`"),
    ("/swiftci train", "unknown command `train`; commands: `/swiftci run [--set key=value …]`, `/swiftci evaluate`, "
                       "`/swiftci deploy --dry-run` or `/swiftci deploy --rollback`"),
    ("/swiftcideploy", "not a swiftci command: write `/swiftci` then a space; commands: `/swiftci run [--set "
                       "key=value …]`, `/swiftci evaluate`, `/swiftci deploy --dry-run` or "
                       "`/swiftci deploy --rollback`"),
])
def test_anything_else_is_refused_with_a_message_and_runs_nothing(cfg, tmp_path, body, message):
    code, out = parse(cfg, body)
    assert code == 2 and out == {"version": 1, "ok": False, "message": message}
    assert not Path("/tmp/pwned").exists()


def test_an_empty_allow_set_allows_no_set(tmp_path):
    path = tmp_path / "swiftci.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "model": {"id": "acme/base"}}))
    code, out = parse(path, "/swiftci run --set train.max_steps=5")
    assert code == 2 and out["message"] == ("refused: `--set train.max_steps` is not allowed from a comment "
                                            "(allowed: none: chatops.allow_set is empty)")


def test_the_body_comes_from_stdin_without_a_shell(cfg):
    from click.testing import CliRunner

    from swiftci.cli import main

    result = CliRunner().invoke(main, ["chatops", "parse", "-c", str(cfg), "--body", "-"],
                                input="/swiftci run --set train.max_steps=3")
    assert result.exit_code == 0 and json.loads(result.stdout)["set"] == ["train.max_steps=3"]


@pytest.mark.parametrize("allow,message", [
    (["notify.slack.token"], "chatops.allow_set[0]: 'notify.slack.token' cannot be allowed: a comment must not "
                             "steer `notify`"),
    (["output_dir"], "chatops.allow_set[0]: 'output_dir' cannot be allowed: a comment must not steer `output_dir`"),
    (["train.lerning_rate"], "chatops.allow_set[0]: 'train.lerning_rate' is no config key; use a dotted key such "
                             "as `train.learning_rate` — did you mean 'learning_rate'?"),
    (["train.lora"], "chatops.allow_set[0]: 'train.lora' is a section; allow its keys one by one, e.g. "
                     "`train.lora.<key>`"),
])
def test_allow_set_names_real_keys_that_steer_no_secret(tmp_path, allow, message):
    path = tmp_path / "swiftci.yaml"
    path.write_text(f"name: x\nmodel: {{id: acme/base}}\nchatops:\n  allow_set: {json.dumps(allow)}\n")
    proc = swiftci_in_process("validate", "-c", str(path), check=2)
    assert f"{path}:4: {message}" in proc.stderr
    proc = swiftci_in_process("chatops", "parse", "-c", str(path), "--body", "/swiftci evaluate", check=2)
    assert f"{path}:4: {message}" in proc.stderr


# --- decide and answer, as the workflow's jobs call them ------------------------------------------------------------


@pytest.fixture
def github(httpserver):
    gh = FakeGitHub(token=TOKEN, permissions={"writer": "write", "admin-person": "admin", "reader": "read"},
                    heads={7: HEAD})
    gh.url = gh.install(httpserver)
    return gh


def in_actions(tmp_path: Path, github: FakeGitHub, body: str, login: str, *, pull_request: bool = True) -> dict:
    event = {"action": "created", "issue": {"number": 7, **({"pull_request": {"url": "…"}} if pull_request else {})},
             "comment": {"id": 555, "body": body, "user": {"login": login},
                         "author_association": "OWNER"},  # what the event claims; never believed
             "repository": {"full_name": "acme/model-repo"}}
    (tmp_path / "event.json").write_text(json.dumps(event))
    (tmp_path / "out.txt").write_text("")
    return {"GITHUB_EVENT_PATH": str(tmp_path / "event.json"), "GITHUB_REPOSITORY": "acme/model-repo",
            "GITHUB_SHA": DEFAULT, "GITHUB_TOKEN": TOKEN, "GITHUB_API_URL": github.url,
            "GITHUB_OUTPUT": str(tmp_path / "out.txt"), "GITHUB_SERVER_URL": "https://github.example",
            "GITHUB_RUN_ID": "42", "GITHUB_ACTIONS": "true"}


def outputs(tmp_path: Path) -> dict:
    text, out = (tmp_path / "out.txt").read_text(), {}
    lines = iter(text.splitlines())
    for line in lines:
        key, _, delimiter = line.partition("<<")
        value = []
        for inner in lines:
            if inner == delimiter:
                break
            value.append(inner)
        out[key] = "\n".join(value)
    return out


def test_a_writers_command_is_decided_on_the_pull_requests_head(cfg, tmp_path, github):
    env = in_actions(tmp_path, github, "/swiftci run --set train.max_steps=5", "writer")
    swiftci_in_process("chatops", "decide", "-c", str(cfg), env=env, check=0)
    assert outputs(tmp_path) == {"ok": "true", "kind": "run", "line": "/swiftci run --set train.max_steps=5",
                                 "set": "train.max_steps=5", "sha": HEAD, "number": "7", "message": ""}
    assert github.reactions == [(555, "eyes")]
    (answer,) = github.for_pr(7)
    assert answer["body"] == ("<!-- swiftci-chatops -->\n⏳ chat-ops command from `writer`: `/swiftci run --set "
                              "train.max_steps=5` runs on commit `c0ffee0` on the pull-request runners — [workflow "
                              "run](https://github.example/acme/model-repo/actions/runs/42)\n")
    swiftci_in_process("chatops", "answer", "--line", "/swiftci run --set train.max_steps=5", "--outcome", "success",
                       "--details", "train: ok", env=env, check=0)
    assert github.reactions == [(555, "eyes"), (555, "+1")]
    (answer,) = github.for_pr(7)  # the same comment, edited
    assert answer["body"].startswith("<!-- swiftci-chatops -->\n✅ chat-ops command from `writer`: `/swiftci run "
                                     "--set train.max_steps=5` passed — [workflow run](")
    assert answer["body"].endswith("\n\ntrain: ok\n")


def test_a_rollback_runs_the_default_branch_and_an_issue_comment_too(cfg, tmp_path, github):
    env = in_actions(tmp_path, github, "/swiftci deploy --rollback", "admin-person", pull_request=False)
    swiftci_in_process("chatops", "decide", "-c", str(cfg), env=env, check=0)
    out = outputs(tmp_path)
    assert out["kind"] == "rollback" and out["sha"] == DEFAULT
    assert "runs on the default branch, in the deploy environment (its reviewers approve it)" in github.for_pr(7)[0][
        "body"]
    assert ("GET", "/repos/acme/model-repo/pulls/7") not in github.requests


@pytest.mark.parametrize("login,body,message", [
    ("reader", "/swiftci run", "refused: `reader` has read access to this repository; chat-ops commands need write "
                               "access"),
    ("stranger", "/swiftci evaluate", "refused: `stranger` has read access to this repository; chat-ops commands "
                                      "need write access"),
    ("writer", "/swiftci run --set deploy.image=x", "refused: `--set deploy.image` is not allowed from a comment "
                                                    "(allowed: `train.learning_rate`, `train.max_steps`)"),
])
def test_a_refusal_is_answered_and_decides_nothing(cfg, tmp_path, github, login, body, message):
    env = in_actions(tmp_path, github, body, login)
    swiftci_in_process("chatops", "decide", "-c", str(cfg), env=env, check=0)
    assert outputs(tmp_path) == {"ok": "false", "message": message}
    assert github.reactions == [(555, "eyes"), (555, "-1")]
    assert github.for_pr(7)[0]["body"] == f"<!-- swiftci-chatops -->\n❌ chat-ops command from `{login}`\n\n{message}\n"
    assert ("GET", f"/repos/acme/model-repo/collaborators/{login}/permission") in github.requests


# --- workflows/chatops.yml, run for real with act ---------------------------------------------------------------


def comment_event(body: str, login: str, comment_id: int = 555) -> dict:
    return {"action": "created",
            "issue": {"number": 7, "title": "tune it", "pull_request": {"url": "https://api.github.example/pulls/7"}},
            "comment": {"id": comment_id, "body": body, "user": {"login": login, "type": "User"},
                        "author_association": "OWNER"},  # a lie the workflow must not believe
            "repository": {"full_name": "acme/model-repo", "name": "model-repo", "owner": {"login": "acme"},
                           "default_branch": "main", "private": True}}


@pytest.fixture
def chatops_repo(tiny_model, tmp_path):
    """A model repository with workflows/chatops.yml copied in unchanged, and a tiny swiftci.yaml (train only)."""
    import shutil

    from conftest import TINY
    from test_push_to_deploy import ModelRepo

    repo = ModelRepo(tmp_path / "model-repo", tiny_model)
    shutil.copy(ROOT / "workflows/chatops.yml", repo.root / ".github/workflows/swiftci-chatops.yml")
    cfg = yaml.safe_load((TINY / "swiftci.yaml").read_text())
    cfg["model"]["id"] = str(tiny_model)
    cfg["train"].update(max_steps=30, save_steps=1000, logging_steps=1)
    for section in ("evaluate", "quantize", "notify"):
        cfg.pop(section, None)
    cfg["deploy"] = {"target": "kubernetes", "engine": "transformers", "engine_image": "registry.example/engine:v1",
                     "image": "registry.example/tiny-reverse", "gpus": 0, "namespace": "ml", "model": "merged"}
    cfg["chatops"] = {"allow_set": ["train.max_steps", "train.learning_rate"]}
    repo.sha = repo.commit(cfg, "tiny model repo")
    return repo


def run_chatops(act_repo, repo, work: Path, github: FakeGitHub, body: str, login: str, *, comment_id: int = 555,
                store: Path | None = None):
    store = store or work / "store"
    store.mkdir(parents=True, exist_ok=True)
    return act(repo.root, work, "issue_comment", ".github/workflows/swiftci-chatops.yml",
               event_json=comment_event(body, login, comment_id), variables={"SWIFTCI_PR_MODEL_STORE": str(store)},
               env={"GITHUB_API_URL": github.url, "SWIFTCI_TEST_REPO": str(repo.root)},
               secrets={"GITHUB_TOKEN": TOKEN, "KUBECONFIG": "not-for-prs"},
               platforms=("self-hosted", "gpu-pr", "gpu"), swiftci_repo=act_repo, stand_ins={
                   "actions/checkout@11bd71901bbe5b1630ceea73d27597364c9af683": ROOT / "tests/fakes/checkout"})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_writers_comment_runs_on_the_pull_requests_head(act_repo, chatops_repo, github, tmp_path):
    """The pull request's head (seed 7) runs, not the default branch the workflow itself runs on (seed 42)."""
    repo = chatops_repo
    repo.git("checkout", "-q", "-b", "feature")
    cfg = yaml.safe_load((repo.root / "swiftci.yaml").read_text())
    cfg["train"]["seed"] = 7
    github.heads[7] = head = repo.commit(cfg, "a pull request's change")
    repo.git("checkout", "-q", "main")
    code, log = run_chatops(act_repo, chatops_repo, tmp_path / "run", github,
                            "/swiftci run --set train.max_steps=5", "writer")
    assert code == 0, log[-6000:]
    assert github.reactions == [(555, "eyes"), (555, "+1")]
    (answer,) = github.for_pr(7)
    assert answer["body"].startswith("<!-- swiftci-chatops -->\n✅ chat-ops command from `writer`: `/swiftci run "
                                     "--set train.max_steps=5` passed"), answer["body"]
    assert answer["body"].endswith("train: ok · evaluate: · quantize: · deploy:\n"), answer["body"]
    assert f"chatops: /swiftci run --set train.max_steps=5 on {head[:12]}" in log
    train = tmp_path / f"run/store/acme/model-repo/chatops-7/{head}/train"
    assert json.loads((train / "train_report.json").read_text())["metrics"]["steps"] == 5, "--set reached the run"
    assert json.loads((train / "run.json").read_text())["seed"] == 7, "the pull request's head ran"
    assert ("GET", "/repos/acme/model-repo/collaborators/writer/permission") in github.requests
    assert TOKEN not in log and "swiftci deploy" not in log

    # a second command on the same commit finds what the first made: the dry run renders what would ship
    code, log = run_chatops(act_repo, chatops_repo, tmp_path / "run2", github, "/swiftci deploy --dry-run", "writer",
                            comment_id=556, store=tmp_path / "run/store")
    assert code == 0, log[-6000:]
    assert github.reactions[2:] == [(556, "eyes"), (556, "+1")]
    (answer,) = github.for_pr(7)
    assert "✅ chat-ops command from `writer`: `/swiftci deploy --dry-run` passed" in answer["body"]
    assert answer["body"].endswith("train: · evaluate: · quantize: · deploy: dry_run\n"), answer["body"]
    deploy = train.parent / "deploy"
    assert json.loads((deploy / "deploy_report.json").read_text())["status"] == "dry_run"
    assert "kind: Deployment" in (deploy / "manifests.yaml").read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("login,body,message", [
    ("reader", "/swiftci run --set train.max_steps=5",
     "refused: `reader` has read access to this repository; chat-ops commands need write access"),
    ("writer", "/swiftci run --set train.max_steps=5 $(touch {pwned}-sub) `touch {pwned}-tick` "
               "${{{{ secrets.GITHUB_TOKEN }}}}\n/swiftci deploy --rollback\"; touch {pwned}-quote #",
     "refused: a command is one line, alone in its comment: nothing on a second line is run; characters a command "
     "never needs (`\"` `#` `$` `(` `)` `;` U+0060 `{` …): " + SAFE),
    ("writer", "/swiftci run --set deploy.image=evil",
     "refused: `--set deploy.image` is not allowed from a comment (allowed: `train.max_steps`, "
     "`train.learning_rate`)"),
])
def test_refused_comments_are_answered_and_run_nothing(act_repo, chatops_repo, github, tmp_path, login, body,
                                                       message):
    pwned = tmp_path / "pwned"
    code, log = run_chatops(act_repo, chatops_repo, tmp_path / "run", github, body.format(pwned=pwned), login)
    assert code == 0, log[-6000:]
    assert github.reactions == [(555, "eyes"), (555, "-1")]
    (answer,) = github.for_pr(7)
    assert answer["body"] == f"<!-- swiftci-chatops -->\n❌ chat-ops command from `{login}`\n\n{message}\n"
    assert not list(tmp_path.glob("pwned*")), "a payload in the comment was executed"
    assert not list((tmp_path / "run/store").iterdir()), "nothing ran on the pull-request runners"
    assert "swiftci train" not in log and TOKEN not in log
