"""Build the tiny base model of the embedded example, offline, in about 20 seconds on 2 CPU cores.

    python examples/tiny/build_base_model.py [OUT_DIR]        # default: examples/tiny/base-model

What it makes: a character-level tokenizer (trained with `tokenizers`, chat special tokens, a chat template) and a
2-layer Llama with hidden size 128 (~355k parameters; 128 so GPTQ/AWQ group size 128 divides every layer's input),
briefly pretrained on plain generated text so that LoRA has features to adapt. The pretraining text never uses the
chat format, so the base model scores about 0 on the chat-formatted reversal task until it is fine-tuned.
The build is deterministic (fixed seeds) and writes into a temporary folder that replaces OUT_DIR only when done.
"""

from __future__ import annotations

import os
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|end|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
PRETRAIN_SECONDS_BUDGET = 120  # a ceiling; the step count below is what makes the build deterministic
PRETRAIN_STEPS = 600


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(4))


def pretraining_lines(n: int, seed: int = 1234) -> list[str]:
    """Plain text with words and their mirror images, never in the chat format."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [_word(rng) for _ in range(3)]
        kind = rng.random()
        if kind < 0.5:
            lines.append(" ".join(f"{w} {w[::-1]}" for w in words) + ".")
        else:
            lines.append(" ".join(words) + " | " + " ".join(w[::-1] for w in reversed(words)) + ".")
    return lines


def build_tokenizer(lines: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n"
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator(lines + list(alphabet), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def build(out_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lines = pretraining_lines(6000)
    tokenizer = build_tokenizer(lines)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)

    # A short full-parameter pretraining on plain text (seeded; fixed number of steps).
    ids = [tokenizer(line + "\n")["input_ids"] for line in lines]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), tokenizer.pad_token_id)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
    labels = batch.masked_fill(batch == tokenizer.pad_token_id, -100)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    model.train()
    started = time.monotonic()
    for step in range(PRETRAIN_STEPS):
        rows = torch.randint(0, len(ids), (32,), generator=gen)
        loss = model(input_ids=batch[rows], labels=labels[rows]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        if step % 100 == 0 or step == PRETRAIN_STEPS - 1:
            print(f"pretrain step {step}: loss {loss.item():.3f}", flush=True)
        if time.monotonic() - started > PRETRAIN_SECONDS_BUDGET:
            raise SystemExit("pretraining took longer than expected; is another job using the CPU?")
    model.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-model-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"tiny base model written to {out_dir}")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("base-model")
    build(target)
