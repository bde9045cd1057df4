"""The `swiftci` command: parses options, calls the library, and is the only place that turns errors into messages
and exit codes (0 ok, 1 gate failed, 2 bad usage or config, 3 a stage could not run, 4 training diverged)."""

from __future__ import annotations

import functools
import json
import re
import sys
from pathlib import Path

import click

from swiftci import __version__
from swiftci.errors import EXIT_GATE_FAILED, EXIT_STAGE_FAILED, ConfigError, SwiftCIError
from swiftci.stages import NAMES as STAGE_NAMES

_LOCATED = re.compile(r"^(?P<file>[^:\n]+):(?P<line>\d+): (?P<msg>.*)$")


def _annotate(message: str) -> None:
    """In GitHub Actions, config problems become file/line annotations on the pull request."""
    from swiftci import ghactions

    for line in message.splitlines():
        m = _LOCATED.match(line)
        if m:
            ghactions.annotate("error", m.group("msg"), ghactions.workspace_relative(m.group("file")),
                               int(m.group("line")))
        else:
            ghactions.annotate("error", line)


def _errors_to_exit_codes(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SwiftCIError as e:
            prefix = "config error" if isinstance(e, ConfigError) else "error"
            if isinstance(e, ConfigError) and len(e.problems) > 1:
                click.echo(f"{prefix}: {len(e.problems)} problems", err=True)
                for p in e.problems:
                    click.echo(f"  {p}", err=True)
            else:
                click.echo(f"{prefix}: {e}", err=True)
            if isinstance(e, ConfigError):
                _annotate(str(e))
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception:  # a bug in swiftci or a library: show it, but never as "gate failed" (1)
            import traceback

            traceback.print_exc()
            click.echo("error: unexpected failure (above); please report it", err=True)
            sys.exit(EXIT_STAGE_FAILED)

    return wrapper


def _expect_option(fn):
    return click.option(
        "--expect", "expected", multiple=True, metavar="STAGE=SHA256",
        help="The file record an earlier stage handed on, e.g. --expect train=3f2a… (its `files-sha256` job "
             "output): its outputs are used only if they are still those bytes (exit 3 otherwise). Repeatable.")(fn)


def _expected(pairs: tuple[str, ...]) -> dict[str, str]:
    from swiftci.errors import UsageError

    out = {}
    for pair in pairs:
        stage, sep, digest = pair.partition("=")
        if not sep or stage not in STAGE_NAMES or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise UsageError(f"--expect {pair}: expected STAGE=SHA256 with a stage name and a 64-hex-digit digest, "
                             "e.g. --expect train=<the train job's files-sha256 output>")
        out[stage] = digest
    return out


def _config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override a config value, e.g. --set train.learning_rate=2e-5 (repeatable).")(fn)
    fn = click.option("-c", "--config", "config_path", default="swiftci.yaml", show_default=True,
                      type=click.Path(dir_okay=False), help="Path to swiftci.yaml.")(fn)
    return fn


def _run_one(cfg, stage: str, *, show_report: bool = True, **options) -> dict:
    """One stage with notifications; its markdown report is printed even when it fails. What the configured stages
    after it will read is checked first (exit 2 before any model loads; each stage checks its own inputs and
    reports the problem in its own report)."""
    from swiftci import pipeline, preflight, stages

    names = stages.configured(cfg)
    preflight.check(cfg, names[names.index(stage) + 1:] if stage in names else [])
    try:
        with pipeline.notifications(cfg) as notifier:
            report = pipeline.run_stage(cfg, stage, notifier, **options)
            pipeline.stage_finished(cfg, stage, report, notifier)
    finally:
        md = stages.summary(cfg, stage) if show_report else None
        if md:
            click.echo(md)
    return report


def _live_answer(cfg) -> str | None:
    """The first smoke answer of a deploy, as the demo's last line: the model speaking through the live endpoint."""
    from swiftci import stages

    results = ((stages.read_report(cfg, "deploy") or {}).get("smoke") or {}).get("results") or []
    if not results or results[0].get("answer") is None:
        return None
    return f"model answer from the live endpoint: {results[0]['prompt']!r} → {results[0]['answer']!r}"


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _load(config_path: str, overrides: tuple[str, ...], expected: tuple[str, ...] = ()):
    """The config, its secrets masked in CI logs; with --expect, the earlier stages' file records checked."""
    from swiftci import config, ghactions, stages

    expect = _expected(expected)
    cfg = config.load(config_path, overrides)
    for value in cfg.env_values:  # values from ${VAR} may be tokens or webhook URLs: keep them out of CI logs
        ghactions.mask(value)
    for w in cfg.warnings:
        click.echo(f"warning: {w}", err=True)
    stages.check_expected(cfg, expect)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="swiftci")
def main() -> None:
    """CI/CD for fine-tuning and shipping LLMs: train → evaluate → quantize → deploy.

    Exit codes: 0 ok, 1 a quality gate failed, 2 bad usage or config, 3 a stage could not run,
    4 training diverged.
    """
    from swiftci import quiet

    quiet.progress_bars_off_unless_a_terminal()


@main.command()
@_config_options
@_errors_to_exit_codes
def validate(config_path: str, overrides: tuple[str, ...]) -> None:
    """Check the config and everything the run will read: data rows, evaluation tasks, their files and the
    metrics the gates name (no GPU needed, no model is loaded)."""
    from swiftci import preflight, stages

    cfg = _load(config_path, overrides)
    preflight.check(cfg, stages.configured(cfg))
    click.echo(f"{config_path}: ok (stages: {', '.join(stages.configured(cfg)) or 'none'})")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["json", "md"]), default="json", show_default=True,
              help="`json`: the JSON Schema (for editor completion); `md`: a table of every key, its type, default "
                   "and description, for people.")
def schema(fmt: str) -> None:
    """Print every key of swiftci.yaml: the JSON Schema, or a readable table."""
    from swiftci import config

    click.echo(json.dumps(config.json_schema(), indent=2) if fmt == "json" else config.reference_markdown(), nl=fmt == "json")


@main.command()
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=".", show_default=True,
              help="The model repository to write into.")
@click.option("--name", help="Run name, e.g. support-bot.")
@click.option("--model", help="Base model: a hub id or a local folder.")
@click.option("--method", type=click.Choice(["sft", "dpo", "kto", "orpo", "simpo"]),
              help="Training method: sft on chats, or a preference method on preference pairs.")
@click.option("--tuner", type=click.Choice(["auto", "lora", "qlora", "full"]), help="auto: what fits the GPU.")
@click.option("--data", help="Training rows (JSONL), relative to --dir.")
@click.option("--gpu-memory", "gpu_memory", type=float, help="GiB per GPU of the runners (default: detected).")
@click.option("--runs-on", help="GPU runner labels, comma-separated (default: self-hosted,gpu).")
@click.option("--pr-runs-on", help="Pull-request runner labels, comma-separated (default: self-hosted,gpu-pr).")
@click.option("--tasks", help="lm-eval tasks, comma-separated (none: no evaluate section).")
@click.option("--gate", help="A gate, `task/metric>=number`, e.g. hellaswag/acc>=0.5.")
@click.option("--quantize/--no-quantize", default=None, help="Add a 4-bit GPTQ quantize section.")
@click.option("--deploy/--no-deploy", default=None, help="Add a Kubernetes deploy section.")
@click.option("--image", help="Image repository for deploy, e.g. ghcr.io/acme/support-bot.")
@click.option("--max-runtime", "max_runtime", help="Longest a training may run, e.g. 6h.")
@click.option("--yes", is_flag=True, help="Ask nothing: the flags and the defaults (also when not in a terminal).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@_errors_to_exit_codes
def init(root: Path, yes: bool, force: bool, **given) -> None:
    """Write a first swiftci.yaml and the push and pull-request workflows, from a few questions or the flags."""
    import dataclasses

    from swiftci import init as starter

    answers = starter.Answers()
    for key, value in given.items():
        if value is None:
            continue
        field = {"gpu_memory": "gpu_memory_gib"}.get(key, key)
        if key in ("runs_on", "pr_runs_on", "tasks"):
            value = [x.strip() for x in value.split(",") if x.strip()]
        answers = dataclasses.replace(answers, **{field: value})
    interactive = not yes and sys.stdin.isatty() and sys.stdout.isatty()
    root.mkdir(parents=True, exist_ok=True)
    try:
        starter.run(answers, root, interactive=interactive, force=force, say=click.echo)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: nothing was written", err=True)
        raise SystemExit(130) from None


@main.command()
@_config_options
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint (start over if there is none).")
@click.option("--on", "launcher", type=click.Choice(["local", "kubernetes"]),
              help="Where to train, overriding train.launcher: `local` (here) or `kubernetes` (a TrainJob or "
                   "PyTorchJob in the cluster of train.kubernetes).")
@click.option("--dry-run", is_flag=True, help="With launcher kubernetes: write the validated job manifest to the "
              "output folder and submit nothing.")
@click.option("--like", type=click.Path(exists=True, path_type=Path), metavar="RUN.json",
              help="Compare environment, config, data and model hashes with an earlier run's run.json (or its output "
                   "folder) before anything loads: a warning per difference, recorded in run.json (the config's "
                   "`reproduce:` section, from the command line).")
@click.option("--strict", is_flag=True, help="With --like: exit 2 listing every difference instead of warning.")
@_errors_to_exit_codes
def train(config_path: str, overrides: tuple[str, ...], resume: bool, launcher: str | None, dry_run: bool,
          like: Path | None, strict: bool) -> None:
    """Fine-tune the base model (LoRA, QLoRA or full SFT), here or as a job on a Kubernetes cluster."""
    from swiftci.errors import UsageError

    if strict and like is None:
        raise UsageError("--strict: only with --like RUN.json (or set `reproduce.strict` in the config)")
    if like is not None:  # a path typed on the command line is relative to where it was typed
        overrides = (*overrides, f"reproduce.from={like.resolve()}", f"reproduce.strict={str(strict).lower()}")
    cfg = _load(config_path, overrides + ((f"train.launcher={launcher}",) if launcher else ()))
    on_kubernetes = cfg.train is not None and cfg.train.launcher == "kubernetes"
    if dry_run:
        if not on_kubernetes:
            raise UsageError("--dry-run renders the cluster job; add --on kubernetes (or set train.launcher: "
                             "kubernetes)")
        from swiftci import kubetrain

        click.echo(f"train: dry run, nothing submitted  manifest: {kubetrain.dry_run(cfg)}")
        return
    report = _run_one(cfg, "train", show_report=False, resume=resume)
    if on_kubernetes:
        job = report["job"]
        click.echo(f"train: ok  run {report['run_id']}  {job['kind']} {job['namespace']}/{job['name']}  "
                   f"outputs: volume {report['remote']['volume']}:{report['remote']['stage_dir']}")
        return
    if "rank" in report:  # a process of a distributed training other than rank 0: rank 0 speaks for the run
        return
    m = report["metrics"]
    click.echo(f"train: ok  run {report['run_id']}  loss {_num(m['train_loss_first'])} → "
               f"{_num(m['train_loss_last'])}  {m['steps']} steps  {_num(m['tokens_per_second'], 0)} tok/s  "
               f"outputs: {cfg.stage_dir('train')}")


@main.command()
@_config_options
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Evaluate this model or adapter folder instead of the train stage's output (e.g. a quantized model).")
@click.option("--baseline", help="Override evaluate.baseline: `base`, `none` or an earlier eval_report.json.")
@_expect_option
@_errors_to_exit_codes
def evaluate(config_path: str, overrides: tuple[str, ...], model_dir: Path | None, baseline: str | None,
             expected: tuple[str, ...]) -> None:
    """Score the model with lm-eval against the baseline and apply the quality gates (exit 1 when one fails)."""
    cfg = _load(config_path, overrides, expected)
    if baseline not in (None, "base", "none"):
        baseline = str(Path(baseline).resolve())  # a path on the command line is relative to where it was typed
    report = _run_one(cfg, "evaluate", model_dir=model_dir, baseline=baseline)
    click.echo(f"evaluate: {report['status']}  outputs: {cfg.stage_dir('evaluate')}")


@main.command()
@_config_options
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Quantize this model or adapter folder instead of the train stage's output.")
@_expect_option
@_errors_to_exit_codes
def quantize(config_path: str, overrides: tuple[str, ...], model_dir: Path | None, expected: tuple[str, ...]) -> None:
    """Quantize to GPTQ/AWQ (merging a LoRA adapter first) and gate on perplexity and the eval gates."""
    cfg = _load(config_path, overrides, expected)
    report = _run_one(cfg, "quantize", model_dir=model_dir)
    click.echo(f"quantize: {report['status']}  model: {cfg.stage_dir('quantize') / 'model'}")


@main.command()
@_config_options
@click.option("--dry-run", is_flag=True,
              help="Write the Dockerfile, the validated manifests and the plan; touch no registry or cluster.")
@click.option("--rollback", is_flag=True, help="Return to the last good revision before the current one.")
@click.option("--image", "image_ref", metavar="REPO@sha256:…",
              help="Deploy this already-pushed image instead of building one (e.g. promote a staging build).")
@_expect_option
@_errors_to_exit_codes
def deploy(config_path: str, overrides: tuple[str, ...], dry_run: bool, rollback: bool,
           image_ref: str | None, expected: tuple[str, ...]) -> None:
    """Build the serving image and roll it out (smoke test, automatic rollback), or serve locally."""
    cfg = _load(config_path, overrides, expected)
    report = _run_one(cfg, "deploy", dry_run=dry_run, rollback=rollback, image=image_ref)
    click.echo(f"deploy: {report['status']}  outputs: {cfg.stage_dir('deploy')}")


@main.command()
@_config_options
@click.option("--resume", is_flag=True, help="Resume training from its newest checkpoint (a finished training of "
              "the same config and data is kept as it is).")
@click.option("--reuse", is_flag=True, help="Keep the finished stages in the output folder whose config, files and "
              "input model are unchanged; run the rest.")
@_errors_to_exit_codes
def run(config_path: str, overrides: tuple[str, ...], resume: bool, reuse: bool) -> None:
    """Run every configured stage in order, stopping at the first failure."""
    from swiftci import pipeline, stages

    cfg = _load(config_path, overrides)
    try:
        pipeline.run(cfg, resume=resume, reuse=reuse, say=lambda s: click.echo(s, err=True))
    finally:  # what each stage concluded, as people read it (the job summary in GitHub Actions)
        for stage in stages.configured(cfg):
            md = stages.summary(cfg, stage)
            if md:
                click.echo(md)
        answer = _live_answer(cfg)
        if answer:
            click.echo(answer)


@main.command()
@click.argument("stage", type=click.Choice(STAGE_NAMES))
@_config_options
@click.option("--summary/--no-summary", default=True, show_default=True,
              help="Also append the stage's markdown report to the job summary ($GITHUB_STEP_SUMMARY).")
@_errors_to_exit_codes
def outputs(stage: str, config_path: str, overrides: tuple[str, ...], summary: bool) -> None:
    """Write a stage's report as GitHub Actions step outputs (model-path, report-path, passed, metrics, run-id)."""
    from swiftci import ghactions, stages

    cfg = _load(config_path, overrides)
    ghactions.set_outputs(ghactions.stage_outputs(cfg, stage))
    md = stages.summary(cfg, stage)
    if summary and md:
        ghactions.append_summary(md)


@main.command()
@_config_options
@click.option("--pr", type=int, help="Pull request number. Default: from the event of this workflow run.")
@click.option("--repo", help="OWNER/NAME. Default: $GITHUB_REPOSITORY.")
@click.option("--final/--in-progress", default=True, show_default=True,
              help="--in-progress shows configured stages without a report as pending (⏳) instead of skipped.")
@click.option("--github-output", is_flag=True, help="Also write `action` and `comment-url` step outputs.")
@click.option("--since", type=click.Path(file_okay=False, path_type=Path),
              help="The last green run's output folder (on the default branch): adds the regression guard's table "
                   "when it holds train/evaluate reports (see `swiftci guard`) and what changed since that run when "
                   "it holds its run.json (see `swiftci diff`).")
@_errors_to_exit_codes
def comment(config_path: str, overrides: tuple[str, ...], pr: int | None, repo: str | None, final: bool,
            github_output: bool, since: Path | None) -> None:
    """Create or update the one sticky pull-request comment with every stage's status and the eval table.

    Needs GITHUB_TOKEN in the environment. Outside a pull request it only writes the job summary.
    """
    from swiftci import comment as comment_stage
    from swiftci import ghactions

    cfg = _load(config_path, overrides)
    posted = comment_stage.run(cfg, pr=pr, repo=repo, final=final, since=since)
    if posted.warning:
        click.echo(f"warning: {posted.warning}", err=True)
        ghactions.annotate("warning", posted.warning)
    click.echo(f"comment: {posted.action}" + (f" {posted.url}" if posted.url else "")
               + f" (body: {cfg.output_path / 'comment.md'})")
    if github_output:
        ghactions.set_outputs({"action": posted.action, "comment-url": posted.url or ""})


@main.command()
@_config_options
@_errors_to_exit_codes
def fetch(config_path: str, overrides: tuple[str, ...]) -> None:
    """Download and check everything a run needs ahead of time (the base model and its tokenizer, every file against
    the hub's sha256; lm-eval's data for built-in tasks), so that a runner without network (HF_HUB_OFFLINE=1) finds
    it in the cache, checks it and never calls a hub."""
    from swiftci import fetch as fetcher

    cfg = _load(config_path, overrides)
    for line in fetcher.run(cfg):
        click.echo(line)


@main.command("diff")
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["md", "text", "json"]), default="text", show_default=True,
              help="`md` for a pull-request comment, `json` for scripts.")
@_errors_to_exit_codes
def diff_command(a: Path, b: Path, fmt: str) -> None:
    """Two runs side by side (run.json files or output folders): config keys, data and model hashes, environment
    and metrics."""
    from swiftci import diff

    left, right = diff.load(a), diff.load(b)
    rows = diff.compare(left, right)
    if fmt == "json":
        click.echo(json.dumps(diff.as_json(left, right, rows), indent=2))
    else:
        click.echo(diff.markdown(left, right, rows) if fmt == "md" else diff.text(left, right, rows), nl=False)


@main.command()
@_config_options
@click.option("--against", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The last green run's output folder (train/train_report.json, evaluate/eval_report.json), e.g. "
                   "its model-store folder.")
@click.option("--format", "fmt", type=click.Choice(["md", "json"]), default="md", show_default=True)
@_errors_to_exit_codes
def guard(config_path: str, overrides: tuple[str, ...], against: Path, fmt: str) -> None:
    """Compare this run's tokens/s, peak memory, final loss and eval metrics with an earlier run's reports: ⚠️ beyond
    the `guard:` limits; exit 1 when `guard.fail` is set and anything is flagged."""
    from swiftci import guard as guard_stage

    cfg = _load(config_path, overrides)
    deltas = guard_stage.compare(cfg, against)
    click.echo(json.dumps(guard_stage.as_json(cfg, deltas), indent=2) if fmt == "json" else guard_stage.markdown(deltas))
    if guard_stage.failed(cfg, deltas):
        sys.exit(EXIT_GATE_FAILED)


@main.command("last-green")
@_config_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for that run's reports, laid out like an output folder, e.g. .swiftci-last-green.")
@click.option("--branch", help="Branch whose green runs count. Default: the repository's default branch.")
@click.option("--github-output", is_flag=True, help="Also write `found`, `run-id` and `head-sha` step outputs.")
@_errors_to_exit_codes
def last_green(config_path: str, overrides: tuple[str, ...], out: Path, branch: str | None,
               github_output: bool) -> None:
    """Fetch the reports of the last green run on the default branch (GitHub's API, with GITHUB_TOKEN and
    `actions: read`) for `swiftci guard --against` and the comment. Exit 0 also when there is none yet."""
    from swiftci import ghactions, lastgreen

    cfg = _load(config_path, overrides)
    found = lastgreen.from_environment(out, cfg.name, branch=branch)
    if found is None:
        click.echo(f"no green run of {cfg.name!r} on the default branch yet: nothing to compare with")
    else:
        click.echo(f"last green run {found.run_id} ({found.head_sha[:7]}): "
                   + ", ".join(a["stage"] for a in found.artifacts) + f" reports in {out}")
    if github_output:
        ghactions.set_outputs({"found": str(found is not None).lower(),
                               "run-id": str(found.run_id) if found else "", "head-sha": found.head_sha if found else ""})


from swiftci.commands.chatops import bot as _bot  # noqa: E402
from swiftci.commands.chatops import chatops as _chatops  # noqa: E402
from swiftci.commands.estimate import estimate as _estimate  # noqa: E402

for _cmd in (_bot, _estimate, *_chatops.commands.values()):  # errors become exit codes here, as for every command
    _cmd.callback = _errors_to_exit_codes(_cmd.callback)
main.add_command(_chatops)
main.add_command(_bot)
main.add_command(_estimate)

if __name__ == "__main__":
    main()
