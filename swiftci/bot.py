"""`swiftci bot`: a small HTTP app that turns a Slack slash command or a Discord command into a GitHub
`workflow_dispatch` of one configured workflow (`chatops.bot`).

    /finetune model=qwen-7b-lora data=wiki_zh learning_rate=1e-4

Every request is checked before its body is read as a command: Slack's v0 signature (HMAC-SHA256 of
`v0:<timestamp>:<body>` with `SLACK_SIGNING_SECRET`), Discord's Ed25519 signature of `<timestamp><body>` with the
application's `DISCORD_PUBLIC_KEY`; a timestamp more than 5 minutes away from now, or a signature already seen
within that window (a replay), is refused like a forged one: 401, nothing done. Then the user, channel and guild
must be on the allow-lists, and every `key=value` must name an allowed workflow input with a plain value.

The answer comes at once (Slack wants one within 3 s, Discord a deferred reply); the dispatch happens after it,
and its result — the run's link — is posted to Slack's `response_url` or as Discord's follow-up. The run's finish
message comes from the dispatched workflow's own `notify` section, as for any run.

Standard library only (http.server), plus PyNaCl for Ed25519.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, urlsplit

from swiftci.config import ChatopsBotConfig
from swiftci.errors import UsageError

SLACK_PATH = "/slack/commands"
DISCORD_PATH = "/discord/interactions"
WINDOW_SECONDS = 300
MAX_BODY = 64 * 1024
WORD = re.compile(r"[A-Za-z0-9_.,:/+=@-]+", re.ASCII)
VALUE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:+-]{0,199}", re.ASCII)
EPHEMERAL = 64  # Discord message flag


@dataclass(frozen=True)
class Settings:
    """What the bot reads from its environment (secrets never come from swiftci.yaml)."""

    slack_signing_secret: str
    discord_public_key: str
    github_token: str
    github_api: str
    github_server: str
    discord_api: str

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        s = cls(slack_signing_secret=env.get("SLACK_SIGNING_SECRET", ""),
                discord_public_key=env.get("DISCORD_PUBLIC_KEY", ""),
                github_token=env.get("GITHUB_TOKEN", ""),
                github_api=env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/"),
                github_server=env.get("GITHUB_SERVER_URL", "https://github.com").rstrip("/"),
                discord_api=env.get("SWIFTCI_DISCORD_API_URL", "https://discord.com/api/v10").rstrip("/"))
        if not s.github_token:
            raise UsageError("bot: set GITHUB_TOKEN (a GitHub App installation token or a fine-grained token with "
                             "actions: write on the repository)")
        if not s.slack_signing_secret and not s.discord_public_key:
            raise UsageError("bot: set SLACK_SIGNING_SECRET (Slack app → Basic Information → Signing Secret) and/or "
                             "DISCORD_PUBLIC_KEY (Discord application → General Information → Public Key)")
        if s.discord_public_key:
            if not re.fullmatch(r"[0-9a-fA-F]{64}", s.discord_public_key):
                raise UsageError("bot: DISCORD_PUBLIC_KEY must be the application's public key, 64 hex digits "
                                 "(Discord application → General Information → Public Key)")
            try:
                import nacl.signing  # noqa: F401
            except ImportError:
                raise UsageError("bot: Discord's signatures need PyNaCl; pip install 'swiftci[chatops]'") from None
        return s


@dataclass(frozen=True)
class Ask:
    """A signed, allowed request: who asked, what for, and where the result goes."""

    platform: str  # slack | discord
    user: str
    inputs: dict[str, str]
    reply_to: str  # Slack's response_url, or Discord's follow-up webhook URL


class Refused(Exception):
    """A request the bot answers but does not act on (allow-lists, bad input); `status` 401 for a bad signature."""

    def __init__(self, message: str, status: int = 200):
        super().__init__(message)
        self.status = status


# --- signatures ------------------------------------------------------------------------------------------------


class Replays:
    """Signatures seen in the last WINDOW_SECONDS: the same signed request twice is a replay."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_time(self, signature: str, now: float) -> bool:
        with self._lock:
            self._seen = {s: t for s, t in self._seen.items() if t > now - 2 * WINDOW_SECONDS}
            if signature in self._seen:
                return False
            self._seen[signature] = now
            return True


def _fresh(timestamp: str, now: float) -> bool:
    return timestamp.isdigit() and abs(now - int(timestamp)) <= WINDOW_SECONDS


def check_slack(secret: str, headers, body: bytes, now: float, replays: Replays) -> None:
    ts, sig = headers.get("X-Slack-Request-Timestamp", ""), headers.get("X-Slack-Signature", "")
    if not secret:
        raise Refused("Slack is not set up on this bot (SLACK_SIGNING_SECRET)", 401)
    if not _fresh(ts, now):
        raise Refused("stale or missing timestamp", 401)
    expected = "v0=" + hmac.new(secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, sig):
        raise Refused("bad signature", 401)
    if not replays.first_time(sig, now):
        raise Refused("replayed request", 401)


def check_discord(public_key: str, headers, body: bytes, now: float, replays: Replays) -> None:
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    ts, sig = headers.get("X-Signature-Timestamp", ""), headers.get("X-Signature-Ed25519", "")
    if not public_key:
        raise Refused("Discord is not set up on this bot (DISCORD_PUBLIC_KEY)", 401)
    if not _fresh(ts, now):
        raise Refused("stale or missing timestamp", 401)
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(ts.encode() + body, bytes.fromhex(sig))
    except (ValueError, BadSignatureError):
        raise Refused("bad signature", 401) from None
    if not replays.first_time(sig, now):
        raise Refused("replayed request", 401)


# --- what a request asks for ----------------------------------------------------------------------------------


def inputs_from(words: list[str], bot: ChatopsBotConfig) -> dict[str, str]:
    """`key=value` words -> workflow inputs, every key allowed and every value plain; all problems at once."""
    unsafe = sorted({c for w in words for c in w if not WORD.fullmatch(c)})
    if unsafe:
        raise Refused("refused: characters a command never needs (" + " ".join(f"U+{ord(c):04X}" for c in unsafe[:8])
                      + "); write plain `key=value` words")
    inputs, problems = {}, []
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in bot.inputs:
            problems.append(f"`{word[:40]}`: expected key=value with a key among {', '.join(bot.inputs)}")
        elif not VALUE.fullmatch(value) or ".." in value:
            problems.append(f"`{key}`: the value must be plain (letters, digits, `_./:+-`, no `..`, up to 200)")
        elif key in inputs:
            problems.append(f"`{key}` is given twice")
        else:
            inputs[key] = value
    given = {w.partition("=")[0] for w in words}
    missing = [k for k in bot.required if k not in given]  # a bad value is named above, not as missing
    if missing:
        problems.append("missing " + ", ".join(f"`{k}=…`" for k in missing))
    if problems:
        raise Refused(f"refused: {'; '.join(problems)}. Usage: /{bot.command} "
                      + " ".join(f"{k}=…" for k in bot.required))
    return inputs


def slack_ask(body: bytes, bot: ChatopsBotConfig) -> Ask:
    form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
    allow = bot.slack
    if allow is None:
        raise Refused("refused: Slack commands are off (chatops.bot.slack is not set)")
    if form.get("command", "").lstrip("/") != bot.command:
        raise Refused(f"refused: this bot answers /{bot.command} only")
    if form.get("user_id") not in allow.users:
        raise Refused("refused: you are not on this bot's allow-list (chatops.bot.slack.users)")
    if form.get("channel_id") not in allow.channels:
        raise Refused("refused: not in this channel (chatops.bot.slack.channels)")
    reply_to = form.get("response_url", "")
    if not _slack_host(reply_to):
        raise Refused("refused: the response_url is not Slack's")
    return Ask("slack", form["user_id"], inputs_from(form.get("text", "").split(), bot), reply_to)


def _slack_host(url: str) -> bool:
    """Slack's own https hosts, or one the bot's SWIFTCI_SLACK_API_HOSTS allows (plain http only on loopback)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    allowed = {h.strip().lower() for h in os.environ.get("SWIFTCI_SLACK_API_HOSTS", "").split(",") if h.strip()}
    if parts.scheme == "https":
        return host == "slack.com" or host.endswith(".slack.com") or host in allowed
    return parts.scheme == "http" and host in allowed and host in ("127.0.0.1", "localhost", "::1")


def discord_ask(interaction: dict, bot: ChatopsBotConfig, settings: Settings) -> Ask:
    allow = bot.discord
    if allow is None:
        raise Refused("refused: Discord commands are off (chatops.bot.discord is not set)")
    data = interaction.get("data") or {}
    if data.get("name") != bot.command:
        raise Refused(f"refused: this bot answers /{bot.command} only")
    user = str(((interaction.get("member") or {}).get("user") or interaction.get("user") or {}).get("id", ""))
    if user not in allow.users:
        raise Refused("refused: you are not on this bot's allow-list (chatops.bot.discord.users)")
    if str(interaction.get("guild_id", "")) not in allow.guilds:
        raise Refused("refused: not in this server (chatops.bot.discord.guilds)")
    if allow.channels and str(interaction.get("channel_id", "")) not in allow.channels:
        raise Refused("refused: not in this channel (chatops.bot.discord.channels)")
    words = []
    for option in data.get("options") or []:  # options named like inputs, and `args` with more key=value words
        value = str(option.get("value", ""))
        words += value.split() if option.get("name") == "args" else [f"{option.get('name')}={value}"]
    app, token = str(interaction.get("application_id", "")), str(interaction.get("token", ""))
    reply_to = f"{settings.discord_api}/webhooks/{quote(app, safe='')}/{quote(token, safe='')}"
    return Ask("discord", user, inputs_from(words, bot), reply_to)


# --- after the answer: dispatch, then say where the run is ---------------------------------------------------------


def dispatch(bot: ChatopsBotConfig, inputs: dict[str, str], settings: Settings) -> str:
    """One workflow_dispatch (never retried: a retry could start a second run); the run's link."""
    import requests

    url = f"{settings.github_api}/repos/{bot.repository}/actions/workflows/{quote(bot.workflow, safe='')}/dispatches"
    headers = {"Authorization": f"Bearer {settings.github_token}", "Accept": "application/vnd.github+json",
               "X-GitHub-Api-Version": "2022-11-28", "User-Agent": "swiftci-bot"}
    body = {"ref": bot.ref, "inputs": inputs, "return_run_details": True}
    resp = requests.post(url, json=body, headers=headers, timeout=(5, 20))
    if resp.status_code in (400, 422) and "return_run_details" in resp.text:
        # a GitHub Enterprise Server older than the run details (February 2026) refuses the field and starts
        # nothing: ask again without it, and link the workflow's runs instead of the run
        del body["return_run_details"]
        resp = requests.post(url, json=body, headers=headers, timeout=(5, 20))
    if resp.status_code >= 400:
        raise RuntimeError(f"GitHub answered {resp.status_code} to the dispatch: {resp.text[:200]}")
    if resp.status_code == 200 and resp.content and resp.json().get("html_url"):
        return resp.json()["html_url"]
    return f"{settings.github_server}/{bot.repository}/actions/workflows/{quote(bot.workflow, safe='')}"


def follow_up(ask: Ask, bot: ChatopsBotConfig, settings: Settings, log) -> None:
    import requests

    shown = " ".join(f"{k}={v}" for k, v in ask.inputs.items())
    try:
        link = dispatch(bot, ask.inputs, settings)
        text = f"✅ started `{bot.workflow}` on `{bot.ref}` ({shown}): {link}"
    except Exception as e:  # the user hears about it; the bot keeps serving
        text = f"❌ could not start `{bot.workflow}`: {e}"
    log(f"{ask.platform} user {ask.user}: {text}")
    try:
        if ask.platform == "slack":
            requests.post(ask.reply_to, json={"response_type": "in_channel", "text": text}, timeout=(5, 20))
        else:
            requests.patch(ask.reply_to + "/messages/@original", json={"content": text}, timeout=(5, 20))
    except requests.RequestException as e:
        log(f"{ask.platform}: the follow-up could not be delivered: {type(e).__name__}")


# --- the app ------------------------------------------------------------------------------------------------------


class Bot:
    def __init__(self, bot: ChatopsBotConfig, settings: Settings, log=print):
        self.cfg, self.settings, self.log = bot, settings, log
        self.replays = Replays()

    def handle(self, path: str, headers, body: bytes) -> tuple[int, dict, Ask | None]:
        """(status, JSON answer, the ask to act on after answering)."""
        now = time.time()
        try:
            if path == SLACK_PATH:
                check_slack(self.settings.slack_signing_secret, headers, body, now, self.replays)
                ask = slack_ask(body, self.cfg)
                return 200, {"response_type": "ephemeral", "text": f"⏳ starting `{self.cfg.workflow}` …"}, ask
            if path == DISCORD_PATH:
                check_discord(self.settings.discord_public_key, headers, body, now, self.replays)
                interaction = json.loads(body)
                if interaction.get("type") == 1:  # PING, when the endpoint is saved in the developer portal
                    return 200, {"type": 1}, None
                ask = discord_ask(interaction, self.cfg, self.settings)
                return 200, {"type": 5}, ask  # deferred: "the bot is thinking…", the follow-up edits it
            return 404, {"error": "not found"}, None
        except Refused as e:
            self.log(f"{path}: {e}")
            if e.status == 401:
                return 401, {"error": "unauthorized"}, None
            if path == DISCORD_PATH:
                return 200, {"type": 4, "data": {"content": str(e), "flags": EPHEMERAL}}, None
            return 200, {"response_type": "ephemeral", "text": str(e)}, None
        except (ValueError, UnicodeDecodeError):
            return 400, {"error": "bad request"}, None


class _Handler(BaseHTTPRequestHandler):
    server_version = "swiftci-bot"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send(200 if self.path == "/healthz" else 404, {"ok": self.path == "/healthz"})

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send(413 if length > MAX_BODY else 400, {"error": "bad length"})
            return
        app: Bot = self.server.app  # type: ignore[attr-defined]
        status, answer, ask = app.handle(self.path, self.headers, self.rfile.read(length))
        self._send(status, answer)
        if ask is not None:
            threading.Thread(target=follow_up, args=(ask, app.cfg, app.settings, app.log), daemon=True).start()

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        self.server.app.log(f"{self.address_string()} {format % args}")  # type: ignore[attr-defined]


def serve(bot: ChatopsBotConfig, settings: Settings, host: str, port: int, log=print) -> None:
    server = ThreadingHTTPServer((host, port), _Handler)
    server.app = Bot(bot, settings, log)  # type: ignore[attr-defined]
    log(f"swiftci bot listening on http://{host}:{server.server_address[1]} ({SLACK_PATH}, {DISCORD_PATH})")
    try:
        server.serve_forever()
    finally:
        server.server_close()
