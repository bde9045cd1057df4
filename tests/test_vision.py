"""Vision-language fine-tuning on the tiny VQA example (examples/tiny-vqa): rows with images, training that makes the
model read them, the same eval gate through lm-eval's hf-multimodal, quantize's refusal of an architecture gptqmodel
does not know, and a local endpoint answering an image prompt through the OpenAI API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from filelock import FileLock

from conftest import ROOT, read_json, swiftci_in_process, write_config

pytestmark = pytest.mark.slow
VQA = ROOT / "examples/tiny-vqa"


@pytest.fixture(scope="session")
def vqa(tiny_model, shared_dir):
    """The example's vision-language base model and generated images, built (a few seconds each) when missing or
    older than the script that makes them (the images by the file make_data.py writes last)."""
    def stale(made: Path, maker: str) -> bool:
        return not made.is_file() or made.stat().st_mtime < (VQA / maker).stat().st_mtime

    with FileLock(str(shared_dir / "tiny-vqa.lock")):
        if stale(VQA / "base-model/config.json", "build_base_model.py"):
            subprocess.run([sys.executable, str(VQA / "build_base_model.py")], check=True)
        if stale(VQA / "data/vqa_task.jsonl", "make_data.py"):
            subprocess.run([sys.executable, str(VQA / "make_data.py")], check=True)
    return VQA


def vqa_config(out: Path, **sections) -> dict:
    """The example's config with absolute paths."""
    cfg = yaml.safe_load((VQA / "swiftci.yaml").read_text())
    cfg["model"]["id"] = str(VQA / "base-model")
    cfg["data"] = {"train": str(VQA / "data/train.jsonl"), "validation": str(VQA / "data/validation.jsonl"),
                   "format": "messages"}
    cfg["evaluate"]["task_dir"] = str(VQA / "tasks")
    cfg["output_dir"] = str(out)
    cfg.update(sections)
    return {k: v for k, v in cfg.items() if v is not None}


@pytest.fixture(scope="session")
def vqa_trained(vqa, shared_dir):
    """The example trained as it is configured (500 steps, about 20 s), once per session, shared by the tests that
    read its outputs."""
    work = shared_dir / "vqa-trained"
    with FileLock(str(shared_dir / "vqa-trained.lock")):
        if not (work / "done").is_file():
            cfg = write_config(work / "swiftci.yaml", vqa_config(work / "out"))
            swiftci_in_process("train", "-c", str(cfg), check=0)
            (work / "done").write_text("")
    return SimpleNamespace(config=work / "swiftci.yaml", out=work / "out")


def _clone(trained, dest: Path, **sections) -> Path:
    shutil.copytree(trained.out / "train", dest / "out/train", ignore=shutil.ignore_patterns("checkpoints"))
    return write_config(dest / "swiftci.yaml", vqa_config(dest / "out", **sections))


def test_training_records_the_images_with_the_data(vqa_trained):
    report = read_json(vqa_trained.out / "train/train_report.json")
    record = read_json(vqa_trained.out / "train/run.json")["data"]
    assert record["train"]["images"] == 800 and len(record["train"]["images_sha256"]) == 64
    assert record["validation"]["images"] == 100
    assert report["packing"]["used"] == "none" and "vision-language" in report["packing"]["why"]
    assert report["logits"]["used"] == "labelled", "the image tokens and the question get no logits"
    assert (vqa_trained.out / "train/model/processor_config.json").is_file()  # it serves with its processor


def test_training_makes_the_model_read_the_images(vqa_trained, tmp_path):
    """Held-out images (never trained on): the base model scores below chance, the fine-tuned one passes the
    example's gate, the issue's bar of 0.9 — on both questions, so it reads the colour and counts the circles."""
    cfg = _clone(vqa_trained, tmp_path)
    proc = swiftci_in_process("evaluate", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exact = read_json(tmp_path / "out/evaluate/eval_report.json")["metrics"]["tiny_vqa"]["exact_match"]
    assert exact["baseline"] < 0.33 and exact["value"] >= 0.9, exact
    samples = tmp_path / "out/evaluate/samples/candidate/tiny_vqa.jsonl"
    scored = [json.loads(line) for line in samples.read_text().splitlines()]
    for question in ("What colour is the square?", "How many circles?"):
        correct = [r["exact_match"] for r in scored if r["doc"]["question"] == question]
        assert sum(correct) / len(correct) >= 0.8, (question, sum(correct), len(correct))


def test_a_stopped_run_resumes_to_the_losses_of_an_uninterrupted_one(vqa, tmp_path):
    """Resume as for text: train.max_runtime stops the run after its first steps with a checkpoint; --resume
    continues from it (the shuffled order of image rows included) and logs the losses one uninterrupted run logs."""
    short = ["--set", "train.max_steps=12", "--set", "train.logging_steps=1", "--set", "train.save_steps=100"]

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (out / "train/loss.jsonl").read_text().splitlines()]

    straight = write_config(tmp_path / "straight/swiftci.yaml", vqa_config(tmp_path / "straight/out"))
    assert swiftci_in_process("train", "-c", str(straight), *short).returncode == 0
    cfg = write_config(tmp_path / "stopped/swiftci.yaml", vqa_config(tmp_path / "stopped/out"))
    stopped = swiftci_in_process("train", "-c", str(cfg), *short, "--set", "train.max_runtime=1s")
    at = re.search(r"train.max_runtime \(1s\) reached at step (\d+) of 12", stopped.stderr)
    assert stopped.returncode == 3 and at, stopped.stderr
    resumed = swiftci_in_process("train", "-c", str(cfg), *short, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = read_json(tmp_path / "stopped/out/train/train_report.json")
    assert report["metrics"]["resumed_from_step"] == int(at[1]) < 12
    assert losses(tmp_path / "stopped/out") == pytest.approx(losses(tmp_path / "straight/out"), rel=1e-4)


def test_the_gate_fails_on_a_model_that_does_not_read_the_images(vqa, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", vqa_config(tmp_path / "out"))
    proc = swiftci_in_process("evaluate", "-c", str(cfg), "--model", str(VQA / "base-model"), "--baseline", "none")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "tiny_vqa/exact_match" in proc.stderr and "< min 0.9" in proc.stderr


def _rows(tmp_path: Path, rows: list[dict]) -> Path:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    shutil.copy(VQA / "data/images/0000.png", data / "images/ok.png")
    (data / "images/broken.png").write_text("not an image")
    path = data / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ask(image: str, question: str = "What colour is the square?", answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def test_a_bad_image_row_is_exit_2_with_its_line_before_anything_loads(vqa, tmp_path):
    train = _rows(tmp_path, [
        _ask("images/ok.png"),
        {"messages": [{"role": "user", "content": "<image>How many circles?"},  # the ms-swift form: fine
                      {"role": "assistant", "content": "one"}], "images": ["images/ok.png"]},
        _ask("images/missing.png"),
        _ask("images/broken.png"),
        {"messages": [{"role": "user", "content": "<image><image>Two?"},
                      {"role": "assistant", "content": "two"}], "images": ["images/ok.png"]}])
    cfg = write_config(tmp_path / "swiftci.yaml", vqa_config(tmp_path / "out"))
    for command in ("validate", "train"):
        proc = swiftci_in_process(command, "-c", str(cfg), "--set", f"data.train={train}",
                                  "--set", "data.validation=null")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "train.jsonl:3: row 3: image 'images/missing.png' not found" in proc.stderr
        assert "train.jsonl:4: row 4: image 'images/broken.png' unreadable" in proc.stderr
        assert "row 5: more <image> placeholders than `images` entries (1)" in proc.stderr
        assert "row 1" not in proc.stderr and "row 2" not in proc.stderr
    assert not list((tmp_path / "out/train").glob("checkpoints/checkpoint-*"))  # refused before any step


def test_rows_with_images_are_refused_for_a_text_model(vqa, tiny_model, tmp_path):
    train = _rows(tmp_path, [_ask("images/ok.png")])
    cfg = write_config(tmp_path / "swiftci.yaml", vqa_config(tmp_path / "out"))
    proc = swiftci_in_process("train", "-c", str(cfg), "--set", f"data.train={train}", "--set",
                              "data.validation=null", "--set", f"model.id={tiny_model}")
    assert proc.returncode == 2 and "row 1 holds images, but model.id" in proc.stderr, proc.stderr


def test_the_loss_is_on_the_answer_only_never_on_the_question_or_the_image(vqa):
    from swiftci import vision

    processor = vision.load_processor(str(VQA / "base-model"), None, VQA / "base-model")
    row = _ask(str(VQA / "data/images/0000.png"), "How many circles?", "three")["messages"]
    (example,), dropped = vision.tokenize([row], processor, max_length=64, source="rows.jsonl")
    ids, labels = example["input_ids"], example["labels"]
    learned = [t for t, label in zip(ids, labels) if label != -100]
    assert dropped == 0 and learned == [label for label in labels if label != -100]  # labels are the ids themselves
    assert processor.tokenizer.decode(learned).strip() in ("three<|end|>", "three")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    image_positions = [i for i, t in enumerate(ids) if t == image_token]
    assert len(image_positions) == read_json(VQA / "base-model/config.json")["image_seq_length"]
    assert all(labels[i] == -100 for i in image_positions)
    assert example["vision"]["pixel_values"].shape[-2:] == (32, 32)


def test_what_learns_the_tower_frozen_by_default_the_projector_fully(vqa):
    from swiftci import vision

    model = vision.load_model(str(VQA / "base-model"), None, VQA / "base-model")
    frozen = vision.adapter_settings(model, "all-linear", freeze_vision=True)
    assert frozen["modules_to_save"] == ["multi_modal_projector"]
    assert frozen["target_modules"] and all("language_model" in n for n in frozen["target_modules"])
    thawed = vision.adapter_settings(model, "all-linear", freeze_vision=False)
    assert any("vision_tower" in n for n in thawed["target_modules"])
    only_attention = vision.adapter_settings(model, ["q_proj", "v_proj"], freeze_vision=True)
    assert {n.split(".")[-1] for n in only_attention["target_modules"]} == {"q_proj", "v_proj"}
    on_projector = vision.adapter_settings(model, ["q_proj", "multi_modal_projector"], freeze_vision=True)
    assert on_projector["modules_to_save"] is None  # adapters there instead of training it fully
    assert any("multi_modal_projector" in n for n in on_projector["target_modules"])


def test_quantize_refuses_an_architecture_gptqmodel_does_not_know(vqa, tmp_path):
    cfg = write_config(tmp_path / "swiftci.yaml", vqa_config(tmp_path / "out", quantize={"method": "gptq"}))
    proc = swiftci_in_process("quantize", "-c", str(cfg), "--model", str(VQA / "base-model"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "cannot quantize the vision-language architecture 'llava'" in proc.stderr
    assert not (tmp_path / "out/quantize/merged").exists()


def test_the_local_endpoint_answers_an_image_prompt(vqa_trained, tmp_path):
    held_out = [json.loads(line)["messages"] for line in (VQA / "data/test.jsonl").read_text().splitlines()]
    user, answer = next(m for m in held_out if m[0]["content"][1]["text"] == "What colour is the square?")
    image, question = VQA / "data" / user["content"][0]["image"], user["content"][1]["text"]
    cfg = _clone(vqa_trained, tmp_path, evaluate=None, deploy={
        "target": "local", "engine": "transformers", "model": "merged",
        "smoke": {"prompts": [{"prompt": question, "image": str(image)}, {"prompt": question}]}})
    proc = swiftci_in_process("deploy", "-c", str(cfg))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with_image, text_only = read_json(tmp_path / "out/deploy/deploy_report.json")["smoke"]["results"]
    assert with_image["passed"] and with_image["answer"].strip() == answer["content"], with_image
    # the image reached the model through the image_url part: its tokens are in the prompt
    seq = read_json(VQA / "base-model/config.json")["image_seq_length"]
    assert with_image["prompt_tokens"] - text_only["prompt_tokens"] == seq, (with_image, text_only)


def test_a_smoke_prompt_with_an_image_sends_it_as_an_openai_image_url_part(tmp_path):
    import base64

    from swiftci.config import SmokePromptConfig
    from swiftci.deploy import smoke

    image = tmp_path / "cat.png"
    image.write_bytes(b"\x89PNG fake bytes")
    prompt = SmokePromptConfig.model_validate({"prompt": "What is this?", "image": "cat.png"},
                                              context={"base_dir": tmp_path})
    assert prompt.image == image  # made absolute against the config's folder
    (picture, text) = smoke._content(prompt)
    assert text == {"type": "text", "text": "What is this?"} and picture["type"] == "image_url"
    head, _, data = picture["image_url"]["url"].partition(",")
    assert head == "data:image/png;base64" and base64.b64decode(data) == image.read_bytes()
    assert smoke._content(SmokePromptConfig(prompt="hi")) == "hi"
