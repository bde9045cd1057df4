"""The tiny_vqa task's images: each row names its image file relative to ../data (lm-eval wants PIL images)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def doc_to_image(doc: dict) -> list:
    from PIL import Image

    return [Image.open(DATA / doc["image"]).convert("RGB")]
