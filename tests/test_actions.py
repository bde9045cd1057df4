"""The GitHub Actions layer, run for real with act (host mode) on the tiny example, plus the static checks.

act cannot download remote actions here: actions/setup-python and the artifact actions are replaced by the
stand-ins in tests/fakes/, `swiftci/swiftci@v1` (what the reusable pipeline uses) by a copy of this working tree,
and GitHub's REST API by tests/fakes/github_api.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, TINY, tiny_config, write_config
from fakes.github_api import FakeGitHub

BIN = Path(sys.executable).parent
FAKES = ROOT / "tests" / "fakes"
PINNED = {  # uses: refs in our files -> stand-ins
    "actions/setup-python@a26af69be951a213d495a4c3e4e4022e16d87065": FAKES / "setup-python",
    "actions/upload-artifact@ea165f8d65b6e75b540449e92b4886f43607fa02": FAKES / "upload-artifact",
    "actions/download-artifact@d3f86a106a0bac45b974a628896c90dbdf5c8093": FAKES / "download-artifact",
}
TOKEN = "ghs_act_token_9f8e7d6c5b4a39281706"
HF_SECRET = "hf_act_secret_5a4b3c2d1e0f99887766"


@pytest.fixture(scope="session")
def act_repo(tmp_path_factory) -> Path:
    """A copy of this working tree as its own git repository with a GitHub origin (act reads the repository name
    from it), so tests see uncommitted changes and never touch the real checkout."""
    repo = tmp_path_factory.mktemp("act-repo")
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / f)
    git = ["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci"]
    for cmd in (["init", "-q", "-b", "main"], ["add", "-A"], ["commit", "-qm", "snapshot"],
                ["remote", "add", "origin", "https://github.com/acme/model-repo.git"]):
        subprocess.run([*git, *cmd], cwd=repo, check=True, capture_output=True)
    return repo


def act(repo: Path, work: Path, event: str, workflow: str, *, event_json: dict | None = None,
        variables: dict | None = None, env: dict | None = None, secrets: dict | None = None,
        platforms: tuple[str, ...] = (), swiftci_repo: Path | None = None, stand_ins: dict | None = None):
    """Run act in host mode with a clean environment (HOME in `work`, where act keeps each job's workspace);
    `platforms` are further runs-on labels that run on this host; `swiftci/swiftci@v1` is `swiftci_repo` (default:
    `repo`, the copy of this working tree); `stand_ins` adds `uses:` refs -> local folders to PINNED's. Returns
    (exit code, log)."""
    (work / "artifacts").mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "act"), event, "-W", workflow, "-P", "ubuntu-latest=-self-hosted", "--no-cache-server",
           *[arg for label in platforms for arg in ("-P", f"{label}=-self-hosted")],
           "--action-cache-path", str(work / "act-cache"), "--local-repository", f"swiftci/swiftci@v1={swiftci_repo or repo}"]
    for ref, path in {**PINNED, **(stand_ins or {})}.items():
        cmd += ["--local-repository", f"{ref}={path}"]
    if event_json is not None:
        (work / "event.json").write_text(json.dumps(event_json))
        cmd += ["-e", str(work / "event.json")]
    all_env = {"SWIFTCI_TEST_SITE_PACKAGES": sysconfig.get_paths()["purelib"],
               "ACT_ARTIFACT_DIR": str(work / "artifacts"), "HF_HOME": str(work / "hf-home"),
               **({"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"]} if "OMP_NUM_THREADS" in os.environ else {}),
               **(env or {})}
    for key, value in all_env.items():
        cmd += ["--env", f"{key}={value}"]
    for key, value in (variables or {}).items():
        cmd += ["--var", f"{key}={value}"]
    for key, value in (secrets or {}).items():
        cmd += ["-s", f"{key}={value}"]
    base_python = Path(os.path.realpath(sys._base_executable)).parent
    (work / "home").mkdir(exist_ok=True)
    clean_env = {"PATH": f"{base_python}:/usr/local/bin:/usr/bin:/bin", "HOME": str(work / "home")}
    proc = subprocess.run(cmd, cwd=repo, env=clean_env, capture_output=True, text=True, timeout=900)
    (work / "act.log").write_text(proc.stdout + proc.stderr)  # the whole log, for a failing test's reader
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture
def act_config(tiny_model, tmp_path):
    def make(**sections) -> Path:
        return write_config(tmp_path / "swiftci.yaml", tiny_config(tiny_model, tmp_path / "out", **sections))

    return make


# What the act runs exercise is the actions' plumbing, not the tiny model's quality: a short training and lenient
# gates keep each run to seconds of model work.
SHORT_TRAIN = {"max_steps": 30, "save_steps": 1000}
LENIENT_EVAL = {"limit": 20, "gates": [{"metric": "tiny_reverse/exact_match", "min": 0.0},
                                       {"metric": "tiny_reverse_mc/acc", "max_drop": "100%"}]}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_each_action_alone_with_its_outputs_read_later(act_repo, act_config, tmp_path, cluster, httpserver,
                                                       registry, containers_env, engine_image):
    """train → evaluate → quantize → deploy as separate actions (no pipeline), each one's documented outputs read by
    a later step; a quantized file changed after quantize is refused (exit 3); `rollback: true` goes back."""
    from fakes.openai_api import FakeOpenAI

    openai = FakeOpenAI(httpserver)
    earlier = f"{registry['host']}/tiny-reverse@sha256:{'e' * 64}"
    cfg = act_config(evaluate=LENIENT_EVAL, quantize={"calibration": {"samples": 16}, "gates": {
        "reuse_eval_gates": False, "max_ppl_increase_pct": 1000}}, deploy={
        "target": "kubernetes", "engine": "transformers", "engine_image": engine_image,
        "image": f"{registry['host']}/tiny-reverse", "builder": "buildah", "insecure_registry": True,
        "model": "quantized", "namespace": "ml", "gpus": 0, "replicas": 1,
        "smoke": {"url": openai.url, "prompts": [{"prompt": "reverse: ship", "expect": ["pihs"]}]},
        "timeouts": {"rollout_seconds": 60, "smoke_seconds": 60}})
    code, log = act(act_repo, tmp_path, "push", "tests/act/actions.yml", variables={"SWIFTCI_CONFIG": str(cfg)},
                    env={"SWIFTCI_TEST_OUT": str(tmp_path), "SWIFTCI_TEST_EARLIER_IMAGE": earlier, **containers_env},
                    secrets={"KUBECONFIG": Path(cluster.kubeconfig_path).read_text()})
    assert code == 0, log[-6000:]
    out = json.loads((tmp_path / "outputs.json").read_text())
    reports = {stage: json.loads(Path(out[f"{stage.upper()}_REPORT_PATH"]).read_text())
               for stage in ("train", "eval", "quantize", "deploy")}
    assert out["TRAIN_PASSED"] == "true" and out["EVAL_PASSED"] == "true" and out["EVAL_STATUS"] == "passed"
    assert Path(out["TRAIN_MODEL_PATH"], "config.json").is_file()  # merge: true -> the merged model
    assert out["TRAIN_RUN_ID"] == reports["train"]["run_id"] == reports["deploy"]["run_id"] == out["DEPLOY_RUN_ID"]
    assert json.loads(out["TRAIN_METRICS"]) == reports["train"]["metrics"] and reports["train"]["metrics"]["steps"] == 30
    assert out["TRAIN_FILES_SHA256"] == reports["train"]["files_sha256"]
    assert json.loads(out["EVAL_METRICS"]) == reports["eval"]["metrics"]
    assert out["QUANTIZE_PASSED"] == "true" and out["QUANTIZE_STATUS"] == "passed"
    assert Path(out["QUANTIZE_MODEL_PATH"], "config.json").is_file() and out["QUANTIZE_MODEL_PATH"].endswith("model")
    assert json.loads(out["QUANTIZE_METRICS"]) == reports["quantize"]["metrics"]
    assert out["QUANTIZE_FILES_SHA256"] == reports["quantize"]["files_sha256"]
    digest = out["DEPLOY_IMAGE_DIGEST"]
    assert out["DEPLOY_STATUS"] == "deployed" and out["DEPLOY_PASSED"] == "true" and digest.startswith("sha256:")
    assert out["DEPLOY_IMAGE_REF"] == f"{registry['host']}/tiny-reverse@{digest}"
    labels = image_labels(f"{registry['host']}/tiny-reverse@{digest}", containers_env)
    assert labels["dev.swiftci.model-sha256"] == reports["quantize"]["files_sha256"], "the image says what it holds"
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["TAMPERED_OUTCOME"] == "failure" and after["TAMPERED_STATUS"] == "failed"
    assert "quantize/model/model.safetensors has sha256" in log and "exit-code=3" in log
    assert after["ROLLBACK_STATUS"] == "rolled_back_by_request" and after["ROLLBACK_IMAGE_DIGEST"] == f"sha256:{'e' * 64}"
    live = cluster.get("deployments", "ml", "tiny-reverse")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert live == earlier, "the rollback left the earlier release serving"
    group = log.index("::group::swiftci train")  # the training log is folded into its own group
    assert group < log.index("step 25/30") < log.index("::endgroup::", group)
    for stage in ("train", "evaluate", "quantize", "deploy"):
        assert f"Summary - ### swiftci {stage}" in log


def image_labels(ref: str, containers_env: dict) -> dict:
    proc = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"], capture_output=True,
                          text=True, env={**os.environ, **containers_env})
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["Labels"]


@pytest.mark.slow
def test_config_errors_become_annotations(act_repo, act_config, tmp_path):
    cfg = act_config(train={"lora": {"rank": 0}})
    code, log = act(act_repo, tmp_path, "push", "tests/act/push.yml",
                    variables={"SWIFTCI_CONFIG": str(cfg)}, env={"SWIFTCI_TEST_OUT": str(tmp_path)})
    assert code == 1
    assert f"::error file={cfg},line=" in log and "::train.lora.rank: must be greater than 0 (got 0)" in log


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_on_pull_requests_keeps_one_sticky_comment(act_repo, act_config, tmp_path, httpserver):
    """The reusable pipeline, twice on a pull request whose title and branch carry shell and `${{ }}` payloads:
    the first run creates the comment, the second edits it, nothing is executed and no secret reaches the log."""
    github = FakeGitHub(token=TOKEN)
    api = github.install(httpserver)
    pwned = tmp_path / "pwned"
    evil = (f'evil"; touch {pwned}-title # $(touch {pwned}-sub) `touch {pwned}-tick` '
            "${{ github.token }} ${{ secrets.HF_TOKEN }}")
    event = {"action": "synchronize", "number": 7,
             "pull_request": {"number": 7, "title": evil,
                              "head": {"ref": f'feat"; touch {pwned}-ref #$(touch {pwned}-ref2)`id`',
                                       "sha": "0123456789abcdef0123456789abcdef01234567"},
                              "base": {"ref": "main", "sha": "fedcba9876543210fedcba9876543210fedcba98"}},
             "repository": {"full_name": "acme/model-repo", "name": "model-repo", "owner": {"login": "acme"}}}
    store = tmp_path / "store"
    store.mkdir()
    logs = []
    for run in range(2):
        # both train SFT then DPO in one train job; the first push has every stage but deploy, on the DPO model; the
        # second trains only (the comment then shows the others as skipped, and the store folder of this commit
        # holds nothing of the first run)
        later = {"evaluate": LENIENT_EVAL, "quantize": {"calibration": {"samples": 16}, "gates": {
            "reuse_eval_gates": False, "max_ppl_increase_pct": 1000}}} if run == 0 else {"evaluate": None,
                                                                                      "quantize": None}
        chain = {"then": {"method": "dpo", "max_steps": 6, "data": {
            "train": str(TINY / "data/pairs.jsonl"), "validation": str(TINY / "data/pairs-validation.jsonl")}}}
        cfg = act_config(train={**SHORT_TRAIN, **chain}, **later)
        code, log = act(act_repo, tmp_path / f"run{run}", "pull_request", "tests/act/pull-request.yml",
                        event_json=event, variables={"SWIFTCI_CONFIG": str(cfg), "SWIFTCI_MODEL_STORE": str(store)},
                        env={"GITHUB_API_URL": api}, secrets={"GITHUB_TOKEN": TOKEN, "HF_TOKEN": HF_SECRET})
        assert code == 0, log[-6000:]
        logs.append(log)
        (only,) = github.for_pr(7)
        assert "| train | ✅ |" in only["body"]
        if run == 0:
            assert "| `tiny_reverse/exact_match` |" in only["body"] and "| evaluate | ✅ |" in only["body"]
            assert "| quantize | ✅ | size ×0.2" in only["body"] and "### swiftci quantize — GPTQ 4-bit" in only["body"]
        else:
            assert "| evaluate | skipped |" in only["body"] and "| quantize | skipped |" in only["body"]
            # compared with the first run, fetched as the default branch's last green run (action input `since`)
            assert "#### Since the last green run on the default branch" in only["body"]
            assert "| train tokens/s |" in only["body"]
        assert "reward accuracy" in only["body"] and "(held-out)" in only["body"], "the dpo step's report"
        if run == 0:  # the first run's reports become the last green push run on main, which the second fetches
            github.add_run(100)
            for folder in (tmp_path / "run0/artifacts").glob("swiftci-reports-*"):
                github.add_artifact(100, folder.name, {p.name: p.read_bytes() for p in folder.iterdir()})
    methods = [m for m, _ in github.requests]
    assert methods.count("POST") == 1 and methods.count("PATCH") == 1
    assert not list(tmp_path.glob("pwned*")), "a payload in the pull request was executed"
    assert "branch `feat\"; touch" in github.for_pr(7)[0]["body"]
    for log in logs:
        assert TOKEN not in log and HF_SECRET not in log
    (stored,) = store.glob("acme/model-repo/*/train/train_report.json")  # a re-run of one commit replaces it
    report = json.loads(stored.read_text())
    assert [s["method"] for s in report["steps"]] == ["sft", "dpo"] and report["outputs"]["model"] == "dpo/model"
    assert (stored.parent / "dpo/model/config.json").is_file(), "the chained model went via the store"
    assert (stored.parent / "sft/run.json").is_file() and not list(store.rglob("checkpoints"))
    for stage in ("evaluate", "quantize"):
        assert not (stored.parent.parent / stage).exists(), f"the re-run left the first run's {stage} output"
    artifacts = [p.name for p in (tmp_path / "run0/artifacts").iterdir()]
    for stage in ("train", "evaluate", "quantize"):  # the reports reach the comment job as artifacts, also with a store
        assert any(a.startswith(f"swiftci-reports-{stage}-") for a in artifacts), artifacts


# --- static checks ----------------------------------------------------------------------------------------------

ACTION_FILES = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("actions/*/action.yml"))
WORKFLOW_FILES = sorted(str(p.relative_to(ROOT)) for p in [*ROOT.glob(".github/workflows/*.yml"),
                                                              *ROOT.glob("workflows/*.yml")])


def tool(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / cmd[0]), *cmd[1:]], cwd=ROOT, capture_output=True, text=True)


def test_actionlint():
    proc = tool("actionlint", *WORKFLOW_FILES, "tests/act/push.yml", "tests/act/pull-request.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_zizmor_finds_nothing_at_medium_or_above():
    proc = tool("zizmor", "--offline", "--format", "json", "--min-severity", "medium", "actions", "workflows",
                ".github")
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1)[:4000]


def test_zizmor_as_an_auditor_finds_nothing_at_medium_or_above_in_what_we_ship():
    """The auditor persona, over the actions and every workflow file by name (zizmor looks for workflows only in
    .github/workflows when given a folder, and users copy ours from workflows/)."""
    proc = tool("zizmor", "--offline", "--persona", "auditor", "--format", "json", "--min-severity", "medium",
                *ACTION_FILES, *WORKFLOW_FILES)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1)[:4000]


@pytest.mark.parametrize("schema,files", [("vendor.github-actions", ACTION_FILES),
                                          ("vendor.github-workflows", WORKFLOW_FILES)])
def test_check_jsonschema(schema, files):
    proc = tool("check-jsonschema", "--builtin-schema", schema, *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_tables_match_the_action_files():
    proc = subprocess.run([sys.executable, str(ROOT / "tools/action_docs.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_action_inputs_are_documented_and_reach_scripts_only_through_env():
    for path in ACTION_FILES:
        spec = yaml.safe_load((ROOT / path).read_text())
        for name, inp in spec["inputs"].items():
            assert name == name.lower() and "_" not in name, f"{path}: input {name} is not kebab-case"
            assert "e.g." in inp["description"], f"{path}: input {name} has no example"
            assert "required" in inp and isinstance(inp.get("default"), str), f"{path}: {name}"
        for step in spec["runs"]["steps"]:
            assert "${{" not in step.get("run", ""), f"{path}: expression inside run: in step {step.get('name')}"
        for name, out in spec["outputs"].items():
            assert out["description"], f"{path}: output {name} undocumented"


def test_pipeline_declares_typed_inputs_secrets_and_least_privilege():
    spec = yaml.safe_load((ROOT / ".github/workflows/pipeline.yml").read_text())
    call = spec[True]["workflow_call"]  # YAML 1.1 reads the `on` key as True
    assert all("type" in i and i.get("description") for i in call["inputs"].values())
    assert "hf-token" in call["secrets"]
    assert spec["permissions"] == {}
    assert "concurrency" in spec
    for job in spec["jobs"].values():
        assert "permissions" in job
    assert list(spec["jobs"]) == ["train", "evaluate", "quantize", "gate", "comment"]
    assert spec["jobs"]["evaluate"]["needs"] == "train"
