"""`swiftci estimate`: per-GPU training memory from the model's config.json, a verdict and the cheapest fix — a thin
click command over swiftci.estimate. swiftci/cli.py registers it and turns its errors into exit codes."""

from __future__ import annotations

import json
import sys

import click

from swiftci.errors import EXIT_GATE_FAILED, UsageError


@click.command()
@click.option("-c", "--config", "config_path", default="swiftci.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Path to swiftci.yaml.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value, e.g. --set train.batch_size=2 (repeatable).")
@click.option("--gpus", type=click.IntRange(min=1), help="GPUs the training runs on. Default: the CUDA GPUs torch "
              "sees here, else 1.")
@click.option("--gpu-memory", "gpu_memory", metavar="SIZE", help="Memory of each GPU, e.g. 80GiB, 24G or 80 (GiB); "
              "80GB means 10^9 bytes. Default: the smallest GPU torch sees here; with none, no verdict.")
@click.option("--strategy", type=click.Choice(["none", "ddp", "fsdp", "deepspeed"]), default=None,
              help="How the GPUs share the training. Default: ddp on several GPUs, else none.")
@click.option("--zero-stage", "zero_stage", type=click.Choice(["2", "3"]), default=None,
              help="DeepSpeed's ZeRO stage: 2 shards gradients and optimizer states, 3 the weights too (implies "
                   "--strategy deepspeed). Default: 2.")
@click.option("--offload", type=click.Choice(["none", "optimizer", "optimizer_and_params"]), default="none",
              show_default=True, help="Keep optimizer states (and weights) in CPU memory (DeepSpeed, FSDP).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default=None,
              help="Override train.precision; its `auto` counts as bf16 here.")
@click.option("--json", "as_json", is_flag=True, help="The same numbers as JSON ({\"version\": 1, …}).")
def estimate(config_path: str, overrides: tuple[str, ...], gpus: int | None, gpu_memory: str | None,
             strategy: str | None, zero_stage: str | None, offload: str, precision: str | None, as_json: bool) -> None:
    """Estimate the training's memory per GPU — weights, gradients, optimizer states, activations — from the base
    model's config.json alone (a hub model: only that file is fetched), say whether it fits, and when it does not,
    the cheapest change that does. Exit 0: fits (or no GPU memory to judge against), 1: does not fit, 2: bad input.
    """
    from swiftci import config
    from swiftci import estimate as memory

    memory_bytes = memory.parse_memory(gpu_memory) if gpu_memory is not None else None
    cfg = config.load(config_path, overrides)
    seen = memory.visible_gpu_memory() if gpus is None or memory_bytes is None else None
    gpus = gpus or (seen[0] if seen else 1)
    if memory_bytes is None and seen is not None:
        memory_bytes = seen[1]
    if offload == "optimizer_and_params" and not (strategy == "fsdp" or zero_stage == "3"):
        raise UsageError("--offload optimizer_and_params offloads sharded weights: it needs --zero-stage 3 (with "
                         "--strategy deepspeed) or --strategy fsdp")
    if (strategy is None and zero_stage is None and offload == "none" and cfg.train is not None
            and cfg.train.distributed.strategy != "none"):
        parallel = memory.Parallelism.of(cfg, gpus)  # the config's train.distributed, on the GPUs given or seen
    else:
        if strategy is None:
            strategy = "deepspeed" if offload != "none" or zero_stage else ("ddp" if gpus > 1 else "none")
        parallel = memory.Parallelism(gpus=gpus, strategy=strategy, zero_stage=int(zero_stage or 2), offload=offload)
    verdict = memory.judge(cfg, parallel, memory_bytes, precision=precision)
    click.echo(json.dumps(memory.as_json(verdict), indent=2) if as_json else memory.table(verdict, config_path))
    if verdict.fits is False:
        sys.exit(EXIT_GATE_FAILED)
