"""Tokenization for SFT: the loss falls only on assistant tokens, truncation is counted, formats are detected."""

from __future__ import annotations

import pytest

from swiftci import data
from swiftci.errors import UsageError


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def labelled_text(tok, example) -> str:
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100])


def test_only_assistant_turns_are_labelled(tok):
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse: abcd"},
            {"role": "assistant", "content": "dcba"}, {"role": "user", "content": "reverse: wxyz"},
            {"role": "assistant", "content": "zyxw"}]
    (ex,), dropped = data.tokenize_sft([conv], tok, 512, "t")
    assert dropped == 0
    assert labelled_text(tok, ex) == "dcba<|end|>zyxw<|end|>"
    assert tok.decode(ex["input_ids"]).startswith("<|system|>be brief<|end|><|user|>reverse: abcd")


def test_alpaca_rows_become_chat(tok):
    msgs = data.to_messages({"instruction": "reverse:", "input": "abcd", "output": "dcba"}, "alpaca", "r")
    assert msgs == [{"role": "user", "content": "reverse:\n\nabcd"}, {"role": "assistant", "content": "dcba"}]
    (ex,), _ = data.tokenize_sft([msgs], tok, 512, "t")
    assert labelled_text(tok, ex) == "dcba<|end|>"


def test_truncation_keeps_max_length_and_drops_rows_without_targets(tok):
    conv = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 40}]
    (ex,), _ = data.tokenize_sft([conv], tok, 50, "t")
    assert len(ex["input_ids"]) == 50 and labelled_text(tok, ex) == "y" * 7
    examples, dropped = data.tokenize_sft([conv], tok, 30, "t")
    assert examples == [] and dropped == 1


def test_format_detection():
    assert data.detect_format([{"messages": []}], "auto", "f") == "messages"
    assert data.detect_format([{"instruction": "a", "output": "b"}], "auto", "f") == "alpaca"
    assert data.detect_format([{"prompt": "a", "chosen": "b", "rejected": "c"}], "auto", "f") == "preference"
    assert data.detect_format([{"prompt": "a", "completion": "b", "label": True}], "auto", "f") == "preference"
    with pytest.raises(UsageError, match="cannot tell the row format"):
        data.detect_format([{"text": "a"}], "auto", "f")


@pytest.mark.parametrize("row,message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"row 3: messages\[0\] must be"),
    ({"messages": "hi"}, "must be a non-empty list"),
])
def test_bad_rows_name_the_row(row, message):
    with pytest.raises(UsageError, match=message):
        data.to_messages(row, "messages", "train.jsonl: row 3")


def test_pad_collator():
    batch = data.PadCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_preference_rows_are_no_sft_data(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "reverse: abcd", "chosen": "dcba", "rejected": "abcd"}\n')
    with pytest.raises(UsageError, match="preference rows .* need a preference method"):
        data.sft_conversations(path, "auto")
    conversations, fmt = data.load_conversations(path, "auto")  # what quantize calibrates on: the preferred answer
    assert fmt == "preference" and conversations == [[{"role": "user", "content": "reverse: abcd"},
                                                      {"role": "assistant", "content": "dcba"}]]
