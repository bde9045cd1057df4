"""Bad configs fail fast and clearly: exit 2, every problem with its file, line and path, no traceback.

These run the real CLI (`python -m swiftci.cli validate`) in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, TINY, swiftci, swiftci_in_process

GOOD = """\
name: demo
model:
  id: {model}
data:
  train: {train}
train:
  tuner: lora
  lora:
    rank: 8
  learning_rate: 2.0e-4
"""


@pytest.fixture
def cfg_file(tmp_path, tiny_model):
    """Write a config from a template; {model} and {train} are filled with real paths."""

    def write(text: str, name: str = "swiftci.yaml") -> Path:
        p = tmp_path / name
        p.write_text(textwrap.dedent(text).replace("{model}", str(tiny_model)).replace("{train}", str(TINY / "data/train.jsonl")))
        return p

    return write


def validate(path: Path, *extra: str, env: dict | None = None):
    return swiftci("validate", "-c", str(path), *extra, env=env)


def assert_config_error(proc, *expected: str) -> str:
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    for e in expected:
        assert e in out, f"{e!r} not in:\n{out}"
    return out


def test_good_config_validates(cfg_file):
    proc = validate(cfg_file(GOOD))
    assert proc.returncode == 0, proc.stderr
    assert "ok (stages: train)" in proc.stdout


BAD = [
    # (id, yaml text, expected fragments)
    ("unknown-top-level-key",
     GOOD.replace("train:\n  tuner", "trian:\n  tuner"),
     ["swiftci.yaml:6: trian: unknown key 'trian' — did you mean 'train'?"]),
    ("unknown-nested-key",
     GOOD.replace("    rank: 8", "    rnak: 8"),
     ["swiftci.yaml:9: train.lora.rnak: unknown key 'rnak' — did you mean 'rank'?"]),
    ("wrong-type",
     GOOD + "  batch_size: many\n",
     ["swiftci.yaml:11: train.batch_size: must be a valid integer", "'many'"]),
    ("bad-enum",
     GOOD.replace("tuner: lora", "tuner: lroa"),
     ["swiftci.yaml:7: train.tuner: must be one of 'lora', 'qlora', 'full' (got 'lroa') — did you mean 'lora'?"]),
    ("negative-rank",
     GOOD.replace("rank: 8", "rank: -1"),
     ["swiftci.yaml:9: train.lora.rank: must be greater than 0 (got -1)"]),
    ("unset-env-var",
     GOOD.replace("id: {model}", "id: ${SWIFTCI_TEST_UNSET_MODEL}"),
     ["swiftci.yaml:3: model.id: environment variable SWIFTCI_TEST_UNSET_MODEL is not set"]),
    ("yaml-syntax-error",
     GOOD.replace("  lora:\n", "  lora: [\n"),
     ["swiftci.yaml:", "YAML syntax error"]),
    ("missing-data-file",
     GOOD.replace("train: {train}", "train: data/nope.jsonl"),
     ["swiftci.yaml:5: data.train: file not found: data/nope.jsonl"]),
    ("missing-required-key",
     GOOD.replace("  id: {model}\n", "  revision: main\n"),
     ["swiftci.yaml:2: model.id: is required"]),
    ("bad-run-name",
     GOOD.replace("name: demo", "name: My Demo"),
     ["swiftci.yaml:1: name: must be 1-40 lowercase letters, digits or dashes", "got 'My Demo'"]),
    ("duplicate-key",
     GOOD + "  learning_rate: 1.0e-3\n",
     ["swiftci.yaml:11: train.learning_rate: duplicate key 'learning_rate'"]),
    ("train-without-data",
     GOOD.replace("data:\n  train: {train}\n", ""),
     ["data: a `train` section needs a `data` section"]),
    ("missing-local-model",
     GOOD.replace("id: {model}", "id: ./no-such-model"),
     ["swiftci.yaml:3: model.id: local model folder not found: ./no-such-model"]),
    ("revision-on-local-model",
     GOOD.replace("id: {model}", "id: {model}\n  revision: main"),
     ["model.revision: only hub ids have revisions"]),
    ("bad-data-format",
     GOOD.replace("train: {train}", "train: {train}\n  format: chatml"),
     ["swiftci.yaml:6: data.format: must be one of 'auto', 'messages', 'alpaca', 'preference' (got 'chatml')"]),
    ("dropout-out-of-range",
     GOOD.replace("rank: 8", "rank: 8\n    dropout: 1.5"),
     ["swiftci.yaml:10: train.lora.dropout: must be less than 1 (got 1.5)"]),
    ("empty-file", "", ["swiftci.yaml:1: the config is empty"]),
    ("not-a-mapping", "- a\n- b\n", ["the config must be a mapping"]),
]


@pytest.mark.parametrize("text,expected", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config(cfg_file, text, expected):
    assert_config_error(validate(cfg_file(text)), *expected)


def test_every_problem_is_reported_at_once(cfg_file):
    text = GOOD.replace("tuner: lora", "tuner: lroa").replace("rank: 8", "rank: 0") + "  epochs: -2\nowner: 5\n"
    out = assert_config_error(validate(cfg_file(text)), "4 problems")
    for fragment in ("train.tuner", "train.lora.rank", "train.epochs", "owner"):
        assert fragment in out


def test_config_file_not_found(tmp_path):
    assert_config_error(validate(tmp_path / "nope.yaml"), "config file not found")


def test_env_vars_are_expanded(cfg_file, tiny_model):
    text = GOOD.replace("id: {model}", "id: ${SWIFTCI_TEST_MODEL}").replace("rank: 8", "rank: ${SWIFTCI_RANK:-8}")
    proc = validate(cfg_file(text), env={"SWIFTCI_TEST_MODEL": str(tiny_model)})
    assert proc.returncode == 0, proc.stderr


class TestOverrides:
    def test_override_is_applied_and_validated(self, cfg_file):
        path = cfg_file(GOOD)
        proc = validate(path, "--set", "train.lora.rank=-3")
        assert_config_error(proc, "--set train.lora.rank: must be greater than 0 (got -3)")

    def test_override_unknown_key_gets_suggestion(self, cfg_file):
        proc = validate(cfg_file(GOOD), "--set", "train.lerning_rate=2e-5")
        assert_config_error(proc, "--set train.lerning_rate: unknown key 'lerning_rate' — did you mean 'learning_rate'?")

    def test_override_without_equals(self, cfg_file):
        assert_config_error(validate(cfg_file(GOOD), "--set", "train.learning_rate"), "expected KEY=VALUE")

    def test_override_values_expand_env_references(self, cfg_file):
        proc = validate(cfg_file(GOOD), "--set", "train.lora.rank=${SWIFTCI_RANK}", env={"SWIFTCI_RANK": "0"})
        assert_config_error(proc, "--set train.lora.rank: must be greater than 0 (got '0')")
        proc = validate(cfg_file(GOOD), "--set", "train.lora.rank=${SWIFTCI_UNSET_RANK}")
        assert_config_error(proc, "--set train.lora.rank: environment variable SWIFTCI_UNSET_RANK is not set")

    def test_a_literal_secret_on_the_command_line_is_refused_like_one_in_the_file(self, cfg_file):
        hook = "https://discord.com/api/webhooks/123/abcdefghijklmnop"
        proc = validate(cfg_file(GOOD), "--set", f"notify.discord.webhook={hook}")
        assert_config_error(proc, "--set notify.discord.webhook: write a reference such as ${DISCORD_WEBHOOK}")
        assert hook not in proc.stderr
        proc = validate(cfg_file(GOOD), "--set", "notify.discord.webhook=${HOOK}", env={"HOOK": hook})
        assert proc.returncode == 0, proc.stderr

    def test_good_override(self, cfg_file):
        from swiftci import config

        sets = ("--set", "train.learning_rate=2e-5", "--set", "train.tuner=full",
                "--set", f"evaluate={{tasks: [tiny_reverse], task_dir: {TINY / 'tasks'}}}")
        proc = validate(cfg_file(GOOD), *sets)
        assert proc.returncode == 0, proc.stderr
        assert "ok (stages: train, evaluate)" in proc.stdout, "the --set that adds a section took effect"
        cfg = config.load(cfg_file(GOOD), sets[1::2])
        assert (cfg.train.learning_rate, cfg.train.tuner, cfg.evaluate.tasks) == (2e-5, "full", ["tiny_reverse"])
        assert cfg.fingerprint() != config.load(cfg_file(GOOD)).fingerprint()


def test_gpu_config_validates_on_cpu(tmp_path):
    """A PR lint job has no GPU: a qlora/bf16 config for a hub model validates here without complaint."""
    (tmp_path / "train.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                          '{"role": "assistant", "content": "hello"}]}\n')
    path = tmp_path / "swiftci.yaml"
    path.write_text(textwrap.dedent("""\
        name: support-bot
        model:
          id: Qwen/Qwen2.5-7B-Instruct
          revision: a09a35458c702b33eeacc393d103063234e8bc28
        data:
          train: train.jsonl
        train:
          tuner: qlora
          precision: bf16
          gradient_checkpointing: true
    """))
    proc = validate(path)
    assert proc.returncode == 0, proc.stderr
    assert "warning" not in proc.stderr


def test_unpinned_hub_model_warns(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = tmp_path / "swiftci.yaml"
    path.write_text("name: x\nmodel:\n  id: org/model\ndata:\n  train: t.jsonl\ntrain: {}\n")
    proc = validate(path)
    assert proc.returncode == 0
    assert "swiftci.yaml:3: model.revision: not set" in proc.stderr


def test_qlora_without_cuda_stops_before_loading(cfg_file, tmp_path):
    path = cfg_file(GOOD.replace("tuner: lora", "tuner: qlora"))
    proc = swiftci("train", "-c", str(path))
    assert_config_error(proc, "train.tuner: qlora", "needs a CUDA GPU", "tuner: lora")
    assert not (tmp_path / "out").exists(), "nothing may be written before the hardware check"


def test_schema_is_json_schema():
    proc = swiftci("schema", check=0)
    schema = json.loads(proc.stdout)
    assert schema["title"] == "swiftci.yaml"
    assert {"name", "model", "data", "train"} <= set(schema["properties"])
    lora = schema["$defs"]["LoraConfig"]["properties"]
    assert lora["rank"]["default"] == 16 and lora["rank"]["exclusiveMinimum"] == 0
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_cli_does_not_import_heavy_libraries(cfg_file):
    """--help, validate and schema answer without importing torch (and friends)."""
    path = cfg_file(GOOD)
    script = textwrap.dedent(f"""
        import sys
        from click.testing import CliRunner
        from swiftci.cli import main
        r = CliRunner()
        for args in (["--help"], ["validate", "-c", {str(path)!r}], ["schema"]):
            res = r.invoke(main, args)
            assert res.exit_code == 0, (args, res.output)
        heavy = [m for m in ("torch", "transformers", "peft", "trl", "lm_eval", "datasets", "kubernetes")
                 if m in sys.modules]
        print("HEAVY:" + ",".join(heavy))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY:\n" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_core_install_without_torch(tmp_path, cfg_file):
    """`pip install swiftci` with no extra gives a working validate and schema, and no torch. (Installed with the
    locked uv, whose cache `make setup` filled: the index is only asked whether its entries are current, seconds.
    Not --offline: uv then refuses cached wheels whose index page it has not revalidated on this machine.)"""
    venv = tmp_path / "venv"
    uv = str(Path(sys.executable).parent / "uv")
    base_python = os.path.realpath(sys._base_executable)
    subprocess.run([uv, "venv", "-q", "--python", base_python, str(venv)], check=True)
    pip = subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin/python"),
                          "-c", str(ROOT / "requirements.lock"), str(ROOT)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    assert subprocess.run([str(venv / "bin/python"), "-c", "import torch"], capture_output=True).returncode != 0
    ok = subprocess.run([str(venv / "bin/swiftci"), "validate", "-c", str(cfg_file(GOOD))], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    schema = subprocess.run([str(venv / "bin/swiftci"), "schema"], capture_output=True, text=True)
    assert schema.returncode == 0 and json.loads(schema.stdout)["title"] == "swiftci.yaml"
    init = subprocess.run([str(venv / "bin/swiftci"), "init", "--dir", str(tmp_path / "repo"), "--yes"],
                          capture_output=True, text=True)
    assert init.returncode == 0, init.stderr  # the workflows it writes travel inside the package
    assert (tmp_path / "repo/.github/workflows/swiftci.yml").read_text() == \
        (ROOT / "workflows/push-to-deploy.yml").read_text()


def test_schema_as_a_table_names_every_key_with_the_models_default():
    from swiftci import config

    proc = swiftci_in_process("schema", "--format", "md")
    assert proc.returncode == 0
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:5]] for line in proc.stdout.splitlines()[2:]]
    rows = {key.strip("`"): rest for key, *rest in cells}
    assert rows["train.lora.rank"][1] == f"`{config.LoraConfig().rank}`"
    assert rows["name"][1] == "required" and rows["evaluate.gates[].metric"][1] == "required"
    assert rows["quantize.gates.max_ppl_increase_pct"][1] == f"`{config.QuantizeGatesConfig().max_ppl_increase_pct}`"
    assert rows["train.tuner"][0] == "`lora` \\| `qlora` \\| `full`"
    leaves = [k for k, f in config._fields_under(config.Config, "") if not config._sections_in(f.annotation)]
    assert set(leaves) <= set(rows), "every key that takes a value has a row"
