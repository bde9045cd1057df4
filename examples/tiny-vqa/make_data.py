"""Generate the VQA example's images and rows, offline and deterministically, in about a second.

    python examples/tiny-vqa/make_data.py [OUT_DIR]       # default: examples/tiny-vqa/data

Each 32×32 image holds one coloured square (red, green, blue or yellow) and one to three black circles, each shape
in its own 8×8 patch. Each row asks one question about one image, in the `messages` format with an image part:
"What colour is the square?" (answer: the colour; chance 1/4) or "How many circles?" (one, two, three; chance 1/3).
Writes images/*.png, train.jsonl (800 rows), validation.jsonl (100) and test.jsonl (100 held-out rows on images
never trained on), and last the lm-eval task's rows (vqa_task.jsonl: the test rows as question, image, answer).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE, PATCH = 32, 8  # the tiny model's image and patch sizes (build_base_model.py)
GRID = SIZE // PATCH  # patches per side
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
COUNTS = {1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 800, "validation": 100, "test": 100}


def _draw(rng: random.Random, colour: str, circles: int):
    """The square and the circles each in their own cell of the 4×4 grid of the vision encoder's 8×8 patches: every
    patch then shows one thing (nothing, a circle, or a square of one colour), and counting circles is counting
    patches. Placed anywhere, a circle straddled up to four patches and the example stopped at 0.82 exact match."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cells = rng.sample(range(GRID**2), 1 + circles)
    for i, cell in enumerate(cells):
        x, y = cell % GRID * PATCH + 1, cell // GRID * PATCH + 1  # a 1-pixel margin
        box = [x, y, x + PATCH - 3, y + PATCH - 3]
        if i == 0:
            draw.rectangle(box, fill=COLOURS[colour])
        else:
            draw.ellipse(box, fill=(0, 0, 0))
    return img


def _row(image: str, question: str, answer: str) -> dict:
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": answer}]}


def make(out: Path, seed: int = 11) -> None:
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    task_rows = []
    n = 0
    for split, rows in SPLITS.items():
        with open(out / f"{split}.jsonl", "w") as f:
            for _ in range(rows):
                colour, circles = rng.choice(list(COLOURS)), rng.randint(1, 3)
                name = f"images/{n:04d}.png"
                _draw(rng, colour, circles).save(out / name)
                n += 1
                if rng.random() < 0.5:
                    question, answer = "What colour is the square?", colour
                else:
                    question, answer = "How many circles?", COUNTS[circles]
                f.write(json.dumps(_row(name, question, answer)) + "\n")
                if split == "test":
                    task_rows.append({"question": question, "image": name, "answer": answer})
    with open(out / "vqa_task.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in task_rows)
    print(f"{n} images and rows written to {out}")


if __name__ == "__main__":
    make(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data")
