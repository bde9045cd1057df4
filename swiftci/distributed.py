"""Training on several processes (`train.distributed`): the launcher and each process's place in the run.

`swiftci train` with a strategy other than `none` prepares the run (run id, resume point, the "running" report,
`distributed.json`), then starts itself again under torchrun, one process per GPU (or per CPU slot with gloo):

    python -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node N --max_restarts 0 \\
        -m swiftci train -c swiftci.yaml [--set ...] [--resume]

The processes it starts carry `SWIFTCI_DISTRIBUTED_CHILD` (they do not launch again) and take their rank from
torchrun's RANK / LOCAL_RANK / WORLD_SIZE. Every process trains; only rank 0 writes reports, the loss log, run.json
and the model. A process that fails writes `distributed/rank-<N>.error.json`; torchrun's agent then stops the
others, and the launcher turns what it finds into ONE error (the failing rank's, or "rank N died" when a process
was killed without a word) with the usual exit code. A dead peer cannot hang the others past
`train.distributed.timeout_seconds`: that is the collectives' timeout.

`swiftci train` started under torchrun by something else (a cluster's job) runs as one of its processes directly:
rank 0 reports and notifies as a one-process run would.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swiftci import reports
from swiftci.config import Config
from swiftci.errors import EXIT_DIVERGED, EXIT_USAGE, Diverged, StageError, SwiftCIError, UsageError

CHILD = "SWIFTCI_DISTRIBUTED_CHILD"  # set by the local launcher on the processes it starts
RUN_ID = "SWIFTCI_RUN_ID"  # the run the launcher prepared
RESUME_FROM = "SWIFTCI_RESUME_FROM"  # the checkpoint it chose ("" for a fresh run)
SETTINGS_FILE = "distributed.json"  # the generated DeepSpeed/FSDP/DDP settings, in the stage folder
RANKS_DIR = "distributed"  # per-rank error files and the rows each rank trained on


@dataclass(frozen=True)
class Worker:
    """This process's place in a distributed run (from torchrun's environment)."""

    rank: int
    local_rank: int
    world_size: int
    launched_here: bool  # started by swiftci's own launcher, which prepared the run and reports its outcome

    @property
    def main(self) -> bool:
        return self.rank == 0


def worker() -> Worker | None:
    """This process's place when torchrun started it; None in a one-process run."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    return Worker(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]),
                  launched_here=os.environ.get(CHILD) == "1")


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes reports, the model and notifications."""
    w = worker()
    return w is None or w.main


def notifies() -> bool:
    """Whether this process sends the command's notifications: not the local launcher's workers (the launcher
    does), and never a rank other than 0."""
    w = worker()
    return w is None or (w.main and not w.launched_here)


def processes_per_node(cfg: Config) -> int:
    """`nproc_per_node: auto` is one per visible CUDA GPU, 1 on CPU."""
    wanted = cfg.train.distributed.nproc_per_node
    if wanted != "auto":
        return wanted
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def launches(cfg: Config) -> bool:
    """Whether `swiftci train` starts torchrun: a strategy is set and this is not already one of its processes."""
    return cfg.train.distributed.strategy != "none" and worker() is None


def check(cfg: Config) -> None:
    """What must hold before the processes start (exit 2): the strategy can run here and means what it says."""
    import torch

    dc = cfg.train.distributed
    on_cuda = torch.cuda.is_available()
    if dc.strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise UsageError("train.distributed.strategy: deepspeed needs the deepspeed package: pip install "
                             "'swiftci[deepspeed]' (or deepspeed), or use strategy: ddp") from None
    if dc.strategy == "fsdp" and not on_cuda:
        raise UsageError("train.distributed.strategy: fsdp needs CUDA GPUs here: transformers' Trainer configured "
                         "for FSDP on CPU silently trains plain DDP (seen with transformers 5.24), so swiftci refuses "
                         "rather than report sharding that did not happen; use strategy: ddp or deepspeed on CPU")
    if on_cuda and dc.nproc_per_node != "auto" and dc.nproc_per_node > torch.cuda.device_count():
        raise UsageError(f"train.distributed.nproc_per_node: {dc.nproc_per_node} processes but "
                         f"{torch.cuda.device_count()} CUDA GPU(s) visible; set it to `auto` or at most that")
    if dc.nnodes > 1:
        raise UsageError(f"train.distributed.nnodes: {dc.nnodes} machines need every machine started together; "
                         "`swiftci train` launches one machine's processes — run it under torchrun on each machine "
                         "(e.g. a Kubeflow TrainJob; README, \"Scaling up\"), or set nnodes: 1")


# --- the settings handed to transformers' Trainer -------------------------------------------------------------


def settings(cfg: Config) -> dict[str, Any]:
    """What `distributed.json` records and the Trainer gets: the backend and timeout, and the DeepSpeed config
    (a dict; "auto" values are filled in by the Trainer from the train settings) or the FSDP settings."""
    import torch

    dc = cfg.train.distributed
    out: dict[str, Any] = {"strategy": dc.strategy, "nnodes": dc.nnodes,
                           "nproc_per_node": processes_per_node(cfg),
                           "world_size": processes_per_node(cfg) * dc.nnodes,
                           "backend": "nccl" if torch.cuda.is_available() else "gloo",
                           "timeout_seconds": dc.timeout_seconds}
    if dc.strategy == "deepspeed":
        out["deepspeed"] = deepspeed_config(cfg)
    if dc.strategy == "fsdp":
        out["fsdp"] = "full_shard auto_wrap"
        out["fsdp_config"] = {"version": 2, "reshard_after_forward": True,
                              "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
                              "cpu_ram_efficient_loading": False}
    return out


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    dc = cfg.train.distributed
    zero: dict[str, Any] = {"stage": dc.zero_stage or 2, "overlap_comm": False, "contiguous_gradients": True}
    if dc.offload in ("optimizer", "optimizer_and_params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if dc.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero["stage"] == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # save_model writes a full state dict
    return {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # the Trainer's own torch AdamW: DeepSpeedCPUAdam compiles a C++ op on first use (~160 s on 2 cores)
        "zero_force_ds_cpu_optimizer": False,
    }


def trainer_arguments(cfg: Config) -> dict[str, Any]:
    """The TrainingArguments a process of the run adds to the stage's own."""
    s = settings(cfg)
    args: dict[str, Any] = {"ddp_backend": s["backend"], "ddp_timeout": s["timeout_seconds"]}
    if s["backend"] == "gloo":  # accelerate sets up CPU processes (MULTI_CPU) only with use_cpu; else each runs alone
        args["use_cpu"] = True
    if "deepspeed" in s:
        args["deepspeed"] = s["deepspeed"]
    if "fsdp" in s:
        args["fsdp"], args["fsdp_config"] = s["fsdp"], s["fsdp_config"]
    return args


def write_settings(cfg: Config, out: Path) -> dict[str, Any]:
    s = settings(cfg)
    reports.write_json(out / SETTINGS_FILE, s)
    return s


def check_trainer(cfg: Config, trainer: Any) -> None:
    """The Trainer really runs what the config asked for — never report sharding or a world size that did not
    happen (transformers has been seen to fall back to plain DDP, or to one process, without a word)."""
    w, strategy = worker(), cfg.train.distributed.strategy
    seen, kind = trainer.args.world_size, trainer.accelerator.distributed_type
    if w is not None:
        print(f"train.distributed: rank {w.rank} of {seen}, {kind.value} ({trainer.args.ddp_backend})",
              file=sys.stderr, flush=True)
    if w is not None and w.world_size > 1 and (seen != w.world_size or kind.value == "NO"):
        # seen with transformers 5.24 on CPU without use_cpu=True: world size 2 but no DDP, every rank on its own
        raise StageError(f"transformers' Trainer runs {kind.value} with a world of {seen} process(es), torchrun "
                         f"started {w.world_size}: the ranks would not train together; refusing to go on")
    if strategy == "deepspeed" and not trainer.is_deepspeed_enabled:
        raise StageError("train.distributed.strategy: deepspeed was asked for, but the Trainer did not enable it")
    if strategy == "fsdp" and not trainer.is_fsdp_enabled:
        raise StageError("train.distributed.strategy: fsdp was asked for, but the Trainer runs without FSDP (plain "
                         "DDP); refusing to report sharding that does not happen")


# --- the launcher --------------------------------------------------------------------------------------------


def command(cfg: Config, resume: bool) -> list[str]:
    """torchrun starting `swiftci train` with the same config and overrides in each process."""
    dc = cfg.train.distributed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nnodes={dc.nnodes}",
           f"--nproc_per_node={processes_per_node(cfg)}", "--max_restarts=0", "--monitor_interval=1",
           "-m", "swiftci", "train", "-c", cfg.source]
    for override in cfg.overrides:
        cmd += ["--set", override]
    return cmd + (["--resume"] if resume else [])


def launch(cfg: Config, out: Path, run_id: str, resume_from: Path | None, resume: bool) -> SwiftCIError | None:
    """Run the processes to the end; None when every one succeeded, else the one error that stands for the run."""
    ranks = out / RANKS_DIR
    for old in ranks.glob("rank-*.error.json"):
        old.unlink()
    env = {**os.environ, CHILD: "1", RUN_ID: run_id, RESUME_FROM: str(resume_from or ""),
           "PYTHONUNBUFFERED": "1"}
    print(f"train.distributed: {cfg.train.distributed.strategy} on {processes_per_node(cfg)} process(es) "
          f"(settings in {out / SETTINGS_FILE})", file=sys.stderr, flush=True)
    proc = subprocess.Popen(command(cfg, resume), env=env)
    try:
        code = proc.wait()
    except KeyboardInterrupt:  # the stall watchdog or Ctrl-C: torchrun stops its workers on SIGTERM
        proc.send_signal(signal.SIGTERM)
        proc.wait()
        raise
    if code == 0:
        return None
    return failure(ranks, code, processes_per_node(cfg) * cfg.train.distributed.nnodes)


def record_error(out: Path, e: SwiftCIError) -> None:
    """A failing process says why, for the launcher (it only sees torchrun's exit code)."""
    w = worker()
    if w is None or not w.launched_here:
        return
    extra = {"step": e.step, "last_good_step": e.last_good_step} if isinstance(e, Diverged) else {}
    reports.write_json(out / RANKS_DIR / f"rank-{w.rank}.error.json",
                       {"rank": w.rank, "exit_code": e.exit_code, "kind": e.kind, "message": str(e),
                        "hint": e.hint, **extra})


def failure(ranks: Path, code: int, world_size: int) -> SwiftCIError:
    """The one error of a failed run: the lowest rank's that said why. A rank that ended without a word (killed,
    out of host memory) is the cause when the others only report the broken connection it left."""
    said = sorted((reports.read_json(p) for p in ranks.glob("rank-*.error.json")), key=lambda e: e["rank"])
    silent = sorted(set(range(world_size)) - {e["rank"] for e in said})
    first = said[0] if said else None
    if first is not None and not (silent and first["kind"] == "StageError"):
        message = f"rank {first['rank']}: {first['message']}"
        if first["exit_code"] == EXIT_DIVERGED:
            return Diverged(message, step=first["step"], last_good_step=first["last_good_step"])
        if first["exit_code"] == EXIT_USAGE:
            return UsageError(message, kind=first["kind"], hint=first["hint"])
        return StageError(message, kind=first["kind"], hint=first["hint"])
    then = f"; then rank {first['rank']}: {first['message']}" if first is not None else ""
    return StageError(f"a training process ended without reporting an error (rank {', '.join(map(str, silent))}: "
                      f"killed by a signal or out of host memory, or stopped by torchrun when another rank "
                      f"failed){then}; torchrun stopped the others and exited with {code}", kind="RankDied",
                      hint="the job log shows which rank stopped first (torchrun's \"Root Cause\"); `dmesg` shows "
                           "the OOM killer")


# --- what each rank trained on ---------------------------------------------------------------------------------


class RowLedger:
    """Mixed into the Trainer of a distributed run: a digest of each row this rank trains on, so the report can
    show (and a test assert) that the ranks split the data rather than each training on all of it."""

    swiftci_rows: list[str]

    def training_step(self, model, inputs, *args, **kwargs):
        self.swiftci_rows.extend(row_digests(inputs))
        return super().training_step(model, inputs, *args, **kwargs)


def row_digests(inputs: dict) -> list[str]:
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    rows = [r[m.bool()] for r, m in zip(ids, mask)] if mask is not None else list(ids)
    return [hashlib.sha256(json.dumps(r.tolist()).encode()).hexdigest()[:16] for r in rows]


def gather_rows(trainer: Any, out: Path) -> list[int]:
    """Every rank's row digests, collected on rank 0 into `distributed/rows.json`; returns rows per rank."""
    import torch.distributed as torch_dist

    mine = getattr(trainer, "swiftci_rows", [])
    everyone: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, mine)
    if is_main_process():
        reports.write_json(out / RANKS_DIR / "rows.json", {f"rank-{i}": rows for i, rows in enumerate(everyone)})
    return [len(rows) for rows in everyone]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any: a stop decision (train.max_runtime) all ranks take at the same
    step, since a rank that stops alone leaves the others waiting in the next collective."""
    import torch
    import torch.distributed as torch_dist

    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return flag
    device = "cuda" if torch_dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=device)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
