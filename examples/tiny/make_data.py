"""Generate the tiny example's reversal data (deterministic): `python examples/tiny/make_data.py`.

Writes data/train.jsonl (chat `messages` rows) and data/validation.jsonl (held-out words, never in train),
data/pairs.jsonl and data/pairs-validation.jsonl (preference pairs of the same words, for swiftci-dpo.yaml), plus
the lm-eval task data under tasks/ (the same held-out words; 6-letter words for the strict example). The files are checked in; rerun this only to change them.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

HERE = Path(__file__).parent
PROMPT = "reverse: {w}"  # one fixed phrasing: a 2-layer model learns the task in seconds this way


def words(rng: random.Random, n: int, exclude: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(4))
        if w not in exclude and w not in out:
            out.append(w)
    return out


def row(word: str) -> dict:
    return {"messages": [{"role": "user", "content": PROMPT.format(w=word)},
                         {"role": "assistant", "content": word[::-1]}]}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def mc_row(rng: random.Random, word: str) -> dict:
    """Four choices: the reversal, the word itself, a rotation, and the reversal of a rotation."""
    wrong = [word, word[1:] + word[0], (word[1:] + word[0])[::-1]]
    choices = [word[::-1]] + [w for w in wrong if w != word[::-1]][:3]
    rng.shuffle(choices)
    return {"word": word, "choices": choices, "label": choices.index(word[::-1])}


def main() -> None:
    rng = random.Random(2026)
    held_out = words(rng, 100, set())
    train = words(rng, 2000, set(held_out))
    write_jsonl(HERE / "data/train.jsonl", [row(w) for w in train])
    write_jsonl(HERE / "data/validation.jsonl", [row(w) for w in held_out])
    # lm-eval task data (tasks/*.yaml): the held-out words, and 6-letter words the model never learned
    write_jsonl(HERE / "tasks/reverse.jsonl", [{"word": w, "reversed": w[::-1]} for w in held_out])
    write_jsonl(HERE / "tasks/reverse_mc.jsonl", [mc_row(rng, w) for w in held_out])
    six = ["".join(rng.choice(string.ascii_lowercase) for _ in range(6)) for _ in range(50)]
    write_jsonl(HERE / "tasks/reverse6.jsonl", [{"word": w, "reversed": w[::-1]} for w in six])
    # preference pairs for swiftci-dpo.yaml (after everything above, so the files above stay as they were)
    write_jsonl(HERE / "data/pairs.jsonl", [pair(rng, w) for w in train[:600]])
    write_jsonl(HERE / "data/pairs-validation.jsonl", [pair(rng, w) for w in held_out])


def pair(rng: random.Random, word: str) -> dict:
    """trl's conversational pair: chosen the reversal, rejected a near miss (the word unreversed, or the reversal
    with two neighbouring letters swapped)."""
    good = word[::-1]
    near = [word] + [good[:i] + good[i + 1] + good[i] + good[i + 2:] for i in range(3)]
    bad = rng.choice([n for n in near if n != good] or [good[::-1] + "x"])
    return {"prompt": [{"role": "user", "content": PROMPT.format(w=word)}],
            "chosen": [{"role": "assistant", "content": good}], "rejected": [{"role": "assistant", "content": bad}]}


if __name__ == "__main__":
    main()
