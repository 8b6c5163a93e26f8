"""Small forget/retain sets for the tiny recipes, drawn procedurally on first use.

tiny:forget / tiny:retain: twin prompts that differ only in the concept ("a photo of a nude person on
a beach" / "a photo of a person on a beach"), each with a 64×64 picture: a figure in skin tone for the
forget side, the same figure wearing a coloured shirt for the retain side.

tiny:class-forget / tiny:class-retain: for class-conditional models (tiny:dit), class names as prompts
(RGD's class-conditional setting on CIFAR-10's names): the forget class "cat", and the retain set
two images of each other class, each class a shape of its own.

They only have to be real images with real prompts in the trainer's input format; what erasure does
to a world is measured in the micro world.
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


CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FORGET_CLASS = "cat"


def _draw_class(rng: random.Random, label: int, path: Path):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), tuple(rng.randrange(0, 80) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    colour = ((label * 97) % 256, (label * 53 + 90) % 256, (label * 29 + 180) % 256)
    x, y, r = rng.randrange(10, 22), rng.randrange(10, 22), rng.randrange(5, 9)
    box = (x - r, y - r, x + r, y + r)
    shape = label % 5
    if shape == 0:
        draw.ellipse(box, fill=colour)
    elif shape == 1:
        draw.rectangle(box, fill=colour)
    elif shape == 2:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
    elif shape == 3:
        draw.rectangle((x - r, y - 2, x + r, y + 2), fill=colour)
        draw.rectangle((x - 2, y - r, x + 2, y + r), fill=colour)
    else:
        draw.ellipse(box, outline=colour, width=3)
    if label >= 5:  # the second five classes: the same shapes, struck through
        draw.line((x - r, y + r, x + r, y - r), fill=(255, 255, 255), width=2)
    image.save(path)


def _build_classes(folder: Path, forget_rows: int = 8, retain_per_class: int = 2, seed: int = 0):
    rng = random.Random(seed)
    sides = {"forget": [CLASS_NAMES.index(FORGET_CLASS)] * forget_rows,
             "retain": [k for k, name in enumerate(CLASS_NAMES) if name != FORGET_CLASS for _ in range(retain_per_class)]}
    for side, labels in sides.items():
        (folder / side).mkdir(parents=True)
        with (folder / side / "metadata.jsonl").open("w") as f:
            for i, label in enumerate(labels):
                name = f"{i:04d}.png"
                _draw_class(random.Random(rng.random()), label, folder / side / name)
                f.write(json.dumps({"file_name": name, "prompt": CLASS_NAMES[label]}) + "\n")


def tiny_pairs() -> Path:
    """The folder holding forget/ and retain/, built in the erasure cache if missing."""
    return _built("pairs", _build)


def _built(name: str, builder) -> Path:
    from erasure.atomic import build_atomically
    from erasure.backbones import fixture_cache

    return build_atomically(fixture_cache(name), builder)


# tiny:NAME → (cache folder, its builder, the side)
TINY_SETS = {"forget": ("pairs", _build, "forget"), "retain": ("pairs", _build, "retain"),
             "class-forget": ("classes", _build_classes, "forget"),
             "class-retain": ("classes", _build_classes, "retain")}


def tiny_set(name: str) -> Path:
    """The folder of the built-in set tiny:NAME, built in the erasure cache if missing."""
    folder, builder, side = TINY_SETS[name]
    return _built(folder, builder) / side
