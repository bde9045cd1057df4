"""Generate the VQA example's images and rows, offline and deterministically, in about a second.

    python examples/tiny-vqa/make_data.py [OUT_DIR]       # default: examples/tiny-vqa/data

Each 32×32 image holds one coloured square (red, green, blue or yellow) and one to three black circles. Each row asks
one question about one image, in the `messages` format with an image part:
"What colour is the square?" (answer: the colour; chance 1/4) or "How many circles?" (one, two, three; chance 1/3).
Writes images/*.png, train.jsonl (800 rows), validation.jsonl (100) and test.jsonl (100 held-out rows on images
never trained on), plus the lm-eval task's rows (tasks/vqa.jsonl: the test rows as question, image, answer).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = 32
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 20)}
COUNTS = {1: "one", 2: "two", 3: "three"}
SPLITS = {"train": 800, "validation": 100, "test": 100}


def _draw(rng: random.Random, colour: str, circles: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    side = 10
    sx, sy = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    draw.rectangle([sx, sy, sx + side - 1, sy + side - 1], fill=COLOURS[colour])
    taken = [(sx + side / 2, sy + side / 2, side * 0.75)]
    placed = 0
    while placed < circles:
        r = 3
        cx, cy = rng.randint(r, SIZE - r - 1), rng.randint(r, SIZE - r - 1)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (r + rr + 2) ** 2 for x, y, rr in taken):
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(0, 0, 0))
            taken.append((cx, cy, r))
            placed += 1
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
