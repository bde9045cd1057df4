"""Real training of the tiny model through `swiftci train`: it learns, it records how, it resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import (ROOT, SWIFTCI, TINY, greedy_exact_match, read_json, swiftci, swiftci_in_process, tiny_config,
                      write_config)
from swiftci.data import sha256_file

pytestmark = pytest.mark.slow
VALIDATION = TINY / "data" / "validation.jsonl"


@pytest.fixture(scope="session")
def lora_run(trained):
    return trained.train_dir, trained.proc


def test_lora_learns_the_task(lora_run, tiny_model):
    out, proc = lora_run
    report = read_json(out / "train_report.json")
    assert report["version"] == 2 and report["stage"] == "train" and report["status"] == "ok"
    m = report["metrics"]
    assert m["train_loss_last"] < m["train_loss_first"] / 5
    assert m["steps"] == 375 and m["tokens"] > 0 and m["tokens_per_second"] > 0
    assert m["peak_memory_mb"] > 0 and m["wall_seconds"] >= m["train_seconds"]
    assert 0 < m["trainable_parameters"] < m["total_parameters"], "LoRA trains adapters on a frozen base"
    assert greedy_exact_match(tiny_model, VALIDATION) <= 0.05
    assert greedy_exact_match(tiny_model, VALIDATION, adapter_dir=out / "adapter") >= 0.9
    # merge: true also wrote a standalone model that answers the same way
    assert greedy_exact_match(out / "model", VALIDATION) >= 0.9
    assert f"run {report['run_id']}" in proc.stdout


def test_lineage_record(lora_run, tiny_model):
    out, _ = lora_run
    run = read_json(out / "run.json")
    report = read_json(out / "train_report.json")
    assert run["run_id"] == report["run_id"]
    assert run["run_id"].startswith("tiny-reverse-sft-")
    assert run["data"]["train"]["sha256"] == sha256_file(TINY / "data/train.jsonl")
    assert run["data"]["train"]["rows"] == 2000 and run["data"]["train"]["rows_used"] == 2000
    assert run["data"]["validation"]["rows"] == 100
    assert len(run["base_model"]["sha256"]) == 64
    assert run["seed"] == 42 and run["train"]["tuner"] == "lora"
    packages = run["environment"]["packages"]
    assert packages["torch"] and packages["transformers"] and packages["peft"]
    assert run["owner"] == "@swiftci-maintainers"
    assert len(run["config"]["sha256"]) == 64
    assert "sha" in run["git"]
    losses = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, *range(25, 376, 25)]
    assert losses[-1]["loss"] == report["metrics"]["train_loss_last"]


def test_full_finetune_learns_the_task(tiny_model, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train={"tuner": "full", "learning_rate": 1e-3, "merge": False}))
    swiftci_in_process("train", "-c", str(cfg), check=0)
    out = tmp_path / "out" / "train"
    report = read_json(out / "train_report.json")
    assert report["outputs"] == {"model": "model"} and not (out / "adapter").exists()
    assert report["metrics"]["trainable_parameters"] == report["metrics"]["total_parameters"]
    assert greedy_exact_match(out / "model", VALIDATION) >= 0.9


def _resume_config(tiny_model, work):
    """512 training rows: 32 steps per epoch, checkpoints at 20 and 40, the run ends at 50."""
    rows = (TINY / "data/train.jsonl").read_text().splitlines()[:512]
    (work / "train.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (work / "train.jsonl").write_text("\n".join(rows) + "\n")
    cfg = tiny_config(tiny_model, work / "out", train={"max_steps": 50, "save_steps": 20, "logging_steps": 5,
                                                       "merge": False})
    cfg["data"]["train"] = str(work / "train.jsonl")
    return write_config(work / "swiftci.yaml", cfg)


def test_killed_run_resumes_to_the_same_loss(tiny_model, tmp_path):
    """Kill a run after its second checkpoint (step 40, inside epoch 2 of 32 steps), resume it, and compare with an
    uninterrupted run. The killed run is a real process; the other two run the CLI in this process."""
    straight = _resume_config(tiny_model, tmp_path / "straight")
    assert swiftci_in_process("train", "-c", str(straight)).returncode == 0
    expected = read_json(tmp_path / "straight/out/train/train_report.json")["metrics"]

    cfg = _resume_config(tiny_model, tmp_path / "killed")
    out = tmp_path / "killed/out/train"
    proc = subprocess.Popen([*SWIFTCI, "train", "-c", str(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ}, start_new_session=True)
    deadline = time.monotonic() + 120
    while not (out / "checkpoints/checkpoint-40/trainer_state.json").exists():
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_report = read_json(out / "train_report.json")
    assert killed_report["status"] == "running", "a killed run must not leave a report that says ok"
    assert not (out / "adapter").exists()

    resumed = swiftci_in_process("train", "-c", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    got = read_json(out / "train_report.json")["metrics"]
    assert got["resumed_from_step"] == 40
    assert got["steps"] == expected["steps"] == 50
    assert got["train_loss_last"] == pytest.approx(expected["train_loss_last"], abs=1e-5)
    assert got["tokens"] == expected["tokens"]
    straight_log = [json.loads(x) for x in (tmp_path / "straight/out/train/loss.jsonl").read_text().splitlines()]
    resumed_log = [json.loads(x) for x in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed_log] == [r["step"] for r in straight_log]
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in straight_log], abs=1e-5)


def test_resume_refuses_a_changed_config(tiny_model, tmp_path):
    cfg = _resume_config(tiny_model, tmp_path)
    assert swiftci_in_process("train", "-c", str(cfg), "--set", "train.max_steps=30").returncode == 0
    proc = swiftci_in_process("train", "-c", str(cfg), "--set", "train.max_steps=30", "--set",
                              "train.learning_rate=1e-2", "--resume")
    assert proc.returncode == 2
    assert "changed since checkpoint-30" in proc.stderr


def test_local_model_never_calls_the_hub(tiny_model, tmp_path, httpserver):
    """No hub call on a local path: the hub endpoint and every proxy point at a recorder that must stay silent."""
    httpserver.expect_request("/").respond_with_data("")
    cfg = write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train={"max_steps": 5, "merge": False}))
    url = httpserver.url_for("/")
    env = {"HF_ENDPOINT": url, "HTTP_PROXY": url, "HTTPS_PROXY": url, "http_proxy": url, "https_proxy": url,
           "NO_PROXY": "", "no_proxy": "", "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    swiftci("train", "-c", str(cfg), env=env, check=0)
    assert httpserver.log == [], [str(r) for r, _ in httpserver.log]


def test_alpaca_rows_train(tiny_model, tmp_path):
    rows = [json.loads(x)["messages"] for x in (TINY / "data/train.jsonl").read_text().splitlines()[:64]]
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": m[0]["content"], "input": "", "output": m[1]["content"]})
                              + "\n" for m in rows))
    cfg = tiny_config(tiny_model, tmp_path / "out", train={"max_steps": 4, "merge": False})
    cfg["data"] = {"train": str(alpaca), "format": "auto"}
    swiftci_in_process("train", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)), check=0)
    run = read_json(tmp_path / "out/train/run.json")
    assert run["data"]["train"]["format"] == "alpaca" and run["data"]["train"]["rows_used"] == 64


def test_bad_data_row_is_a_usage_error(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   "{not json\n")
    cfg = tiny_config(tiny_model, tmp_path / "out")
    cfg["data"] = {"train": str(bad)}
    proc = swiftci_in_process("train", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)))
    assert proc.returncode == 2
    assert "bad.jsonl:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    report = read_json(tmp_path / "out/train/train_report.json")
    assert report["status"] == "failed" and report["error"]["kind"] == "UsageError"
    assert "bad.jsonl:2: not valid JSON" in report["error"]["reason"] and report["error"]["hint"]


def test_a_second_divergence_never_overwrites_the_first_ones_quarantine(tmp_path):
    from swiftci.train import _quarantine

    for name in ("checkpoint-10", "checkpoint-20", "diverged-checkpoint-20"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
    assert _quarantine(tmp_path, last_good_step=15) == ["diverged-checkpoint-20.2"]
    assert (tmp_path / "diverged-checkpoint-20/marker").read_text() == "diverged-checkpoint-20"
    assert (tmp_path / "diverged-checkpoint-20.2/marker").read_text() == "checkpoint-20"
    assert (tmp_path / "checkpoint-10").is_dir(), "the last good checkpoint stays for --resume"


def test_the_imports_are_frozen_while_a_stage_runs_and_what_it_makes_stays_collectable(tmp_path):
    """The Trainer runs a full garbage collection as it starts (0.3 s over the objects importing torch and
    transformers makes, 7 % of a 30-step run of the tiny model): those are frozen while the stage runs. Garbage made
    after the imports (loading a model, say) is still collected, the freeze ends with the stage, also when it fails,
    and a process that froze objects itself keeps its own freeze."""
    import gc
    import weakref

    from swiftci.train import _imports_frozen

    class Node:
        pass

    def cycle_freed() -> bool:  # a reference cycle, dropped: only a collection frees it
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        return gone() is None

    assert gc.get_freeze_count() == 0
    with _imports_frozen(tmp_path):
        assert gc.get_freeze_count() > 10_000  # the modules imported so far, at least
        assert cycle_freed()
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), _imports_frozen(tmp_path):
        raise RuntimeError("out of memory")
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        with _imports_frozen(tmp_path):
            pass
        assert gc.get_freeze_count() > 10_000  # still theirs (the count drops as frozen objects are freed)
    finally:
        gc.unfreeze()


def test_a_loss_plot_that_cannot_be_drawn_costs_only_a_warning(tmp_path, monkeypatch, capsys):
    from swiftci import train

    (tmp_path / "loss.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    monkeypatch.setattr(train, "_plot_loss", lambda out, title: (_ for _ in ()).throw(OSError("disk full")))
    assert train.plot_loss(tmp_path, "run") is None
    assert "could not draw the loss curve (OSError: disk full)" in capsys.readouterr().err
    monkeypatch.undo()
    assert train.plot_loss(tmp_path, "run") == tmp_path / "loss.png"


def _short_run(tiny_model, work, **train):
    cfg = tiny_config(tiny_model, work / "out", train={"max_steps": 3, "logging_steps": 1, "save_steps": 1000,
                                                       "merge": False, **train})
    proc = swiftci_in_process("train", "-c", str(write_config(work / "swiftci.yaml", cfg)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = read_json(work / "out/train/train_report.json")
    losses = [json.loads(x)["loss"] for x in (work / "out/train/loss.jsonl").read_text().splitlines()]
    return report, losses, proc


def test_padding_free_batches_give_the_padded_loss(tiny_model, tmp_path):
    """The same rows concatenated with their boundaries in position_ids (no padding) train to the same losses as
    padded batches; on CPU, `auto` keeps padding and says why."""
    padded, padded_losses, proc = _short_run(tiny_model, tmp_path / "auto")
    flat, flat_losses, _ = _short_run(tiny_model, tmp_path / "flat", packing="padding_free")
    assert len(padded_losses) == len(flat_losses) == 3
    assert flat_losses == pytest.approx(padded_losses, abs=1e-5)
    assert flat["metrics"]["tokens"] == padded["metrics"]["tokens"], "both count the rows' tokens, no padding"
    assert padded["packing"]["used"] == "none" and "dense mask" in padded["packing"]["why"]
    assert flat["packing"] == {"used": "padding_free", "why": flat["packing"]["why"]}
    assert "train.packing: none (" in proc.stdout
    assert padded["kernels"]["used"] == "none" and "liger-kernel" in padded["kernels"]["why"]


def test_logits_only_where_a_label_is_give_the_full_logits_loss_and_gradients(tiny_model):
    """data.LabelledLogits: the model projects only the positions whose next token is learned, and the loss and
    every gradient are those of the full logits — padded and padding-free batches alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorWithFlattening

    from swiftci import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(x) for x in (TINY / "data/train.jsonl").read_text().splitlines()[:6]]
    tokenized, _ = data.tokenize_sft([r["messages"] for r in rows], tokenizer, 512, "train.jsonl")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def loss_and_grads(batch):
        model.zero_grad()
        learned = (batch["labels"][..., 1:] != -100).sum()  # as the Trainer counts them for gradient accumulation
        out = model(**batch, num_items_in_batch=learned)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters()}

    for collate in (data.PadCollator(tokenizer.pad_token_id), DataCollatorWithFlattening(return_position_ids=True)):
        full, full_grads = loss_and_grads(collate(tokenized))
        batch = data.LabelledLogits(collate)(tokenized)
        learned = int((batch["labels"][..., 1:] != -100).sum())
        labelled, grads = loss_and_grads(batch)
        assert 0 < learned < batch["labels"].numel() // 2, "the prompts are most of these rows"
        assert labelled.logits.shape == (learned, model.config.vocab_size)
        assert full.logits.shape[:-1] == batch["labels"].shape
        assert labelled.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
        for name, grad in full_grads.items():
            assert torch.allclose(grads[name], grad, rtol=1e-4, atol=1e-7), name


def test_a_run_with_logits_only_where_a_label_is_trains_to_the_same_losses(tiny_model, tmp_path, monkeypatch):
    from swiftci import data

    batches = []
    collate = data.LabelledLogits.__call__
    monkeypatch.setattr(data.LabelledLogits, "__call__", lambda self, rows: batches.append(collate(self, rows))
                        or batches[-1])
    labelled, labelled_losses, proc = _short_run(tiny_model, tmp_path / "auto")
    assert batches and all(b["logits_to_keep"].sum() < b["labels"].numel() for b in batches), "the model got them"
    seen = len(batches)
    full, full_losses, _ = _short_run(tiny_model, tmp_path / "all", logits="all")
    assert len(batches) == seen, "train.logits: all builds plain batches"
    assert len(labelled_losses) == 3 and labelled_losses == pytest.approx(full_losses, rel=1e-5)
    validation = labelled["metrics"]["validation_loss"]
    assert validation is not None and validation == pytest.approx(full["metrics"]["validation_loss"], rel=1e-5)
    assert labelled["logits"]["used"] == "labelled" and "next token is learned" in labelled["logits"]["why"]
    assert full["logits"] == {"used": "all", "why": "train.logits: all"}
    assert "train.logits: labelled (" in proc.stdout


def test_liger_where_it_cannot_run_stops_before_loading(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "out", train={"kernels": "liger"})
    proc = swiftci_in_process("train", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)))
    assert proc.returncode == 2
    assert "train.kernels: liger cannot be used here" in proc.stderr and "train.kernels: auto" in proc.stderr
    assert not (tmp_path / "out/train/train_report.json").exists()


def test_padding_free_is_for_sft(tiny_model, tmp_path):
    cfg = tiny_config(tiny_model, tmp_path / "out", train={"method": "dpo", "packing": "padding_free"})
    proc = swiftci_in_process("validate", "-c", str(write_config(tmp_path / "swiftci.yaml", cfg)))
    assert proc.returncode == 2 and "train.packing" in proc.stderr and "padding_free is for method sft" in proc.stderr
