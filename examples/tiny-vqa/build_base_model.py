"""Build the tiny vision-language base model of the VQA example, offline, in a few seconds on 2 CPU cores.

    python examples/tiny-vqa/build_base_model.py [OUT_DIR]    # default: examples/tiny-vqa/base-model

What it makes: a Llava-architecture model (transformers' LlavaForConditionalGeneration, loadable with
AutoModelForImageTextToText) from a 2-layer CLIP vision encoder on 32×32 images (16 patches of 8×8, hidden 64,
randomly initialised and kept frozen: its random features still carry colour and layout) and the tiny example's
pretrained 2-layer Llama as the language model, with the tiny tokenizer plus an `<image>` token, a chat template
whose user turns take image parts, and a LlavaProcessor (CLIP image processor) saved beside it. It needs the tiny
text model first (`make tiny-model`). Deterministic (fixed seed); written to a temporary folder that replaces
OUT_DIR only when done.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT_MODEL = HERE.parent / "tiny/base-model"
IMAGE_SIZE, PATCH = 32, 8
IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build(out_dir: Path) -> None:
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    if not (TEXT_MODEL / "config.json").is_file():
        raise SystemExit(f"build the tiny text model first: make tiny-model ({TEXT_MODEL} is missing)")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(TEXT_MODEL)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    text = AutoModelForCausalLM.from_pretrained(TEXT_MODEL)
    text.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    config = LlavaConfig(vision_config=vision, text_config=text.config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_select_strategy="full", vision_feature_layer=-1,
                         projector_hidden_act="gelu", image_seq_length=(IMAGE_SIZE // PATCH) ** 2 + 1)
    model = LlavaForConditionalGeneration(config)
    model.model.language_model.load_state_dict(text.model.state_dict())
    model.lm_head.load_state_dict(text.lm_head.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id

    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                "width": IMAGE_SIZE}, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH,
                               vision_feature_select_strategy="full", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".base-model-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    print(f"tiny vision-language base model written to {out_dir}")


if __name__ == "__main__":
    build(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "base-model")
