"""`swiftci quantize` for real on the tiny model: GPTQ and AWQ with gptqmodel on CPU, reloaded with transformers,
gated on perplexity and the reused eval gates."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, TINY, clone_trained, read_json, swiftci

pytestmark = pytest.mark.slow
VALIDATION = TINY / "data" / "validation.jsonl"


def exact_match_in_subprocess(model_dir) -> float:
    """Reload with plain transformers on CPU, in a fresh process, and score held-out exact match (greedy)."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from conftest import greedy_exact_match
        print(greedy_exact_match({str(model_dir)!r}, {str(VALIDATION)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def unquantized_exact_match(trained):
    return exact_match_in_subprocess(trained.train_dir / "model")


def quantize(cfg, *args):
    return swiftci("quantize", "-c", str(cfg), *args)


def test_gptq_from_an_adapter(trained, tiny_model, tmp_path, unquantized_exact_match):
    """GPTQ 4-bit on the LoRA adapter: merged into its base first, quantized, served-ready, still reverses words."""
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize={"method": "gptq", "bits": 4, "group_size": 128},
                        evaluate={"limit": 40})
    proc = quantize(cfg, "--model", str(tmp_path / "out/train/adapter"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out/quantize"
    report = read_json(out / "quantize_report.json")
    assert report["version"] == 1 and report["stage"] == "quantize" and report["passed"] is True
    assert report["source_model"] == "adapter (adapter merged into the base)" and (out / "merged/config.json").is_file()
    m = report["metrics"]
    assert m["size_after_bytes"] < m["size_before_bytes"] * 0.3
    assert abs(m["perplexity_increase_pct"]) < 5 and m["calibration_rows"] == 64
    assert [g["metric"] for g in report["gates"]] == ["perplexity", "eval:tiny_reverse/exact_match",
                                                      "eval:tiny_reverse_mc/acc"]
    assert report["eval"]["baseline"]["kind"] in ("base", "report")
    qcfg = json.loads((out / "model/config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"]) == ("gptq", 4, 128)
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / "model" / name).is_file()
    assert json.loads((out / "model/generation_config.json").read_text()).get("do_sample") in (None, False)
    em = exact_match_in_subprocess(out / "model")
    assert em == pytest.approx(unquantized_exact_match, abs=0.05)
    md = (out / "quantize_report.md").read_text()
    assert "GPTQ 4-bit" in md and "| size on disk |" in md and "✅ **PASS**" in md
    shown = proc.stdout + proc.stderr  # the quantizer's per-layer progress stays out of the CI log
    assert "Quantizing layer" in (out / "quantizer.log").read_text() and "Quantizing layer" not in shown
    assert len(shown.splitlines()) < 60 and report["quantizer_log"] == "quantizer.log"
    assert list((out / "logs").glob("gptq_log_*")) and not (ROOT / "logs").exists(), \
        "gptqmodel's ./logs land in the stage folder, never in the directory swiftci was started from"


def test_a_quantizer_crash_shows_the_end_of_its_output(tmp_path):
    """In a real process: Python prints and native writes to fd 2 both land in the log, and a crash shows its end."""
    log = tmp_path / "quantizer.log"
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from swiftci.quantize import _quantizer_output
        with _quantizer_output(Path({str(log)!r})):
            print("python-level line")
            os.write(2, b"native line from C++\\n")
            raise RuntimeError("kernel exploded")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 1 and "RuntimeError: kernel exploded" in proc.stderr
    assert "quantizer output (last lines; all in quantizer.log):" in proc.stderr
    assert "python-level line" in proc.stderr and "native line from C++" in proc.stderr
    assert proc.stdout == "", "nothing reached the console while the quantizer ran"
    assert "python-level line" in log.read_text() and "native line from C++" in log.read_text()


def test_awq(trained, tiny_model, tmp_path, unquantized_exact_match):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize={"method": "awq", "bits": 4, "group_size": 128,
                                                                 "calibration": {"samples": 32}},
                        evaluate={"limit": 40})
    proc = quantize(cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out/quantize"
    report = read_json(out / "quantize_report.json")
    assert report["passed"] and report["source_model"] == "train/model"
    qcfg = json.loads((out / "model/config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"]) == ("awq", 4)
    assert report["metrics"]["size_ratio"] < 0.3
    assert exact_match_in_subprocess(out / "model") == pytest.approx(unquantized_exact_match, abs=0.05)


def test_zero_percent_perplexity_gate_fails_with_its_reason(trained, tiny_model, tmp_path):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize={
        "method": "gptq", "gates": {"max_ppl_increase_pct": 0, "reuse_eval_gates": False}})
    proc = quantize(cfg)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "quantization gate failed: perplexity perplexity rose" in proc.stderr and "more than 0%" in proc.stderr
    report = read_json(tmp_path / "out/quantize/quantize_report.json")
    assert report["status"] == "failed" and report["gates"][0]["passed"] is False
    assert "❌ **FAIL**" in (tmp_path / "out/quantize/quantize_report.md").read_text()


@pytest.mark.parametrize("section,message", [
    ({"method": "awq", "bits": 3}, "quantize.bits: awq supports 4 bits, not 3; set `quantize.bits` to 4"),
    ({"method": "gptq", "bits": 5}, "quantize.bits: gptq supports 2, 3, 4, 8 bits, not 5"),
    ({"group_size": 96}, "quantize.group_size: 96 does not divide the model's hidden_size"),
    ({"group_size": 0}, "quantize.group_size: 0 is not a group size"),
    ({"method": "awq", "desc_act": True}, "quantize.desc_act: only GPTQ has act-order"),
])
def test_impossible_combinations_are_config_errors(trained, tiny_model, tmp_path, section, message):
    cfg = clone_trained(trained, tmp_path, tiny_model, quantize=section)
    for command in ("validate", "quantize"):
        proc = swiftci(command, "-c", str(cfg))
        assert proc.returncode == 2, (command, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr


def test_perplexity_is_the_models_own_loss_whatever_the_batch(tiny_model):
    """Padding never counts: batches of 1 and of 4 give the same perplexity, and a single row matches
    exp(loss) as transformers computes it from labels."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftci.quantize import perplexity

    rows = [json.loads(line)["messages"] for line in VALIDATION.read_text().splitlines()[:6]]
    texts = [" ".join(m["content"] for m in row) * (i + 1) for i, row in enumerate(rows)]  # lengths differ
    one, four = perplexity(tiny_model, texts, 64, 1), perplexity(tiny_model, texts, 64, 4)
    assert one == pytest.approx(four, rel=1e-4)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.tensor([tok(texts[0], add_special_tokens=False)["input_ids"][:64]])
    with torch.no_grad():
        expected = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert perplexity(tiny_model, texts[:1], 64, 1) == pytest.approx(expected, rel=1e-4)
