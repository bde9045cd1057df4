"""Notifications and the training watchdog, with local HTTP receivers standing in for Slack and Discord
(pytest-httpserver) and real training runs of the tiny model."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from werkzeug import Request, Response

from conftest import TINY, read_json, swiftci, swiftci_in_process, tiny_config, write_config
from swiftci import config as configlib
from swiftci import reports
from swiftci.errors import ConfigError
from swiftci.notify import Message, Notifier, Redactor, null_notifier, slack_payload

SLACK_TOKEN = "xoxb-000000000000-000000000000-SECRETsecretSECRET"
HOOK_SECRET = "T0SECRETB0SECRETzz91hookpath"
RUN_ENV = {"GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "acme/model-repo",
           "GITHUB_RUN_ID": "4242"}


class Receiver:
    """Stands for Slack's Web API (chat.postMessage / chat.update) and for Slack and Discord webhooks."""

    def __init__(self, httpserver):
        self.calls: list[dict] = []
        self.raw: list[bytes] = []
        self.fail_next: list[tuple[int, dict]] = []
        self.times: list[float] = []
        self.ts = 0
        httpserver.expect_request(re.compile(".*")).respond_with_handler(self.handle)
        self.url = httpserver.url_for("/").rstrip("/")

    def handle(self, request: Request) -> Response:
        self.times.append(time.monotonic())
        self.raw.append(request.get_data() + json.dumps(dict(request.form)).encode())
        if self.fail_next:
            status, headers = self.fail_next.pop(0)
            return Response("busy", status=status, headers=headers)
        if request.files:
            body = json.loads(request.form["payload_json"])
            files = {k: f.read() for k, f in request.files.items()}
        else:
            body, files = request.get_json(silent=True) or {}, {}
        self.calls.append({"path": request.path, "body": body, "files": files,
                           "auth": request.headers.get("Authorization")})
        if request.path.endswith("chat.postMessage"):
            self.ts += 1
            return Response(json.dumps({"ok": True, "channel": "C0123", "ts": f"1700000000.{self.ts:06d}"}),
                            content_type="application/json")
        if request.path.endswith("chat.update"):
            return Response(json.dumps({"ok": True, "channel": "C0123", "ts": body.get("ts")}),
                            content_type="application/json")
        return Response("ok")

    def at(self, suffix: str) -> list[dict]:
        return [c for c in self.calls if c["path"].endswith(suffix)]


def notify_config(tiny_model, tmp_path, *, notify: dict, **sections) -> Path:
    cfg = tiny_config(tiny_model, tmp_path / "out", **sections)
    cfg["owner"] = "@alice"
    cfg["notify"] = notify
    cfg.pop("quantize", None)
    cfg.pop("deploy", None)
    return write_config(tmp_path / "swiftci.yaml", cfg)


def all_text(receiver: Receiver) -> str:
    return b"\n".join(receiver.raw).decode("utf-8", "replace")


@pytest.mark.slow
def test_run_events_with_a_slack_bot_and_discord(tiny_model, tmp_path, httpserver):
    """start, progress, stage and finish reach both channels; the Slack bot posts ONE message and updates it, with
    stage events in its thread; Discord's finish carries the loss curve; nothing secret or absolute leaks."""
    rx = Receiver(httpserver)
    cfg = notify_config(tiny_model, tmp_path, train={"max_steps": 60, "logging_steps": 5, "merge": False},
                        evaluate={"limit": 10, "tasks": ["tiny_reverse"], "gates": []},
                        notify={"slack": {"token": "${SLACK_BOT_TOKEN}", "channel": "C0123",
                                          "api_url": "${SLACK_API}"},
                                "discord": {"webhook": "${DISCORD_HOOK}"}, "progress_every": 0.0001})
    env = {**RUN_ENV, "SLACK_BOT_TOKEN": SLACK_TOKEN, "SLACK_API": f"{rx.url}/slack/api",
           "DISCORD_HOOK": f"{rx.url}/discord/{HOOK_SECRET}"}
    proc = swiftci_in_process("run", "-c", str(cfg), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    posts = rx.at("chat.postMessage")
    top = [c for c in posts if "thread_ts" not in c["body"]]
    assert len(top) == 1, "the bot posts one message per run"
    ts = "1700000000.000001"
    updates = rx.at("chat.update")
    assert updates and all(c["body"]["ts"] == ts for c in updates), "later events update that message"
    thread = [c for c in posts if c["body"].get("thread_ts") == ts]
    assert any("train ok" in c["body"]["text"] for c in thread) and any("finished" in c["body"]["text"]
                                                                         for c in thread)
    assert all(c["auth"] == f"Bearer {SLACK_TOKEN}" for c in posts + updates)
    start = top[0]["body"]
    assert "training started" in start["text"]
    fields = json.dumps(start["blocks"], ensure_ascii=False)
    for expected in ("*run*", "tiny-reverse-sft-", "*dataset*", "train.jsonl", "*method*", "sft · lora",
                     "*estimated duration*", "*estimated GPU-hours*", "0 (no GPU)"):
        assert expected in fields, expected
    progress = [c["body"] for c in updates if "step " in c["body"]["text"] and "/60" in c["body"]["text"]]
    assert progress, "progress updates the run's message"
    assert all(k in json.dumps(progress[0]["blocks"], ensure_ascii=False) for k in ("*loss*", "*learning rate*", "*tokens/s*",
                                                                 "*ETA*", "*memory*"))

    discord = rx.at(f"/discord/{HOOK_SECRET}")
    titles = [c["body"]["embeds"][0]["title"] for c in discord]
    assert titles[0].startswith("🚀") and any(t.startswith("⏳") for t in titles) and titles[-1].startswith("✅")
    finish = discord[-1]
    assert finish["files"] and next(iter(finish["files"].values())).startswith(b"\x89PNG")
    names = {f["name"] for f in finish["body"]["embeds"][0]["fields"]}
    assert {"loss", "steps", "eval verdict"} <= names
    assert finish["body"]["embeds"][0]["url"] == "https://github.com/acme/model-repo/actions/runs/4242"
    assert "content" not in finish["body"], "no mention when nothing failed"

    text = all_text(rx)
    assert SLACK_TOKEN not in text and HOOK_SECRET not in text
    assert str(tmp_path) not in text and str(TINY) not in text, "absolute paths must not leak"
    assert (tmp_path / "out/train/loss.png").read_bytes().startswith(b"\x89PNG")
    assert read_json(tmp_path / "out/train/train_report.json")["loss_plot"] == "loss.png"


@pytest.mark.slow
def test_divergence_stops_within_one_logging_step_keeps_the_last_good_checkpoint_and_notifies(
        tiny_model, tmp_path, httpserver):
    rx = Receiver(httpserver)
    cfg = notify_config(tiny_model, tmp_path, evaluate=None, notify={"discord": {"webhook": "${DISCORD_HOOK}"}},
                        train={"learning_rate": 5.0, "lr_scheduler": "linear", "warmup_ratio": 0.5,
                               "max_steps": 100, "save_steps": 10, "logging_steps": 5, "merge": False})
    proc = swiftci_in_process("train", "-c", str(cfg), env={"DISCORD_HOOK": f"{rx.url}/discord/{HOOK_SECRET}"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    out = tmp_path / "out/train"
    records = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    first_bad = next(r["step"] for r in records if not all(
        v is None or v == v and abs(v) != float("inf") for v in (r["loss"], r["grad_norm"])))
    report = read_json(out / "train_report.json")
    assert report["status"] == "failed" and report["error"]["kind"] == "Diverged"
    assert report["error"]["step"] == first_bad == records[-1]["step"], "stopped at the first non-finite log"
    good = out / "checkpoints" / report["error"]["last_good_checkpoint"]
    assert int(good.name.split("-")[1]) < first_bad
    from safetensors.torch import load_file

    weights = load_file(good / "adapter_model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values()), "the kept checkpoint is finite"
    assert not any(p.name.startswith("checkpoint-") and int(p.name.split("-")[1]) > first_bad
                   for p in (out / "checkpoints").iterdir())
    failure = rx.calls[-1]["body"]
    assert failure["embeds"][0]["title"].startswith("❌") and "train failed" in failure["embeds"][0]["title"]
    assert "diverged" in failure["embeds"][0]["description"] and "*Try:*" in failure["embeds"][0]["description"]
    assert failure["content"] == "@alice", "failures mention the owner"
    assert "training diverged at step" in proc.stderr


@pytest.mark.slow
def test_gradient_norm_threshold(tiny_model, tmp_path):
    cfg = notify_config(tiny_model, tmp_path, evaluate=None, notify={"events": ["failure"]},
                        train={"max_steps": 30, "watchdog": {"max_grad_norm": 0.001}, "merge": False})
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 4
    assert "exceeds train.watchdog.max_grad_norm (0.001)" in proc.stderr
    assert read_json(tmp_path / "out/train/train_report.json")["error"]["step"] == 1


@pytest.mark.slow
def test_no_optimizer_step_for_stall_minutes_fails(tiny_model, tmp_path):
    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "reverse: " + "abcd " * 80},
                                                          {"role": "assistant", "content": "dcba " * 80}]}) + "\n"
                                 for _ in range(64)))
    cfg = tiny_config(tiny_model, tmp_path / "out", train={
        "max_steps": 50, "max_length": 512, "batch_size": 32, "merge": False,
        "watchdog": {"stall_minutes": 0.0005}})  # 30 ms: every step of these long rows takes longer
    cfg["data"] = {"train": str(long_rows)}
    cfg.pop("evaluate")
    cfg.pop("quantize")
    # started with SIGINT ignored, as every background job of a non-interactive shell is: the watchdog's interrupt
    # still stops the training (without its handler, only the hard exit after 10 s would, saying it did not respond)
    proc = swiftci("train", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)),
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "error: no optimizer step finished for 0.0005 minutes (train.watchdog.stall_minutes)" in proc.stderr
    assert "did not respond" not in proc.stderr
    assert read_json(tmp_path / "out/train/train_report.json")["error"]["kind"] == "Stalled"


def _hanging_server() -> tuple[int, threading.Event]:
    """Accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = threading.Event()
    held = []

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue
        for c in held:
            c.close()
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    return sock.getsockname()[1], stop


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.slow
def test_a_run_with_endpoints_that_refuse_or_never_answer_succeeds(tiny_model, tmp_path):
    port, stop = _hanging_server()
    try:
        dead = notify_config(tiny_model, tmp_path / "dead", notify={
            "slack": {"webhook": "${SLACK_HOOK}"}, "discord": {"webhook": "${DISCORD_HOOK}"},
            "progress_every": 0.0001}, evaluate=None, train={"max_steps": 30, "logging_steps": 5, "merge": False})
        env = {"SLACK_HOOK": f"http://127.0.0.1:{_closed_port()}/hook",
               "DISCORD_HOOK": f"http://127.0.0.1:{port}/api/webhooks/1/{HOOK_SECRET}"}
        proc = swiftci_in_process("train", "-c", str(dead), env=env, check=0)
    finally:
        stop.set()
    assert read_json(tmp_path / "dead/out/train/train_report.json")["status"] == "ok"
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: notifications")]
    assert 1 <= len(warnings) <= 3, warnings  # one per endpoint (and one for giving up), not one per message
    assert HOOK_SECRET not in proc.stderr


def test_dead_endpoints_are_called_only_from_the_worker_thread(tiny_model, tmp_path, monkeypatch, capsys):
    """Whatever an endpoint does, the caller (the training loop) never waits on the network: every HTTP call is
    made by the notifier's own thread, and close() gives up on one that never answers, with a warning."""
    port, stop = _hanging_server()
    monkeypatch.setenv("SLACK_HOOK", f"http://127.0.0.1:{_closed_port()}/hook")
    monkeypatch.setenv("DISCORD_HOOK", f"http://127.0.0.1:{port}/api/webhooks/1/{HOOK_SECRET}")
    cfg = configlib.load(notify_config(tiny_model, tmp_path, evaluate=None, notify={
        "slack": {"webhook": "${SLACK_HOOK}"}, "discord": {"webhook": "${DISCORD_HOOK}"}}))
    notifier = Notifier(cfg)
    callers: list[str] = []
    post = notifier._post
    monkeypatch.setattr(notifier, "_post", lambda *a, **k: (callers.append(threading.current_thread().name),
                                                            post(*a, **k))[1])
    try:
        for i in range(5):
            notifier.progress(Message("progress", f"step {i}"))
        notifier.close(budget=0.5)
    finally:
        stop.set()
    assert callers and set(callers) == {"swiftci-notify"}, callers
    err = capsys.readouterr().err
    assert "notifications: slack is unreachable" in err and "gave up after" in err
    assert HOOK_SECRET not in err


# --- delivery and formatting, in process ---------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _loopback_slack_api(monkeypatch):
    """The Slack Web API stand-ins listen on loopback over http: allowed only because this names them."""
    monkeypatch.setenv("SWIFTCI_SLACK_API_HOSTS", "127.0.0.1,localhost")


@pytest.mark.parametrize("url", ["http://slack.com/api", "https://slack.com.evil.example/api",
                                 "https://evil.example/api", "http://127.0.0.2:8080/api"])
def test_a_slack_api_url_that_could_leak_the_bot_token_is_a_config_error(load_notify, url):
    with pytest.raises(ConfigError, match="notify.slack.api_url: .* would receive the bot token"):
        load_notify({"slack": {"token": "${SLACK_BOT_TOKEN}", "channel": "C0123", "api_url": url}},
                    SLACK_BOT_TOKEN=SLACK_TOKEN)


def test_slack_text_from_data_is_shown_never_interpreted():
    msg = Message("failure", "bot: <!channel> train failed", text="*Why:* row <!here|x> & <https://evil.example|ok>",
                  fields=[("dataset", "<!everyone>.jsonl")], mention=True)
    payload = slack_payload(msg, ["<@U012AB3CD>"])
    text = json.dumps([payload["text"], *payload["blocks"][1:]])  # the header is plain_text: never parsed
    assert "<!channel>" not in text and "<!here" not in text and "<!everyone>" not in text
    assert "<https://evil.example" not in text and "&lt;https://evil.example|ok&gt;" in text
    assert "&amp;" in text and "<@U012AB3CD>" in json.dumps(payload["blocks"][-1]), "the configured mention stays"


@pytest.fixture
def webhook_cfg(tiny_model, tmp_path, monkeypatch):
    def make(url: str, **notify) -> configlib.Config:
        monkeypatch.setenv("SLACK_HOOK", url)
        path = notify_config(tiny_model, tmp_path, evaluate=None,
                             notify={"slack": {"webhook": "${SLACK_HOOK}"}, **notify})
        return configlib.load(path)

    return make


def test_500_then_success_is_retried(webhook_cfg, httpserver):
    rx = Receiver(httpserver)
    rx.fail_next = [(500, {})]
    n = Notifier(webhook_cfg(f"{rx.url}/hook"))
    n.finish(Message("finish", "done"))
    n.close()
    assert len(rx.calls) == 1 and n.sent == [("slack", "finish")] and not n.warned


def test_429_retry_after_is_respected(webhook_cfg, httpserver):
    rx = Receiver(httpserver)
    rx.fail_next = [(429, {"Retry-After": "2"})]
    n = Notifier(webhook_cfg(f"{rx.url}/hook"))
    n.finish(Message("finish", "done"))
    n.close(budget=10)
    assert len(rx.calls) == 1 and len(rx.times) == 2
    assert rx.times[1] - rx.times[0] >= 1.9


def test_a_failed_endpoint_is_dropped_after_one_warning(webhook_cfg, capsys):
    n = Notifier(webhook_cfg(f"http://127.0.0.1:{_closed_port()}/hook"))
    for i in range(5):
        n.progress(Message("progress", f"step {i}"))
    n.close()
    assert capsys.readouterr().err.count("warning: notifications") == 1 and n.sent == []


def test_events_filter(webhook_cfg, httpserver):
    rx = Receiver(httpserver)
    n = Notifier(webhook_cfg(f"{rx.url}/hook", events=["failure"]))
    n.start(Message("start", "s"))
    n.finish(Message("finish", "f"))
    n.failure(Message("failure", "boom"))
    n.close()
    assert [c["body"]["text"][:6] for c in rx.calls] == ["❌ boom"]


def test_slack_webhook_payload_reads_well():
    payload = slack_payload(Message("failure", "bot: train failed", text="*Why:* NaN", fields=[("run", "`r1`")],
                                    mention=True), ["<@U012AB3CD>"])
    kinds = [b["type"] for b in payload["blocks"]]
    assert kinds == ["header", "section", "section", "context"]
    assert payload["blocks"][0]["text"]["text"] == "❌ bot: train failed"
    assert payload["blocks"][3]["elements"][0]["text"] == "<@U012AB3CD>"
    assert payload["text"].startswith("❌ bot: train failed")


@pytest.mark.parametrize("raw,clean", [
    ("data at /home/ci/private/customers.jsonl", "data at customers.jsonl"),
    ("see ~/datasets/v2/train.jsonl now", "see train.jsonl now"),
    ("token xoxb-1234567890-abcdefghij", "token •••"),
    ("hf_abcdefghijklmnopqrstuvwxyz123", "•••"),
    ("posting to https://hooks.slack.com/services/T0/B0/abc", "posting to •••"),
    ("run https://github.com/acme/repo/actions/runs/1 ok", "run https://github.com/acme/repo/actions/runs/1 ok"),
    ("ratio 3/4 and a/b", "ratio 3/4 and a/b"),
    ("secret hunter2hunter2 here", "secret ••• here"),
])
def test_redaction(raw, clean):
    assert Redactor(["hunter2hunter2"])(raw) == clean


# --- secrets that are not set here (a fork's pull request) ---------------------------------------------------------

SLACK_OFF = ("warning: notify.slack.webhook is empty (its secret is not set here, e.g. a fork's pull request): "
             "Slack notifications are off for this run")


@pytest.fixture
def load_notify(tiny_model, tmp_path, monkeypatch):
    """Loads a config with the given `notify` section, the environment set as given."""
    def load(notify: dict, **env: str) -> configlib.Config:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return configlib.load(notify_config(tiny_model, tmp_path, evaluate=None, notify=notify))

    return load


def test_an_empty_secret_turns_its_channel_off_with_one_warning(load_notify, httpserver, capsys):
    rx = Receiver(httpserver)
    cfg = load_notify({"slack": {"webhook": "${SLACK_HOOK}"}, "discord": {"webhook": "${DISCORD_HOOK}"}},
                      SLACK_HOOK="", DISCORD_HOOK=f"{rx.url}/discord/{HOOK_SECRET}")
    assert capsys.readouterr().err == "", "loading says nothing; the notifier does"
    n = Notifier(cfg)
    n.start(Message("start", "s"))
    n.failure(Message("failure", "boom"))
    n.close()
    assert capsys.readouterr().err.splitlines() == [SLACK_OFF]
    assert n.sent == [("discord", "start"), ("discord", "failure")]
    assert [c["path"] for c in rx.calls] == [f"/discord/{HOOK_SECRET}"] * 2


def test_every_channel_off_sends_nothing_and_null_notifier_stays_quiet(load_notify, capsys):
    cfg = load_notify({"slack": {"webhook": "${SLACK_HOOK:-}", "token": "${SLACK_TOKEN:-}", "channel": "C0123"},
                       "discord": {"webhook": "${DISCORD_HOOK}"}}, DISCORD_HOOK="")
    quiet = null_notifier(cfg)
    assert capsys.readouterr().err == ""
    n = Notifier(cfg)
    assert capsys.readouterr().err.splitlines() == [
        "warning: notify.slack.webhook and notify.slack.token are empty (their secrets are not set here, e.g. a "
        "fork's pull request): Slack notifications are off for this run",
        "warning: notify.discord.webhook is empty (its secret is not set here, e.g. a fork's pull request): Discord "
        "notifications are off for this run"]
    for notifier in (n, quiet):
        notifier.start(Message("start", "s"))
        notifier.failure(Message("failure", "boom"))
        notifier.close()
        assert not notifier.enabled and notifier._thread is None and notifier.sent == []
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("notify,env,problem", [
    ({"slack": {"webhook": ""}}, {}, "notify.slack.webhook: empty; write a reference such as ${SLACK_WEBHOOK}"),
    ({"discord": {"webhook": ""}}, {}, "notify.discord.webhook: empty; write a reference"),
    ({"slack": {"webhook": "https://hooks.example.invalid/T0/B0/x"}}, {}, "a literal value here would be committed"),
    ({"slack": {"webhook": "${NOT_EXPORTED_HOOK}"}}, {}, "environment variable NOT_EXPORTED_HOOK is not set"),
    ({"slack": {"token": "${SLACK_TOKEN}"}}, {"SLACK_TOKEN": ""}, "a bot `token` needs a `channel`"),
    ({"slack": {"webhook": "${A}", "token": "${B}", "channel": "C1"}}, {"A": "x" * 8, "B": "y" * 8},
     "set exactly one of `webhook`"),
])
def test_notify_config_errors_that_stay_errors(load_notify, monkeypatch, notify, env, problem):
    monkeypatch.delenv("NOT_EXPORTED_HOOK", raising=False)
    with pytest.raises(ConfigError) as e:
        load_notify(notify, **env)
    assert problem in str(e.value)


def test_an_empty_webhook_beside_a_token_leaves_the_bot(load_notify, httpserver, capsys):
    rx = Receiver(httpserver)
    cfg = load_notify({"slack": {"webhook": "${SLACK_HOOK}", "token": "${SLACK_TOKEN}", "channel": "C0123",
                                 "api_url": "${SLACK_API}"}},
                      SLACK_HOOK="", SLACK_TOKEN=SLACK_TOKEN, SLACK_API=f"{rx.url}/slack/api")
    n = Notifier(cfg)
    n.finish(Message("finish", "done"))
    n.close()
    assert [c["path"] for c in rx.calls] == ["/slack/api/chat.postMessage"] and capsys.readouterr().err == ""


@pytest.mark.slow
def test_validate_and_train_go_on_without_the_secret(tiny_model, tmp_path):
    cfg = notify_config(tiny_model, tmp_path, evaluate=None, train={"max_steps": 6, "logging_steps": 2,
                                                                    "merge": False},
                        notify={"slack": {"webhook": "${SLACK_WEBHOOK_URL}"}, "progress_every": 0.0001})
    env = {"SLACK_WEBHOOK_URL": ""}
    checked = swiftci("validate", "-c", str(cfg), env=env, check=0)
    assert "ok" in checked.stdout
    proc = swiftci_in_process("train", "-c", str(cfg), env=env, check=0)
    assert proc.stderr.count("notify.slack.webhook is empty") == 1, proc.stderr[-2000:]
    assert read_json(tmp_path / "out/train/train_report.json")["status"] == "ok"


# --- the Slack bot's message belongs to one run ---------------------------------------------------------------------


def test_a_new_run_in_the_same_folder_posts_its_own_slack_message(load_notify, httpserver):
    rx = Receiver(httpserver)
    cfg = load_notify({"slack": {"token": "${SLACK_BOT_TOKEN}", "channel": "C0123", "api_url": "${SLACK_API}"}},
                      SLACK_BOT_TOKEN=SLACK_TOKEN, SLACK_API=f"{rx.url}/slack/api")
    train_dir = cfg.stage_dir("train")
    reports.write_json(train_dir / "notify_state.json", {"channel": "C0123", "ts": "1600000000.000001"})  # no run id

    def run(run_id: str, *events: str) -> None:
        reports.write_json(train_dir / "train_report.json", reports.new_report("train", "running", run_id=run_id))
        n = Notifier(cfg)
        for event in events:
            getattr(n, event)(Message(event, f"{run_id} {event}"))
        n.close()
        assert n.sent == [("slack", e) for e in events]

    run("r1", "start", "progress", "finish")
    run("r2", "start", "progress")
    run("r2", "finish")  # a later command of run r2 (evaluate, or a resume) keeps r2's message

    posts = rx.at("chat.postMessage")
    ts = {id(c): f"1700000000.{i:06d}" for i, c in enumerate(posts, 1)}
    top = [(c["body"]["text"], ts[id(c)]) for c in posts if "thread_ts" not in c["body"]]
    assert [text for text, _ in top] == ["🚀 r1 start", "🚀 r2 start"], "one message per run, none for the old state"
    (_, ts1), (_, ts2) = top
    assert [(c["body"]["text"], c["body"]["ts"]) for c in rx.at("chat.update")] == [
        ("⏳ r1 progress", ts1), ("✅ r1 finish", ts1), ("⏳ r2 progress", ts2), ("✅ r2 finish", ts2)]
    assert [(c["body"]["text"], c["body"]["thread_ts"]) for c in posts if "thread_ts" in c["body"]] == [
        ("✅ r1 finish", ts1), ("✅ r2 finish", ts2)]
    assert read_json(train_dir / "notify_state.json") == {"run_id": "r2", "channel": "C0123", "ts": ts2}


# --- one worker, however many threads emit ----------------------------------------------------------------------


def test_concurrent_emits_start_one_worker_and_deliver_each_message_once(webhook_cfg, httpserver, monkeypatch):
    rx = Receiver(httpserver)
    n = Notifier(webhook_cfg(f"{rx.url}/hook"))
    workers = []
    real_thread = threading.Thread

    class SlowToStart(real_thread):
        """Widens the window between "no worker yet" and "worker recorded" that unguarded emits race through."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.name == "swiftci-notify":
                workers.append(self)
                time.sleep(0.05)

    emitters = 8
    barrier = threading.Barrier(emitters)

    def emit(i: int) -> None:
        barrier.wait()
        n.progress(Message("progress", f"m{i}"))

    threads = [real_thread(target=emit, args=(i,)) for i in range(emitters)]
    monkeypatch.setattr(threading, "Thread", SlowToStart)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    n.close(budget=10)
    assert len(workers) == 1, f"{len(workers)} workers started"
    assert sorted(c["body"]["text"] for c in rx.calls) == sorted(f"⏳ m{i}" for i in range(emitters))
    assert not workers[0].is_alive()
