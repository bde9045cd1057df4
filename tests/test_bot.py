"""`swiftci bot`, started for real on loopback: Slack requests signed with HMAC, Discord's with a real Ed25519 key
(PyNaCl); GitHub's API and the chat follow-up endpoints are the fakes of tests/fakes, reached over HTTP."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests
import yaml
from nacl.signing import SigningKey

from conftest import SWIFTCI, ROOT, _free_port, swiftci_in_process
from fakes.chat_api import FakeChat
from fakes.github_api import FakeGitHub

TOKEN = "ghs_bot_token_0a1b2c3d4e5f"
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
DISCORD_KEY = SigningKey(b"\x07" * 32)
BOT = {"repository": "acme/model-repo", "workflow": "swiftci.yml", "ref": "main",
       "inputs": ["model", "data", "learning_rate"], "required": ["model", "data"],
       "slack": {"users": ["U0ALLOWED"], "channels": ["C0ALLOWED"]},
       "discord": {"users": ["111"], "guilds": ["222"]}}


class Running:
    def __init__(self, url: str, github: FakeGitHub, chat: FakeChat, api: str, proc: subprocess.Popen):
        self.url, self.github, self.chat, self.api, self.proc = url, github, chat, api, proc

    def slack(self, form: dict, *, secret: str = SLACK_SECRET, ts: int | None = None, signed: bool = True,
              body: bytes | None = None):
        """`body`: sent instead of the form, with the form's signature (a request changed on its way)."""
        signed_body = urlencode(form).encode()
        body = body if body is not None else signed_body
        ts = int(time.time()) if ts is None else ts
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if signed:
            sig = "v0=" + hmac.new(secret.encode(), f"v0:{ts}:".encode() + signed_body, hashlib.sha256).hexdigest()
            headers |= {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sig}
        return requests.post(self.url + "/slack/commands", data=body, headers=headers, timeout=10)

    def discord(self, payload: dict | None, *, key: SigningKey = DISCORD_KEY, ts: int | None = None,
                body: bytes | None = None):
        body = body if body is not None else json.dumps(payload).encode()
        ts_text = str(int(time.time()) if ts is None else ts)
        sig = key.sign(ts_text.encode() + body).signature.hex()
        return requests.post(self.url + "/discord/interactions", data=body, timeout=10, headers={
            "Content-Type": "application/json", "X-Signature-Ed25519": sig, "X-Signature-Timestamp": ts_text})

    def wait_for_follow_ups(self, count: int) -> list[dict]:
        for _ in range(100):
            if len(self.chat.received) >= count:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # nothing more should come
        return self.chat.received


@pytest.fixture
def bot(tmp_path, httpserver):
    chat = FakeChat()
    chat.install(httpserver)  # first: the GitHub fake below answers every other path
    github = FakeGitHub(token=TOKEN)
    api = github.install(httpserver)
    cfg = tmp_path / "swiftci.yaml"
    cfg.write_text(yaml.safe_dump({"name": "bot-test", "model": {"id": "acme/base"}, "chatops": {"bot": BOT}}))
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLACK_SIGNING_SECRET": SLACK_SECRET, "GITHUB_TOKEN": TOKEN,
           "DISCORD_PUBLIC_KEY": DISCORD_KEY.verify_key.encode().hex(), "GITHUB_API_URL": api,
           "SWIFTCI_DISCORD_API_URL": api + "/discord/api", "SWIFTCI_SLACK_API_HOSTS": "127.0.0.1,localhost"}
    log = open(tmp_path / "bot.log", "w")
    proc = subprocess.Popen([*SWIFTCI, "bot", "-c", str(cfg), "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the bot did not start: " + (tmp_path / "bot.log").read_text())
    yield Running(url, github, chat, api, proc)
    proc.terminate()
    proc.wait(10)
    log.close()


def slack_form(api: str, **extra) -> dict:
    return {"command": "/finetune", "text": "model=qwen-7b-lora data=wiki_zh learning_rate=1e-4",
            "user_id": "U0ALLOWED", "channel_id": "C0ALLOWED", "team_id": "T1",
            "response_url": f"{api}/slack/hooks/T1/B1/xyz", **extra}


def test_a_signed_slack_command_dispatches_once_and_answers_with_the_run(bot):
    form = slack_form(bot.api)
    started, sent_at = time.monotonic(), int(time.time())
    resp = bot.slack(form, ts=sent_at)
    assert time.monotonic() - started < 3, "Slack wants an answer within 3 s"
    assert resp.status_code == 200 and resp.json()["text"] == "⏳ starting `swiftci.yml` …"
    (follow_up,) = bot.wait_for_follow_ups(1)
    assert bot.github.dispatches == [{"repo": "acme/model-repo", "workflow": "swiftci.yml", "ref": "main",
                                      "inputs": {"model": "qwen-7b-lora", "data": "wiki_zh", "learning_rate": "1e-4"}}]
    assert follow_up["path"] == "/slack/hooks/T1/B1/xyz"
    assert follow_up["json"]["text"] == ("✅ started `swiftci.yml` on `main` (model=qwen-7b-lora data=wiki_zh "
                                         "learning_rate=1e-4): "
                                         "https://github.example/acme/model-repo/actions/runs/9001")

    body = urlencode(form).encode()
    stale = int(time.time()) - 301
    for attempt in (bot.slack(form, ts=sent_at),  # the same signed request again: a replay
                    bot.slack(form, signed=False),
                    bot.slack(form, secret="not-the-signing-secret"),
                    bot.slack(form, ts=stale),  # signed correctly, 5 minutes and a second old
                    bot.slack(form, ts=int(time.time()) + 301),
                    bot.slack(form, body=body.replace(b"wiki_zh", b"wiki_en"), ts=int(time.time()) - 1)):
        assert attempt.status_code == 401 and attempt.json() == {"error": "unauthorized"}
    assert len(bot.github.dispatches) == 1 and len(bot.wait_for_follow_ups(1)) == 1


def test_a_signed_discord_command_answers_ping_defers_and_dispatches_once(bot):
    assert bot.discord({"type": 1}).json() == {"type": 1}
    interaction = {"type": 2, "id": "9", "application_id": "app1", "token": "tok-abc", "guild_id": "222",
                   "channel_id": "333", "member": {"user": {"id": "111"}},
                   "data": {"name": "finetune", "options": [{"name": "model", "type": 3, "value": "qwen-7b-lora"},
                                                            {"name": "data", "type": 3, "value": "wiki_zh"}]}}
    sent_at = int(time.time())
    resp = bot.discord(interaction, ts=sent_at)
    assert resp.status_code == 200 and resp.json() == {"type": 5}
    (follow_up,) = bot.wait_for_follow_ups(1)
    assert follow_up["method"] == "PATCH"
    assert follow_up["path"] == "/discord/api/webhooks/app1/tok-abc/messages/@original"
    assert "https://github.example/acme/model-repo/actions/runs/9001" in follow_up["json"]["content"]
    assert [d["inputs"] for d in bot.github.dispatches] == [{"model": "qwen-7b-lora", "data": "wiki_zh"}]

    for attempt in (bot.discord(interaction, ts=sent_at),  # replay
                    bot.discord(interaction, key=SigningKey(b"\x08" * 32)),  # forged: another key
                    bot.discord(interaction, ts=int(time.time()) - 400),  # stale
                    bot.discord({"type": 1}, key=SigningKey(b"\x08" * 32))):  # a forged PING too
        assert attempt.status_code == 401
    unsigned = requests.post(bot.url + "/discord/interactions", json=interaction, timeout=10)
    assert unsigned.status_code == 401
    assert len(bot.github.dispatches) == 1 and len(bot.wait_for_follow_ups(1)) == 1


@pytest.mark.parametrize("change,message", [
    ({"user_id": "U0STRANGER"}, "refused: you are not on this bot's allow-list (chatops.bot.slack.users)"),
    ({"channel_id": "C0OTHER"}, "refused: not in this channel (chatops.bot.slack.channels)"),
    ({"text": "model=qwen data=wiki ref=evil"}, "refused: `ref=evil`: expected key=value with a key among model, "
                                                "data, learning_rate. Usage: /finetune model=… data=…"),
    ({"text": "model=qwen"}, "refused: missing `data=…`. Usage: /finetune model=… data=…"),
    ({"text": "model=$(touch /tmp/pwned) data=`id`"}, "refused: characters a command never needs (U+0024 U+0028 "
                                                      "U+0029 U+0060); write plain `key=value` words"),
    ({"text": "model=qwen data=../../secrets"}, "refused: `data`: the value must be plain (letters, digits, "
                                                "`_./:+-`, no `..`, up to 200). Usage: /finetune model=… data=…"),
    ({"command": "/deploy"}, "refused: this bot answers /finetune only"),
    ({"response_url": "https://evil.example/hook"}, "refused: the response_url is not Slack's"),
])
def test_slack_requests_outside_the_allow_lists_are_refused(bot, change, message):
    resp = bot.slack(slack_form(bot.api, **change))
    assert resp.status_code == 200 and resp.json() == {"response_type": "ephemeral", "text": message}
    assert bot.github.dispatches == [] and bot.wait_for_follow_ups(0) == []


def test_discord_requests_outside_the_allow_lists_are_refused(bot):
    base = {"type": 2, "application_id": "app1", "token": "t", "guild_id": "222", "channel_id": "333",
            "member": {"user": {"id": "111"}}, "data": {"name": "finetune", "options": [
                {"name": "model", "value": "m"}, {"name": "data", "value": "d"}]}}
    for change, message in (({"member": {"user": {"id": "999"}}}, "chatops.bot.discord.users"),
                            ({"guild_id": "777"}, "chatops.bot.discord.guilds"),
                            ({"guild_id": None, "member": None, "user": {"id": "111"}}, "chatops.bot.discord.guilds")):
        resp = bot.discord({**base, **change})
        assert resp.status_code == 200 and resp.json()["type"] == 4 and message in resp.json()["data"]["content"]
        assert resp.json()["data"]["flags"] == 64  # only the asker sees it
    assert bot.github.dispatches == [] and bot.wait_for_follow_ups(0) == []


def test_bot_refuses_to_start_without_its_section_or_secrets(tmp_path):
    cfg = tmp_path / "swiftci.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "model": {"id": "acme/base"}}))
    proc = swiftci_in_process("bot", "-c", str(cfg), check=2)
    assert "chatops.bot: not set" in proc.stderr
    cfg.write_text(yaml.safe_dump({"name": "x", "model": {"id": "acme/base"}, "chatops": {"bot": BOT}}))
    proc = swiftci_in_process("bot", "-c", str(cfg), env={"GITHUB_TOKEN": "", "SLACK_SIGNING_SECRET": ""}, check=2)
    assert "bot: set GITHUB_TOKEN" in proc.stderr
    proc = swiftci_in_process("bot", "-c", str(cfg), env={"GITHUB_TOKEN": "x", "SLACK_SIGNING_SECRET": "",
                                                          "DISCORD_PUBLIC_KEY": ""}, check=2)
    assert "bot: set SLACK_SIGNING_SECRET" in proc.stderr
    proc = swiftci_in_process("bot", "-c", str(cfg), env={"GITHUB_TOKEN": "x", "DISCORD_PUBLIC_KEY": "not-hex"},
                              check=2)
    assert "bot: DISCORD_PUBLIC_KEY must be the application's public key, 64 hex digits" in proc.stderr
    bad = {**BOT, "repository": "acme", "inputs": ["model"], "required": ["model", "data"]}
    cfg.write_text(yaml.safe_dump({"name": "x", "model": {"id": "acme/base"}, "chatops": {"bot": bad}}))
    proc = swiftci_in_process("bot", "-c", str(cfg), check=2)
    lines = yaml.safe_dump({"name": "x", "model": {"id": "acme/base"}, "chatops": {"bot": bad}}).splitlines()
    where = {key: lines.index(next(x for x in lines if x.strip().startswith(key + ":"))) + 1
             for key in ("repository", "required")}
    assert (f"{cfg}:{where['repository']}: chatops.bot.repository: 'acme' is not OWNER/NAME, e.g. "
            "`acme/support-bot`") in proc.stderr
    assert f"{cfg}:{where['required']}: chatops.bot.required: data not in `inputs`; add them there" in proc.stderr


def test_the_bot_ships_as_an_image_and_valid_kubernetes_manifests(tmp_path):
    """deploy/bot: the manifests validate against Kubernetes 1.33's schemas (strict), and they, the Dockerfile and
    the bot agree on the config path, port, user, probe and the two paths Slack and Discord call."""
    import kubernetes_validate

    from swiftci.bot import DISCORD_PATH, SLACK_PATH

    proc = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy/bot")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(proc.stdout)}
    assert sorted(docs) == ["ConfigMap", "Deployment", "Ingress", "Service"]
    for doc in docs.values():
        kubernetes_validate.validate(doc, "1.33", strict=True)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert docs["Deployment"]["spec"]["replicas"] == 1, "the replay guard lives in one pod's memory"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]}
    assert secrets == {"GITHUB_TOKEN": "swiftci-bot", "SLACK_SIGNING_SECRET": "swiftci-bot",
                       "DISCORD_PUBLIC_KEY": "swiftci-bot"}
    paths = [p["path"] for rule in docs["Ingress"]["spec"]["rules"] for p in rule["http"]["paths"]]
    assert paths == [SLACK_PATH, DISCORD_PATH]

    dockerfile = (ROOT / "deploy/bot/Dockerfile").read_text()
    entry = json.loads(next(x for x in dockerfile.splitlines() if x.startswith("ENTRYPOINT "))[len("ENTRYPOINT "):])
    mount = container["volumeMounts"][0]["mountPath"]
    assert entry[:2] == ["swiftci", "bot"] and entry[entry.index("-c") + 1] == f"{mount}/swiftci.yaml"
    assert entry[entry.index("--port") + 1] == str(container["ports"][0]["containerPort"])
    assert f"USER {pod['securityContext']['runAsUser']}:" in dockerfile and ".[chatops]" in dockerfile

    config = tmp_path / "swiftci.yaml"  # the ConfigMap's swiftci.yaml is a valid config with a bot section
    config.write_text(docs["ConfigMap"]["data"]["swiftci.yaml"])
    assert swiftci_in_process("validate", "-c", str(config), check=0).returncode == 0


def test_an_older_github_without_run_details_still_gets_one_dispatch(bot):
    bot.github.legacy_dispatch = True
    assert bot.slack(slack_form(bot.api)).status_code == 200
    (follow_up,) = bot.wait_for_follow_ups(1)
    assert len(bot.github.dispatches) == 1
    assert follow_up["json"]["text"].endswith("): https://github.com/acme/model-repo/actions/workflows/swiftci.yml")


def test_a_request_too_large_is_refused_unread(bot):
    big = requests.post(bot.url + "/slack/commands", data=b"x" * (64 * 1024 + 1), timeout=10)
    assert big.status_code == 413 and bot.github.dispatches == []
