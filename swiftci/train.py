"""The train stage: supervised fine-tuning (LoRA, QLoRA or full) with transformers + peft, resumable, recording how
the model was made.

Outputs in `<output_dir>/train/`:
  adapter/            LoRA adapter + tokenizer (lora, qlora)
  model/              full model (full) or the adapter merged into the base (`merge: true`) + tokenizer
  checkpoints/        every `save_steps`; `--resume` continues from the newest
  loss.jsonl          one line per logging step
  run.json            lineage: config (hash and values), data sha256 and row counts, base model revision and
                      each file's sha256, git commit, seed, the environment (swiftci/provenance.py), owner
  train_report.json   {"version": 2, "stage": "train", "status", "run_id", "metrics", "outputs"}
  train_report.md     the same for people: metrics table and the loss curve (a mermaid chart)

The report is written first with status "running" and replaced at the end, so a crash or a kill never leaves a
report that says "ok".
"""

from __future__ import annotations

import _thread
import contextlib
import datetime as dt
import gc
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swiftci import data as datalib
from swiftci import distributed, hub, models, preference, provenance, quiet, reports, runinfo, stages, vision
from swiftci.config import NOT_DECIDING, Config, duration_seconds
from swiftci.errors import EXIT_STAGE_FAILED, Diverged, StageError, SwiftCIError, UsageError
from swiftci.notify import Message, Notifier, failure_message, null_notifier, run_fields

STAGE = "train"
RUN_MARKER = "swiftci-run.json"  # in checkpoints/: run id and config hash, so --resume refuses a changed config
OOM_TIPS = ("lower `train.batch_size` and raise `train.gradient_accumulation` to keep the effective batch, "
            "set `train.gradient_checkpointing: true`, lower `train.max_length`, or use `train.tuner: qlora`")


def check_runnable(cfg: Config) -> None:
    """What must hold before anything is loaded (exit 2): a train section, and hardware for the chosen options."""
    tc = cfg.train
    if tc is None:
        raise UsageError(f"{cfg.source}: no `train` section; add one (see examples/tiny/swiftci.yaml)")
    needs_cuda = []
    if tc.tuner == "qlora":
        needs_cuda.append("train.tuner: qlora loads the base model in 4 bits with bitsandbytes, which needs a CUDA "
                          "GPU; on this machine use `tuner: lora` (or `full`), or run on a GPU runner")
    if tc.precision == "fp16":
        needs_cuda.append("train.precision: fp16 mixed precision needs a CUDA GPU; use `bf16`, `fp32` or `auto`")
    if needs_cuda:
        import torch

        if not torch.cuda.is_available():
            raise UsageError("no CUDA GPU found:\n" + "\n".join(needs_cuda))
    if tc.tuner == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError("train.tuner: qlora needs bitsandbytes: pip install 'swiftci[train]'") from None
    kernels = kernels_choice(cfg) if tc.kernels == "liger" else None
    if kernels is not None and kernels.used != "liger":
        raise UsageError(f"train.kernels: liger cannot be used here: {kernels.why}; set "
                         "train.kernels: auto (liger where it can run) or none")


def memory_preflight(cfg: Config) -> None:
    """On CUDA GPUs, before anything loads: refuse (exit 2, with the cheapest fix) a training whose estimated memory
    (swiftci/estimate.py, from config.json alone) exceeds the smallest visible GPU's, sharded as `train.distributed`
    says; `train.preflight: false` skips the check, and on CPU there is nothing to check against."""
    from swiftci import estimate

    if not cfg.train.preflight:
        return
    gpus = estimate.visible_gpu_memory()
    if gpus is None:
        return
    steps = [cfg.train] if cfg.train.then is None else [cfg.train, cfg.train.then.step(cfg.train)]
    for step in steps:
        procs = gpus[0] if cfg.train.distributed.nproc_per_node == "auto" else cfg.train.distributed.nproc_per_node
        verdict = estimate.preflight(cfg.model_copy(update={"train": step}), gpus[1],
                                     estimate.Parallelism.of(cfg, procs))
        print(f"train pre-flight: {step.method} needs about {verdict.estimate.total / estimate.GIB:.1f} GiB of the "
              f"GPU's {gpus[1] / estimate.GIB:.1f} GiB ({estimate.describe(verdict)})", flush=True)


@dataclass
class Choice:
    """A setting the stage decided at run time (train.packing, train.kernels, train.logits), and why; the report
    keeps both."""

    used: str
    why: str


def kernels_choice(cfg: Config) -> Choice:
    """train.kernels: Liger's fused kernels only where the package and a CUDA GPU are there."""
    import importlib.util

    import torch

    wanted = cfg.train.kernels
    if wanted == "none":
        return Choice("none", "train.kernels: none")
    if importlib.util.find_spec("liger_kernel") is None:
        return Choice("none", "the liger-kernel package is not installed (pip install liger-kernel)")
    if not torch.cuda.is_available():
        return Choice("none", "Liger's kernels are Triton kernels for CUDA GPUs; there is none here")
    return Choice("liger", f"train.kernels: {wanted}; liger-kernel and a CUDA GPU are there")


# attention implementations that take sequence boundaries from position_ids: padding-free batches cost nothing extra
BOUNDARY_AWARE_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def packing_choice(cfg: Config, model: Any) -> Choice:
    """train.packing for this model: padding-free batches only pay with an attention that takes the boundaries."""
    tc = cfg.train
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if getattr(model.config, "vision_config", None) is not None:
        if tc.packing == "padding_free":
            raise UsageError("train.packing: padding_free is for text models; a vision-language model's batches "
                             "are padded — set train.packing: auto or none")
        return Choice("none", "vision-language rows are padded (their image tokens must stay with their row)")
    if tc.method != "sft":
        return Choice("none", f"{tc.method} pads its pairs (trl's collator)")
    if tc.packing == "none":
        return Choice("none", "train.packing: none")
    aware = attention in BOUNDARY_AWARE_ATTENTION
    if tc.packing == "padding_free":
        return Choice("padding_free", "train.packing: padding_free" + ("" if aware else
                      f"; note: {attention} attention needs a dense mask over the whole batch for it, slower than "
                      "padding (flash_attention_2 or flex_attention make it fast)"))
    if aware:
        return Choice("padding_free", f"{attention} attention takes the sequence boundaries: no padding computed")
    return Choice("none", f"{attention} attention would need a dense mask over the whole flattened batch (about 4x "
                  "slower than padded batches of similar lengths, measured on CPU); rows of similar length are "
                  "batched together instead")


def logits_choice(cfg: Config, model: Any, kernels: Choice) -> Choice:
    """train.logits for this model: the logits only where a label is, when the model's own forward and loss take
    them so (data.LabelledLogits)."""
    import inspect

    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    tc = cfg.train
    if tc.logits == "all":
        return Choice("all", "train.logits: all")
    if tc.method != "sft":
        return Choice("all", f"{tc.method}: trl's trainer computes the logits it needs")
    if kernels.used == "liger":
        return Choice("all", "Liger's fused linear cross-entropy never builds the logits")
    gpus = torch.cuda.device_count()
    if distributed.worker() is None and gpus > 1:
        return Choice("all", f"one process on {gpus} GPUs: DataParallel would split the labels by count, not by "
                      "row (train.distributed gives one process per GPU)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft's adapters
    if getattr(base.config, "is_encoder_decoder", False):
        return Choice("all", "an encoder-decoder model: its decoder's labels are not its input's, shifted")
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return Choice("all", f"{type(base).__name__}.forward takes no logits_to_keep")
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return Choice("all", f"{type(base).__name__} has its own loss, not transformers' causal-LM loss")
    return Choice("labelled", "computed only at the positions whose next token is learned: the lm_head and the "
                  "loss skip every position without a label (prompts, padding, image tokens)")


@dataclass
class Job:
    """One training run: where it writes, which run it is, where it resumes from, who hears about it."""

    cfg: Config
    out: Path
    run_id: str
    last_checkpoint: Path | None
    notifier: Notifier
    started: float = field(default_factory=time.monotonic)
    fingerprint: str = ""  # what decides the outputs (config sections, data rows), as the run starts
    parent: dict | None = None  # the step whose model this one starts from (a chained training's sft step)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def run(cfg: Config, *, resume: bool = False, notifier: Notifier | None = None) -> dict:
    if cfg.train is not None and cfg.train.launcher == "kubernetes":  # a job of the cluster's training engine
        from swiftci import kubetrain

        return kubetrain.run(cfg, resume=resume)
    check_runnable(cfg)
    if cfg.train.distributed.strategy != "none":
        distributed.check(cfg)
    memory_preflight(cfg)
    if distributed.launches(cfg):
        return _run_launched(cfg, resume, notifier)
    if cfg.train.then is not None:
        return _run_chain(cfg, resume, notifier)
    worker = distributed.worker()
    if worker is None or not worker.launched_here:
        return _run_step(cfg, cfg.stage_dir(STAGE), resume, notifier)
    try:
        return _run_step(cfg, cfg.stage_dir(STAGE), resume, notifier)
    except SwiftCIError as e:  # recorded for the launcher, which tells the run's one error
        raise SystemExit(e.exit_code) from None


def _run_launched(cfg: Config, resume: bool, notifier: Notifier | None) -> dict:
    """train.distributed: prepare the run here (run id, resume point, the running report, distributed.json), train
    in torchrun's processes, and stand for them: their outcome becomes this report and this error."""
    out = cfg.stage_dir(STAGE)
    prepared = _prepare(cfg, out, resume)
    if isinstance(prepared, dict):
        return prepared
    run_id, last_checkpoint = prepared
    job = Job(cfg, out, run_id, last_checkpoint, notifier or null_notifier(cfg))
    _write(job, reports.new_report(STAGE, stages.RUNNING, run_id=run_id), [])
    distributed.write_settings(cfg, out)
    error = distributed.launch(cfg, out, run_id, last_checkpoint, resume)
    report = reports.read_json(out / stages.TRAIN.report)
    if error is None and report.get("status") == "ok":
        return report
    error = error or StageError("the training processes ended without a finished report")
    # rank 0 died before it could say so, or what it said (a broken connection) was only the consequence of a
    # rank that died without a word: the report then says what the run's one error says
    if report.get("status") != "failed" or error.kind == "RankDied":
        _fail(job, error)
    raise error


def _prepare(cfg: Config, out: Path, resume: bool) -> dict | tuple[str, Path | None]:
    """A finished run of this config to keep (its report), or (run id, checkpoint to resume from) of a new one."""
    fingerprint = stages.fingerprint(cfg, STAGE)  # hashes the data files: once per step
    finished = stages.reusable(cfg, STAGE, current=fingerprint) if out == cfg.stage_dir(STAGE) else None
    if finished is not None and resume:
        print(f"--resume: {finished['run_id']} already finished with this config and data; nothing to resume, its "
              f"report and outputs in {out} are left as they are", flush=True)
        return finished
    if finished is not None:
        print(f"note: {out} holds the finished run {finished['run_id']} of this same config and data; training "
              "again from the start (`--resume` keeps it)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    return _resume_point(cfg, out / "checkpoints", resume)


def _run_chain(cfg: Config, resume: bool, notifier: Notifier | None) -> dict:
    """sft, then the preference step on the sft model, each in its own folder (`sft/`, `<method>/`) with its own
    report and run.json (the second names its parent); the stage's report is the second's, its outputs and file
    record named from the stage folder. `--resume` keeps a finished first step and resumes the interrupted one."""
    stage, then = cfg.stage_dir(STAGE), cfg.train.then
    first_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"then": None, "merge": True})})
    first_dir = stage / "sft"
    first = _finished_step(first_cfg, first_dir) if resume else None
    if first is None:
        print("==> train step 1 of 2: sft", file=sys.stderr, flush=True)
        first = _run_step(first_cfg, first_dir, resume, notifier)
    second_cfg = _then_config(cfg, first_dir / first["outputs"]["model"])
    print(f"==> train step 2 of 2: {then.method} on the sft model", file=sys.stderr, flush=True)
    parent = {"step": "sft", "run_id": first["run_id"], "report": "sft/" + stages.TRAIN.report,
              "files_sha256": first["files_sha256"]}
    second = _run_step(second_cfg, stage / then.method, resume, notifier, parent=parent)
    model = f"{then.method}/{second['outputs']['model']}"
    files = stages.record_files(stage, [model])
    report = {**second, "outputs": {"model": model}, "files": files, "files_sha256": stages.files_digest(files),
              "fingerprint": stages.fingerprint(cfg, STAGE), "loss_log": f"{then.method}/loss.jsonl",
              "steps": [{"method": "sft", "run_id": first["run_id"], "report": parent["report"]},
                        {"method": then.method, "run_id": second["run_id"],
                         "report": f"{then.method}/{stages.TRAIN.report}"}]}
    records = reports.read_jsonl(stage / then.method / "loss.jsonl")
    reports.write_text(stage / "loss.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    reports.write_json(stage / stages.TRAIN.report, report)
    reports.write_text(stage / stages.TRAIN.markdown, render_markdown(report, records))
    return report


def _then_config(cfg: Config, sft_model: Path) -> Config:
    """The second step's config: its train settings and rows, starting from the sft step's merged model. The
    reference `sft` is then the model the step starts from (`base` to preference.py), and `base` the model of
    `model.id`, loaded beside it."""
    then = cfg.train.then
    train = then.step(cfg.train)
    method = getattr(train, then.method)
    if getattr(method, "reference", None) in ("sft", "base"):
        original = str(cfg.model_local_path) if cfg.model_local_path is not None else cfg.model.id
        reference = "base" if method.reference == "sft" else original
        train = train.model_copy(update={then.method: method.model_copy(update={"reference": reference})})
    model = cfg.model.model_copy(update={"id": str(sft_model.resolve()), "revision": None})
    return cfg.model_copy(update={"train": train, "data": then.data, "model": model})


def _finished_step(cfg: Config, out: Path) -> dict | None:
    """A step's finished report when its fingerprint is this config's and its files are still its own."""
    report = stages.reusable(cfg, STAGE, stage_dir=out)
    if report is not None:
        print(f"--resume: the sft step {report['run_id']} already finished; going on with the next step", flush=True)
    return report


def _run_step(cfg: Config, out: Path, resume: bool, notifier: Notifier | None, parent: dict | None = None) -> dict:
    worker = distributed.worker()
    if worker is not None and worker.launched_here:  # the launcher prepared the run and reports what happens
        prepared: dict | tuple[str, Path | None] = (os.environ[distributed.RUN_ID],
                                                    Path(os.environ[distributed.RESUME_FROM] or ".") if
                                                    os.environ[distributed.RESUME_FROM] else None)
        notifier = Notifier(cfg) if worker.main else None  # the start and progress messages are rank 0's
    elif worker is not None and not worker.main:  # under someone else's torchrun: rank 0 prepares the folder
        prepared = _resume_point_of(cfg, out / "checkpoints", resume)
    else:
        prepared = _prepare(cfg, out, resume)
    if isinstance(prepared, dict):
        return prepared
    run_id, last_checkpoint = prepared
    job = Job(cfg, out, run_id, last_checkpoint, notifier or null_notifier(cfg),
              fingerprint=stages.fingerprint(cfg, STAGE), parent=parent)
    if worker is None or not worker.launched_here:
        _write(job, reports.new_report(STAGE, stages.RUNNING, run_id=run_id), [])
    stall = StallWatchdog(cfg.train.watchdog.stall_minutes * 60, lambda: _hard_stall(job, stall))
    idle = IdleWatch(cfg, stall, job.notifier)
    try:
        idle.start()
        with _imports_frozen(job.out):
            return _train(job, stall)
    except Diverged as e:
        suspects = _quarantine(job.checkpoints, e.last_good_step) if distributed.is_main_process() else []
        good = _last_checkpoint(job.checkpoints)
        _fail(job, e, step=e.step, last_good_checkpoint=good.name if good else None, quarantined=suspects)
        raise
    except SwiftCIError as e:
        _fail(job, e)
        raise
    except KeyboardInterrupt:
        if not stall.stalled:
            _fail(job, StageError("interrupted", kind="Interrupted"))
            raise
        raise _fail(job, StageError(stall.reason, kind=stall.kind)) from None
    except MemoryError:
        raise _fail(job, StageError(f"training ran out of host memory; {OOM_TIPS}", kind="OutOfMemory")) from None
    except Exception as e:  # recorded in the report, then raised as a stage failure
        if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            raise _fail(job, StageError(f"training ran out of GPU memory; {OOM_TIPS}", kind="OutOfMemory")) from None
        raise _fail(job, StageError(f"training failed: {type(e).__name__}: {e}")) from e
    finally:
        idle.stop()
        stall.stop()
        if worker is not None and worker.launched_here and worker.main:
            job.notifier.close()


@contextlib.contextmanager
def _imports_frozen(stage_dir: Path):
    """The ~500k objects that importing torch and transformers makes live as long as the process: frozen while the
    stage runs, they are skipped by the full collection the Trainer runs as it starts (0.3 s on 2 CPU cores, 7 % of a
    30-step run of the tiny model) and by every automatic one. What the stage makes after its imports (the model, the
    data, garbage of loading them) stays collectable. A process that froze objects itself keeps its own freeze."""
    quiet.import_libraries(stage_dir)  # first: any transformers import can pull in the loud ones
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train(job: Job, stall: StallWatchdog) -> dict:
    """Data → model → trainer → train → save → lineage → report (libraries imported by _imports_frozen)."""
    from transformers import set_seed

    cfg, tc = job.cfg, job.cfg.train
    _quiet_libraries()
    set_seed(tc.seed)
    precision, dtype = models.compute_dtype(tc.precision)
    sees = vision.is_vision_language(cfg.model.id, cfg.model.revision, cfg.model_local_path)
    if sees and tc.method != "sft":
        raise UsageError(f"train.method: {tc.method} is for text models; {cfg.model.id} is a vision-language model, "
                         "which swiftci trains with method sft")
    load_tokenizer = vision.load_processor if sees else models.load_tokenizer
    tokenizer = load_tokenizer(cfg.model.id, cfg.model.revision, cfg.model_local_path)  # a processor when it sees
    data = _load_data(cfg, tokenizer, sees)
    model, base_record = _load_model(cfg, dtype, sees)
    model = _add_adapters(cfg, model, sees)
    parameters = {"trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "total_parameters": sum(p.numel() for p in model.parameters())}  # before a merge changes them
    choices = {"packing": packing_choice(cfg, model), "kernels": kernels_choice(cfg)}
    choices["logits"] = logits_choice(cfg, model, choices["kernels"])
    for name, choice in choices.items():
        print(f"train.{name}: {choice.used} ({choice.why})", flush=True)
    trainer, progress = _make_trainer(job, model, tokenizer, data, precision, stall, choices)
    fit = _fit(trainer, job.last_checkpoint)
    if progress.out_of_time_at is not None:
        raise StageError(f"train.max_runtime ({tc.max_runtime}) reached at step {progress.out_of_time_at} of "
                         f"{trainer.state.max_steps}; checkpoint-{progress.out_of_time_at} is saved — continue with "
                         f"`swiftci train -c {cfg.source} --resume`", kind="MaxRuntime")
    validation = _validate(trainer, data) if data.validation else {}
    validation_loss = validation.get("eval_loss")
    outputs = _save(cfg, job.out, trainer, tokenizer, dtype)
    metrics = {**_metrics(job, trainer, fit, progress.records, validation_loss), **parameters,
               "gpu_hours_estimated": progress.gpu_hours_estimate}
    if distributed.worker() is not None:
        metrics["distributed"] = {"strategy": tc.distributed.strategy, "world_size": trainer.args.world_size,
                                  "rows_per_rank": distributed.gather_rows(trainer, job.out)}
    worker = distributed.worker()
    if worker is not None and not worker.main:
        return {"status": "ok", "rank": worker.rank, "run_id": job.run_id, "metrics": metrics}
    if tc.method != "sft":  # trl's rewards at the last logging step, and on the held-out pairs
        last = progress.records[-1] if progress.records else {}
        metrics["preference"] = {k: v for k, v in last.items() if k.startswith(preference.LOGGED_KEYS)}
        metrics["validation_preference"] = preference.logged(
            {k.removeprefix("eval_"): v for k, v in validation.items()})
    reports.write_json(job.out / "run.json", _lineage(job, base_record, data.record, precision, outputs))
    files = stages.record_files(job.out, list(outputs.values()))  # later stages load only these bytes
    report = reports.new_report(STAGE, "ok", run_id=job.run_id, method=tc.method, tuner=tc.tuner,
                                base_model=cfg.model.id, metrics=metrics, outputs=outputs, files=files,
                                files_sha256=stages.files_digest(files), fingerprint=job.fingerprint,
                                loss_log="loss.jsonl", lineage="run.json",
                                **{name: vars(choice) for name, choice in choices.items()})
    if plot_loss(job.out, job.run_id) is not None:
        report["loss_plot"] = "loss.png"
    _write(job, report, progress.records)
    if worker is not None and worker.launched_here:  # the launcher reads the report and speaks for the run
        return {"status": "ok", "rank": worker.rank, "run_id": job.run_id, "metrics": metrics}
    return report


# --- failures ----------------------------------------------------------------------------------------------------


def _fail(job: Job, e: SwiftCIError, **extra: Any) -> SwiftCIError:
    """Replace the running report with a failed one (what went wrong, the fix); returns the error to raise.
    In a distributed run every rank records its error for the launcher; rank 0 writes the report."""
    distributed.record_error(job.out, e)
    if not distributed.is_main_process():
        return e
    report = reports.new_report(STAGE, "failed", run_id=job.run_id,
                                error=stages.error(str(e), e.kind, e.hint, **extra),
                                metrics={"wall_seconds": round(time.monotonic() - job.started, 2)})
    if plot_loss(job.out, job.run_id) is not None:
        report["loss_plot"] = "loss.png"
    _write(job, report, reports.read_jsonl(job.out / "loss.jsonl"))
    return e


def _hard_stall(job: Job, stall: StallWatchdog) -> None:
    """The main thread did not respond to the stall watchdog's interrupt: report and notify before it exits."""
    error = _fail(job, StageError(stall.reason, kind=stall.kind))
    print(f"error: {stall.reason}; the training did not respond to the interrupt (stuck in native code), so the "
          "process exits", file=sys.stderr, flush=True)
    job.notifier.failure(failure_message(job.cfg, STAGE, job.run_id, stages.error_of(error)))
    job.notifier.close()


def _quarantine(ckpt_dir: Path, last_good_step: int) -> list[str]:
    """Checkpoints written after the last finite logged step may hold broken weights: rename them so `--resume`
    never picks them; the last good checkpoint stays where it is. An earlier divergence may have left a folder of
    the same name: the new one gets a numbered name, nothing is overwritten."""
    moved = []
    for p in sorted(ckpt_dir.glob("checkpoint-*")):
        if int(p.name.split("-")[1]) > last_good_step:
            target = p.with_name(f"diverged-{p.name}")
            n = 1
            while target.exists():
                n += 1
                target = p.with_name(f"diverged-{p.name}.{n}")
            p.rename(target)
            moved.append(target.name)
    return moved


class StallWatchdog:
    """Fails the run when no optimizer step finishes for `limit` seconds: interrupts the main thread, and if it is
    stuck in native code (a hung collective or data loader) and does not respond, reports and exits with code 3.

    The interrupt is a simulated SIGINT, which Python delivers only while SIGINT has its Python handler. A process
    started with SIGINT ignored (any background job of a non-interactive shell: `swiftci train &`, nohup in a
    script) inherits SIG_IGN, and the interrupt would do nothing: the watchdog would always take the hard path. So
    while it watches, SIGINT gets Python's handler, and its earlier disposition is restored afterwards."""

    def __init__(self, limit: float, on_hard_stall):
        self.limit = limit
        self.on_hard_stall = on_hard_stall
        self.last = time.monotonic()
        self.stalled = False
        self.reason = f"no optimizer step finished for {limit / 60:g} minutes (train.watchdog.stall_minutes)"
        self.kind = "Stalled"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sigint: Any = None  # SIGINT's disposition before start() gave it Python's handler

    def start(self) -> None:
        self.last = time.monotonic()
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if previous in (signal.SIG_IGN, signal.SIG_DFL, None):
                signal.signal(signal.SIGINT, signal.default_int_handler)
                self._sigint = previous
        self._thread = threading.Thread(target=self._watch, name="swiftci-stall-watchdog", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._sigint)
            self._sigint = None

    def _watch(self) -> None:
        tick = max(0.05, min(5.0, self.limit / 10))
        while not self._stop.wait(tick):
            if time.monotonic() - self.last > self.limit:
                self.trip()
                return

    def trip(self, reason: str | None = None, kind: str | None = None) -> None:
        """Stop the run now: interrupt the main thread; if it does not respond, report and exit with code 3."""
        if self.stalled:
            return
        self.reason, self.kind, self.stalled = reason or self.reason, kind or self.kind, True
        _thread.interrupt_main()
        if not self._stop.wait(max(10.0, min(60.0, self.limit))):
            self.on_hard_stall()
            os._exit(EXIT_STAGE_FAILED)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_utilization() -> float | None:
    """This process's GPU utilization in percent, read from NVML; None without a CUDA GPU or NVML."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization(torch.cuda.current_device()))
    except Exception:  # noqa: BLE001 - no NVML (nvidia-ml-py) here: the idle guard is off
        return None


class IdleWatch:
    """On a GPU: utilization at or below train.watchdog.idle_utilization_pct for idle_minutes stops the run like a
    stall (exit 3); at half of it, one warning (log and notification). Off without a GPU or NVML."""

    def __init__(self, cfg: Config, stall: StallWatchdog, notifier: Notifier):
        wd = cfg.train.watchdog
        self.cfg, self.stall, self.notifier = cfg, stall, notifier
        self.limit, self.pct = wd.idle_minutes * 60, wd.idle_utilization_pct
        self._stop = threading.Event()

    def start(self) -> None:
        if _gpu_utilization() is not None:
            threading.Thread(target=self._watch, name="swiftci-idle-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        idle_since, warned = None, False
        while not self._stop.wait(max(0.05, min(30.0, self.limit / 10))):
            used = _gpu_utilization()
            if used is None or used > self.pct:
                idle_since, warned = None, False
                continue
            idle_since = idle_since or time.monotonic()
            idle = time.monotonic() - idle_since
            minutes = f"{self.limit / 60:g} minutes (train.watchdog.idle_minutes)"
            if idle >= self.limit:
                self.stall.trip(f"the GPU was idle (utilization ≤ {self.pct:g}%) for {minutes}", "Idle")
                return
            if idle >= self.limit / 2 and not warned:
                warned = True
                text = f"the GPU has been idle (utilization ≤ {self.pct:g}%) for {idle / 60:.1f} minutes; the run " \
                       f"stops at {minutes}"
                print(f"warning: {text}", file=sys.stderr, flush=True)
                self.notifier.progress(Message("progress", f"{self.cfg.name}: GPU idle", text=text, mention=True))


# --- resuming ----------------------------------------------------------------------------------------------------


def _train_fingerprint(cfg: Config) -> str:
    """Hash of what decides the trained weights: model, data, train sections (not notifications or later stages)."""
    parts = {k: getattr(cfg, k).model_dump(mode="json", exclude=NOT_DECIDING.get(k)) for k in ("model", "data", "train")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _resume_point_of(cfg: Config, ckpt_dir: Path, resume: bool) -> tuple[str, Path | None]:
    """A rank other than 0 under a cluster's torchrun: the run id and checkpoint rank 0 picks, read, never written."""
    last = _last_checkpoint(ckpt_dir) if resume and (ckpt_dir / RUN_MARKER).is_file() else None
    if last is not None:
        return json.loads((ckpt_dir / RUN_MARKER).read_text())["run_id"], last
    return runinfo.run_id(cfg.name, cfg.train.method, cfg.resolve(".")), None


def _resume_point(cfg: Config, ckpt_dir: Path, resume: bool) -> tuple[str, Path | None]:
    """(run id, checkpoint to resume from). A fresh run clears the checkpoints of an earlier one."""
    fingerprint = _train_fingerprint(cfg)
    marker = ckpt_dir / RUN_MARKER
    if resume and marker.is_file():
        saved = json.loads(marker.read_text())
        last = _last_checkpoint(ckpt_dir)
        if last is not None:
            if saved.get("train_config_sha256") != fingerprint:
                raise UsageError(
                    f"--resume: the model, data or train settings changed since {last.name} was written, so "
                    "resuming would mix two different runs; drop --resume to start over"
                )
            print(f"resuming {saved['run_id']} from {last.name}", flush=True)
            return saved["run_id"], last
    if resume:
        print("--resume: no checkpoint yet, starting from the beginning", flush=True)
    if ckpt_dir.exists():  # checkpoints of an earlier run must not be mistaken for this one's
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True)
    rid = runinfo.run_id(cfg.name, cfg.train.method, cfg.resolve("."))
    reports.write_json(marker, {"run_id": rid, "train_config_sha256": fingerprint})
    return rid, None


def _last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (Trainer writes trainer_state.json last)."""
    done = [p for p in ckpt_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


# --- data and model ----------------------------------------------------------------------------------------------


@dataclass
class TrainData:
    train: list[dict]  # {input_ids, labels}
    validation: list[dict] | None
    record: dict  # for run.json: each file's hash, format and row counts


def _load_data(cfg: Config, tokenizer: Any, sees: bool) -> TrainData:
    """Tokenized rows; `sees`: a vision-language model, whose `tokenizer` is its processor."""
    tc = cfg.train
    if tc.method != "sft":  # preference rows go to trl as they are; its trainers tokenize them
        return TrainData(*preference.load(cfg))
    train_path = cfg.resolve(cfg.data.train)
    conversations, fmt = datalib.sft_conversations(train_path, cfg.data.format)
    tokenize = vision.tokenize if sees else _text_only(cfg, datalib.tokenize_sft)
    train_set, dropped = tokenize(conversations, tokenizer, tc.max_length, train_path.name)
    if not train_set:
        raise UsageError(f"{train_path.name}: every row was truncated before its first assistant token; "
                         "raise train.max_length")
    record = {"train": {"file": str(cfg.data.train), "sha256": datalib.sha256_file(train_path), "format": fmt,
                        "rows": len(conversations), "rows_used": len(train_set),
                        "rows_dropped_no_target_after_truncation": dropped, **_images_record(conversations)}}
    validation = None
    if cfg.data.validation is not None:
        val_path = cfg.resolve(cfg.data.validation)
        val_convs, val_fmt = datalib.sft_conversations(val_path, cfg.data.format)
        validation, _ = tokenize(val_convs, tokenizer, tc.max_length, val_path.name)
        record["validation"] = {"file": str(cfg.data.validation), "sha256": datalib.sha256_file(val_path),
                                "format": val_fmt, "rows": len(val_convs), "rows_used": len(validation),
                                **_images_record(val_convs)}
    return TrainData(train_set, validation, record)


def _text_only(cfg: Config, tokenize):
    """The text tokenizer, refusing rows with images: a text model would silently learn from their words alone."""
    def check(conversations, tokenizer, max_length, source):
        with_images = next((i for i, c in enumerate(conversations) if datalib.images_of(c)), None)
        if with_images is not None:
            raise UsageError(f"{source}: row {with_images + 1} holds images, but model.id {cfg.model.id} is a text "
                             "model (its config.json has no vision_config); use a vision-language model or drop "
                             "the images")
        return tokenize(conversations, tokenizer, max_length, source)
    return check


def _images_record(conversations: list[list[dict]]) -> dict:
    """The images a data file's rows read, hashed with it: their count and one sha256 over (path, bytes sha256)."""
    paths = sorted({p for c in conversations for p in datalib.images_of(c)})
    if not paths:
        return {}
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{Path(p).name}\0{datalib.sha256_file(Path(p))}\n".encode())
    return {"images": len(paths), "images_sha256": h.hexdigest()}


def _load_model(cfg: Config, dtype: Any, sees: bool = False) -> tuple[Any, dict]:
    """The base model (4-bit for qlora) and its record for run.json (revision, or content hash of a folder)."""
    import torch

    tc, local = cfg.train, cfg.model_local_path
    extra: dict[str, Any] = {}
    if tc.tuner == "qlora":
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=tc.qlora.quant_type,
            bnb_4bit_use_double_quant=tc.qlora.double_quant, bnb_4bit_compute_dtype=dtype)
        extra["device_map"] = {"": torch.cuda.current_device()}
    # full fine-tuning keeps fp32 master weights under mixed precision; adapters train on a base in compute dtype
    load_dtype = torch.float32 if tc.tuner == "full" else dtype
    load = vision.load_model if sees else models.load_causal_lm
    model = load(cfg.model.id, cfg.model.revision, local, dtype=load_dtype, **extra)
    checked = hub.prepare(cfg)  # done before anything loaded (pipeline); here its record
    record = {"id": cfg.model.id, "revision_requested": cfg.model.revision, **checked.record()}
    if checked.source == "local":  # one content hash for the folder, from the file hashes just taken
        record["sha256"] = stages.files_digest(checked.files)
    return model, record


def _validate(trainer: Any, data: TrainData) -> dict:
    """The held-out loss (and, for preference methods, trl's rewards on the held-out pairs)."""
    if trainer.eval_dataset is not None:  # trl's trainers tokenized it when they were built
        return trainer.evaluate()
    return trainer.evaluate(eval_dataset=data.validation)


def _add_adapters(cfg: Config, model: Any, sees: bool = False) -> Any:
    """LoRA adapters on the frozen base (lora, qlora); the model itself for full fine-tuning. A vision-language
    model: see swiftci/vision.py for what learns."""
    tc = cfg.train
    if tc.tuner == "full":
        if sees and tc.freeze_vision:
            vision.freeze_tower(model)
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if tc.tuner == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tc.gradient_checkpointing)
    target = tc.lora.target_modules
    targets = (vision.adapter_settings(model, target, tc.freeze_vision) if sees else
               {"target_modules": target if isinstance(target, str) else list(target)})
    return get_peft_model(model, LoraConfig(
        r=tc.lora.rank, lora_alpha=tc.lora.alpha, lora_dropout=tc.lora.dropout, task_type="CAUSAL_LM", **targets))


# --- the trainer -------------------------------------------------------------------------------------------------


def _settings(cfg: Config, ckpt_dir: Path, precision: str) -> dict:
    """What every trainer of the stage shares (transformers' Trainer for sft, trl's for preference methods)."""
    import torch

    tc = cfg.train
    return dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=tc.batch_size,
        per_device_eval_batch_size=tc.batch_size,
        gradient_accumulation_steps=tc.gradient_accumulation,
        learning_rate=tc.learning_rate,
        lr_scheduler_type=tc.lr_scheduler,
        warmup_steps=tc.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        num_train_epochs=tc.epochs,
        max_steps=tc.max_steps or -1,
        seed=tc.seed,
        data_seed=tc.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=tc.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=tc.save_steps,
        save_total_limit=tc.save_total_limit,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=torch.cuda.is_available(),
        use_liger_kernel=kernels_choice(cfg).used == "liger",
        **(distributed.trainer_arguments(cfg) if distributed.worker() is not None else {}),
    )


def _training_arguments(cfg: Config, ckpt_dir: Path, precision: str) -> Any:
    from transformers import TrainingArguments

    tc = cfg.train
    return TrainingArguments(
        **_settings(cfg, ckpt_dir, precision), remove_unused_columns=False,
        # the stage reads the validation loss only; gathering the logits (per-rank counts of labelled positions
        # under train.logits: auto) across ranks would need equal sizes and holds them all in memory
        prediction_loss_only=True,
        activation_checkpointing=tc.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if tc.gradient_checkpointing else None)


class LengthGroupedSampler:
    """Batches of similar lengths (less padding), reshuffled per epoch from `seed + epoch` so a resumed run sees
    exactly the order an uninterrupted one would; `grouped=False`: a plain shuffle with the same guarantee.
    (A sampler is anything with __iter__ and __len__.)

    Why not transformers' own (`train_sampling_strategy="group_by_length"`, the same grouping function): it draws
    from the global RNG when the epoch starts, so a run resumed inside an epoch sees another order.
    tests/test_train.py::test_killed_run_resumes_to_the_same_loss fails with it (transformers 5.24, 2026-12-02:
    the first step after the resume logged loss 1.0794 instead of the uninterrupted run's 1.0990)."""

    def __init__(self, lengths: list[int], group: int, seed: int, grouped: bool = True):
        self.lengths, self.group, self.seed, self.epoch, self.grouped = lengths, group, seed, 0, grouped

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.grouped:
            return iter(torch.randperm(len(self.lengths), generator=gen).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group, generator=gen))


class _GroupedByLength:
    """Mixed into transformers' Trainer (see `_make_trainer`): train batches come from `swiftci_sampler`."""

    swiftci_sampler: LengthGroupedSampler

    def _get_train_sampler(self, train_dataset=None):
        return self.swiftci_sampler


def _make_trainer(job: Job, model: Any, tokenizer: Any, data: TrainData, precision: str,
                  stall: StallWatchdog, choices: dict[str, Choice]) -> tuple[Any, Progress]:
    from transformers import PrinterCallback, Trainer, TrainerCallback

    tc = job.cfg.train
    # classes built here because transformers is imported lazily: our methods first, the library's behind them
    callback_class = type("SwiftProgress", (Progress, TrainerCallback), {})
    ledger = (distributed.RowLedger,) if distributed.worker() is not None else ()
    trainer_class = type("SwiftTrainer", (*ledger, _GroupedByLength, Trainer), {})
    progress = callback_class(job, _loss_history(job.out / "loss.jsonl", job.last_checkpoint), stall)
    if tc.method != "sft":
        trainer = preference.make_trainer(job.cfg, model, tokenizer, data.train, data.validation,
                                          _settings(job.cfg, job.checkpoints, precision), [progress])
        trainer.remove_callback(PrinterCallback)
        return trainer, progress
    trainer = trainer_class(model=model, args=_training_arguments(job.cfg, job.checkpoints, precision),
                            train_dataset=data.train, data_collator=_collator(choices, tokenizer, model),
                            processing_class=tokenizer, callbacks=[progress])
    # grouped by the global batch (every rank's share of one optimizer step), so N processes see the rows one
    # process would, split between them. Vision-language rows are shuffled, not grouped: their length says little but
    # the question and the answer's length, so same-length batches hold one answer each and the model learns the
    # batch, not the image (the tiny VQA example stayed at chance, 0.34, after 400 grouped steps; shuffled, it learns).
    sees = getattr(model.config, "vision_config", None) is not None
    trainer.swiftci_sampler = LengthGroupedSampler([len(x["input_ids"]) for x in data.train],
                                                   tc.batch_size * tc.gradient_accumulation * trainer.args.world_size,
                                                   tc.seed, grouped=not sees)
    trainer.swiftci_rows = []
    trainer.remove_callback(PrinterCallback)  # Progress prints one line per logging step instead
    distributed.check_trainer(job.cfg, trainer)
    return trainer, progress


def _collator(choices: dict[str, Choice], tokenizer: Any, model: Any) -> Any:
    collate = _batches(choices["packing"], tokenizer, model)
    return datalib.LabelledLogits(collate) if choices["logits"].used == "labelled" else collate


def _batches(packing: Choice, tokenizer: Any, model: Any) -> Any:
    if getattr(model.config, "vision_config", None) is not None:  # `tokenizer` is the processor
        return vision.Collator(tokenizer.tokenizer.pad_token_id)
    if packing.used == "padding_free":
        from transformers import DataCollatorWithFlattening

        # transformers builds the block-diagonal attention from position_ids only when no cache is passed: the
        # Trainer passes use_cache=False
        return DataCollatorWithFlattening(return_position_ids=True)
    return datalib.PadCollator(tokenizer.pad_token_id)


@dataclass
class Fit:
    seconds: float
    tokens: int  # input tokens seen in this session (not before the checkpoint it resumed from)


def _fit(trainer: Any, last_checkpoint: Path | None) -> Fit:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    tokens_before = _tokens_seen(last_checkpoint)
    t0 = time.monotonic()
    trainer.train(resume_from_checkpoint=str(last_checkpoint) if last_checkpoint else None)
    return Fit(time.monotonic() - t0, trainer.state.num_input_tokens_seen - tokens_before)


# --- outputs -----------------------------------------------------------------------------------------------------


def _save(cfg: Config, out: Path, trainer: Any, tokenizer: Any, dtype: Any) -> dict[str, str]:
    """adapter/ (lora, qlora), model/ (full, or the adapter merged when train.merge); returns what was written.
    Sharded weights (ZeRO-3, FSDP) are gathered by every rank together; otherwise rank 0 saves alone."""
    tc = cfg.train
    dc = tc.distributed
    if dc.strategy == "fsdp" or (dc.strategy == "deepspeed" and (dc.zero_stage or 2) == 3):
        return _save_gathered(cfg, out, trainer, tokenizer, dtype)
    if not distributed.is_main_process():  # what rank 0 writes
        if tc.tuner == "full":
            return {"model": "model"}
        return {"adapter": "adapter", **({"model": "model"} if tc.merge else {})}
    if tc.tuner == "full":
        _save_atomic(out / "model", lambda d: (trainer.model.save_pretrained(d), tokenizer.save_pretrained(d)))
        return {"model": "model"}
    _save_atomic(out / "adapter", lambda d: (trainer.model.save_pretrained(d), tokenizer.save_pretrained(d)))
    if not tc.merge:
        return {"adapter": "adapter"}
    if tc.tuner == "qlora":  # never merge into 4-bit weights: reload the base in compute dtype
        load = vision.load_model if hasattr(tokenizer, "image_processor") else models.load_causal_lm
        base = load(cfg.model.id, cfg.model.revision, cfg.model_local_path, dtype=dtype)
        _save_atomic(out / "model", lambda d: models.merge_adapter(base, out / "adapter", d, tokenizer))
    else:
        merged = trainer.model.merge_and_unload()
        _save_atomic(out / "model", lambda d: (merged.save_pretrained(d), tokenizer.save_pretrained(d)))
    return {"adapter": "adapter", "model": "model"}


def _save_gathered(cfg: Config, out: Path, trainer: Any, tokenizer: Any, dtype: Any) -> dict[str, str]:
    """ZeRO-3 / FSDP: every rank takes part in gathering the full state dict (trainer.save_model); rank 0 writes a
    normal Hugging Face folder, and merges an adapter into a freshly loaded base."""
    tc = cfg.train
    name = "model" if tc.tuner == "full" else "adapter"
    tmp = out / f".{name}.tmp"
    if distributed.is_main_process() and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    trainer.save_model(str(tmp))  # a collective: gathers the shards, rank 0 writes
    distributed.barrier()
    outputs = {name: name}
    if distributed.is_main_process():
        tokenizer.save_pretrained(tmp)
        if (out / name).exists():
            shutil.rmtree(out / name)
        os.replace(tmp, out / name)
    if tc.tuner != "full" and tc.merge:
        outputs["model"] = "model"
        if distributed.is_main_process():
            if tc.distributed.strategy == "deepspeed":  # else from_pretrained partitions the base with ZeRO-3's
                from transformers.integrations.deepspeed import unset_hf_deepspeed_config  # zero.Init: a collective

                unset_hf_deepspeed_config()
            base = models.load_causal_lm(cfg.model.id, cfg.model.revision, cfg.model_local_path, dtype=dtype)
            _save_atomic(out / "model", lambda d: models.merge_adapter(base, out / "adapter", d, tokenizer))
    return outputs


def _metrics(job: Job, trainer: Any, fit: Fit, records: list[dict], validation_loss: float | None) -> dict:
    import torch

    state, losses = trainer.state, [r["loss"] for r in records]
    if torch.cuda.is_available():
        peak_mb, memory_kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    else:
        peak_mb, memory_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "host_rss"
    return {
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "validation_loss": validation_loss,
        "steps": state.global_step,
        "epochs": round(state.epoch or 0, 4),
        "tokens": state.num_input_tokens_seen,
        # None when the trainer counts no tokens (trl's ORPO and CPO batches have no `input_ids` to count)
        "tokens_per_second": round(fit.tokens / fit.seconds, 1) if fit.seconds > 0 and fit.tokens > 0 else None,
        "train_seconds": round(fit.seconds, 2),
        "gpu_hours": round((time.monotonic() - job.started) * _gpu_count() / 3600, 3),
        "wall_seconds": round(time.monotonic() - job.started, 2),
        "peak_memory_mb": round(peak_mb, 1),
        "peak_memory_kind": memory_kind,
        "resumed_from_step": int(job.last_checkpoint.name.split("-")[1]) if job.last_checkpoint else None,
    }


def _lineage(job: Job, base_record: dict, data_record: dict, precision: str, outputs: dict) -> dict:
    """run.json: how this model was made."""
    import torch

    cfg = job.cfg
    on_cuda = torch.cuda.is_available()
    return {
        "version": reports.REPORT_VERSION,
        "run_id": job.run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "owner": cfg.owner,
        "config": {"file": Path(cfg.source).name, "sha256": cfg.fingerprint(), "train_sha256": _train_fingerprint(cfg),
                   "values": provenance.config_values(cfg)},
        "git": runinfo.git_commit(cfg.resolve(".")),
        "base_model": base_record,
        "data": data_record,
        "train": {**cfg.train.model_dump(mode="json"), "precision_used": precision},
        "seed": cfg.train.seed,
        "hardware": {"device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
                     "gpus": torch.cuda.device_count(), "torch_threads": torch.get_num_threads()},
        "environment": provenance.environment(),  # python, torch/CUDA/cuDNN/driver, packages, GPUs
        **({"reproduce": provenance.reproduce_record(cfg)} if cfg.reproduce else {}),
        "outputs": outputs,
        **({"distributed": {"settings_file": distributed.SETTINGS_FILE, **distributed.settings(cfg)}}
           if cfg.train.distributed.strategy != "none" else {}),
        **({"parent": job.parent} if job.parent else {}),
    }


def _write(job: Job, report: dict, records: list[dict]) -> None:
    if not distributed.is_main_process():
        return
    reports.write_json(job.out / stages.TRAIN.report, report)
    reports.write_text(job.out / stages.TRAIN.markdown, render_markdown(report, records))


def _quiet_libraries() -> None:
    from transformers import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")


# --- progress ----------------------------------------------------------------------------------------------------


class Progress:
    """The TrainerCallback of a run (its class gets transformers' TrainerCallback behind it in `_make_trainer`):
    appends to loss.jsonl, prints one line per logging step, sends start/progress notifications, feeds the stall
    watchdog, and stops training at the first non-finite loss or gradient norm (or one above
    train.watchdog.max_grad_norm)."""

    def __init__(self, job: Job, history: list[dict], stall: StallWatchdog) -> None:
        self.job, self.stall = job, stall
        self.records = list(history)
        self.every = job.cfg.notify.progress_every * 60 if job.cfg.notify is not None else float("inf")
        self.t0 = self.last_progress = time.monotonic()
        self.first_step_at: float | None = None
        self.first_step = 0
        self.start_sent = False
        self.last_tokens = 0
        self.last_good_step = history[-1]["step"] if history else 0
        runtime = job.cfg.train.max_runtime
        self.max_runtime = duration_seconds(runtime) if runtime else None
        self.out_of_time_at: int | None = None  # the step at which train.max_runtime stopped the run
        self.gpu_hours_estimate: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.t0 = self.last_progress = time.monotonic()
        self.last_tokens = state.num_input_tokens_seen
        self.stall.start()

    def on_step_end(self, args, state, control, **kwargs):
        self.stall.beat()
        now = time.monotonic()
        if self.first_step_at is None:
            self.first_step_at, self.first_step = now, state.global_step
        elif not self.start_sent and (state.global_step - self.first_step >= 2 or state.global_step >= state.max_steps):
            per_step = (now - self.first_step_at) / max(1, state.global_step - self.first_step)
            self._started(per_step * (state.max_steps - state.global_step) + (now - self.t0), state.max_steps)
        out_of_time = self.max_runtime is not None and now - self.job.started >= self.max_runtime
        if self.max_runtime is not None and distributed.worker() is not None:
            out_of_time = distributed.any_rank(out_of_time)  # every rank stops at the same step
        if out_of_time and self.out_of_time_at is None:
            self.out_of_time_at = state.global_step  # save a checkpoint at this step, then stop
            control.should_save = control.should_training_stop = True

    def _started(self, eta: float, steps: int) -> None:
        """The start notification: steps, estimated duration and GPU-hours (duration × GPUs), and a warning with a
        mention when the estimate is over notify.budget.gpu_hours."""
        cfg, gpus = self.job.cfg, _gpu_count()
        self.gpu_hours_estimate = round(eta / 3600 * gpus, 3)
        fields = run_fields(cfg, self.job.run_id) + [
            ("steps", str(steps)), ("estimated duration", _duration(eta)),
            ("estimated GPU-hours", f"{self.gpu_hours_estimate:.2f} ({gpus} GPU)" if gpus else "0 (no GPU)")]
        budget = cfg.notify.budget.gpu_hours if cfg.notify is not None else None
        over = budget is not None and self.gpu_hours_estimate > budget
        if over:
            warning = f"estimated {self.gpu_hours_estimate:.2f} GPU-hours, over notify.budget.gpu_hours ({budget:g})"
            fields.append(("over budget", warning))
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        self.job.notifier.start(Message("start", f"{cfg.name}: training started", fields=fields, mention=over))
        self.start_sent = True

    def on_train_end(self, args, state, control, **kwargs):
        self.stall.stop()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "loss": logs["loss"],
               "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               "tokens": state.num_input_tokens_seen, "elapsed_s": round(time.monotonic() - self.t0, 2),
               **preference.logged(logs)}
        self.records.append(rec)
        if not distributed.is_main_process():  # the logged loss is averaged over the ranks: each checks it alike
            self._check_health(rec)
            return
        with open(self.job.out / "loss.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        gn = rec["grad_norm"]
        print(f"step {state.global_step}/{state.max_steps}  epoch {rec['epoch']:.2f}  loss {rec['loss']:.4f}  "
              f"lr {rec['learning_rate']:.2e}  grad_norm {gn if gn is None else f'{gn:.3f}'}  "
              f"elapsed {_duration(rec['elapsed_s'])}  eta {self._eta(state)}"
              + (f"  reward_acc {rec['rewards_accuracies']:.2f}  margin {rec.get('rewards_margins', math.nan):.3f}"
                 if "rewards_accuracies" in rec else ""), file=sys.stderr, flush=True)
        self._check_health(rec)
        if self.start_sent and time.monotonic() - self.last_progress >= self.every:
            self._progress(state, rec)

    def _eta(self, state) -> str:
        """Time left at the pace of the steps since the first one (which includes warm-up and compilation)."""
        done = state.global_step - self.first_step
        if self.first_step_at is None or done <= 0:
            return "—"
        return _duration((time.monotonic() - self.first_step_at) / done * (state.max_steps - state.global_step))

    def _check_health(self, rec: dict) -> None:
        watchdog = self.job.cfg.train.watchdog
        watched = ("loss", "grad_norm", *[k for k in rec if k.startswith("rewards_")])  # a NaN reward is a NaN loss
        bad = [f"{k} is {rec[k]}" for k in watched if rec[k] is not None and not math.isfinite(rec[k])]
        if not bad and watchdog.max_grad_norm is not None and (rec["grad_norm"] or 0) > watchdog.max_grad_norm:
            bad.append(f"grad_norm {rec['grad_norm']:.4g} exceeds train.watchdog.max_grad_norm "
                       f"({watchdog.max_grad_norm:g})")
        if bad:
            raise Diverged(f"training diverged at step {rec['step']}: {', '.join(bad)}; stopped, the last good "
                           f"checkpoint is kept", step=rec["step"], last_good_step=self.last_good_step)
        self.last_good_step = rec["step"]

    def _progress(self, state, rec: dict) -> None:
        now = time.monotonic()
        tps = (state.num_input_tokens_seen - self.last_tokens) / max(now - self.last_progress, 1e-9)
        per_step = (now - self.t0) / max(1, state.global_step - (self.first_step or 0) + 1)
        eta = per_step * (state.max_steps - state.global_step)
        self.job.notifier.progress(Message("progress", f"{self.job.cfg.name}: step {state.global_step}/"
                                                       f"{state.max_steps}", fields=[
            ("run", f"`{self.job.run_id}`"), ("loss", f"{rec['loss']:.4g}"),
            ("learning rate", f"{rec['learning_rate']:.2e}"), ("tokens/s", f"{tps:,.0f}"), ("ETA", _duration(eta)),
            ("memory", _memory())]))
        self.last_progress, self.last_tokens = now, state.num_input_tokens_seen


def render_markdown(report: dict, records: list[dict]) -> str:
    m = report.get("metrics") or {}
    if report.get("status") == "running":
        return f"### swiftci train\n\n⏳ **RUNNING** — run `{report.get('run_id')}`\n"
    if report.get("status") != "ok":
        error = report.get("error") or {}
        return (f"### swiftci train\n\n❌ **{report.get('status', 'failed').upper()}** — "
                f"{error.get('reason', 'training did not finish')}\n")

    def num(x, fmt=".4g"):
        return "—" if x is None else format(x, fmt)

    rows = [
        ("run", f"`{report['run_id']}`"),
        ("method", f"{report.get('method')} · {report.get('tuner')} · base `{report.get('base_model')}`"),
        ("loss", f"{num(m.get('train_loss_first'))} → {num(m.get('train_loss_last'))}"
                 + (f" (validation {num(m.get('validation_loss'))})" if m.get("validation_loss") is not None else "")),
        ("steps", f"{m.get('steps')} ({num(m.get('epochs'))} epochs)"),
        *([("preference", preference.summary(m))] if preference.summary(m) else []),
        ("throughput", f"{num(m.get('tokens_per_second'), ',.0f')} tokens/s · {m.get('tokens') or 0:,} tokens"),
        ("time", f"{num(m.get('wall_seconds'), '.1f')} s"
                 + (f" · {m['gpu_hours']:.2f} GPU-hours (estimated {m.get('gpu_hours_estimated') or 0:.2f})"
                    if m.get("gpu_hours") else "")),
        ("peak memory", f"{num(m.get('peak_memory_mb'), ',.0f')} MB ({m.get('peak_memory_kind')})"),
        ("outputs", ", ".join(f"`{v}/`" for v in (report.get("outputs") or {}).values())),
    ]
    lines = ["### swiftci train", "", "✅ **OK**", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    chart = reports.loss_chart(records)
    if chart:
        lines += ["", chart]
    return "\n".join(lines) + "\n"


def _save_atomic(target: Path, save) -> None:
    """Save into a sibling temp folder, then swap it in: no half-written model beside a finished report."""
    tmp = target.with_name(f".{target.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _tokens_seen(ckpt: Path | None) -> int:
    if ckpt is None:
        return 0
    return json.loads((ckpt / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def _loss_history(loss_path: Path, last_ckpt: Path | None) -> list[dict]:
    """On resume, keep the logged steps up to the checkpoint; on a fresh run, start an empty log."""
    main = distributed.is_main_process()  # in a distributed run, rank 0 keeps the log
    if last_ckpt is None or not loss_path.is_file():
        if main:
            reports.write_text(loss_path, "")
        return []
    upto = int(last_ckpt.name.split("-")[1])
    kept = [json.loads(x) for x in loss_path.read_text().splitlines() if x.strip()]
    kept = [r for r in kept if r["step"] <= upto]
    if main:
        reports.write_text(loss_path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def _memory() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB GPU (peak)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB RSS (peak)"


def plot_loss(out: Path, title: str) -> Path | None:
    """loss.png beside loss.jsonl (headless matplotlib); None when there is nothing to plot or plotting fails —
    a chart is never worth a failed run or a lost report."""
    try:
        return _plot_loss(out, title)
    except Exception as e:  # noqa: BLE001
        print(f"warning: could not draw the loss curve ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _plot_loss(out: Path, title: str) -> Path | None:
    records = [r for r in reports.read_jsonl(out / "loss.jsonl") if isinstance(r.get("loss"), (int, float))]
    if len(records) < 2:
        return None
    try:
        import logging

        import matplotlib

        logging.getLogger("matplotlib").setLevel(logging.WARNING)
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [r["step"] for r in records]
    losses = [r["loss"] if math.isfinite(r["loss"]) else float("nan") for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(steps, losses, color="#5b3cc4", linewidth=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, out / "loss.png")
    return out / "loss.png"
