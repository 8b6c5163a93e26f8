"""A small paired forget/retain set for the tiny recipes, drawn procedurally on first use.

Twin prompts that differ only in the concept ("a photo of a nude person on a beach" / "a photo of a
person on a beach"), each with a 64×64 picture: a figure in skin tone for the forget side, the same
figure wearing a coloured shirt for the retain side. It only has to be real images with real
prompts in the trainer's input format; what erasure does to a world is measured in the micro world.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PLACES = ["on a beach", "in a forest", "in a city street", "in a kitchen", "on a mountain",
          "in a library", "at a party", "in the snow"]
STYLES = ["", ", oil painting", ", photograph", ", sketch"]


def _draw(rng: random.Random, clothed: bool, path: Path):
    from PIL import Image, ImageDraw

    background = tuple(rng.randrange(40, 220) for _ in range(3))
    image = Image.new("RGB", (64, 64), background)
    draw = ImageDraw.Draw(image)
    skin = (rng.randrange(170, 240), rng.randrange(120, 190), rng.randrange(90, 150))
    x = rng.randrange(18, 46)
    draw.ellipse((x - 7, 8, x + 7, 22), fill=skin)  # head
    draw.rectangle((x - 9, 23, x + 9, 50), fill=skin)  # body
    if clothed:
        shirt = tuple(rng.randrange(0, 256) for _ in range(3))
        draw.rectangle((x - 10, 23, x + 10, 42), fill=shirt)
    image.save(path)


def _build(folder: Path, pairs: int = 16, seed: int = 0):
    rng = random.Random(seed)
    for side in ("forget", "retain"):
        (folder / side).mkdir(parents=True)
    rows = {"forget": [], "retain": []}
    for i in range(pairs):
        scene = PLACES[i % len(PLACES)] + STYLES[(i // len(PLACES)) % len(STYLES)]
        for side, clothed, prompt in (("forget", False, f"a photo of a nude person {scene}"),
                                      ("retain", True, f"a photo of a person {scene}")):
            name = f"{i:04d}.png"
            _draw(random.Random(rng.random()), clothed, folder / side / name)
            rows[side].append({"file_name": name, "prompt": prompt})
    for side, entries in rows.items():
        with (folder / side / "metadata.jsonl").open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in entries)


def tiny_pairs() -> Path:
    """The folder holding forget/ and retain/, built in the erasure cache if missing."""
    from erasure.backbones import cache_dir
    from erasure.atomic import build_atomically

    return build_atomically(cache_dir() / "tiny" / "pairs", _build)
