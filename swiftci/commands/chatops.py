"""`swiftci chatops parse|decide|answer` (pull-request and issue comment commands) and `swiftci bot` (Slack and
Discord slash commands): thin click commands over swiftci.chatops and swiftci.bot. swiftci/cli.py registers them
and turns their errors into exit codes."""

from __future__ import annotations

import json
import sys

import click

from swiftci.errors import EXIT_USAGE

_CONFIG = click.option("-c", "--config", "config_path", default="swiftci.yaml", show_default=True,
                       type=click.Path(dir_okay=False),
                       help="swiftci.yaml; only its `chatops` section is read (no other secrets or files needed).")


def _chatops_section(config_path: str):
    from swiftci import config

    return config.load_section(config_path, "chatops") or config.ChatopsConfig()


@click.group()
def chatops() -> None:
    """Commands in pull-request and issue comments: `/swiftci run [--set key=value …]`, `/swiftci evaluate`,
    `/swiftci deploy --dry-run`, `/swiftci deploy --rollback` (workflows/chatops.yml)."""


@chatops.command()
@_CONFIG
@click.option("--body", required=True, metavar="TEXT",
              help="The comment body; `-` reads it from stdin (what workflows do: it never passes through a shell).")
def parse(config_path: str, body: str) -> None:
    """Turn a comment body into a validated command: JSON on stdout, exit 0; or a refusal with its message,
    exit 2. Nothing is run."""
    from swiftci import chatops as ops

    text = sys.stdin.read() if body == "-" else body
    result = ops.parse(text, _chatops_section(config_path).allow_set)
    click.echo(json.dumps(result.to_json()))
    if isinstance(result, ops.Refusal):
        click.echo(result.message, err=True)
        sys.exit(EXIT_USAGE)


@chatops.command()
@_CONFIG
def decide(config_path: str) -> None:
    """In an `issue_comment` workflow: react 👀, check through the API that the commenter may write, parse the
    comment and name the commit to run; a refusal is answered (👎, ❌ and why) on the issue. Step outputs: ok,
    kind, line, set, sha, number, message."""
    from swiftci import chatops as ops
    from swiftci import ghactions

    event = ops.Event.from_actions()
    decision = ops.decide(event, _chatops_section(config_path).allow_set, ops.GitHub(ops.token_from_env()))
    ghactions.set_outputs(decision.outputs)
    if decision.command is None:
        click.echo(f"chatops: {decision.message}")
    else:
        click.echo(f"chatops: {decision.command.line} on {decision.sha[:12]}")


@chatops.command()
@click.option("--line", required=True, help="The validated command line, as `decide` wrote it (its `line` output).")
@click.option("--outcome", required=True, help="How the run ended: `success`, or e.g. `failure`, `cancelled`.")
@click.option("--details", default="", help="A line or two of Markdown to add, e.g. the stages' statuses.")
def answer(line: str, outcome: str, details: str) -> None:
    """In an `issue_comment` workflow's last job: react 👍 or 👎 and answer ✅ or ❌ with the run link."""
    from swiftci import chatops as ops

    ops.answer(ops.Event.from_actions(), line, outcome, ops.GitHub(ops.token_from_env()), details)
    click.echo(f"chatops: answered {outcome}")


@click.command()
@_CONFIG
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on.")
def bot(config_path: str, host: str, port: int) -> None:
    """Serve Slack slash commands (POST /slack/commands) and Discord interactions (POST /discord/interactions)
    that dispatch `chatops.bot.workflow`. Reads SLACK_SIGNING_SECRET, DISCORD_PUBLIC_KEY, GITHUB_TOKEN and
    GITHUB_API_URL from the environment; GET /healthz answers probes."""
    from swiftci import bot as app
    from swiftci.errors import UsageError

    section = _chatops_section(config_path)
    if section.bot is None:
        raise UsageError(f"{config_path}: chatops.bot: not set; add `chatops: {{bot: {{repository: OWNER/NAME, "
                         "workflow: swiftci.yml, slack: {users: […], channels: […]}}}` (README, \"Chat-ops\")")
    app.serve(section.bot, app.Settings.from_env(), host, port, log=lambda s: click.echo(s, err=True))
