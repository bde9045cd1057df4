"""Slack and Discord notifications that never hurt the run.

Events: `start`, `progress` (every `notify.progress_every` minutes), `finish`, `failure`. With a Slack bot token
one message per run is posted and then updated in place (`chat.update`); stage events go in its thread. Webhooks
(Slack incoming webhooks, Discord) get one message per event; Discord's finish message carries the loss curve.

Delivery is off the training loop's critical path: messages go through one background thread, over `requests`
with urllib3's `Retry` (5xx, 429 with Retry-After), short timeouts, and a circuit breaker: once an endpoint has
failed, its later messages are dropped with a single warning. `close()` waits a bounded time, so a notifier that is
down costs the run a few seconds at most and never fails it.

A channel whose `${VAR}` secret expands to nothing (GitHub gives a fork's pull request no secrets) is off for the run,
with one warning when the notifier is created.

The Slack bot's message is kept in `notify_state.json` under the train stage's folder, keyed by the run id of
`train_report.json`: later stages and resumed runs update it, a new run in the same folder posts its own.

Redaction: secret values (everything that came from `${VAR}` in swiftci.yaml, tokens, webhook URLs) never appear in
a payload; absolute paths are cut to their file names; token-like strings are masked.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swiftci import preference, reports, runinfo, stages
from swiftci.config import Config, NotifyConfig

CLOSE_BUDGET_SECONDS = 3.0
TIMEOUT = (2.0, 3.0)  # connect, read
COLORS = {"start": 0x5865F2, "progress": 0x5865F2, "finish": 0x2EB67D, "failure": 0xE01E5A, "stage": 0x8A8A8A}
ICONS = {"start": "🚀", "progress": "⏳", "finish": "✅", "failure": "❌", "stage": "▶️"}

_TOKEN_PATTERNS = [
    re.compile(r"xox[abposr]-[A-Za-z0-9-]{8,}"),  # Slack tokens
    re.compile(r"https://hooks\.slack\.com/[^\s)>\]]+"),
    re.compile(r"https://(?:\w+\.)?discord(?:app)?\.com/api/webhooks/[^\s)>\]]+"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}\b"),  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b"),
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),  # Hugging Face
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),  # OpenAI-style keys
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b"),  # JWTs
]
_ABS_PATH = re.compile(r"(?<![\w:/.~-])(?:~/|/)(?:[\w.@+-]+/)+([\w.@+-]+)")
MASK = "•••"


@dataclass
class Message:
    event: str  # start | progress | finish | failure | stage
    title: str
    text: str = ""
    fields: list[tuple[str, str]] = field(default_factory=list)
    mention: bool = False
    attachment: Path | None = None


class Redactor:
    def __init__(self, secrets: list[str]):
        found = set()
        for s in secrets:
            if not s or len(s) < 4:
                continue
            found.add(s)
            if "://" in s:  # a URL's path and its parts carry the credential (webhook ids and tokens)
                path = s.split("://", 1)[1].partition("/")[2].split("?")[0]
                if path:
                    found.add("/" + path)
                    found.update(part for part in path.split("/") if len(part) >= 8)
        self.secrets = sorted(found, key=len, reverse=True)

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            for s in self.secrets:
                value = value.replace(s, MASK)
            for pattern in _TOKEN_PATTERNS:
                value = pattern.sub(MASK, value)
            return _ABS_PATH.sub(lambda m: m.group(1), value)
        if isinstance(value, dict):
            return {k: self(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        return value


# --- payloads -----------------------------------------------------------------------------------------------------


def _mrkdwn(text: str) -> str:
    """Text for Slack's mrkdwn: `&`, `<` and `>` escaped, so a value from data or a report (`<!channel>`, a link)
    is shown, never interpreted. Our own links and the configured mentions are added after this."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(msg: Message, mentions: list[str]) -> dict:
    head = f"{ICONS.get(msg.event, '')} {msg.title}".strip()
    blocks: list[dict] = [{"type": "header", "text": {"type": "plain_text", "text": head[:150], "emoji": True}}]
    if msg.text:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(msg.text)[:2900]}})
    if msg.fields:
        blocks.append({"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{_mrkdwn(k)}*\n{_mrkdwn(v)}"[:2000]}
                                                     for k, v in msg.fields[:10]]})
    context = []
    if msg.mention and mentions:
        context.append(" ".join(mentions))
    url = runinfo.run_url()
    if url:
        context.append(f"<{url}|workflow run>")
    if context:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]})
    fallback = _mrkdwn(head + (f" — {msg.text}" if msg.text else ""))
    return {"text": fallback[:3000], "blocks": blocks}


def discord_payload(msg: Message, mentions: list[str]) -> dict:
    embed: dict[str, Any] = {"title": f"{ICONS.get(msg.event, '')} {msg.title}".strip()[:256],
                             "color": COLORS.get(msg.event, 0x8A8A8A)}
    if msg.text:
        embed["description"] = msg.text[:4000]
    if msg.fields:
        embed["fields"] = [{"name": k[:256], "value": (v or "—")[:1024], "inline": len(v) < 40}
                           for k, v in msg.fields[:25]]
    url = runinfo.run_url()
    if url:
        embed["url"] = url
    if msg.attachment is not None:
        embed["image"] = {"url": f"attachment://{msg.attachment.name}"}
    payload: dict[str, Any] = {"embeds": [embed], "allowed_mentions": {"parse": ["users", "roles"]}}
    if msg.mention and mentions:
        payload["content"] = " ".join(mentions)
    return payload


# --- delivery -----------------------------------------------------------------------------------------------------


def _session():
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    retry = Retry(total=3, connect=1, read=0, status=2, backoff_factor=0.3,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=None,
                  respect_retry_after_header=True, raise_on_status=False)
    s = requests.Session()
    s.mount("http://", HTTPAdapter(max_retries=retry))
    s.mount("https://", HTTPAdapter(max_retries=retry))
    s.headers["User-Agent"] = "swiftci"
    return s


class _Down(Exception):
    pass


def _channels(nc: NotifyConfig | None) -> tuple[list[str], dict[str, list[str]]]:
    """The channels that can post, and for each configured channel that cannot, its empty secrets' dotted paths."""
    usable: list[str] = []
    off: dict[str, list[str]] = {}
    if nc is None:
        return usable, off
    if nc.slack is not None:
        if nc.slack.webhook or nc.slack.token:
            usable.append("slack")
        else:
            off["slack"] = [f"notify.slack.{k}" for k in ("webhook", "token") if getattr(nc.slack, k) is not None]
    if nc.discord is not None:
        if nc.discord.webhook:
            usable.append("discord")
        else:
            off["discord"] = ["notify.discord.webhook"]
    return usable, off


def _off_warning(channel: str, paths: list[str]) -> str:
    name = {"slack": "Slack", "discord": "Discord"}[channel]
    if len(paths) == 1:
        which = f"{paths[0]} is empty (its secret is not set here"
    else:
        which = f"{' and '.join(paths)} are empty (their secrets are not set here"
    return f"{which}, e.g. a fork's pull request): {name} notifications are off for this run"


class Notifier:
    """Sends run events to the configured channels from a background thread; every method returns at once.

    `enabled=False` makes a notifier that sends nothing and says nothing (see `null_notifier`)."""

    def __init__(self, cfg: Config, state_path: Path | None = None, *, enabled: bool = True):
        nc = cfg.notify
        self.channels, off = _channels(nc) if enabled else ([], {})
        self.enabled = bool(self.channels)
        self.cfg = cfg
        self.events = set(nc.events) if nc is not None else set()
        owner = [cfg.owner] if cfg.owner else []
        self.mentions = (nc.mention if nc is not None and nc.mention is not None else owner)
        secrets = list(cfg.env_values)
        if nc is not None:
            for value in (nc.slack.webhook if nc.slack else None, nc.slack.token if nc.slack else None,
                          nc.discord.webhook if nc.discord else None):
                if value:
                    secrets.append(value)
        self.redact = Redactor(secrets)
        self.state_path = state_path or cfg.stage_dir("train") / "notify_state.json"
        self.warned: set[str] = set()
        self.down: set[str] = set()
        self.sent: list[tuple[str, str]] = []  # (channel, event) delivered, for reports and tests
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._session = None
        self._lock = threading.Lock()
        # the training callback and the stall watchdog emit from different threads: one worker, started once
        self._worker_lock = threading.Lock()
        self._slack_message: dict | None = None  # this notifier's own Slack bot message: {"run_id", "channel", "ts"}
        for channel, paths in off.items():
            self._warn(f"off:{channel}", _off_warning(channel, paths))

    # The events -------------------------------------------------------------------------------------------------

    def start(self, msg: Message) -> None:
        self._emit("start", msg)

    def progress(self, msg: Message) -> None:
        self._emit("progress", msg)

    def stage(self, msg: Message) -> None:
        """A stage finished inside a run (a thread reply for a Slack bot; a message for webhooks)."""
        self._emit("finish", msg)

    def finish(self, msg: Message) -> None:
        self._emit("finish", msg)

    def failure(self, msg: Message) -> None:
        msg.mention = True
        self._emit("failure", msg)

    def close(self, budget: float = CLOSE_BUDGET_SECONDS) -> None:
        """Wait at most `budget` seconds for queued messages; whatever is left is dropped with a warning."""
        # held while joining: an emit racing with close waits (at most `budget`) instead of starting a second worker
        # that could take the stop sentinel meant for this one
        with self._worker_lock:
            if self._thread is None:
                return
            self._queue.put(None)
            self._thread.join(timeout=budget)
            if self._thread.is_alive():
                self._warn("timeout", f"notifications: gave up after {budget:.0f} s waiting for an endpoint "
                                      "that does not answer; the run itself is unaffected")
            self._thread = None

    # Plumbing -----------------------------------------------------------------------------------------------------

    def _emit(self, event: str, msg: Message) -> None:
        if not self.enabled or event not in self.events:
            return
        msg.event = msg.event or event
        with self._worker_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="swiftci-notify", daemon=True)
                self._thread.start()
            self._queue.put(msg)

    def _worker(self) -> None:
        senders = {"slack": self._send_slack, "discord": self._send_discord}
        while True:
            msg = self._queue.get()
            if msg is None:
                return
            for channel in self.channels:
                self._deliver(channel, senders[channel], msg)

    def _deliver(self, channel: str, send, msg: Message) -> None:
        if channel in self.down:
            return
        try:
            send(msg)
            with self._lock:
                self.sent.append((channel, msg.event))
        except Exception as e:  # noqa: BLE001 - a notification must never fail the run
            self.down.add(channel)
            detail = str(e) if isinstance(e, _Down) else type(e).__name__  # never the URL: it holds the secret
            self._warn(channel, f"notifications: {channel} is unreachable or refused the message ({detail}); "
                                f"later {channel} messages of this run are dropped")

    def _warn(self, key: str, text: str) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        print(f"warning: {text}", file=sys.stderr, flush=True)

    def _http(self):
        if self._session is None:
            self._session = _session()
        return self._session

    def _post(self, url: str, **kwargs):
        resp = self._http().post(url, timeout=TIMEOUT, **kwargs)
        if resp.status_code >= 400:
            raise _Down(f"HTTP {resp.status_code}")
        return resp

    def _send_discord(self, msg: Message) -> None:
        payload = self.redact(discord_payload(msg, self.mentions))
        url = self.cfg.notify.discord.webhook
        if msg.attachment is not None and msg.attachment.is_file():
            with open(msg.attachment, "rb") as f:
                self._post(url, data={"payload_json": json.dumps(payload)},
                           files={"files[0]": (msg.attachment.name, f, "image/png")})
        else:
            self._post(url, json=payload)

    def _send_slack(self, msg: Message) -> None:
        slack = self.cfg.notify.slack
        payload = self.redact(slack_payload(msg, self.mentions))
        if slack.webhook:
            self._post(slack.webhook, json=payload)
            return
        api = slack.api_url.rstrip("/")
        headers = {"Authorization": f"Bearer {slack.token}"}
        run_id = stages.train_run_id(self.cfg)  # written before the first message
        state = self._slack_state(run_id)
        if state is None:  # the run's one message
            data = self._slack_call(f"{api}/chat.postMessage", headers, {"channel": slack.channel, **payload})
            self._slack_message = {"run_id": run_id, "channel": data["channel"], "ts": data["ts"]}
            self._save_state(self._slack_message)
            return
        main = {"channel": state["channel"], "ts": state["ts"], **payload}
        if msg.event == "progress":
            self._slack_call(f"{api}/chat.update", headers, main)
            return
        # stage events, finish and failure: the headline follows, the details go in the thread
        self._slack_call(f"{api}/chat.update", headers, main)
        self._slack_call(f"{api}/chat.postMessage", headers,
                         {"channel": state["channel"], "thread_ts": state["ts"], **payload})

    def _slack_call(self, url: str, headers: dict, body: dict) -> dict:
        resp = self._post(url, headers=headers, json=body)
        data = resp.json()
        if not data.get("ok"):
            raise _Down(f"Slack API error {data.get('error')!r}")
        return data

    def _slack_state(self, run_id: str | None) -> dict | None:
        """The Slack message of run `run_id`, or None when that run has none yet."""
        if self._slack_message is not None and self._slack_message["run_id"] == run_id:
            return self._slack_message
        if run_id is None:  # nothing ties another process's message to this run
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        # an earlier run's message (another run id, or a state file from before run ids were kept) is not ours
        if not isinstance(state, dict) or state.get("run_id") != run_id or not {"channel", "ts"} <= state.keys():
            return None
        return state

    def _save_state(self, state: dict) -> None:
        reports.write_json(self.state_path, state)


def null_notifier(cfg: Config) -> Notifier:
    return Notifier(cfg, enabled=False)


# --- messages from reports -----------------------------------------------------------------------------------------


def run_fields(cfg: Config, run_id: str | None) -> list[tuple[str, str]]:
    fields = [("run", f"`{run_id}`" if run_id else "—"), ("model", Path(cfg.model.id).name if
                                                           cfg.model_is_local else cfg.model.id)]
    if cfg.data is not None:
        fields.append(("dataset", Path(cfg.data.train).name))
    if cfg.train is not None:
        fields.append(("method", f"{cfg.train.method} · {cfg.train.tuner}"))
    return fields


def failure_message(cfg: Config, stage: str, run_id: str | None, error: dict) -> Message:
    """`error` is a report's failure (`stages.error`): what went wrong and how to fix it."""
    return Message("failure", f"{cfg.name}: {stage} failed",
                   text=f"*Why:* {error['reason']}\n*Try:* {error['hint']}",
                   fields=run_fields(cfg, run_id) + [("stage", stage), ("kind", error["kind"])])


def finish_message(cfg: Config, done: dict[str, dict]) -> Message:
    train = done.get("train") or {}
    m = train.get("metrics") or {}
    fields = run_fields(cfg, train.get("run_id"))
    job = train.get("job") or {}
    if job:  # trained as a cluster job (train.launcher: kubernetes): its losses are in the job's own report
        fields.append(("job", f"{job.get('kind')} {job.get('namespace')}/{job.get('name')}"))
    if m and "train_loss_last" in m:
        fields += [("loss", f"{m.get('train_loss_first', 0):.4g} → {m.get('train_loss_last', 0):.4g}"),
                   ("steps", str(m.get("steps"))), ("time", f"{m.get('wall_seconds', 0):.0f} s")]
        if preference.summary(m):
            fields.append(("rewards", preference.summary(m)))
    ev = done.get("evaluate")
    if ev:
        gates = ev.get("gates") or []
        fields.append(("eval verdict", f"{'PASS' if ev.get('passed') else 'FAIL'} "
                                       f"({sum(g['passed'] for g in gates)}/{len(gates)} gates)"))
    q = done.get("quantize")
    if q:
        qm = q.get("metrics") or {}
        fields.append(("quantized", f"{q.get('method', '').upper()} size ×{qm.get('size_ratio')}, perplexity "
                                    f"{qm.get('perplexity_increase_pct', 0):+.2f}%"))
    d = done.get("deploy")
    if d:
        fields.append(("deployed", str(d.get("status"))))
    plot = cfg.stage_dir("train") / "loss.png"
    return Message("finish", f"{cfg.name}: finished", fields=fields,
                   attachment=plot if plot.is_file() else None)
