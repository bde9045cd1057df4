"""How much GPU memory a training needs, per GPU, from the model's config.json alone — no weights are read.

`swiftci estimate` prints it with a verdict against the GPUs' memory and, when it does not fit, the cheapest change
that does; `swiftci train` runs the same check as a pre-flight on CUDA machines before it loads anything.

How the figures are made (bytes per GPU; P parameters of the base model, T trainable LoRA parameters, e bytes per
element in the compute precision: 2 for bf16/fp16, 4 for fp32):

- Parameters are counted on the model built from config.json on PyTorch's `meta` device (shapes, no storage), by
  layer type: embeddings, attention and MLP Linear layers, norms, the lm_head (none of its own when tied).
- full, mixed precision: the 16-bit working weights 2P, fp32 gradients 4P, and optimizer states 12P (fp32 master
  weights and AdamW's two moments) — 18P, as DeepSpeed counts it; in fp32: 4P + 4P + 8P.
- lora: the frozen base in the compute precision, e·P, plus 18T (or 16T in fp32) for the adapters (peft keeps them
  in fp32). The LoRA parameters are r·(in + out) for every Linear layer `train.lora.target_modules` selects, matched
  as peft matches them (`all-linear`: every Linear but the lm_head).
- qlora: the Linear layers but the lm_head in 4 bits — 4.127 bits per parameter with double quantization (one fp8
  scale per 64 weights, one fp32 per 256 scales), 4.5 without — and the other parameters (embeddings, lm_head,
  norms) in fp32, where peft's prepare_model_for_kbit_training puts them; the adapters as for lora.
- ZeRO-2 shards gradients and optimizer states over the GPUs; ZeRO-3 and FSDP shard the weights too, gathering
  the largest decoder layer (twice: the current one and the prefetched next) in 16 bits. Offload moves optimizer
  states (and, with `optimizer_and_params`, the weights) to CPU memory.
- activations, per decoder layer, the tensors autograd keeps per token, in the compute precision: each RMSNorm's
  input (an fp32 copy under 16-bit precision), normalized value and output (2 × 4h in bf16/fp16, 2 × 3h in fp32),
  the attention's query, key and value after the rotary embedding, its output and the o_proj input (3q + 2kv, q and
  kv the query and key/value widths), and the MLP's gate, up, activation and down-projection input
  (4·intermediate); plus the logits (e), their fp32 copy for the loss (4, when e is 2) and the loss's fp32
  log-softmax (4) for every one of b·s·vocabulary entries — an upper bound under `train.logits: auto`, which builds
  them only for the positions whose next token is learned, a share of the rows this pre-flight does not read.
  sdpa/flash attention keeps no s×s matrix. With gradient checkpointing only each layer's input is kept (h per token
  per layer) and one layer's activations are rebuilt at a time. Rows are `train.batch_size` (twice that for dpo,
  orpo and simpo, which run chosen and rejected together) of `train.max_length` tokens — the longest a batch can be.
- an allowance of 1 GiB per GPU for the CUDA context, kernels and the caching allocator's slack (not measured
  here: no GPU was lent when this was written). On the tiny model on CPU, without it, the estimate was 0.94-1.08
  times torch's measured tensor peak (bench/estimate_accuracy.py); tools/gpu_check.py measures it on a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swiftci.errors import UsageError

if TYPE_CHECKING:
    from swiftci.config import Config, TrainConfig

GIB = 2**30
CUDA_ALLOWANCE = 1 * GIB  # CUDA context, kernels, allocator slack: an allowance, see the module docstring
JSON_VERSION = 1
PAIRED_METHODS = ("dpo", "orpo", "simpo")  # chosen and rejected go through the model in one batch
SHORTEST_SUGGESTED_LENGTH = 256  # a shorter max_length is no longer the same training; not suggested below this


# --- the model, from its config.json -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    name: str
    inputs: int
    outputs: int
    bias: bool


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: parameters by layer type, its Linear layers, and the sizes that set the
    activations."""

    embeddings: int
    attention: int
    mlp: int
    norms: int
    lm_head: int  # 0 when tied to the embeddings
    other: int  # anything else (e.g. MoE routers, fused expert tensors): kept in 16 bits, never quantized
    tied: bool
    linears: tuple[Linear, ...]  # every Linear layer but the lm_head, as peft and bitsandbytes see them
    embedding_names: tuple[tuple[str, int, int], ...]  # (name, rows, dim): LoRA can target these by name
    largest_layer: int  # parameters of the largest decoder layer (what ZeRO-3/FSDP gathers at a time)
    hidden: int
    layers: int
    q_dim: int
    kv_dim: int
    intermediate: int
    vocab: int

    @property
    def total(self) -> int:
        return self.embeddings + self.attention + self.mlp + self.norms + self.lm_head + self.other

    @property
    def quantizable(self) -> int:
        """Parameters bitsandbytes stores in 4 bits: the Linear layers' weights (their biases stay 16-bit)."""
        return sum(lin.inputs * lin.outputs for lin in self.linears)


def read_model_config(cfg: Config) -> dict:
    """The base model's config.json: read from a local folder, or only that file fetched from the hub at
    `model.revision` (no weights)."""
    local = cfg.model_local_path
    if local is not None:
        path = local / "config.json"
        if not path.is_file():
            raise UsageError(f"model.id: {local} has no config.json; point model.id at a Hugging Face model folder")
    else:
        path = _download_config(cfg.model.id, cfg.model.revision)
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"model.id: cannot read {path}: {e}") from None


def _download_config(model_id: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(model_id, "config.json", revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        at = f" at revision {revision}" if revision else ""
        raise UsageError(f"model.id: cannot fetch config.json of {model_id}{at}: {type(e).__name__}: {e}; check "
                         "the id, the revision and HF_TOKEN for gated models") from None


def model_shape(config: dict) -> ModelShape:
    """Build the model on the meta device (shapes only) and count its parameters by layer type."""
    model = _meta_model(config)
    text = model.config.get_text_config()
    seen: set[int] = set()
    counts = dict.fromkeys(("embeddings", "attention", "mlp", "norms", "lm_head", "other"), 0)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    linears, embeddings = [], []
    for name, module in model.named_modules():
        kind = _kind(name, module, output)
        if kind == "linear":
            linears.append(Linear(name, module.in_features, module.out_features, module.bias is not None))
        elif kind == "embeddings":
            embeddings.append((name, module.num_embeddings, module.embedding_dim))
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                counts[_bucket(kind, name)] += p.numel()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(**counts, tied=tied, linears=tuple(linears), embedding_names=tuple(embeddings),
                      largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in _decoder_layers(model)),
                                        default=0),
                      hidden=text.hidden_size, layers=text.num_hidden_layers, q_dim=heads * head_dim,
                      kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
                      intermediate=_intermediate(text), vocab=text.vocab_size)


def _meta_model(config: dict) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights  # shapes only: initializing 7B meta weights takes 15 s

    if "model_type" not in config:
        raise UsageError("model.id: its config.json has no `model_type`; transformers cannot tell the architecture")
    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        model_config = AutoConfig.for_model(config["model_type"], **fields)
        with torch.device("meta"), no_init_weights():
            model = AutoModelForCausalLM.from_config(model_config)
        model.tie_weights()  # skipped with the initialization: one tensor for tied embeddings, as from_pretrained has
        return model
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"model.id: transformers cannot build a causal LM from its config.json "
                         f"(model_type {config['model_type']!r}): {e}") from None


def _kind(name: str, module: Any, output: Any) -> str:
    import torch

    if module is output:
        return "lm_head"
    if isinstance(module, torch.nn.Embedding):
        return "embeddings"
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if "norm" in type(module).__name__.lower():
        return "norms"
    return "other"


def _bucket(kind: str, name: str) -> str:
    if kind != "linear":
        return kind
    leaf_parent = name.rsplit(".", 2)[-2] if name.count(".") else ""
    return "attention" if "attn" in leaf_parent or "attention" in leaf_parent else "mlp"


def _decoder_layers(model: Any) -> Any:
    """The decoder layers: the model's first ModuleList (`model.layers` in transformers' decoders)."""
    import torch

    return next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)), [])


def _intermediate(text: Any) -> int:
    """The MLP's hidden width a token passes through: for mixture-of-experts models, that of the experts it is
    routed to (each expert's width × experts per token)."""
    experts = getattr(text, "num_experts_per_tok", None)
    width = getattr(text, "moe_intermediate_size", None) if experts else None
    if experts and width:
        return experts * width
    return getattr(text, "intermediate_size", None) or 4 * text.hidden_size


# --- what is trained, and where ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parallelism:
    """How the training is spread over GPUs. Filled from `swiftci estimate`'s flags, and by train's pre-flight
    (one process: one GPU); `train.distributed` feeds it when that section exists."""

    gpus: int = 1
    strategy: str = "none"  # none | ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed only: 2 shards gradients and optimizer states, 3 the weights too
    offload: str = "none"  # none | optimizer | optimizer_and_params

    @classmethod
    def of(cls, cfg: Config, gpus: int) -> Parallelism:
        """What `train.distributed` asks for, on `gpus` devices per node (one process per GPU)."""
        d = cfg.train.distributed
        return cls(gpus=gpus * d.nnodes if d.strategy != "none" else 1, strategy=d.strategy,
                   zero_stage=d.zero_stage or 2, offload=d.offload)

    @property
    def shards_states(self) -> bool:
        return self.gpus > 1 and self.strategy in ("fsdp", "deepspeed")

    @property
    def shards_weights(self) -> bool:
        return self.shards_states and (self.strategy == "fsdp" or self.zero_stage == 3)


@dataclass(frozen=True)
class Setup:
    """The settings of train (and the parallelism) the memory depends on."""

    tuner: str
    precision: str  # fp32 | bf16 | fp16 (`auto` resolved)
    batch_size: int
    gradient_accumulation: int
    rows_per_example: int  # 2 for paired preference methods: chosen and rejected in one batch
    max_length: int
    gradient_checkpointing: bool
    lora_rank: int
    lora_targets: str | tuple[str, ...]
    double_quant: bool
    parallel: Parallelism = Parallelism()


def setup_of(tc: TrainConfig, parallel: Parallelism, precision: str | None = None) -> Setup:
    """The estimate's view of a train section. `precision` overrides `train.precision`; its `auto` is bf16 (the
    estimate is for GPUs that support it; pass fp16 or fp32 for others)."""
    precision = precision or tc.precision
    target = tc.lora.target_modules
    return Setup(tuner=tc.tuner, precision="bf16" if precision == "auto" else precision,
                 batch_size=tc.batch_size, gradient_accumulation=tc.gradient_accumulation,
                 rows_per_example=2 if tc.method in PAIRED_METHODS else 1, max_length=tc.max_length,
                 gradient_checkpointing=tc.gradient_checkpointing, lora_rank=tc.lora.rank,
                 lora_targets=target if isinstance(target, str) else tuple(target),
                 double_quant=tc.qlora.double_quant, parallel=parallel)


def lora_parameters(shape: ModelShape, rank: int, targets: str | tuple[str, ...]) -> int:
    """LoRA's trainable parameters: r·(in + out) per targeted layer, matched as peft matches target_modules (a
    string other than `all-linear` is a regular expression over the full module name)."""
    def targeted(name: str) -> bool:
        if targets == "all-linear":
            return True
        if isinstance(targets, str):
            return re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    linear = sum(rank * (lin.inputs + lin.outputs) for lin in shape.linears if targeted(lin.name))
    if targets == "all-linear":
        return linear
    return linear + sum(rank * (rows + dim) for name, rows, dim in shape.embedding_names if targeted(name))


# --- the estimate ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Estimate:
    """Bytes per GPU, by component; `offloaded` is what lives in CPU memory instead."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    activations_checkpointed: int  # the activations with gradient checkpointing on
    activations_full: int  # ... and off
    overhead: int
    offloaded: int
    parameters: int
    trainable: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead

    @property
    def tensors(self) -> int:
        """What the estimate says autograd and the optimizer hold, without the CUDA allowance."""
        return self.total - self.overhead


def estimate(shape: ModelShape, setup: Setup, *, cuda_allowance: int = CUDA_ALLOWANCE) -> Estimate:
    """Per-GPU memory of one training of `shape` with `setup` (the module docstring says how)."""
    e = 4 if setup.precision == "fp32" else 2
    trainable = shape.total if setup.tuner == "full" else lora_parameters(shape, setup.lora_rank, setup.lora_targets)
    frozen = _frozen_weight_bytes(shape, setup, e)
    weights = frozen + trainable * e
    gradients = trainable * 4
    optimizer = trainable * (8 if e == 4 else 12)  # AdamW's moments; fp32 master weights under mixed precision
    par, n = setup.parallel, setup.parallel.gpus
    if par.shards_states:
        gradients, optimizer = _ceil(gradients, n), _ceil(optimizer, n)
    if par.shards_weights:
        weights = _ceil(weights, n) + 2 * shape.largest_layer * 2
    offloaded = 0
    if par.offload in ("optimizer", "optimizer_and_params"):
        offloaded, optimizer = optimizer, 0
    if par.offload == "optimizer_and_params":
        gathered = 2 * shape.largest_layer * 2
        offloaded, weights = offloaded + max(weights - gathered, 0), min(weights, gathered)
    checkpointed, full = _activations(shape, setup, e, True), _activations(shape, setup, e, False)
    return Estimate(weights=weights, gradients=gradients, optimizer=optimizer,
                    activations=checkpointed if setup.gradient_checkpointing else full,
                    activations_checkpointed=checkpointed, activations_full=full, overhead=cuda_allowance,
                    offloaded=offloaded, parameters=shape.total, trainable=trainable)


def _frozen_weight_bytes(shape: ModelShape, setup: Setup, e: int) -> int:
    if setup.tuner == "full":
        return 0
    if setup.tuner == "lora":
        return shape.total * e
    bits = 4.127 if setup.double_quant else 4.5  # NF4/FP4 values plus their scales
    return round(shape.quantizable * bits / 8) + (shape.total - shape.quantizable) * 4


def _activations(shape: ModelShape, setup: Setup, e: int, checkpointing: bool) -> int:
    tokens = setup.batch_size * setup.rows_per_example * setup.max_length
    h = shape.hidden
    norms = 2 * (4 * h if e == 2 else 3 * h)  # input (an fp32 copy under 16-bit precision), normed, output
    per_layer = tokens * e * (norms + 3 * shape.q_dim + 2 * shape.kv_dim + 4 * shape.intermediate)
    kept = tokens * e * h * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    final_norm = tokens * e * 2 * h
    logits = tokens * shape.vocab * (e + (4 if e != 4 else 0) + 4)
    return kept + final_norm + logits


def _ceil(x: int, n: int) -> int:
    return -(-x // n)


# --- fits, and the cheapest change that would -------------------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """A change to the training that makes it fit: what to set (config keys, and `swiftci estimate` flags that
    re-check it) and the estimate with it."""

    says: str
    settings: dict[str, Any]
    flags: tuple[str, ...]
    setup: Setup
    estimate: Estimate


def fits(est: Estimate, gpu_memory: int) -> bool:
    return est.total <= gpu_memory


def cheapest_fix(shape: ModelShape, setup: Setup, gpu_memory: int) -> Fix | None:
    """The first change, in order of what it costs — gradient checkpointing, ZeRO-3 (several GPUs), optimizer
    offload, qlora (for lora), a smaller batch, a shorter max_length — whose re-run estimate fits; when none fits
    alone, the same changes taken together in that order, as soon as they fit. None: nothing in the list fits."""
    for change in CHANGES:
        fix = change(setup, shape, gpu_memory)
        if fix is not None and fits(fix.estimate, gpu_memory):
            return fix
    combined: Fix | None = None
    current = setup
    for change in CHANGES:
        fix = change(current, shape, gpu_memory)
        if fix is None:
            continue
        combined = fix if combined is None else Fix(
            f"{combined.says}, and {fix.says}", {**combined.settings, **fix.settings},
            _merge_flags(combined.flags, fix.flags), fix.setup, fix.estimate)
        current = combined.setup
        if fits(combined.estimate, gpu_memory):
            return combined
    return None


def _fix(says: str, settings: dict, flags: tuple[str, ...], shape: ModelShape, setup: Setup) -> Fix:
    return Fix(says, settings, flags, setup, estimate(shape, setup))


def _checkpointing(setup: Setup, shape: ModelShape, _memory: int) -> Fix | None:
    if setup.gradient_checkpointing:
        return None
    return _fix("set `train.gradient_checkpointing: true` (~30% slower)", {"train.gradient_checkpointing": True},
                ("--set", "train.gradient_checkpointing=true"), shape,
                dataclasses.replace(setup, gradient_checkpointing=True))


def _zero3(setup: Setup, shape: ModelShape, _memory: int) -> Fix | None:
    par = setup.parallel
    if par.gpus < 2 or par.shards_weights or setup.tuner == "qlora":  # qlora + ZeRO-3 is refused by train
        return None
    new = dataclasses.replace(par, strategy="deepspeed", zero_stage=3)
    return _fix(f"shard the weights too with DeepSpeed ZeRO-3 over the {par.gpus} GPUs "
                "(`train.distributed: {strategy: deepspeed, zero_stage: 3}`)",
                {"train.distributed.strategy": "deepspeed", "train.distributed.zero_stage": 3},
                ("--strategy", "deepspeed", "--zero-stage", "3"), shape, dataclasses.replace(setup, parallel=new))


def _offload(setup: Setup, shape: ModelShape, _memory: int) -> Fix | None:
    par = setup.parallel
    if par.offload != "none":
        return None
    strategy = par.strategy if par.strategy in ("deepspeed", "fsdp") else "deepspeed"
    new = dataclasses.replace(par, strategy=strategy, offload="optimizer")
    return _fix(f"offload the optimizer states to CPU memory (`train.distributed: {{strategy: {strategy}, offload: "
                "optimizer}`; slower steps, needs host RAM)",
                {"train.distributed.strategy": strategy, "train.distributed.offload": "optimizer"},
                ("--strategy", strategy, "--offload", "optimizer"), shape, dataclasses.replace(setup, parallel=new))


def _qlora(setup: Setup, shape: ModelShape, _memory: int) -> Fix | None:
    if setup.tuner != "lora":
        return None
    new = setup
    if setup.parallel.shards_weights:  # qlora + ZeRO-3 is refused by train: back to ZeRO-2
        new = dataclasses.replace(setup, parallel=dataclasses.replace(setup.parallel, zero_stage=2))
    return _fix("train a 4-bit base with `train.tuner: qlora`", {"train.tuner": "qlora"},
                ("--set", "train.tuner=qlora"), shape, dataclasses.replace(new, tuner="qlora"))


def _smaller_batch(setup: Setup, shape: ModelShape, memory: int) -> Fix | None:
    """The largest smaller batch (halving) that fits, else 1; gradient accumulation keeps the effective batch."""
    batch, candidate = setup.batch_size, None
    while batch > 1:
        batch //= 2
        candidate = dataclasses.replace(setup, batch_size=batch,
                                        gradient_accumulation=setup.gradient_accumulation * setup.batch_size // batch)
        if fits(estimate(shape, candidate), memory):
            break
    if candidate is None:
        return None
    accumulation = candidate.gradient_accumulation
    return _fix(f"set `train.batch_size: {batch}` and `train.gradient_accumulation: {accumulation}` (the same "
                "effective batch)", {"train.batch_size": batch, "train.gradient_accumulation": accumulation},
                ("--set", f"train.batch_size={batch}", "--set", f"train.gradient_accumulation={accumulation}"),
                shape, candidate)


def _shorter_length(setup: Setup, shape: ModelShape, memory: int) -> Fix | None:
    length, candidate = setup.max_length, None
    while length // 2 >= SHORTEST_SUGGESTED_LENGTH:
        length //= 2
        candidate = dataclasses.replace(setup, max_length=length)
        if fits(estimate(shape, candidate), memory):
            break
    if candidate is None:
        return None
    return _fix(f"set `train.max_length: {length}` (longer rows are cut)", {"train.max_length": length},
                ("--set", f"train.max_length={length}"), shape, candidate)


CHANGES = (_checkpointing, _zero3, _offload, _qlora, _smaller_batch, _shorter_length)  # cheapest first


def _merge_flags(first: tuple[str, ...], second: tuple[str, ...]) -> tuple[str, ...]:
    """Flags of two changes, the second's value winning for a flag both give (e.g. --strategy)."""
    pairs = dict(zip(first[::2], first[1::2], strict=True))
    sets = [v for k, v in zip(first[::2], first[1::2], strict=True) if k == "--set"]
    for k, v in zip(second[::2], second[1::2], strict=True):
        if k == "--set":
            sets.append(v)
        else:
            pairs[k] = v
    out: list[str] = []
    for s in sets:
        out += ["--set", s]
    for k, v in pairs.items():
        if k != "--set":
            out += [k, v]
    return tuple(out)


# --- the command's and the pre-flight's answer ------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """An estimate against the GPUs' memory (None: no memory figure, no verdict) and the cheapest fix."""

    shape: ModelShape
    setup: Setup
    estimate: Estimate
    gpu_memory: int | None
    fix: Fix | None

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_memory is None else fits(self.estimate, self.gpu_memory)


def judge(cfg: Config, parallel: Parallelism, gpu_memory: int | None, *, precision: str | None = None) -> Verdict:
    """Estimate `cfg`'s training and, with a memory figure, say whether it fits and what would."""
    if cfg.train is None:
        raise UsageError(f"{cfg.source}: no `train` section to estimate; add one (see examples/tiny/swiftci.yaml)")
    shape = model_shape(read_model_config(cfg))
    setup = setup_of(cfg.train, parallel, precision)
    est = estimate(shape, setup)
    fix = cheapest_fix(shape, setup, gpu_memory) if gpu_memory is not None and not fits(est, gpu_memory) else None
    return Verdict(shape, setup, est, gpu_memory, fix)


def visible_gpu_memory() -> tuple[int, int] | None:
    """(GPUs, bytes of the smallest) that torch sees; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    count = torch.cuda.device_count()
    return count, min(torch.cuda.get_device_properties(i).total_memory for i in range(count))


def preflight(cfg: Config, gpu_memory: int, parallel: Parallelism = Parallelism()) -> Verdict:
    """train's memory pre-flight: refuse (UsageError, exit 2) a training that cannot fit `gpu_memory` bytes per
    GPU, before anything is loaded, with the cheapest fix. `train.preflight: false` skips it (train's call)."""
    verdict = judge(cfg, parallel, gpu_memory)
    if verdict.fits:
        return verdict
    fix = (f"fix: {verdict.fix.says} (→ {_gib(verdict.fix.estimate.total)} per GPU)" if verdict.fix else
           "no change in swiftci's list fits (gradient checkpointing, ZeRO-3, offload, qlora, batch, length): use "
           "more GPUs or GPUs with more memory")
    raise UsageError(
        f"train pre-flight: this training needs about {_gib(verdict.estimate.total)} per GPU and the GPU has "
        f"{_gib(gpu_memory)} ({describe(verdict)}); {fix}. `swiftci estimate -c {cfg.source}` shows the whole "
        "estimate; set `train.preflight: false` to train anyway", kind="DoesNotFit",
        hint=verdict.fix.says if verdict.fix else "use more GPUs or GPUs with more memory")


def describe(verdict: Verdict) -> str:
    est = verdict.estimate
    return ", ".join(f"{name} {_gib(value)}" for name, value in _rows(est))


def _rows(est: Estimate) -> list[tuple[str, int]]:
    return [("weights", est.weights), ("gradients", est.gradients), ("optimizer states", est.optimizer),
            ("activations", est.activations), ("CUDA allowance", est.overhead)]


def _number(n: int) -> str:
    """GiB with two decimals, or four for the small figures of small models."""
    return f"{n / GIB:.2f}" if n >= GIB / 100 or n == 0 else f"{n / GIB:.4f}"


def _gib(n: int) -> str:
    return f"{_number(n)} GiB"


def table(verdict: Verdict, config_label: str) -> str:
    """What `swiftci estimate` prints: the setup, a table of GiB per GPU, the verdict and the fix."""
    est, st, shape = verdict.estimate, verdict.setup, verdict.shape
    par = st.parallel
    lines = [f"{config_label}: {st.tuner}, {st.precision}, batch {st.batch_size} × {st.max_length} tokens"
             + (" (chosen and rejected: 2 rows each)" if st.rows_per_example == 2 else "")
             + f", gradient checkpointing {'on' if st.gradient_checkpointing else 'off'}, {par.gpus} GPU(s)"
             + (f", {par.strategy}" + (f" ZeRO-{par.zero_stage}" if par.strategy == "deepspeed" else "")
                if par.strategy != "none" else "") + (f", offload {par.offload}" if par.offload != "none" else ""),
             f"parameters: {shape.total:,} (embeddings {shape.embeddings:,}, attention {shape.attention:,}, "
             f"MLP {shape.mlp:,}, norms {shape.norms:,}, lm_head {'tied' if shape.tied else f'{shape.lm_head:,}'}"
             + (f", other {shape.other:,}" if shape.other else "") + f"); trainable {est.trainable:,}", "",
             "| component | GiB per GPU |", "| --- | ---: |"]
    lines += [f"| {name} | {_number(value)} |" for name, value in _rows(est)]
    lines += [f"| **total** | **{_number(est.total)}** |", "",
              f"activations: {_gib(est.activations_full)} without gradient checkpointing, "
              f"{_gib(est.activations_checkpointed)} with it"
              + (f"; offloaded to CPU memory: {_gib(est.offloaded)}" if est.offloaded else "")]
    lines.append(_verdict_line(verdict))
    return "\n".join(lines)


def _verdict_line(verdict: Verdict) -> str:
    gpus = verdict.setup.parallel.gpus
    if verdict.gpu_memory is None:
        return "no GPU here and no --gpu-memory given: no verdict (e.g. --gpu-memory 80GiB)"
    where = f"{gpus} × {_gib(verdict.gpu_memory)}"
    if verdict.fits:
        return f"fits: {_gib(verdict.estimate.total)} of {_gib(verdict.gpu_memory)} per GPU ({where})"
    line = f"does not fit on {where}: {_gib(verdict.estimate.total)} needed per GPU"
    if verdict.fix is None:
        return line + "; nothing in swiftci's list of changes fits: use more GPUs or GPUs with more memory"
    return (line + f"\ncheapest fix: {verdict.fix.says} → {_gib(verdict.fix.estimate.total)} per GPU"
            f"\nre-check: swiftci estimate … {' '.join(verdict.fix.flags)}")


def as_json(verdict: Verdict) -> dict:
    """`swiftci estimate --json`: the same numbers as the table, in bytes and GiB."""
    est, st = verdict.estimate, verdict.setup
    fix = verdict.fix
    return {
        "version": JSON_VERSION,
        "setup": {k: v for k, v in dataclasses.asdict(st).items() if k != "parallel"} | {
            "parallel": dataclasses.asdict(st.parallel)},
        "parameters": {"total": est.parameters, "trainable": est.trainable, "embeddings": verdict.shape.embeddings,
                       "attention": verdict.shape.attention, "mlp": verdict.shape.mlp, "norms": verdict.shape.norms,
                       "lm_head": verdict.shape.lm_head, "other": verdict.shape.other, "tied": verdict.shape.tied},
        "per_gpu_bytes": _components(est),
        "per_gpu_gib": {k: round(v / GIB, 3) for k, v in _components(est).items()},
        "activations_bytes": {"without_checkpointing": est.activations_full,
                              "with_checkpointing": est.activations_checkpointed},
        "offloaded_bytes": est.offloaded,
        "gpu_memory_bytes": verdict.gpu_memory,
        "fits": verdict.fits,
        "fix": None if fix is None else {"says": fix.says, "settings": fix.settings, "flags": list(fix.flags),
                                         "per_gpu_bytes": _components(fix.estimate)},
    }


def _components(est: Estimate) -> dict[str, int]:
    return {"weights": est.weights, "gradients": est.gradients, "optimizer_states": est.optimizer,
            "activations": est.activations, "cuda_allowance": est.overhead, "total": est.total}


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GiB|G|GB|MiB|MB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6, "tib": 2**40}


def parse_memory(text: str) -> int:
    """`80GiB`, `80G` or `80` (GiB), `80GB` (10^9 bytes), `40960MiB` → bytes."""
    m = _MEMORY.match(text)
    if not m or float(m.group(1)) <= 0:
        raise UsageError(f"--gpu-memory {text!r}: expected a size per GPU such as 80GiB, 24G, 80 (GiB) or 40960MiB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "GiB").lower()])
