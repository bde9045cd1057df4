"""train.distributed on this CPU machine: 2 processes with gloo, launched by `swiftci train` under torchrun.

Each training here is a few steps of the tiny model; the two-process runs are real processes (torchrun's agent and
its workers), the launcher is the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, SWIFTCI, read_json, swiftci, swiftci_in_process, tiny_config, write_config

STEPS = 6
DDP = {"strategy": "ddp", "nproc_per_node": 2}


def _config(tiny_model: Path, work: Path, batch_size: int, distributed: dict | None = None, **train) -> Path:
    """A few steps, a log line per step; `batch_size` per process (the effective batch is that × processes)."""
    settings = {"max_steps": STEPS, "batch_size": batch_size, "logging_steps": 1, "save_steps": 3,
                "warmup_ratio": 0.0, **train}
    if distributed is not None:
        settings["distributed"] = distributed
    return write_config(work / "swiftci.yaml", tiny_config(tiny_model, work / "out", train=settings, evaluate=None,
                                                           quantize=None, deploy=None))


def _losses(train_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (train_dir / "loss.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def one_process(tiny_model, tmp_path_factory) -> Path:
    """The reference: one process, batch 4."""
    work = tmp_path_factory.mktemp("one")
    swiftci_in_process("train", "-c", str(_config(tiny_model, work, batch_size=4)), check=0)
    return work / "out/train"


@pytest.fixture(scope="module")
def two_processes(tiny_model, tmp_path_factory):
    """The same effective batch on 2 processes with gloo: batch 2 each."""
    work = tmp_path_factory.mktemp("two")
    proc = swiftci("train", "-c", str(_config(tiny_model, work, batch_size=2, distributed=DDP)), check=0)
    return work / "out/train", proc


def test_two_processes_train_like_one_at_the_same_effective_batch(one_process, two_processes):
    """Same rows per optimizer step (the sampler groups by the global batch; each rank takes its share) and a loss
    averaged over every rank's tokens (transformers' average_tokens_across_devices): the runs may differ only by
    float summation order and padding lengths. Seen: equal to 4 decimals; 1e-3 relative leaves room for that."""
    two, _ = two_processes
    reference, distributed = _losses(one_process), _losses(two)
    assert [s for s, _ in distributed] == [s for s, _ in reference] == list(range(1, STEPS + 1))
    assert [loss for _, loss in distributed] == pytest.approx([loss for _, loss in reference], rel=1e-3)
    assert read_json(two / "train_report.json")["metrics"]["train_loss_last"] == pytest.approx(
        read_json(one_process / "train_report.json")["metrics"]["train_loss_last"], rel=1e-3)


def test_the_ranks_split_the_data(two_processes):
    """Launched wrongly on CPU, every rank trains on the whole data set (world size 1 each, or no DDP): the two
    ranks must see disjoint rows, half of every step's batch each."""
    two, _ = two_processes
    report = read_json(two / "train_report.json")
    assert report["metrics"]["distributed"] == {"strategy": "ddp", "world_size": 2, "rows_per_rank": [12, 12]}
    rows = read_json(two / "distributed/rows.json")
    assert sorted(rows) == ["rank-0", "rank-1"]
    assert len(rows["rank-0"]) == len(rows["rank-1"]) == STEPS * 2
    assert not set(rows["rank-0"]) & set(rows["rank-1"]), "a row trained on by both ranks"
    assert len(set(rows["rank-0"]) | set(rows["rank-1"])) == STEPS * 4


def test_rank_zero_alone_writes_reports_and_a_normal_model(two_processes, tiny_model):
    two, proc = two_processes
    report = read_json(two / "train_report.json")
    assert report["status"] == "ok"
    assert len((two / "loss.jsonl").read_text().splitlines()) == STEPS, "one log line per step, not one per rank"
    assert proc.stdout.count("train: ok") == 1, proc.stdout
    assert not list((two / "distributed").glob("rank-*.error.json"))
    settings = read_json(two / "distributed.json")
    assert settings == {"strategy": "ddp", "nnodes": 1, "nproc_per_node": 2, "world_size": 2, "backend": "gloo",
                        "timeout_seconds": 60}
    assert read_json(two / "run.json")["distributed"] == {"settings_file": "distributed.json", **settings}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(two / "model")
    assert merged.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_model).num_parameters()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), two / "adapter")


def _rank_pid(parent: int, rank: int, deadline: float) -> int:
    """The pid of the worker with this RANK among `parent`'s descendants."""
    while time.monotonic() < deadline:
        for pid in _descendants(parent):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"SWIFTCI_DISTRIBUTED_CHILD=1" in env:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} under {parent}")


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def test_a_killed_rank_fails_the_run_with_exit_3_within_a_minute(tiny_model, tmp_path):
    cfg = _config(tiny_model, tmp_path, batch_size=2, distributed=DDP, max_steps=100000, save_steps=100000)
    out = tmp_path / "out/train"
    proc = subprocess.Popen([*SWIFTCI, "train", "-c", str(cfg)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while not (out / "loss.jsonl").is_file() or len((out / "loss.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.kill(_rank_pid(proc.pid, 1, deadline), signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, output[-3000:]
    assert took < 60
    message = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(message) == 1, output[-3000:]
    assert message[0].startswith("error: a training process ended without reporting an error (rank ")
    assert "1" in message[0].split("(rank ")[1].split(":")[0], "the killed rank is named"
    report = read_json(out / "train_report.json")
    assert report["status"] == "failed" and report["error"]["kind"] == "RankDied"


def test_divergence_stops_every_rank_at_the_same_step(tiny_model, tmp_path):
    """The logged loss and gradient norm are the ranks' common values: each rank's watchdog stops at the same step,
    and the run fails once, with exit 4, the way a one-process run does."""
    cfg = _config(tiny_model, tmp_path, batch_size=2, distributed=DDP, watchdog={"max_grad_norm": 0.5})
    proc = swiftci("train", "-c", str(cfg))
    assert proc.returncode == 4, proc.stderr[-3000:]
    out = tmp_path / "out/train"
    errors = [read_json(out / f"distributed/rank-{r}.error.json") for r in (0, 1)]
    assert [e["kind"] for e in errors] == ["Diverged", "Diverged"]
    assert errors[0]["step"] == errors[1]["step"] == 1
    report = read_json(out / "train_report.json")
    assert report["status"] == "failed" and report["error"]["kind"] == "Diverged"
    assert report["error"]["reason"].startswith("training diverged at step 1: grad_norm")  # rank 0's own report
    errors_said = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors_said) == 1 and errors_said[0].startswith("error: rank 0: training diverged at step 1")


@pytest.mark.parametrize("strategy", [  # ZeRO-3 (weights sharded too) stands for ZeRO-2, which resumes by the same
    DDP,                                   # path and passed too, to keep the suite inside its time
    pytest.param({"strategy": "deepspeed", "nproc_per_node": 2, "zero_stage": 3}, marks=pytest.mark.slow),
], ids=["ddp", "zero3"])
def test_a_run_stopped_by_max_runtime_resumes_to_the_same_loss(one_process, tiny_model, tmp_path, strategy):
    """train.max_runtime stops every rank at the same step (a rank that stopped alone would leave the other
    waiting); --resume continues from the checkpoint — DDP's, or DeepSpeed's sharded one (each rank reloads its
    own optimizer-state shard, and under ZeRO-3 its weight shard) — and ends where one uninterrupted process ends."""
    cfg = _config(tiny_model, tmp_path, batch_size=2, distributed=strategy, save_steps=100)
    stopped = swiftci("train", "-c", str(cfg), "--set", "train.max_runtime=1s")
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "error: rank 0: train.max_runtime (1s) reached at step 1 of 6" in stopped.stderr
    if strategy["strategy"] == "deepspeed":  # one optimizer-state shard per rank, not a gathered copy
        shards = sorted(p.name for p in (tmp_path / "out/train/checkpoints/checkpoint-1").glob("global_step1/*optim*"))
        assert len(shards) == 2, shards
    resumed = swiftci("train", "-c", str(cfg), "--resume", check=0)
    assert "resuming" in resumed.stdout
    out = tmp_path / "out/train"
    assert read_json(out / "train_report.json")["metrics"]["resumed_from_step"] == 1
    assert [loss for _, loss in _losses(out)] == pytest.approx([loss for _, loss in _losses(one_process)], rel=1e-3)


@pytest.mark.parametrize("settings, message", [
    ({"strategy": "ddp", "zero_stage": 2},
     "train.distributed.zero_stage: is a DeepSpeed setting; set `strategy: deepspeed` or remove it"),
    ({"strategy": "deepspeed", "offload": "optimizer_and_params", "zero_stage": 2},
     "train.distributed.offload: `optimizer_and_params` needs the weights partitioned"),
    ({"nproc_per_node": 2},
     "train.distributed.strategy: several processes need a strategy"),
])
def test_settings_that_do_not_fit_are_refused_with_their_path(tiny_model, tmp_path, settings, message):
    cfg = _config(tiny_model, tmp_path, batch_size=2, distributed=settings)
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert message in proc.stderr


def test_qlora_with_zero3_is_refused_with_the_reason(tiny_model, tmp_path):
    cfg = _config(tiny_model, tmp_path, batch_size=2, tuner="qlora",
                  distributed={"strategy": "deepspeed", "zero_stage": 3})
    proc = swiftci_in_process("validate", "-c", str(cfg))
    assert proc.returncode == 2
    assert ("train.distributed.zero_stage: bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3; use "
            "zero_stage: 2 or tuner: lora") in proc.stderr


@pytest.mark.parametrize("distributed, message", [
    ({"strategy": "fsdp", "nproc_per_node": 2},
     "error: train.distributed.strategy: fsdp needs CUDA GPUs here: transformers' Trainer configured for FSDP on "
     "CPU silently trains plain DDP"),
    ({"strategy": "ddp", "nnodes": 2}, "error: train.distributed.nnodes: 2 machines need every machine started"),
])
def test_what_cannot_run_here_stops_before_anything_loads(tiny_model, tmp_path, distributed, message):
    cfg = _config(tiny_model, tmp_path, batch_size=2, distributed=distributed)
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / "out/train").exists()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_trains_across_two_processes(one_process, tiny_model, tmp_path, zero_stage):
    """DeepSpeed ZeRO on 2 CPU processes (gloo), the Trainer's own torch AdamW: the same losses as one process,
    the data split, and (ZeRO-3: gathered from the shards) a normal Hugging Face adapter and merged model."""
    cfg = _config(tiny_model, tmp_path, batch_size=2,
                  distributed={"strategy": "deepspeed", "nproc_per_node": 2, "zero_stage": zero_stage})
    swiftci("train", "-c", str(cfg), check=0, timeout=900)
    out = tmp_path / "out/train"
    assert [loss for _, loss in _losses(out)] == pytest.approx([loss for _, loss in _losses(one_process)], rel=1e-3)
    report = read_json(out / "train_report.json")
    assert report["metrics"]["distributed"] == {"strategy": "deepspeed", "world_size": 2, "rows_per_rank": [12, 12]}
    assert read_json(out / "distributed.json")["deepspeed"]["zero_optimization"]["stage"] == zero_stage
    rows = read_json(out / "distributed/rows.json")
    assert not set(rows["rank-0"]) & set(rows["rank-1"])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert merged.num_parameters() == base.num_parameters()
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4), "the merged model is the adapter's"
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4), "the adapter learned nothing"
