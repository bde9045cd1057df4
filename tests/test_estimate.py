"""The memory estimate (`swiftci estimate`, train's pre-flight): parameter counts equal to the real models', LoRA's
trainable parameters equal to peft's, the estimate against torch's measured peak on the tiny model, the properties
any correct estimate has (sharding halves, checkpointing lowers, qlora < lora < full), and the command's table,
JSON, verdicts, fixes and exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess

import pytest
import yaml
from conftest import ROOT, SWIFTCI, swiftci_in_process, tiny_config, write_config

from swiftci import estimate
from swiftci.errors import EXIT_USAGE, UsageError

GIB = 2**30
TIED = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 300, "tie_word_embeddings": True}
GQA_BIAS = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 257, "tie_word_embeddings": False}
# a 7B-class shape (Qwen2.5-7B's config.json sizes), built on the meta device only: no weights anywhere
SEVEN_B = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False}


def _bench():
    spec = importlib.util.spec_from_file_location("estimate_accuracy", ROOT / "bench/estimate_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _real_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in config.items() if k != "model_type"}
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **fields))


def _setup(**changes) -> estimate.Setup:
    base = dict(tuner="lora", precision="bf16", batch_size=4, gradient_accumulation=1, rows_per_example=1,
                max_length=2048, gradient_checkpointing=False, lora_rank=16, lora_targets="all-linear",
                double_quant=True)
    return estimate.Setup(**{**base, **changes})


@pytest.fixture(scope="module")
def seven_b() -> estimate.ModelShape:
    return estimate.model_shape(SEVEN_B)


# --- parameters ------------------------------------------------------------------------------------------------


def test_parameter_count_of_the_tiny_model_is_its_real_count_by_layer_type(tiny_model):
    from transformers import AutoModelForCausalLM

    shape = estimate.model_shape(json.loads((tiny_model / "config.json").read_text()))
    real = AutoModelForCausalLM.from_pretrained(tiny_model)
    params = dict(real.named_parameters())
    assert shape.total == sum(p.numel() for p in real.parameters())
    assert shape.embeddings == params["model.embed_tokens.weight"].numel()
    assert shape.lm_head == params["lm_head.weight"].numel() and not shape.tied
    assert shape.attention == sum(p.numel() for n, p in params.items() if ".self_attn." in n)
    assert shape.mlp == sum(p.numel() for n, p in params.items() if ".mlp." in n)
    assert shape.norms == sum(p.numel() for n, p in params.items() if "norm" in n)


@pytest.mark.parametrize("config", [TIED, GQA_BIAS], ids=["tied-embeddings", "gqa-with-qkv-bias"])
def test_parameter_count_equals_the_real_model_built_from_the_same_config(config):
    shape = estimate.model_shape(config)
    real = _real_model(config)
    assert shape.total == sum(p.numel() for p in real.parameters())  # each tied tensor once
    assert shape.tied == config["tie_word_embeddings"]
    assert (shape.lm_head == 0) == config["tie_word_embeddings"]


@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj"), r".*\.mlp\.(up|down)_proj"],
                         ids=["all-linear", "names", "regex"])
def test_lora_trainable_parameters_equal_peft_s(tiny_model, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    shape = estimate.model_shape(json.loads((tiny_model / "config.json").read_text()))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(
        r=8, target_modules=targets if isinstance(targets, str) else list(targets), task_type="CAUSAL_LM"))
    trainable, everything = model.get_nb_trainable_parameters()
    assert estimate.lora_parameters(shape, 8, targets) == trainable
    assert shape.total + trainable == everything


def test_seven_b_shape_is_counted_from_its_config_alone(seven_b):
    """Qwen2.5-7B: 7,615,616,512 parameters and 40,370,176 LoRA r=16 all-linear ones (what transformers and peft
    report for the real model)."""
    assert seven_b.total == 7_615_616_512
    assert estimate.lora_parameters(seven_b, 16, "all-linear") == 40_370_176


# --- against measured memory (CPU, fp32: torch's MemTracker) -----------------------------------------------------


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_estimate_against_the_measured_peak_of_the_tiny_model(tiny_model, tuner):
    """The weights and optimizer states are exact; activations are a model of what autograd keeps, so only their
    direction is asserted (checkpointing lowers them, measured and estimated). The ratios are printed: on this
    machine (torch 2.13, transformers 5.24) 0.94-1.08, see bench/estimate_accuracy.py."""
    bench = _bench()
    ratios, measured, estimated = {}, {}, {}
    for ckpt in (False, True):
        measured[ckpt] = bench.measure(tiny_model, tuner, 16, 64, ckpt, steps=2)
        estimated[ckpt] = bench.estimated(tiny_model, tuner, 16, 64, ckpt)
        ratios[ckpt] = round(estimated[ckpt]["tensors_bytes"] / measured[ckpt]["tensors_bytes"], 3)
    print(f"\n{tuner}: estimate / measured peak: checkpointing off {ratios[False]}, on {ratios[True]}")
    kinds = measured[False]["by_kind"]
    assert estimated[False]["weights"] == kinds["Parameter"]  # fp32 base (+ fp32 adapters): every byte
    param_tensors = sum(1 for _ in _real_model_params(tiny_model, tuner))
    # AdamW's two moments per trainable parameter, plus one 4-byte step counter per parameter tensor
    assert estimated[False]["optimizer"] <= kinds["Optstate"] <= estimated[False]["optimizer"] + 4 * param_tensors
    assert measured[True]["by_kind"]["Activation"] < kinds["Activation"]
    assert estimated[True]["activations"] < estimated[False]["activations"]


def _real_model_params(tiny_model, tuner):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    return [p for p in model.parameters() if p.requires_grad]


# --- properties any correct estimate has ------------------------------------------------------------------------


def test_qlora_below_lora_below_full(seven_b):
    totals = {t: estimate.estimate(seven_b, _setup(tuner=t)).total for t in ("qlora", "lora", "full")}
    assert totals["qlora"] < totals["lora"] < totals["full"]
    lora, qlora = (estimate.estimate(seven_b, _setup(tuner=t)) for t in ("lora", "qlora"))
    assert lora.weights == (seven_b.total + lora.trainable) * 2  # bf16 base, and the adapters' 16-bit copies
    # 4-bit Linear layers (4.127 bits with double quantization); embeddings, lm_head and norms in fp32 (peft)
    frozen = round(seven_b.quantizable * 4.127 / 8) + (seven_b.total - seven_b.quantizable) * 4
    assert qlora.weights == frozen + qlora.trainable * 2
    assert qlora.gradients == lora.gradients and qlora.optimizer == lora.optimizer  # same adapters
    without_double_quant = estimate.estimate(seven_b, _setup(tuner="qlora", double_quant=False))
    assert qlora.weights < without_double_quant.weights


def test_checkpointing_lowers_activations_and_nothing_else(seven_b):
    off, on = (estimate.estimate(seven_b, _setup(gradient_checkpointing=c)) for c in (False, True))
    assert on.activations < off.activations
    assert (on.weights, on.gradients, on.optimizer) == (off.weights, off.gradients, off.optimizer)
    assert off.activations_checkpointed == on.activations and on.activations_full == off.activations


def test_zero3_over_two_gpus_halves_the_weights_and_zero2_shards_only_states(seven_b):
    one = estimate.estimate(seven_b, _setup(tuner="full"))
    zero2 = estimate.estimate(seven_b, _setup(tuner="full", parallel=estimate.Parallelism(2, "deepspeed", 2)))
    zero3 = estimate.estimate(seven_b, _setup(tuner="full", parallel=estimate.Parallelism(2, "deepspeed", 3)))
    gathered = 2 * seven_b.largest_layer * 2  # the layer being computed and the prefetched next one, in 16 bits
    assert zero2.weights == one.weights
    assert (zero2.gradients, zero2.optimizer) == (one.gradients // 2, one.optimizer // 2)
    assert zero3.weights == one.weights // 2 + gathered
    assert zero3.activations == one.activations  # each GPU still runs its own micro-batch
    ddp = estimate.estimate(seven_b, _setup(tuner="full", parallel=estimate.Parallelism(2, "ddp")))
    assert ddp.total == one.total


def test_offload_moves_the_optimizer_states_to_cpu(seven_b):
    on_gpu = estimate.estimate(seven_b, _setup(tuner="full"))
    offloaded = estimate.estimate(seven_b, _setup(tuner="full", parallel=estimate.Parallelism(1, "deepspeed",
                                                                                               offload="optimizer")))
    assert offloaded.optimizer == 0 and offloaded.offloaded == on_gpu.optimizer
    assert offloaded.total == on_gpu.total - on_gpu.optimizer


def test_paired_preference_methods_double_the_rows(seven_b):
    from swiftci.config import TrainConfig

    rows = {m: estimate.setup_of(TrainConfig(method=m), estimate.Parallelism()).rows_per_example
            for m in ("sft", "dpo", "kto", "orpo", "simpo")}
    assert rows == {"sft": 1, "dpo": 2, "kto": 1, "orpo": 2, "simpo": 2}  # KTO's rows are unpaired
    sft, dpo = (estimate.estimate(seven_b, _setup(rows_per_example=r)) for r in (1, 2))
    twice = estimate.estimate(seven_b, _setup(batch_size=8))
    assert dpo.activations == twice.activations > sft.activations


def test_the_cheapest_fix_is_rechecked_and_fits(seven_b):
    lora = _setup()  # 72.9 GiB: weights 14.3, activations 57 (bf16, 4 × 2048, no checkpointing)
    fix = estimate.cheapest_fix(seven_b, lora, 40 * GIB)
    assert fix.settings == {"train.gradient_checkpointing": True}
    assert estimate.estimate(seven_b, fix.setup).total == fix.estimate.total <= 40 * GIB
    full = _setup(tuner="full", gradient_checkpointing=True, parallel=estimate.Parallelism(8, "ddp"))
    fix = estimate.cheapest_fix(seven_b, full, 80 * GIB)
    assert fix.settings == {"train.distributed.strategy": "deepspeed", "train.distributed.zero_stage": 3}
    assert fix.estimate.total <= 80 * GIB
    assert estimate.cheapest_fix(seven_b, _setup(tuner="full"), 1 * GIB) is None  # nothing fits 1 GiB


# --- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture
def config_file(tiny_model, tmp_path):
    """The tiny example at a size that needs a GPU: batch 64 × 4096 tokens (about 3.7 GiB in bf16)."""
    return write_config(tmp_path / "swiftci.yaml", tiny_config(
        tiny_model, tmp_path / "out", train={"batch_size": 64, "max_length": 4096}))


def test_estimate_prints_a_table_and_fits(config_file):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "80GiB", check=0)
    for row in ("| weights |", "| gradients |", "| optimizer states |", "| activations |", "| CUDA allowance |",
                "| **total** |"):
        assert row in proc.stdout
    assert "parameters: 354,688" in proc.stdout and "trainable 69,632" in proc.stdout
    assert "fits:" in proc.stdout and "80.00 GiB" in proc.stdout


def test_estimate_json_is_versioned_and_matches_the_table(config_file):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "80GiB", "--json", check=0)
    data = json.loads(proc.stdout)
    assert set(data) == {"version", "setup", "parameters", "per_gpu_bytes", "per_gpu_gib", "activations_bytes",
                         "offloaded_bytes", "gpu_memory_bytes", "fits", "fix"}
    assert data["version"] == 1 and data["fits"] is True and data["fix"] is None
    assert data["per_gpu_gib"] == {k: round(v / GIB, 3) for k, v in data["per_gpu_bytes"].items()}
    per_gpu = data["per_gpu_bytes"]
    assert set(per_gpu) == {"weights", "gradients", "optimizer_states", "activations", "cuda_allowance", "total"}
    assert per_gpu["total"] == sum(v for k, v in per_gpu.items() if k != "total")
    assert data["parameters"]["total"] == 354_688 and data["gpu_memory_bytes"] == 80 * GIB
    table = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "80GiB").stdout
    assert f"| **total** | **{per_gpu['total'] / GIB:.2f}** |" in table


def test_estimate_that_does_not_fit_exits_1_with_a_fix_that_fits_when_rechecked(config_file):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "3GiB", "--json", check=1)
    fix = json.loads(proc.stdout)["fix"]
    assert fix["per_gpu_bytes"]["total"] <= 3 * GIB
    recheck = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "3GiB", "--json", *fix["flags"],
                                 check=0)
    assert json.loads(recheck.stdout)["per_gpu_bytes"] == fix["per_gpu_bytes"]
    text = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "3GiB", check=1).stdout
    assert "does not fit on 1 × 3.00 GiB" in text and "cheapest fix: set `train.gradient_checkpointing: true`" in text


def test_nothing_fits_exits_1_and_says_so(config_file):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", "1GiB", check=1)
    assert "nothing in swiftci's list of changes fits" in proc.stdout


@pytest.mark.parametrize("size", ["eighty", "0", "-3GiB", "80 PB"])
def test_bad_gpu_memory_is_exit_2_naming_the_option(config_file, size):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--gpu-memory", size, check=EXIT_USAGE)
    assert "--gpu-memory" in proc.stderr and "80GiB" in proc.stderr


def test_without_a_gpu_or_gpu_memory_there_is_no_verdict(config_file):
    proc = swiftci_in_process("estimate", "-c", str(config_file), "--json", check=0)
    assert json.loads(proc.stdout)["fits"] is None
    text = swiftci_in_process("estimate", "-c", str(config_file), check=0).stdout
    assert "no verdict" in text


def test_a_hub_model_is_estimated_from_its_config_json_alone(tiny_model, tmp_path):
    from fakes.hf_hub import FakeHFHub

    hub = FakeHFHub("acme/tiny", tiny_model)  # serves the weights too: they must never be asked for
    try:
        cfg = tiny_config(tiny_model, tmp_path / "out", model={"id": "acme/tiny", "revision": "main"})
        path = write_config(tmp_path / "swiftci.yaml", cfg)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        proc = subprocess.run([*SWIFTCI, "estimate", "-c", str(path), "--json"], capture_output=True, text=True,
                              env=env, timeout=600)
    finally:
        hub.close()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["parameters"]["total"] == 354_688
    files = [path for _, path in hub.calls if "/resolve/" in path]  # (huggingface_hub also asks /api/… itself)
    assert "/acme/tiny/resolve/main/config.json" in files
    assert all(f.endswith("/acme/tiny/resolve/main/config.json") for f in files), files


# --- train's pre-flight ------------------------------------------------------------------------------------------


def test_preflight_refuses_before_any_weight_is_read(config_file, tiny_model, tmp_path):
    """The model folder's weights are garbage: reading them would fail. The pre-flight only reads config.json."""
    from swiftci import config

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"\0garbage, not safetensors")
    raw = yaml.safe_load(config_file.read_text())
    raw["model"]["id"] = str(broken)
    cfg = config.load(write_config(tmp_path / "broken.yaml", raw))
    with pytest.raises(UsageError) as refused:
        estimate.preflight(cfg, 3 * GIB)
    message = str(refused.value)
    assert refused.value.exit_code == EXIT_USAGE
    assert "fix: set `train.gradient_checkpointing: true`" in message and "train.preflight: false" in message
    assert estimate.preflight(cfg, 80 * GIB).fits


def test_preflight_false_is_a_setting_that_does_not_change_the_run(tiny_model, tmp_path):
    from swiftci import config, stages

    on = config.load(write_config(tmp_path / "a.yaml", tiny_config(tiny_model, tmp_path / "out")))
    off = config.load(write_config(tmp_path / "b.yaml", tiny_config(tiny_model, tmp_path / "out",
                                                                  train={"preflight": False})))
    assert on.train.preflight and not off.train.preflight
    assert stages.fingerprint(on, "train") == stages.fingerprint(off, "train")  # neither blocks --resume
