"""swiftci.yaml: one typed model per section, the only home of defaults, and a loader that reports every problem at
once with its file, line and path (`swiftci.yaml:14: train.lora.rank: must be greater than 0`).

Relative paths in the config are relative to the folder that holds the config file; they are kept as written in
the model (so a config dumps and hashes the same on every machine) and resolved with `Config.resolve()`.
`${VAR}` and `${VAR:-default}` in string values are expanded from the environment at load time (`$${` is a literal
`${`); an unset variable without a default is an error that names it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from swiftci.errors import ConfigError, closest

DEFAULT_CONFIG = "swiftci.yaml"


# --- paths that must exist -------------------------------------------------------------------------------------


def _existing(kind: Literal["file", "dir", "any"]):
    def check(value: Path, info: ValidationInfo) -> Path:
        base = (info.context or {}).get("base_dir")
        if base is None:  # validated without a file on disk (e.g. a test building a model in code)
            return value
        full = value if value.is_absolute() else Path(base) / value
        if not full.exists():
            raise ValueError(f"{kind if kind != 'any' else 'path'} not found: {value} (resolved to {full}); "
                             "fix the path (relative paths are relative to the config file's folder)")
        if kind == "file" and not full.is_file():
            raise ValueError(f"{value} is a folder; point it at a file")
        if kind == "dir" and not full.is_dir():
            raise ValueError(f"{value} is a file; point it at a folder")
        return value

    return AfterValidator(check)


ExistingFile = Annotated[Path, _existing("file")]
ExistingDir = Annotated[Path, _existing("dir")]


def _run_name(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?", value):
        raise ValueError(f"must be 1-40 lowercase letters, digits or dashes, starting and ending with a letter or "
                         f"digit, e.g. `support-bot` (it names run ids, image tags and Kubernetes objects); "
                         f"got {value!r}")
    return value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --- model -----------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _sha256_hex(value: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"must be a sha256: 64 lowercase hex digits (`sha256sum FILE` prints it); got {value!r}")
    return value


class ModelConfig(Section):
    id: str = Field(
        description="Base model: a local folder (relative to this file) or a hub id (Hugging Face or ModelScope: "
        "`source`), e.g. `Qwen/Qwen2.5-0.5B-Instruct`.",
        min_length=1,
    )
    revision: str | None = Field(
        default=None,
        description="Revision of a hub model to use (commit sha, tag or branch), e.g. a 40-character commit sha. "
        "Unset: the hub's default branch; the commit actually used is recorded in run.json either way.",
    )
    source: Literal["huggingface", "modelscope"] = Field(
        default="huggingface",
        description="The hub a hub id is downloaded from: `huggingface` (or the mirror in HF_ENDPOINT) or "
        "`modelscope` (MODELSCOPE_ENDPOINT). Every file is checked against the hub's own sha256 before anything "
        "loads (README, \"Provenance\").",
    )
    sha256: dict[str, Annotated[str, AfterValidator(_sha256_hex)]] | ExistingFile | None = Field(
        default=None,
        description="Pins of the model's exact bytes, for hub ids and local folders alike: a map "
        "`{file: sha256}` (e.g. `{model.safetensors: 3f2a…}`), or a manifest file (`sha256sum` output or that "
        "map in JSON). A file whose bytes differ fails the run before it loads (exit 2). Unset: no pins.",
    )

    @model_validator(mode="after")
    def _check_id(self, info: ValidationInfo) -> ModelConfig:
        base = (info.context or {}).get("base_dir")
        looks_local = self.id.startswith((".", "/", "~"))
        if base is not None and (looks_local or (Path(base) / self.id).exists()):
            full = Path(base) / Path(self.id).expanduser()
            if not full.is_dir():
                raise ValueError(f"id: local model folder not found: {self.id} (resolved to {full}); "
                                 "fix the path or use a hub id such as `org/name`")
            if self.revision is not None:
                raise ValueError("revision: only hub ids have revisions; remove it for a local model folder")
        elif not looks_local and not _HUB_ID.match(self.id):
            raise ValueError(f"id: {self.id!r} is neither an existing folder nor a hub id like `org/name`")
        return self


# --- data ------------------------------------------------------------------------------------------------------


class DataConfig(Section):
    train: ExistingFile = Field(description="Training rows, JSONL, e.g. `data/train.jsonl`.")
    validation: ExistingFile | None = Field(
        default=None,
        description="Held-out rows, JSONL, e.g. `data/validation.jsonl`. Unset: no validation loss; "
        "quantize then measures perplexity on the last rows of `train`.",
    )
    format: Literal["auto", "messages", "alpaca", "preference"] = Field(
        default="auto",
        description="Row format: `messages` (chat: {messages: [{role, content}]}) or `alpaca` "
        "({instruction, input, output}) for sft; `preference` (trl's own shapes: {prompt, chosen, rejected}, "
        "strings or lists of messages, or KTO's {prompt, completion, label}) for dpo, kto, orpo and simpo; `auto` "
        "detects it from the first row.",
    )
    sha256: dict[str, Annotated[str, AfterValidator(_sha256_hex)]] | None = Field(
        default=None,
        description="Pins of the data files' bytes: `{path: sha256}`, paths as written above (relative to this "
        "file), e.g. `{data/train.jsonl: 3f2a…}`. A changed file fails the run before training (exit 2, both "
        "hashes shown). Unset: no pins (run.json records the hashes either way).",
    )


# --- train -----------------------------------------------------------------------------------------------------


class LoraConfig(Section):
    rank: int = Field(default=16, gt=0, description="LoRA rank r, e.g. 8-64; higher learns more, costs more memory.")
    alpha: float = Field(default=32, gt=0, description="LoRA alpha; the update is scaled by alpha/rank.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA path, e.g. 0.05.")
    target_modules: str | list[str] = Field(
        default="all-linear",
        description="Modules that get adapters: `all-linear` or a list of module names, e.g. `[q_proj, v_proj]`.",
    )


class QLoraConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field(
        default="nf4", description="4-bit type of the frozen base: `nf4` (NormalFloat, the QLoRA paper's) or `fp4`."
    )
    double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too: ~0.4 bits per parameter less memory."
    )


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def duration_seconds(text: str) -> float:
    """`6h`, `90m`, `45s`, `1.5d` in seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration; write a number and a unit: `45s`, `90m`, `6h` or `1d`")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def _duration_text(text: str) -> str:
    if duration_seconds(text) <= 0:
        raise ValueError("must be longer than 0")
    return text.strip()


class WatchdogConfig(Section):
    max_grad_norm: float | None = Field(
        default=None, gt=0,
        description="Stop (exit 4) when a logged gradient norm exceeds this, e.g. 100. Unset: only non-finite "
        "loss or gradient norm stops training.",
    )
    stall_minutes: float = Field(
        default=30, gt=0, description="Fail (exit 3) when no optimizer step finishes for this long, e.g. a hung "
        "data loader or collective."
    )
    idle_minutes: float = Field(
        default=30, gt=0, description="On a GPU: utilization at or below `idle_utilization_pct` (read from NVML) "
        "for this long is a stall — a warning at half of it, then the run stops like one (exit 3). An idle GPU is "
        "paid for all the same.",
    )
    idle_utilization_pct: float = Field(
        default=5, ge=0, lt=100, description="What counts as idle for `idle_minutes`, in percent of GPU utilization."
    )


class ReferenceMixin(Section):
    reference: str = Field(
        default="base", description="The reference model the policy is kept close to: `base` (the model of "
        "`model.id`), `sft` (in a `train.then` step, its default: the SFT step's model) or a model folder. The "
        "model a step starts from (base alone, sft in a chain) is scored with LoRA on the same weights with the "
        "adapter disabled, never a second copy in memory; any other reference is loaded beside it.",
    )


DpoLoss = Literal["sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"]


class DpoConfig(ReferenceMixin):
    beta: float = Field(default=0.1, gt=0, description="How far from the reference the policy may move; higher "
                        "keeps it closer (trl's default 0.1).")
    loss_type: DpoLoss | list[DpoLoss] = Field(
        default="sigmoid", description="trl's DPO loss: `sigmoid` (the DPO paper's), `ipo`, `hinge`, `robust`, …, or "
        "a list whose losses are added, e.g. `[sigmoid, sft]` (DPO plus the SFT loss on the chosen answer, as RPO).")
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5, description="Assumed share of flipped preference "
                                   "labels (robust/cDPO losses), e.g. 0.1.")
    precompute_ref_log_probs: bool = Field(default=False, description="Score the reference once before training "
                                           "(saves a forward pass per step, costs a pass over the data).")


class KtoConfig(ReferenceMixin):
    beta: float = Field(default=0.1, gt=0, description="Distance to the reference, as in DPO (trl's default 0.1).")
    desirable_weight: float = Field(default=1.0, gt=0, description="Weight of desirable (label true) examples.")
    undesirable_weight: float = Field(default=1.0, gt=0, description="Weight of undesirable (label false) examples.")


class OrpoConfig(Section):
    beta: float = Field(default=0.1, gt=0, description="Weight of the odds-ratio term against the SFT loss (the "
                        "ORPO paper's λ; trl's default 0.1). No reference model.")


class SimpoConfig(Section):
    beta: float = Field(default=2.0, gt=0, description="Reward scale (the SimPO paper uses 2.0–2.5). No reference "
                        "model.")
    gamma: float = Field(default=0.5, ge=0, description="Target reward margin, as a ratio of beta (trl's "
                         "simpo_gamma, default 0.5).")
    cpo_alpha: float = Field(default=0.0, ge=0, description="Weight of an added SFT loss on the chosen answer "
                             "(0: pure SimPO).")


_DNS_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# what the runtime sets for torchrun (Kubeflow Trainer refuses a TrainJob that sets them) and what torchrun sets
_LAUNCHER_ENV = re.compile(r"^(PET_.*|MASTER_ADDR|MASTER_PORT|WORLD_SIZE|RANK|LOCAL_RANK|NODE_RANK)$")


class ModelStoreVolume(Section):
    claim: str = Field(description="The PersistentVolumeClaim every node mounts, e.g. `model-store`: it holds this "
                       "config, the data and the base model, and the job writes its output folder into it "
                       "(ReadWriteMany for more than one node).")
    mount_path: str = Field(default="/workspace", description="Where the volume is mounted in the pods.")
    config: str | None = Field(
        default=None, description="This config file's path on the volume, relative to `mount_path`, e.g. "
        "`support-bot/swiftci.yaml`; its relative paths (data, output_dir) resolve beside it as they do here. "
        "Unset: the config's file name at the top of the volume.")

    @model_validator(mode="after")
    def _paths(self) -> ModelStoreVolume:
        problems = []
        if not _DNS_NAME.match(self.claim):
            problems.append(f"claim: {self.claim!r} is not a Kubernetes name; use lowercase letters, digits and "
                            "dashes")
        if not self.mount_path.startswith("/"):
            problems.append(f"mount_path: must be an absolute path in the pod, e.g. `/workspace` (got "
                            f"{self.mount_path!r})")
        if self.config is not None and (self.config.startswith("/") or ".." in self.config.split("/")):
            problems.append(f"config: give the path relative to mount_path, inside the volume (got {self.config!r})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class KubeTrainTimeouts(Section):
    submit_seconds: int = Field(default=120, gt=0, description="How long submitting may take, retries of a busy "
                                "API server included, before the run fails (exit 3).")
    follow_seconds: int = Field(default=86400, gt=0, description="How long to follow the job to its end; past "
                                "it the run fails (exit 3) and the job is left running in the cluster.")


class KubernetesTrainConfig(Section):
    """Where and how `train.launcher: kubernetes` runs the training: a job of the cluster's own training engine."""

    api: Literal["trainjob", "pytorchjob"] = Field(
        default="trainjob", description="`trainjob`: a Kubeflow Trainer v2 TrainJob (`trainer.kubeflow.org/"
        "v1alpha1`); `pytorchjob`: a PyTorchJob (`kubeflow.org/v1`) of the older training operator.")
    context: str | None = Field(default=None, description="kubeconfig context, e.g. `gpu-cluster`. Unset: the "
                                "current one (or the pod's service account inside a cluster).")
    namespace: str = Field(default="default", description="Namespace of the job, e.g. `training`.")
    image: str | None = Field(
        default=None, description="The image the nodes run, with swiftci[train] and torchrun installed, pinned by "
        "tag or digest, e.g. `acme/swiftci-train:0.1.0`. Required for launcher kubernetes.")
    runtime: str = Field(default="torch-distributed", description="The ClusterTrainingRuntime a TrainJob refers "
                         "to (api trainjob); it sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, "
                         "PET_MASTER_ADDR and PET_MASTER_PORT for torchrun.")
    num_nodes: int = Field(default=1, gt=0, description="Nodes (pods) of the job; rank 0 writes the reports.")
    num_proc_per_node: int | None = Field(
        default=None, gt=0, description="Training processes per node. Unset: one per GPU (`gpus_per_node`), or 1 "
        "without GPUs.")
    gpus_per_node: int = Field(default=1, ge=0, description="`nvidia.com/gpu` each node requests and is limited "
                               "to; 0 trains on CPUs.")
    cpu: str | None = Field(default=None, description="CPU each node requests, e.g. `\"16\"`. Unset: the "
                            "cluster's default.")
    memory: str | None = Field(default=None, description="Memory each node requests, e.g. `200Gi`. Unset: the "
                               "cluster's default.")
    volume: ModelStoreVolume | None = Field(
        default=None, description="The model store the nodes read the config and data from and write the output "
        "folder to, e.g. `{claim: model-store, mount_path: /workspace}`. Required for launcher kubernetes.")
    service_account: str | None = Field(default=None, description="Service account of the pods, e.g. `trainer` "
                                        "(for access to the volume or a hub token). Unset: the namespace's default.")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment of the training processes, "
                                "e.g. `{HF_HOME: /workspace/.cache/huggingface}`.")
    timeouts: KubeTrainTimeouts = Field(default_factory=KubeTrainTimeouts, description="Time limits.")

    @property
    def procs_per_node(self) -> int:
        return self.num_proc_per_node or max(1, self.gpus_per_node)

    @model_validator(mode="after")
    def _fits(self) -> KubernetesTrainConfig:
        problems = []
        if not _DNS_NAME.match(self.namespace):
            problems.append(f"namespace: {self.namespace!r} is not a Kubernetes name; use lowercase letters, "
                            "digits and dashes")
        if self.image is not None:
            tail = self.image.rsplit("/", 1)[-1]
            if not ("@sha256:" in self.image or (":" in tail and not tail.endswith(":latest"))):
                problems.append(f"image: {self.image!r} is not pinned; add a version tag or @sha256 digest (every "
                                "node must run the same image, and a rerun the same one)")
        if self.api == "pytorchjob" and self.runtime != "torch-distributed":
            problems.append("runtime: names a ClusterTrainingRuntime of Kubeflow Trainer v2; a PyTorchJob (api "
                            "pytorchjob) has none — remove it, or set api: trainjob")
        if self.gpus_per_node and self.num_proc_per_node and self.num_proc_per_node > self.gpus_per_node:
            problems.append(f"num_proc_per_node: {self.num_proc_per_node} processes would share "
                            f"{self.gpus_per_node} GPU(s); use at most gpus_per_node ({self.gpus_per_node}), or "
                            "leave it unset (one per GPU)")
        reserved = sorted(k for k in self.env if _LAUNCHER_ENV.match(k))
        if reserved:
            problems.append(f"env: {', '.join(reserved)} are set by the training runtime and torchrun; remove "
                            "them (num_nodes and num_proc_per_node set the sizes)")
        if problems:
            raise ValueError("\n".join(problems))
        return self


class DistributedConfig(Section):
    """Training on several processes (GPUs, or CPU processes with gloo): `swiftci train` launches itself under
    torchrun; each process trains on its own share of every batch."""

    strategy: Literal["none", "ddp", "fsdp", "deepspeed"] = Field(
        default="none", description="`none`: one process; `ddp`: a full copy of the model per process, gradients "
        "averaged (fits when one device holds the model and its optimizer); `fsdp`: PyTorch FSDP shards weights, "
        "gradients and optimizer state (FSDP2; needs CUDA GPUs); `deepspeed`: DeepSpeed ZeRO (`zero_stage`, "
        "`offload`; needs the deepspeed package).")
    nproc_per_node: Literal["auto"] | Annotated[int, Field(gt=0)] = Field(
        default="auto", description="Processes per machine: `auto` = one per visible CUDA GPU (1 on CPU), or a "
        "number, e.g. 8, or 2 to run two CPU processes with gloo.")
    nnodes: int = Field(default=1, gt=0, description="Machines in the job (torchrun's --nnodes); more than 1 needs a "
                        "launcher that starts every machine (see README, \"Scaling up\").")
    zero_stage: Literal[2, 3] | None = Field(
        default=None, description="deepspeed only: ZeRO stage 2 (optimizer state and gradients sharded) or 3 "
        "(weights too; the model is gathered to a full state dict when saved). Unset with deepspeed: 2.")
    offload: Literal["none", "optimizer", "optimizer_and_params"] = Field(
        default="none", description="deepspeed only: move the optimizer state (`optimizer`, ZeRO-2 or 3), or it and "
        "the weights (`optimizer_and_params`, ZeRO-3), to host memory — slower steps, much less GPU memory.")
    timeout_seconds: int = Field(
        default=60, gt=0, description="How long a process waits for the others at a collective before the run "
        "fails (exit 3): a dead or stuck rank ends the run instead of hanging it.")

    @model_validator(mode="after")
    def _options_fit_strategy(self) -> DistributedConfig:
        if self.strategy != "deepspeed":
            for name, unset in (("zero_stage", None), ("offload", "none")):
                if getattr(self, name) != unset:
                    raise ValueError(f"{name}: is a DeepSpeed setting; set `strategy: deepspeed` or remove it")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError("offload: `optimizer_and_params` needs the weights partitioned, i.e. `zero_stage: 3`; "
                             "with ZeRO-2 use `offload: optimizer`")
        if self.strategy == "none" and (self.nproc_per_node != "auto" or self.nnodes != 1):
            raise ValueError("strategy: several processes need a strategy (`ddp`, `fsdp` or `deepspeed`); set one, "
                             "or leave nproc_per_node and nnodes unset")
        return self


class TrainConfig(Section):
    method: Literal["sft", "dpo", "kto", "orpo", "simpo"] = Field(
        default="sft", description="`sft` (supervised fine-tuning on messages/alpaca rows) or preference tuning on "
        "preference rows through trl's own trainers: `dpo`, `kto`, `orpo`, `simpo`.")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="DPO settings (method dpo).")
    kto: KtoConfig = Field(default_factory=KtoConfig, description="KTO settings (method kto; batch_size ≥ 2).")
    orpo: OrpoConfig = Field(default_factory=OrpoConfig, description="ORPO settings (method orpo).")
    simpo: SimpoConfig = Field(default_factory=SimpoConfig, description="SimPO settings (method simpo: trl's CPO "
                               "trainer with loss_type simpo).")
    tuner: Literal["lora", "qlora", "full"] = Field(
        default="lora",
        description="`lora` (adapters on frozen weights), `qlora` (LoRA on a 4-bit base; needs a CUDA GPU), "
        "`full` (every weight; most memory).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings (lora and qlora).")
    qlora: QLoraConfig = Field(
        default_factory=QLoraConfig, description="How qlora loads the base model in 4 bits (bitsandbytes)."
    )
    learning_rate: float = Field(default=2e-4, gt=0, description="Peak learning rate, e.g. 2e-4 for LoRA, 2e-5 full.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(
        default=None, gt=0, description="Stop after this many optimizer steps. Unset: train for `epochs`."
    )
    batch_size: int = Field(default=4, gt=0, description="Rows per device per micro-batch.")
    gradient_accumulation: int = Field(
        default=1, gt=0, description="Micro-batches per optimizer step; effective batch = batch_size × this × GPUs."
    )
    max_length: int = Field(default=2048, gt=0, description="Tokens per row; longer rows are truncated.")
    seed: int = Field(default=42, description="Seed for weights init, data order and dropout.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto", description="`auto`: bf16 on GPUs that support it, else fp16 on GPUs, fp32 on CPU."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass: ~30% slower, much less memory."
    )
    freeze_vision: bool = Field(
        default=True, description="Vision-language models: the vision tower stays frozen and gets no adapters; the "
        "projector between it and the language model trains fully; the language model gets LoRA on "
        "`lora.target_modules`. false: target modules inside the tower get adapters too (tuner full: it trains). "
        "Text models: no effect.")
    packing: Literal["auto", "none", "padding_free"] = Field(
        default="auto", description="How sft batches rows: `none` pads each batch to its longest row (rows of "
        "similar length are batched together); `padding_free` concatenates the rows of a batch with their "
        "boundaries in position_ids (no padding computed) — fast with an attention that takes those boundaries "
        "(flash_attention_2/3, flex_attention), slower than padding with sdpa or eager, which need a dense mask "
        "over the whole batch; `auto` picks padding_free for such an attention, else none. The report says which "
        "was used and why. Preference methods pad their pairs (`none`).")
    kernels: Literal["auto", "none", "liger"] = Field(
        default="auto", description="Fused GPU kernels: `liger` patches the model with Liger's RMSNorm, RoPE, "
        "SwiGLU and fused linear cross-entropy (transformers' `use_liger_kernel`; needs the liger-kernel package "
        "and a CUDA GPU); `auto` uses liger when both are there, else none; `none` never.")
    logits: Literal["auto", "all"] = Field(
        default="auto", description="Where sft computes the logits: `auto` only at the positions whose next token "
        "is learned (the answers; the lm_head and the loss's softmax over the vocabulary skip the prompts, the "
        "padding and the image tokens — the same loss and gradients up to rounding, less time and memory, most "
        "with large vocabularies), where the model's forward takes `logits_to_keep` and its loss is "
        "transformers' causal-LM loss, else all; `all`: every position, as transformers' Trainer does. The report "
        "says which was used and why. Preference methods compute their own (`all`).")
    save_steps: int = Field(default=500, gt=0, description="Write a checkpoint every N optimizer steps.")
    save_total_limit: int = Field(default=2, gt=0, description="Checkpoints kept on disk (oldest removed).")
    logging_steps: int = Field(default=10, gt=0, description="Log loss, learning rate and grad norm every N steps.")
    merge: bool = Field(default=False, description="Also write the adapter merged into the base model (`model/`).")
    preflight: bool = Field(
        default=True, description="On CUDA GPUs, estimate the training's memory per GPU from the model's config.json "
        "before loading anything and refuse (exit 2, with the cheapest fix) a training that cannot fit the GPUs "
        "torch sees (`swiftci estimate` shows the figures). On CPU nothing is checked. `false`: skip it.")
    max_runtime: Annotated[str, AfterValidator(_duration_text)] | None = Field(
        default=None, description="Longest a training may run, e.g. `6h`, `90m` or `45s`: on reaching it a "
        "checkpoint is saved and training stops with exit 3 and the command that resumes it. Workflows written by "
        "`swiftci init` take their job timeout from it. Unset: no limit.",
    )
    watchdog: WatchdogConfig = Field(
        default_factory=WatchdogConfig,
        description="Training health: a NaN/inf loss or gradient norm always stops training within one logging "
        "step (exit 4), keeping the last good checkpoint.",
    )
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Several processes: DDP, FSDP or DeepSpeed ZeRO, launched "
        "with torchrun (README, \"Scaling up\"). Default: one process.",
    )
    then: ThenConfig | None = Field(
        default=None, description="A preference step trained on top of this (sft) step's model in the same run, "
        "e.g. `{method: dpo, data: {train: data/pairs.jsonl}}`; later stages take its model. Unset: one step.",
    )
    launcher: Literal["local", "kubernetes"] = Field(
        default="local", description="Where the training runs: `local` (this machine: the runner) or `kubernetes` "
        "(a Kubeflow Trainer TrainJob or a PyTorchJob in a cluster, set in `kubernetes`; swiftci submits it, "
        "streams rank 0's log and follows it to its end). `swiftci train --on kubernetes` overrides it.")
    kubernetes: KubernetesTrainConfig = Field(
        default_factory=KubernetesTrainConfig, description="The cluster job of launcher kubernetes: api, image, "
        "nodes, processes and GPUs per node, the model-store volume.")

    @model_validator(mode="after")
    def _chain(self) -> TrainConfig:
        if self.then is not None and self.method != "sft":
            raise ValueError("then: a preference step follows an `sft` step; set train.method: sft")
        if self.method in ("dpo", "kto") and getattr(self, self.method).reference == "sft":
            raise ValueError(f"{self.method}.reference: `sft` names the SFT step of a chain (train.then); "
                             "here use `base` or a model folder")
        if self.launcher == "kubernetes":
            missing = [f"kubernetes.{key}: required for train.launcher: kubernetes, e.g. {example}"
                       for key, example in (("image", "`acme/swiftci-train:0.1.0`"),
                                            ("volume", "`{claim: model-store, mount_path: /workspace}`"))
                       if getattr(self.kubernetes, key) is None]
            if missing:
                raise ValueError("\n".join(missing))
        if self.packing == "padding_free" and self.method != "sft":
            raise ValueError(f"packing: padding_free is for method sft; {self.method} pads its pairs — set "
                             "train.packing: auto or none")
        return self

    @model_validator(mode="after")
    def _distributed_fits(self) -> TrainConfig:
        dist = self.distributed
        if dist.strategy == "deepspeed" and dist.zero_stage == 3 and self.tuner == "qlora":
            raise ValueError("distributed.zero_stage: bitsandbytes 4-bit weights cannot be partitioned by ZeRO-3; "
                             "use zero_stage: 2 or tuner: lora")
        if dist.strategy == "fsdp" and self.tuner == "qlora":
            raise ValueError("distributed.strategy: FSDP cannot shard bitsandbytes 4-bit weights here; use "
                             "strategy: ddp or deepspeed with zero_stage: 2, or tuner: lora")
        if dist.strategy != "none" and (self.then is not None or self.method != "sft"):
            raise ValueError("distributed.strategy: several processes are supported for one sft step so far; "
                             "remove `then` and use method: sft, or set strategy: none")
        return self


class ThenConfig(Section):
    """The second step of a chained training: every key of `train` that is set here replaces the first step's."""

    method: Literal["dpo", "kto", "orpo", "simpo"] = Field(description="The preference method of this step.")
    data: DataConfig = Field(description="This step's preference rows, e.g. `{train: data/pairs.jsonl}`.")
    learning_rate: float | None = Field(default=None, gt=0, description="Unset: the sft step's.")
    epochs: float | None = Field(default=None, gt=0, description="Unset: the sft step's.")
    max_steps: int | None = Field(default=None, gt=0, description="Unset: the sft step's.")
    batch_size: int | None = Field(default=None, gt=0, description="Unset: the sft step's.")
    gradient_accumulation: int | None = Field(default=None, gt=0, description="Unset: the sft step's.")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="DPO settings.")
    kto: KtoConfig = Field(default_factory=KtoConfig, description="KTO settings.")
    orpo: OrpoConfig = Field(default_factory=OrpoConfig, description="ORPO settings.")
    simpo: SimpoConfig = Field(default_factory=SimpoConfig, description="SimPO settings.")

    @model_validator(mode="before")
    @classmethod
    def _sft_reference(cls, data: Any) -> Any:
        """In a chain the reference defaults to the SFT model the step starts from."""
        if isinstance(data, dict):
            for method in ("dpo", "kto"):
                section = data.get(method)
                if section is None or (isinstance(section, dict) and "reference" not in section):
                    data = {**data, method: {**(section or {}), "reference": "sft"}}
        return data

    def step(self, first: TrainConfig) -> TrainConfig:
        """The TrainConfig of this step: the first step's, with what is set here (and merge on: later stages take
        the merged model, since this step's adapter sits on the sft model, not on the base)."""
        given = {k: getattr(self, k) for k in self.model_fields_set if k != "data" and getattr(self, k) is not None}
        return first.model_copy(update={**given, "method": self.method, "then": None, "merge": True})


# Settings that guard or log a training but do not decide its weights: changing them neither blocks --resume nor
# makes a finished run stale.
# Where the training runs (launcher, kubernetes) decides no weight either: a cluster job of a config computes the
# fingerprint a local run of it would. Nor does train.logits: the same loss and gradients, over fewer positions.
NOT_DECIDING = {"train": {"max_runtime", "watchdog", "logging_steps", "save_steps", "save_total_limit", "launcher",
                          "kubernetes", "preflight", "logits"}}


# --- evaluate --------------------------------------------------------------------------------------------------

_PERCENT = re.compile(r"^\s*(\d+(\.\d+)?)\s*%\s*$")



class GateConfig(Section):
    metric: str = Field(
        description="`<task>/<metric>` as lm-eval names them, e.g. `tiny_reverse/exact_match` or "
        "`gsm8k/exact_match,strict-match`.",
        pattern=r"^[^/\s]+/[^/\s]+$",
    )
    min: float | None = Field(default=None, description="Fail when the candidate's value is below this, e.g. 0.6.")
    max: float | None = Field(
        default=None, description="Fail when the value is above this (for lower-is-better metrics such as perplexity)."
    )
    max_drop: float | str | None = Field(
        default=None,
        description="Largest allowed worsening against the baseline: absolute (e.g. 0.02) or a percentage of the "
        "baseline (e.g. `\"2%\"`). Needs a baseline. Direction follows the metric's higher_is_better.",
    )
    margin: Literal["none", "stderr"] = Field(
        default="none",
        description="`stderr` widens max_drop by the combined standard error of candidate and baseline, so noise "
        "on small eval sets does not fail the gate.",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> GateConfig:
        if self.min is None and self.max is None and self.max_drop is None:
            raise ValueError("min: a gate needs at least one of `min`, `max` or `max_drop`")
        if isinstance(self.max_drop, str):
            if not _PERCENT.match(self.max_drop):
                raise ValueError(f"max_drop: {self.max_drop!r} is neither a number nor a percentage like \"2%\"")
        elif self.max_drop is not None and self.max_drop < 0:
            raise ValueError("max_drop: must be >= 0 (it is the largest allowed worsening)")
        return self

    @property
    def task(self) -> str:
        return self.metric.split("/", 1)[0]

    @property
    def metric_name(self) -> str:
        return self.metric.split("/", 1)[1]

    def allowed_drop(self, baseline: float) -> float | None:
        """max_drop as an absolute amount for this baseline value."""
        if self.max_drop is None:
            return None
        if isinstance(self.max_drop, str):
            return abs(baseline) * float(_PERCENT.match(self.max_drop).group(1)) / 100
        return float(self.max_drop)


def _baseline(value: str, info: ValidationInfo) -> str:
    if value in ("base", "none"):
        return value
    base = (info.context or {}).get("base_dir")
    if base is not None:
        full = Path(base) / value
        if not full.is_file():
            raise ValueError(f"must be `base`, `none` or the path of an earlier eval_report.json; {value} "
                             f"(resolved to {full}) is not a file")
    return value


class EvaluateConfig(Section):
    tasks: list[str] = Field(
        min_length=1,
        description="lm-eval task names (e.g. `hellaswag`, `gsm8k`) or names of local task YAMLs under `task_dir`.",
    )
    task_dir: ExistingDir | None = Field(
        default=None,
        description="Folder of local task YAMLs in lm-eval's own format, e.g. `eval/tasks`; paths inside them are "
        "relative to it. Unset: only lm-eval's built-in tasks.",
    )
    limit: float | None = Field(
        default=None, gt=0, description="Rows per task: a count (e.g. 200) or a fraction below 1. Unset: all rows."
    )
    num_fewshot: int | None = Field(default=None, ge=0, description="Few-shot examples. Unset: each task's default.")
    batch_size: int = Field(default=8, gt=0, description="Requests per forward pass.")
    apply_chat_template: bool = Field(
        default=True, description="Format prompts with the model's chat template (right for chat/instruct models)."
    )
    baseline: Annotated[str, AfterValidator(_baseline)] = Field(
        default="base",
        description="What deltas are measured against: `base` (this run's base model; with a LoRA adapter the base "
        "weights are loaded once and scored with the adapter disabled), a path to an earlier eval_report.json "
        "(e.g. the production model's), or `none`.",
    )
    gates: list[GateConfig] = Field(
        default_factory=list, description="Quality gates; the stage fails (exit 1) when any gate fails."
    )


def local_task_metrics(task_dir: Path) -> dict[str, list[str] | None]:
    """Task name -> metric names declared in local lm-eval YAMLs (None when the YAML does not list them)."""

    class _Lenient(yaml.SafeLoader):
        pass

    _Lenient.add_multi_constructor("!", lambda loader, suffix, node: None)
    found: dict[str, list[str] | None] = {}
    for path in sorted(task_dir.rglob("*.yaml")):
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_Lenient)
        except yaml.YAMLError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            metrics = doc.get("metric_list")
            found[doc["task"]] = ([m.get("metric") for m in metrics if isinstance(m, dict)]
                                  if isinstance(metrics, list) else None)
    return found


# --- quantize --------------------------------------------------------------------------------------------------

BITS_BY_METHOD = {"gptq": (2, 3, 4, 8), "awq": (4,)}


class CalibrationConfig(Section):
    samples: int = Field(default=128, gt=0, description="Calibration rows; more is slower (AWQ most) and steadier.")
    max_length: int = Field(default=512, gt=0, description="Tokens per calibration row (longer rows are cut).")
    batch_size: int = Field(default=8, gt=0, description="Calibration rows per forward pass.")
    file: ExistingFile | None = Field(
        default=None,
        description="JSONL of calibration text ({text} or chat/alpaca rows), e.g. `data/calib.jsonl`. "
        "Unset: the first rows of data.train.",
    )


class QuantizeGatesConfig(Section):
    max_ppl_increase_pct: float = Field(
        default=5.0, ge=0, description="Fail when held-out perplexity rises by more than this percentage."
    )
    reuse_eval_gates: bool = Field(
        default=True,
        description="Run the evaluate section's gates on the quantized model, with the unquantized model's eval "
        "report as the baseline when there is one.",
    )
    perplexity_samples: int = Field(
        default=128, gt=0, description="Held-out rows (data.validation, else the last training rows) for perplexity, "
        "scored on their assistant tokens: exp(validation loss). Without a data section: calibration text, every token."
    )
    perplexity_max_length: int = Field(
        default=512, gt=0, description="Tokens per held-out row when measuring perplexity (longer rows are cut)."
    )
    perplexity_batch_size: int = Field(
        default=4, gt=0, description="Rows per forward pass when measuring perplexity; the logits of a batch take "
        "batch × length × vocabulary × 4 bytes, so lower it for long rows and large vocabularies."
    )


class QuantizeConfig(Section):
    method: Literal["gptq", "awq"] = Field(
        default="gptq", description="`gptq` or `awq`; both load in vLLM, lmdeploy and transformers."
    )
    bits: int = Field(default=4, description="Bits per weight: gptq 2, 3, 4 or 8; awq 4.")
    group_size: int = Field(
        default=128,
        description="Weights sharing one scale; must divide every quantized layer's input size, or -1 for one "
        "group per output channel. Smaller groups: better quality, bigger files.",
    )
    desc_act: bool = Field(
        default=False, description="GPTQ act-order: slightly better quality, slower kernels on some engines."
    )
    backend: Literal["gptqmodel"] = Field(
        default="gptqmodel",
        description="`gptqmodel`, the maintained successor of AutoGPTQ (see README for why llmcompressor is not "
        "offered yet).",
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Calibration data.")
    gates: QuantizeGatesConfig = Field(default_factory=QuantizeGatesConfig, description="Quality gates.")

    @model_validator(mode="after")
    def _supported(self) -> QuantizeConfig:
        problems = []
        if self.bits not in BITS_BY_METHOD[self.method]:
            allowed = ", ".join(map(str, BITS_BY_METHOD[self.method]))
            problems.append(f"bits: {self.method} supports {allowed} bits, not {self.bits}; set `quantize.bits` "
                            f"to {BITS_BY_METHOD[self.method][-1] if self.method == 'awq' else 4}"
                            + (" or use `method: gptq` for other widths" if self.method == "awq" else ""))
        if self.group_size == 0 or self.group_size < -1:
            problems.append(f"group_size: {self.group_size} is not a group size; use a positive size such as 128, "
                            "or -1 for one group per output channel")
        if self.desc_act and self.method != "gptq":
            problems.append("desc_act: only GPTQ has act-order; remove it or use `method: gptq`")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def layer_input_sizes(model_config: dict) -> dict[str, int]:
    """Input sizes of the linear layers a decoder block quantizes (Llama/Qwen/Mistral-style config.json)."""
    hidden = model_config.get("hidden_size")
    sizes = {"hidden_size (q/k/v, gate/up projections)": hidden}
    heads, head_dim = model_config.get("num_attention_heads"), model_config.get("head_dim")
    if heads and (head_dim or hidden):
        sizes["attention output (o_proj)"] = heads * (head_dim or hidden // heads)
    if model_config.get("intermediate_size"):
        sizes["intermediate_size (down_proj)"] = model_config["intermediate_size"]
    return {k: v for k, v in sizes.items() if v}


def group_size_problem(model_config: dict, group_size: int) -> str | None:
    """Why `group_size` cannot quantize a model with this config.json, with the fix; None when it can."""
    if group_size == -1:
        return None
    sizes = layer_input_sizes(model_config)
    bad = {name: size for name, size in sizes.items() if size % group_size}
    if not bad:
        return None
    divisors = [g for g in (32, 64, 128) if all(v % g == 0 for v in sizes.values())]
    fix = (f"set `quantize.group_size` to {' or '.join(map(str, divisors))}" if divisors
           else "set `quantize.group_size: -1` (one group per output channel)")
    listed = ", ".join(f"{name} = {size}" for name, size in bad.items())
    return f"{group_size} does not divide the model's {listed}; {fix}"


# --- notify ----------------------------------------------------------------------------------------------------

SECRET_PATHS = (("notify", "slack", "webhook"), ("notify", "slack", "token"), ("notify", "discord", "webhook"))


class SlackConfig(Section):
    webhook: str | None = Field(
        default=None, description="Incoming webhook URL, e.g. `${SLACK_WEBHOOK_URL}`: one message per event."
    )
    token: str | None = Field(
        default=None,
        description="Bot token, e.g. `${SLACK_BOT_TOKEN}` (chat:write): one message per run, updated in place, "
        "stage events in its thread. Needs `channel`.",
    )
    channel: str | None = Field(default=None, description="Channel id or name for the bot token, e.g. `C0123ABCD`.")
    api_url: str = Field(
        default="https://slack.com/api",
        description="Slack Web API base URL; it receives the bot token, so it must be https on slack.com or a host "
        "the runner's SWIFTCI_SLACK_API_HOSTS allows (comma-separated, e.g. a company proxy; plain http only for a "
        "loopback host listed there).",
    )

    @model_validator(mode="after")
    def _api_url(self) -> SlackConfig:
        from urllib.parse import urlsplit

        url = urlsplit(self.api_url)
        host = (url.hostname or "").lower()
        allowed = {h.strip().lower() for h in os.environ.get("SWIFTCI_SLACK_API_HOSTS", "").split(",") if h.strip()}
        trusted = host == "slack.com" or host.endswith(".slack.com") or host in allowed
        loopback = host in ("127.0.0.1", "localhost", "::1")
        if not trusted or not (url.scheme == "https" or (url.scheme == "http" and loopback and host in allowed)):
            raise ValueError(f"api_url: {self.api_url!r} would receive the bot token; use https://slack.com/api, or "
                             "allow a proxy host in the runner's SWIFTCI_SLACK_API_HOSTS")
        return self

    @model_validator(mode="after")
    def _one_way(self) -> SlackConfig:
        # "" is a `${VAR}` whose secret is not set here (a fork's pull request gets none): it turns Slack off for the
        # run rather than failing it, so only missing or doubled ways are errors
        if (self.webhook is None and self.token is None) or (self.webhook and self.token):
            raise ValueError("webhook: set exactly one of `webhook` (incoming webhook) or `token` (bot token)")
        # checked even when the token is empty here, so that a run without secrets still catches a missing channel
        uses_token = bool(self.token) or (self.token is not None and self.webhook is None)
        if uses_token and not self.channel:
            raise ValueError("channel: a bot `token` needs a `channel` to post in, e.g. `C0123ABCD`")
        return self


class DiscordConfig(Section):
    webhook: str = Field(description="Discord webhook URL, e.g. `${DISCORD_WEBHOOK_URL}`.")


class BudgetConfig(Section):
    gpu_hours: float | None = Field(
        default=None, gt=0, description="Warn (start notification, with a mention, and the log) when a training's "
        "estimated GPU-hours — its estimated duration × GPUs, measured after the first steps — exceed this, e.g. "
        "40. Unset: no warning.",
    )


class NotifyConfig(Section):
    slack: SlackConfig | None = Field(default=None, description="Slack: an incoming webhook or a bot token.")
    discord: DiscordConfig | None = Field(default=None, description="Discord: a webhook.")
    mention: list[str] | None = Field(
        default=None,
        description="Who is pinged on failure, e.g. `[\"<@U012AB3CD>\"]` (Slack ids) or `[\"<@1234>\"]` "
        "(Discord). Unset: the config's `owner`.",
    )
    progress_every: float = Field(default=30, gt=0, description="Minutes between progress messages during training.")
    budget: BudgetConfig = Field(default_factory=BudgetConfig, description="Cost warnings.")
    events: list[Literal["start", "progress", "finish", "failure"]] = Field(
        default_factory=lambda: ["start", "progress", "finish", "failure"], description="Which events are sent."
    )


# --- chatops ---------------------------------------------------------------------------------------------------

_REPOSITORY = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
_INPUT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
# what a comment may never steer: where secrets come from, and the chat-ops rules themselves
_NEVER_SET = ("notify", "chatops", "output_dir")


def _settable(key: str) -> str:
    parts = tuple(key.split("."))
    if parts[0] in _NEVER_SET:
        raise ValueError(f"{key!r} cannot be allowed: a comment must not steer `{parts[0]}`")
    fields = _fields_at(Config, parts[:-1])
    if fields is None or parts[-1] not in fields:
        options = sorted(fields or Config.model_fields)
        raise ValueError(f"{key!r} is no config key; use a dotted key such as `train.learning_rate`"
                         f"{_suggest(parts[-1], options)}")
    if _fields_at(Config, parts) is not None:
        raise ValueError(f"{key!r} is a section; allow its keys one by one, e.g. `{key}.<key>`")
    return key


class ChatopsSlackConfig(Section):
    users: list[str] = Field(
        default_factory=list, description="Slack user ids that may run the command, e.g. `[U012AB3CD]`. Empty: nobody."
    )
    channels: list[str] = Field(
        default_factory=list, description="Channel ids it may be run in, e.g. `[C0123ABCD]`. Empty: none."
    )


class ChatopsDiscordConfig(Section):
    users: list[str] = Field(
        default_factory=list, description="Discord user ids that may run the command, e.g. `[\"80351110224678912\"]`. "
        "Empty: nobody.",
    )
    guilds: list[str] = Field(
        default_factory=list, description="Server (guild) ids it may be run in, e.g. `[\"41771983423143937\"]`. "
        "Empty: none (direct messages never).",
    )
    channels: list[str] = Field(
        default_factory=list, description="Channel ids it may be run in, e.g. `[\"41771983423143938\"]`. Empty: any "
        "channel of the allowed guilds.",
    )


class ChatopsBotConfig(Section):
    repository: str = Field(description="The repository whose workflow the bot dispatches, e.g. `acme/support-bot`.")
    workflow: str = Field(
        description="The workflow file (or id) to dispatch, e.g. `swiftci.yml`; it declares the inputs below under "
        "`on.workflow_dispatch.inputs`."
    )
    ref: str = Field(default="main", description="Branch the workflow runs on, e.g. `main`.")
    command: str = Field(default="finetune", description="The slash command's name, without `/`, e.g. `finetune`.")
    inputs: list[str] = Field(
        default_factory=lambda: ["model", "data"],
        description="Workflow inputs `/finetune key=value` may set, e.g. `[model, data, learning_rate]`; any other key "
        "is refused.",
    )
    required: list[str] = Field(
        default_factory=lambda: ["model", "data"], description="Inputs every command must give, e.g. `[model, data]`."
    )
    slack: ChatopsSlackConfig | None = Field(default=None, description="Slack slash commands. Unset: refused.")
    discord: ChatopsDiscordConfig | None = Field(default=None, description="Discord commands. Unset: refused.")

    @model_validator(mode="after")
    def _names(self) -> ChatopsBotConfig:
        problems = []
        if not _REPOSITORY.match(self.repository):
            problems.append(f"repository: {self.repository!r} is not OWNER/NAME, e.g. `acme/support-bot`")
        bad = [n for n in self.inputs if not _INPUT_NAME.match(n)]
        if bad:
            problems.append(f"inputs: {', '.join(map(repr, bad))}: input names are lowercase letters, digits, `_` "
                            "and `-`, e.g. `learning_rate`")
        missing = [n for n in self.required if n not in self.inputs]
        if missing:
            problems.append(f"required: {', '.join(missing)} not in `inputs`; add them there")
        if not re.fullmatch(r"[a-z0-9_-]{1,32}", self.command):
            problems.append(f"command: {self.command!r} is no slash command name; use e.g. `finetune`")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --- guard -------------------------------------------------------------------------------------------------------

_SIGNED_PCT = re.compile(r"^[+-]\d+(\.\d+)?%$")


def _signed_pct(text: str) -> str:
    if not _SIGNED_PCT.match(text):
        raise ValueError(f"{text!r} is not a signed percentage; write e.g. \"-10%\" (a fall beyond 10 % is flagged) "
                         "or \"+10%\" (a rise beyond 10 %)")
    return text


SignedPct = Annotated[str, AfterValidator(_signed_pct)]


class GuardConfig(Section):
    """The regression guard (`swiftci guard`, the sticky comment): this run against the last green run's reports."""

    tokens_per_second: SignedPct = Field(default="-10%", description="Training tokens/s: a fall beyond this is "
                                         "flagged ⚠️, e.g. `-10%`.")
    peak_memory: SignedPct = Field(default="+10%", description="Training peak memory: a rise beyond this is flagged.")
    final_loss: SignedPct = Field(default="+10%", description="The last logged training loss: a rise beyond this "
                                  "is flagged.")
    eval_metric: SignedPct = Field(default="-5%", description="Each eval metric: a change against its direction "
                                   "beyond this is flagged (a fall, or a rise for lower-is-better metrics).")
    fail: bool = Field(default=False, description="Exit 1 (`swiftci guard`) when anything is flagged; else the "
                       "flags only warn.")


class ReproduceConfig(Section):
    """`swiftci train --like RUN.json`: compare with an earlier run's record before anything loads."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: Annotated[Path, _existing("any")] = Field(
        alias="from", description="An earlier run's run.json (or the output folder that holds train/run.json), e.g. "
        "`runs/last-green/train/run.json`.")
    strict: bool = Field(default=False, description="Exit 2 listing every difference (environment, config, data, "
                         "model) before anything loads; else one warning per difference, recorded in run.json.")


class ChatopsConfig(Section):
    allow_set: list[Annotated[str, AfterValidator(_settable)]] = Field(
        default_factory=list,
        description="Config keys a `/swiftci run --set key=value` comment may override, e.g. "
        "`[train.learning_rate, train.epochs]`. Empty: no `--set` at all.",
    )
    bot: ChatopsBotConfig | None = Field(
        default=None, description="`swiftci bot`: which workflow a Slack or Discord `/finetune` dispatches, and who "
        "may. Unset: the bot refuses to start.",
    )


# --- deploy ----------------------------------------------------------------------------------------------------

_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$")


class SmokePromptConfig(Section):
    prompt: str = Field(min_length=1, description="A user message sent to /v1/chat/completions, e.g. `reverse: abcd`.")
    image: ExistingFile | None = Field(
        default=None, description="An image sent with the prompt (vision-language models), as an OpenAI `image_url` "
        "content part holding the file as a data: URL, e.g. `data/images/0900.png`. Unset: text only.")

    @field_validator("image")
    @classmethod
    def _absolute(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """Made absolute here (relative to the config's folder): the smoke test reads it wherever it runs from."""
        base = (info.context or {}).get("base_dir")
        return value if value is None or value.is_absolute() or base is None else Path(base) / value
    expect: list[str] = Field(
        default_factory=list, description="Substrings the answer must contain, e.g. `[dcba]`. Empty: any answer."
    )


class SmokeConfig(Section):
    prompts: list[SmokePromptConfig] = Field(
        default_factory=list, description="Prompts the new deployment must answer; empty: only the health check."
    )
    latency_budget_ms: int = Field(default=10000, gt=0, description="Each answer must arrive within this, e.g. 2000.")
    max_tokens: int = Field(default=64, gt=0, description="max_tokens of each smoke request.")
    url: str | None = Field(
        default=None,
        description="OpenAI-compatible base URL that reaches the NEW pods from the runner, e.g. an ingress "
        "`https://bot-canary.internal/v1`. Unset: a port-forward to a new pod through the Kubernetes API.",
    )


class CanaryConfig(Section):
    replicas: int | None = Field(default=None, gt=0, description="Canary pods, e.g. 1.")
    percent: float | None = Field(
        default=None, gt=0, lt=100, description="Canary share of the replicas, e.g. 10 (rounded up to a pod)."
    )
    evaluate: bool = Field(
        default=False,
        description="Also score the evaluate gates through the canary's endpoint (lm-eval local-chat-completions) "
        "before promoting; the offline eval report is the baseline.",
    )
    tasks: list[str] | None = Field(
        default=None,
        description="The evaluate tasks scored through the canary, e.g. `[support_faq]`: generation tasks only (a "
        "chat endpoint gives no log-likelihoods). Unset: every evaluate task.",
    )


class DeployTimeouts(Section):
    rollout_seconds: int = Field(default=1800, gt=0, description="Fail (and roll back) when the rollout takes longer.")
    startup_seconds: int = Field(
        default=1800, gt=0, description="How long a pod may take to load its model before it counts as failed."
    )
    smoke_seconds: int = Field(default=300, gt=0, description="Total time for the smoke prompts.")


class LocalServeConfig(Section):
    host: str = Field(default="127.0.0.1", description="Address `transformers serve` listens on.")
    port: int = Field(default=0, ge=0, le=65535, description="Port; 0 picks a free one.")
    device: str = Field(
        default="auto", min_length=1,
        description="`--device` of `transformers serve`, e.g. `cpu` or `cuda:0`; `auto`: a GPU when there is one.",
    )


class DeployConfig(Section):
    target: Literal["kubernetes", "local"] = Field(
        default="kubernetes",
        description="`kubernetes` (image + rollout) or `local` (serve here with transformers, smoke-test, stop).",
    )
    engine: Literal["lmdeploy", "vllm", "transformers"] = Field(
        default="lmdeploy", description="Serving engine in the image: `lmdeploy`, `vllm`, or `transformers` (CPU)."
    )
    engine_image: str | None = Field(
        default=None,
        description="The untouched engine image the model is layered on, pinned by tag or digest, e.g. "
        "`openmmlab/lmdeploy:v0.10.2-cu12`. Required for kubernetes.",
    )
    image: str | None = Field(
        default=None,
        description="Repository to push to, e.g. `ghcr.io/acme/support-bot`; tags are the run id and the git sha, "
        "Kubernetes gets the digest. Required for kubernetes.",
    )
    builder: Literal["auto", "docker", "buildah"] = Field(
        default="auto", description="`auto`: docker when its daemon answers, else buildah."
    )
    insecure_registry: bool = Field(
        default=False, description="Push and pull over plain HTTP (a registry on localhost or in a lab)."
    )
    model: Literal["auto", "quantized", "merged"] = Field(
        default="auto",
        description="What ships: `quantized` (the quantize stage's model, which must have passed its gates), "
        "`merged` (the train stage's full or merged model); `auto`: quantized when the config has a quantize "
        "section, else merged.",
    )
    context: str | None = Field(default=None, description="kubeconfig context, e.g. `prod`. Unset: the current one.")
    namespace: str = Field(default="default", description="Kubernetes namespace, e.g. `llm`.")
    name: str | None = Field(default=None, description="Deployment and Service name. Unset: the config's `name`.")
    replicas: int = Field(default=1, gt=0, description="Pods; more than 1 also gets a PodDisruptionBudget.")
    gpus: int = Field(default=1, ge=0, description="nvidia.com/gpu per pod; 0 for the CPU engine.")
    resources: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Container requests/limits, e.g. `{requests: {cpu: \"4\", memory: 32Gi}}` (GPUs come from `gpus`).",
    )
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector, e.g. `{gpu: a100}`.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Pod tolerations.")
    port: int = Field(default=8000, gt=0, le=65535, description="Port of the OpenAI-compatible API.")
    shm_size: str = Field(
        default="2Gi", description="Size of /dev/shm (engines use it between workers), e.g. `16Gi` for vLLM with "
        "tensor parallelism."
    )
    strategy: Literal["rolling", "canary"] = Field(
        default="rolling",
        description="`rolling`: replace pods, roll back on failure; `canary`: a `<name>-canary` Deployment behind "
        "the same Service takes its share, is smoke-tested, then promoted or removed.",
    )
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary size and checks.")
    smoke: SmokeConfig = Field(default_factory=SmokeConfig, description="The smoke test of a new deployment.")
    timeouts: DeployTimeouts = Field(default_factory=DeployTimeouts, description="Time limits.")
    kubernetes_version: str = Field(
        default="1.33", pattern=r"^1\.\d+$", description="Kubernetes version whose schemas validate the manifests."
    )
    local: LocalServeConfig = Field(default_factory=LocalServeConfig, description="target: local settings.")

    @model_validator(mode="after")
    def _complete(self) -> DeployConfig:
        problems = []
        if self.target == "kubernetes":
            if not self.image:
                problems.append("image: required for target kubernetes, e.g. `ghcr.io/acme/support-bot`")
            if not self.engine_image:
                problems.append("engine_image: required for target kubernetes, pinned, e.g. "
                                "`openmmlab/lmdeploy:v0.10.2-cu12`")
        if self.engine_image:
            ref = self.engine_image
            pinned = "@sha256:" in ref or (":" in ref.rsplit("/", 1)[-1] and not ref.endswith(":latest"))
            if not pinned:
                problems.append(f"engine_image: {ref!r} is not pinned; add a version tag or @sha256 digest "
                                "(a moving tag would change what is served without a commit)")
        if self.image and ("@" in self.image or ":" in self.image.rsplit("/", 1)[-1]):
            problems.append("image: give the repository only (tags are the run id and git sha), e.g. "
                            "`ghcr.io/acme/support-bot`")
        if self.name is not None and not _DNS_LABEL.match(self.name):
            problems.append(f"name: {self.name!r} is not a Kubernetes name; use lowercase letters, digits and dashes")
        if self.strategy == "canary" and (self.canary.replicas is None) == (self.canary.percent is None):
            problems.append("canary: set exactly one of `canary.replicas` or `canary.percent` for strategy canary")
        if self.engine in ("lmdeploy", "vllm") and self.gpus == 0 and self.target == "kubernetes":
            problems.append(f"gpus: {self.engine} needs a GPU per pod; set `gpus: 1` or `engine: transformers`")
        if self.canary.evaluate and not self.smoke.url:
            problems.append("canary: `canary.evaluate` scores the gates through the canary's endpoint, so it needs "
                            "`smoke.url` (an address that reaches the canary pods)")
        if problems:
            raise ValueError("\n".join(problems))
        return self


# --- the whole file --------------------------------------------------------------------------------------------


class Config(Section):
    name: Annotated[str, AfterValidator(_run_name)] = Field(
        description="Run name, e.g. `support-bot`; run ids are `<name>-<method>-<yyyymmdd>-<short sha>`.",
    )
    owner: str | None = Field(default=None, description="Who is mentioned on failures, e.g. `@alice`.")
    output_dir: Path = Field(
        default=Path("out"), description="Where stages write their outputs (`<output_dir>/<stage>/`)."
    )
    model: ModelConfig = Field(description="The base model.")
    data: DataConfig | None = Field(default=None, description="Training data. Required with a `train` section.")
    train: TrainConfig | None = Field(default=None, description="Fine-tuning. Unset: the pipeline has no train stage.")
    evaluate: EvaluateConfig | None = Field(
        default=None, description="lm-eval evaluation and quality gates. Unset: no evaluate stage."
    )
    quantize: QuantizeConfig | None = Field(
        default=None, description="GPTQ/AWQ quantization with a quality gate. Unset: no quantize stage."
    )
    deploy: DeployConfig | None = Field(
        default=None, description="Serving image and rollout (Kubernetes) or a local smoke-served run. Unset: none."
    )
    notify: NotifyConfig | None = Field(
        default=None, description="Slack/Discord notifications. Unset: none."
    )
    guard: GuardConfig | None = Field(
        default=None, description="Regression guard against the last green run on the default branch "
        "(`swiftci guard --against DIR`, the sticky comment). Unset: the defaults, warnings only.",
    )
    reproduce: ReproduceConfig | None = Field(
        default=None, description="Reproduce an earlier run: compare this run's environment, config, data and model "
        "hashes with its run.json before anything loads (`swiftci train --like`). Unset: no comparison.",
    )
    chatops: ChatopsConfig | None = Field(
        default=None, description="Chat-ops: pull-request comment commands and the Slack/Discord bot (README, "
        "\"Chat-ops\"). Unset: comments run nothing and the bot refuses to start.",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default=DEFAULT_CONFIG)
    _env_values: list[str] = PrivateAttr(default_factory=list)
    _warnings: list[str] = PrivateAttr(default_factory=list)
    _model_files: Any = PrivateAttr(default=None)  # hub.ModelFiles once the base model's bytes were checked
    _overrides: tuple[str, ...] = PrivateAttr(default=())

    def _method_fits_data(self) -> None:
        method, fmt = self.train.method, self.data.format
        if method == "sft" and fmt == "preference":
            raise ValueError("train.method: preference rows need a preference method (`dpo`, `kto`, `orpo` or "
                             "`simpo`), or give sft `messages`/alpaca rows")
        if method != "sft" and fmt in ("messages", "alpaca"):
            raise ValueError(f"data.format: {method} trains on preference rows ({{prompt, chosen, rejected}} or "
                             f"{{prompt, completion, label}}), not {fmt}; set `format: preference` (or `auto`)")
        if method == "kto" and self.train.batch_size < 2:
            raise ValueError("train.batch_size: kto compares the examples of a batch, so it needs at least 2")
        then = self.train.then
        if then is not None and then.data.format in ("messages", "alpaca"):
            raise ValueError(f"train.then.data.format: {then.method} trains on preference rows, not {then.data.format}")
        if then is not None and then.method == "kto" and (then.batch_size or self.train.batch_size) < 2:
            raise ValueError("train.then.batch_size: kto compares the examples of a batch, so it needs at least 2")

    @model_validator(mode="after")
    def _sections_fit(self, info: ValidationInfo) -> Config:
        if self.train is not None and self.data is None:
            raise ValueError("data: a `train` section needs a `data` section with at least `train:`")
        if self.train is not None:
            self._method_fits_data()
        base = (info.context or {}).get("base_dir")
        ev = self.evaluate
        if ev is not None:
            local = local_task_metrics(Path(base) / ev.task_dir) if ev.task_dir and base else {}
            problems = []
            for i, gate in enumerate(ev.gates):
                where = f"evaluate.gates[{i}].metric"
                close = closest(gate.task, ev.tasks) if gate.task not in ev.tasks else None
                if close and gate.task in local and close not in local:  # the task list holds the typo
                    problems.append(f"evaluate.tasks[{ev.tasks.index(close)}]: '{close}' is no task in "
                                    f"{ev.task_dir}/, but {where} names '{gate.task}', which is — did you mean "
                                    f"'{gate.task}'?")
                elif gate.task not in ev.tasks:
                    problems.append(f"{where}: task '{gate.task}' is not in evaluate.tasks "
                                    f"({', '.join(ev.tasks)}){_suggest(gate.task, ev.tasks)}")
                elif local.get(gate.task) and gate.metric_name.split(",")[0] not in local[gate.task]:
                    problems.append(f"{where}: task '{gate.task}' produces {', '.join(local[gate.task])}, "
                                    f"not '{gate.metric_name}'{_suggest(gate.metric_name, local[gate.task])}")
                if gate.max_drop is not None and ev.baseline == "none":
                    problems.append(f"evaluate.gates[{i}].max_drop: needs a baseline, but evaluate.baseline is "
                                    "`none`; set it to `base` or an earlier eval_report.json, or use `min`")
            if problems:
                raise ValueError("\n".join(problems))
        if self.quantize is not None and base is not None:
            self._check_quantize_fits(Path(base))
        dep = self.deploy
        if dep is not None and dep.canary.evaluate:
            if self.evaluate is None:
                raise ValueError("deploy.canary.evaluate: needs an `evaluate` section whose gates it re-scores")
            unknown = [t for t in (dep.canary.tasks or []) if t not in self.evaluate.tasks]
            if unknown:
                raise ValueError(f"deploy.canary.tasks: {', '.join(unknown)} not in evaluate.tasks")
            if not self.evaluate.apply_chat_template:
                raise ValueError("deploy.canary.evaluate: a chat endpoint applies the server's chat template, so it "
                                 "cannot score prompts the way `evaluate.apply_chat_template: false` does offline; "
                                 "set that to true, or turn canary.evaluate off")
        return self

    def _check_quantize_fits(self, base: Path) -> None:
        """For a local base model, an impossible group size is caught here, before any GPU time is spent."""
        local = base / Path(self.model.id).expanduser()
        if not (local / "config.json").is_file():
            return  # a hub model: checked by `swiftci quantize` before it loads anything
        problem = group_size_problem(json.loads((local / "config.json").read_text()), self.quantize.group_size)
        if problem:
            raise ValueError(f"quantize.group_size: {problem}")

    # Helpers for stage code -----------------------------------------------------------------------------------

    def resolve(self, path: Path | str) -> Path:
        """A config path made absolute against the config file's folder."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.output_path / stage

    @property
    def model_local_path(self) -> Path | None:
        """The base model's folder when `model.id` is local, or once a hub id's files were downloaded and checked
        (swiftci.hub.prepare), else None."""
        files = self._model_files
        if files is not None and files.id == self.model.id:  # a chained step's copy has another model.id
            return files.path
        return self.resolve(self.model.id) if self.model_is_local else None

    @property
    def model_is_local(self) -> bool:
        """`model.id` names a local folder, not a hub id."""
        return self.model.id.startswith((".", "/", "~")) or self.resolve(self.model.id).is_dir()

    @property
    def source(self) -> str:
        return self._source

    @property
    def overrides(self) -> tuple[str, ...]:
        """The `--set KEY=VALUE` overrides it was loaded with (a relaunched process loads it the same way)."""
        return self._overrides

    @property
    def env_values(self) -> list[str]:
        """Values that came from `${VAR}` references: treated as secrets wherever swiftci writes or sends text."""
        return list(self._env_values)

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    def fingerprint(self) -> str:
        """sha256 of the validated config with defaults filled in, paths as written (`reproduce`, which only says
        what to compare with, left out)."""
        data = self.model_dump(mode="json", exclude={"reproduce"})
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# --- loading ---------------------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.S)


class _Located:
    """Where each key of the YAML document sits: path tuple -> 1-based line."""

    def __init__(self) -> None:
        self.lines: dict[tuple, int] = {}

    def line_of(self, path: tuple) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)


def _walk_nodes(node: yaml.Node, path: tuple, where: _Located, problems: list[tuple[tuple, str]]) -> None:
    where.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                where.lines[path + (key,)] = key_node.start_mark.line + 1
                problems.append((path + (key,), f"duplicate key '{key}' (an earlier one would be silently ignored)"))
            seen.add(key)
            where.lines[path + (key,)] = key_node.start_mark.line + 1
            _walk_nodes(value_node, path + (key,), where, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            where.lines[path + (i,)] = item.start_mark.line + 1
            _walk_nodes(item, path + (i,), where, problems)


def _expand_env(value: Any, path: tuple, problems: list[tuple[tuple, str]], secrets: list[str],
                expanded: set[tuple] | None = None) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, path + (k,), problems, secrets, expanded) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, path + (i,), problems, secrets, expanded) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    if expanded is not None and _ENV_REF.search(value) and not value.startswith("$${"):
        expanded.add(path)

    def repl(m: re.Match) -> str:
        if m.group(1):  # $${...} is a literal ${...}
            return "${" + m.group(2) + "}"
        ref = _ENV_NAME.match(m.group(2))
        if not ref:
            problems.append((path, f"bad environment reference ${{{m.group(2)}}}; write ${{NAME}} or ${{NAME:-default}}"))
            return ""
        name, default = ref.group(1), ref.group(2)
        if name in os.environ:
            if os.environ[name]:
                secrets.append(os.environ[name])
            return os.environ[name]
        if default is not None:
            return default
        problems.append((path, f"environment variable {name} is not set; export it or write ${{{name}:-default}}"))
        return ""

    return _ENV_REF.sub(repl, value)


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """`--set train.learning_rate=2e-5` -> [("train.learning_rate", "2e-5")]; values are parsed as YAML."""
    parsed = []
    bad = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*$", key.strip()):
            bad.append(f"--set {item}: expected KEY=VALUE with a dotted key, e.g. --set train.learning_rate=2e-5")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    if bad:
        raise ConfigError(bad)
    return parsed


def _fields_at(model: type[BaseModel], path: tuple) -> dict | None:
    """The fields of the section model found at `path`, or None."""
    cur: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)) or part not in cur.model_fields:
            return None
        cur = _section_type(cur.model_fields[part].annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return cur.model_fields
    return None


def _section_type(annotation: Any) -> Any:
    """The BaseModel inside `X | None` or `list[X]`, else the annotation itself."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _section_type(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def _display_path(raw: Any, loc: tuple) -> tuple:
    """Drop pydantic's union-member tags from a location, keeping the parts that exist in the document."""
    out: list = []
    cur = raw
    for i, part in enumerate(loc):
        if isinstance(cur, dict) and part in cur:
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, list) and isinstance(part, int) and 0 <= part < len(cur):
            out.append(part)
            cur = cur[part]
        elif isinstance(cur, dict) and i == len(loc) - 1 and isinstance(part, str):
            out.append(part)  # a missing key
        elif isinstance(cur, dict) and isinstance(part, str) and part not in ("function-after", "function-before"):
            # a missing section with errors below it (e.g. a required key inside an absent mapping)
            if not any(c in part for c in "[]-"):
                out.append(part)
                cur = {}
    return tuple(out)


def _dotted(path: tuple) -> str:
    s = ""
    for part in path:
        s += f"[{part}]" if isinstance(part, int) else (f".{part}" if s else str(part))
    return s or "(top level)"


def _suggest(word: str, options: list[str]) -> str:
    close = closest(word, options)
    return f" — did you mean '{close}'?" if close else ""


def _message(err: dict, path: tuple, root: type[BaseModel]) -> str:
    kind = err["type"]
    given = err.get("input")
    if kind == "extra_forbidden":
        fields = _fields_at(root, path[:-1]) or {}
        message = f"unknown key '{path[-1]}'" + (_suggest(path[-1], list(fields)) or f"; known keys: {', '.join(fields)}")
        if given is None:  # `{metric: task/m,filter, min: 1}` reads as a key `filter` with no value
            message += ("; if it is the rest of a value that holds a comma or a colon, quote the value, e.g. "
                        "`metric: \"gsm8k/exact_match,strict-match\"`")
        return message
    if kind == "missing":
        return "is required"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", err.get("ctx", {}).get("expected", ""))
        listed = ", ".join(f"'{o}'" for o in options)
        return f"must be one of {listed} (got {given!r})" + _suggest(given, options)
    msg = err["msg"]
    msg = re.sub(r"^Value error, ", "", msg)
    msg = re.sub(r"^Input should be ", "must be ", msg)
    msg = msg.replace("Input should be ", "must be ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind in ("greater_than", "greater_than_equal",
                                                                       "less_than", "less_than_equal",
                                                                       "string_pattern_mismatch"):
        if not isinstance(given, (dict, list)):
            msg += f" (got {given!r})"
    return msg


_RELATIVE_PATH = re.compile(r"^([a-z_]\w*(?:\.[a-z_]\w*|\[\d+\])*): (.*)$", re.S)


def _split_model_errors(err: dict) -> list[tuple[tuple, dict]]:
    """Model-level validators report lines of `relative.path[0].key: message`; give each its own location."""
    loc = tuple(err["loc"])
    if err["type"] != "value_error":
        return [(loc, err)]
    text = re.sub(r"^Value error, ", "", err["msg"])
    out = []
    for line in text.split("\n"):
        m = _RELATIVE_PATH.match(line)
        if not m:
            out.append((loc, {**err, "msg": line}))
            continue
        rel: list = []
        for part in re.findall(r"[a-z_]\w*|\[\d+\]", m.group(1)):
            rel.append(int(part[1:-1]) if part.startswith("[") else part)
        out.append((loc + tuple(rel), {**err, "msg": m.group(2)}))
    return out


def load(path: str | Path = DEFAULT_CONFIG, overrides: list[str] | tuple[str, ...] = (), *,
         check_files: bool = True) -> Config:
    """Read, expand, override and validate a config file; raise ConfigError listing every problem."""
    path = Path(path)
    label = str(path)
    raw, where, problems = _read_yaml(path, label)
    # --set values go through the same ${VAR} expansion and literal-secret check as the file's own values
    from_cli: set[tuple] = set()
    for key, value in parse_overrides(overrides):
        _set_path(raw, key, value)
        from_cli.add(tuple(key.split(".")))
    secrets: list[str] = []
    expanded: set[tuple] = set()
    raw = _expand_env(raw, (), problems, secrets, expanded)
    problems += _literal_secrets(raw, expanded)

    def located(p: tuple, message: str) -> str:
        for cli_path in from_cli:
            if p[: len(cli_path)] == cli_path:
                return f"--set {_dotted(p)}: {message}"
        line = where.line_of(p)
        return f"{label}:{line or 1}: {_dotted(p)}: {message}"

    messages = [located(p, m) for p, m in problems]
    context = {"base_dir": path.resolve().parent} if check_files else None
    cfg = None
    try:
        cfg = Config.model_validate(raw, context=context)
    except ValidationError as e:
        messages += [located(p, " or ".join(msgs)) for p, msgs in _validation_messages(e, raw).items()]
    if messages:
        raise ConfigError(messages)
    assert cfg is not None
    cfg._base_dir = path.resolve().parent
    cfg._source = label
    cfg._env_values = secrets
    cfg._overrides = tuple(overrides)
    if cfg.model_local_path is None and cfg.model.revision is None:
        cfg._warnings.append(
            f"{label}:{where.line_of(('model', 'id'))}: model.revision: not set, so the hub's default branch is "
            "used and may change; pin a commit sha for reproducible runs"
        )
    return cfg


def load_section(path: str | Path, name: str) -> Any:
    """One top-level section of the file, validated alone, or None when the file has none. For readers that have
    neither the other sections' secrets nor their files: `swiftci bot` and chat-ops' `decide` read only `chatops`."""
    path = Path(path)
    label = str(path)
    raw, where, problems = _read_yaml(path, label)
    messages = [f"{label}:{where.line_of(p) or 1}: {_dotted(p)}: {m}" for p, m in problems if p[:1] == (name,)]
    if raw.get(name) is None:
        if messages:
            raise ConfigError(messages)
        return None
    env_problems: list[tuple[tuple, str]] = []
    value = _expand_env(raw[name], (name,), env_problems, [])
    messages += [f"{label}:{where.line_of(p) or 1}: {_dotted(p)}: {m}" for p, m in env_problems]
    section = None
    try:
        section = _section_type(Config.model_fields[name].annotation).model_validate(value)
    except ValidationError as e:
        for p, msgs in _validation_messages(e, {name: value}, prefix=(name,)).items():
            messages.append(f"{label}:{where.line_of(p) or 1}: {_dotted(p)}: {' or '.join(msgs)}")
    if messages:
        raise ConfigError(messages)
    return section


def _read_yaml(path: Path, label: str) -> tuple[dict, _Located, list[tuple[tuple, str]]]:
    """The document, where each key sits, and the problems found while reading it (duplicate keys)."""
    if not path.is_file():
        raise ConfigError([f"{label}: config file not found; pass -c PATH or create {DEFAULT_CONFIG}"
                           " (see examples/tiny/swiftci.yaml)"])
    text = path.read_text(encoding="utf-8")
    where = _Located()
    problems: list[tuple[tuple, str]] = []
    try:
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            raw = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([f"{label}:{line}: YAML syntax error: {e.problem or e}"
                           + (f" ({e.context})" if e.context else "")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{label}: YAML error: {e}"]) from None
    if raw is None:
        raise ConfigError([f"{label}:1: the config is empty; start from examples/tiny/swiftci.yaml"])
    if not isinstance(raw, dict):
        raise ConfigError([f"{label}:1: the config must be a mapping of sections (name, model, data, train, …)"])
    _walk_nodes(node, (), where, problems)
    return raw, where, problems


def _literal_secrets(raw: dict, expanded: set[tuple]) -> list[tuple[tuple, str]]:
    """A token written into swiftci.yaml ends up in git history: secrets must be `${VAR}` references."""
    problems = []
    for secret_path in SECRET_PATHS:
        cur: Any = raw
        for part in secret_path:
            cur = cur.get(part) if isinstance(cur, dict) else None
        if isinstance(cur, str) and secret_path not in expanded:
            name = "_".join(secret_path[1:]).upper()
            if cur:
                problems.append((secret_path, f"write a reference such as ${{{name}}} and keep the value in a secret; "
                                              "a literal value here would be committed to git"))
            else:  # only a `${VAR}` that expands to nothing turns a channel off; a literal "" is a mistake
                problems.append((secret_path, f"empty; write a reference such as ${{{name}}}, or remove "
                                              f"notify.{secret_path[1]} to send nothing there"))
    return problems


def _validation_messages(e: ValidationError, raw: dict, prefix: tuple = ()) -> dict[tuple, list[str]]:
    """pydantic's errors as messages, grouped by the document path they belong to (`prefix`: where the validated
    model sits in the document, for a section validated alone)."""
    by_path: dict[tuple, list[str]] = {}
    for err in e.errors():
        for loc, err in _split_model_errors(err):
            shown = _display_path(raw, prefix + tuple(loc))
            msg = _message(err, shown, Config)
            by_path.setdefault(shown, [])
            if msg not in by_path[shown]:
                by_path[shown].append(msg)
    return by_path


def json_schema() -> dict:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "swiftci.yaml"
    return schema


# --- the reference, for people ----------------------------------------------------------------------------------


def reference_markdown() -> str:
    """Every key of swiftci.yaml as a Markdown table — key, type, default, description — read from the models above
    (the only home of defaults): `swiftci schema --format md`, and README's configuration reference."""
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in _fields_under(Config, ""):
        lines.append(f"| `{key}` | {_md_cell(_type_name(field.annotation))} | {_md_cell(_default_text(field))} | "
                     f"{_md_cell(field.description or '')} |")
    return "\n".join(lines) + "\n"


def _fields_under(model: type[BaseModel], prefix: str):
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        yield key, field
        for inner, suffix in _sections_in(field.annotation):
            yield from _fields_under(inner, f"{key}{suffix}.")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _sections_in(annotation: Any) -> list[tuple[type[BaseModel], str]]:
    """The config models inside a field's type: `X` and `X | None` (keys `a.b`), `list[X]` (keys `a[].b`)."""
    if _is_section(annotation):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list:
        return [(args[0], "[]")] if args and _is_section(args[0]) else []
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in _sections_in(arg)]
    return []


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if _is_section(tp):
        return "section"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"map of {_type_name(args[1])}" if len(args) == 2 else "map"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", Any: "any"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "(section)" if isinstance(value, BaseModel) else f"`{json.dumps(value, default=str)}`"
    if field.default is None:
        return "unset"
    value = field.default.value if hasattr(field.default, "value") else field.default
    return f"`{json.dumps(value, default=str)}`"


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|").replace("\\\\|", "\\|")
