"""Cost guards for GPU time: train.max_runtime stops a run with a checkpoint that --resume continues from; an idle
GPU (NVML utilization near 0) stops it like a stall, after a warning; the start notification shows the estimated
GPU-hours and warns, with a mention, over notify.budget.gpu_hours. There is no GPU here: the NVML reader and the
GPU count are stand-ins (what torch.cuda would report), the rest of the run is real."""

from __future__ import annotations

import json

from conftest import swiftci_in_process, tiny_config, write_config
from test_notify import Receiver


def config(tmp_path, tiny_model, **train):
    return write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train={"max_steps": 12, "logging_steps": 2, "save_steps": 1000, **train},
        evaluate=None, quantize=None, deploy=None))


def test_max_runtime_saves_a_checkpoint_and_stops_then_resume_finishes(tiny_model, tmp_path):
    cfg = config(tmp_path, tiny_model, max_runtime="0.2s")
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 3, proc.stderr
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["status"] == "failed" and report["error"]["kind"] == "MaxRuntime"
    stopped = [p.name for p in (tmp_path / "out/train/checkpoints").glob("checkpoint-*")]
    assert len(stopped) == 1, "a checkpoint at the step where the time ran out"
    assert f"{stopped[0]} is saved" in proc.stderr and "--resume" in proc.stderr
    step = int(stopped[0].split("-")[1])
    assert step < 12

    proc = swiftci_in_process("train", "-c", str(cfg), "--resume", "--set", "train.max_runtime=1h")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["status"] == "ok" and report["metrics"]["steps"] == 12
    assert report["metrics"]["resumed_from_step"] == step


def test_an_idle_gpu_warns_then_stops_the_run(tiny_model, tmp_path, monkeypatch):
    from swiftci import train

    monkeypatch.setattr(train, "_gpu_utilization", lambda: 0.0)  # NVML: this GPU does nothing
    cfg = config(tmp_path, tiny_model, max_steps=5000, watchdog={"idle_minutes": 0.02, "idle_utilization_pct": 5})
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "warning: the GPU has been idle (utilization ≤ 5%)" in proc.stderr
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    assert report["error"]["kind"] == "Idle" and "idle (utilization ≤ 5%) for 0.02 minutes" in report["error"]["reason"]


def test_a_busy_gpu_is_never_idle(tiny_model, tmp_path, monkeypatch):
    from swiftci import train

    monkeypatch.setattr(train, "_gpu_utilization", lambda: 87.0)
    cfg = config(tmp_path, tiny_model, watchdog={"idle_minutes": 0.001})
    proc = swiftci_in_process("train", "-c", str(cfg))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "idle" not in proc.stderr


def test_the_start_notification_estimates_gpu_hours_and_warns_over_budget(tiny_model, tmp_path, monkeypatch,
                                                                          httpserver):
    from swiftci import train

    monkeypatch.setattr(train, "_gpu_count", lambda: 8)
    rx = Receiver(httpserver)
    cfg_dict = tiny_config(tiny_model, tmp_path / "out", train={"max_steps": 12, "logging_steps": 2},
                           evaluate=None, quantize=None, deploy=None)
    cfg_dict["notify"] = {"discord": {"webhook": "${HOOK}"}, "mention": ["@alice"], "budget": {"gpu_hours": 1e-6}}
    cfg = write_config(tmp_path / "swiftci.yaml", cfg_dict)
    proc = swiftci_in_process("train", "-c", str(cfg), env={"HOOK": f"{rx.url}/hook/abcdefgh12345678"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "out/train/train_report.json").read_text())
    estimate = report["metrics"]["gpu_hours_estimated"]
    assert estimate > 1e-6 and report["metrics"]["gpu_hours"] > 0
    start = next(c["body"] for c in rx.calls if c["body"]["embeds"][0]["title"].startswith("🚀"))
    fields = {f["name"]: f["value"] for f in start["embeds"][0]["fields"]}
    assert fields["estimated GPU-hours"] == f"{estimate:.2f} (8 GPU)"
    assert "over notify.budget.gpu_hours" in fields["over budget"] and "@alice" in start.get("content", "")
    assert "warning: estimated" in proc.stderr
    md = (tmp_path / "out/train/train_report.md").read_text()  # what the job summary and the PR comment show
    assert f"GPU-hours (estimated {estimate:.2f})" in md
