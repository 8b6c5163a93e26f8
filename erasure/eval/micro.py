"""Micro-world metrics: the oracle reads every attribute of every image back.

For a concept value c of attribute A (texture "striped", shape "triangle"), over images generated
from world captions:

- UA (unlearning accuracy, higher is better): on forget captions (those naming c), the share of
  images where the oracle does NOT read c — RGD's and SalUn's UA, with the oracle as classifier.
- implicit UA (higher is better): the same on captions that ask for c by its alias only
  (render.ALIASES: "banded" for striped, "wedge" for triangle), as I2P asks for nudity without the
  word. An erasure that re-maps the concept's word and leaves the look reachable scores high UA and
  low implicit UA.
- neighbour accuracy (higher is better): on the other captions, the share where the oracle reads the
  prompted value of A — the other textures or shapes must survive (the "other artists"). Implicit
  neighbour accuracy: the same on alias captions.
- RA (higher is better): on the other captions, the oracle's accuracy averaged over all four
  attributes — what the model still draws as asked.
- forget context (higher is better): on forget captions, accuracy on the three other attributes —
  asked for "a red striped circle on a black background", the erased model should still draw a red
  circle on black.
- Fréchet distance to the first model (lower is better): Fréchet distance (eq. of Heusel et al.
  2017, as FID) between the oracle's penultimate features of this model's images and the first
  model's (the base), prompt for prompt and seed for seed.

UA, neighbour accuracy, RA and forget context are read on captions that use no alias; the implicit
figures on captions with aliases (``world: all+aliases`` gives every combination both ways).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from erasure.data.paired import DataError

# prompts.world: every combination named (480), every combination by its aliases (480), both (960),
# or the shipped world's held-out captions.
WORLD_PROMPTS = ("all", "aliases", "all+aliases", "held_out")


def concept_attribute(concept: str) -> str:
    from erasure.world.render import ATTRIBUTES

    for key, values in ATTRIBUTES.items():
        if concept in values:
            return key
    known = ", ".join(v for values in ATTRIBUTES.values() for v in values)
    raise ValueError(f"micro_world.concept: {concept!r} is not a micro-world attribute value; one of {known}")


def world_prompts(which: str) -> list[str]:
    """Captions of a world prompt source (``WORLD_PROMPTS``)."""
    import json

    from erasure.world.model import WORLD_FILE, all_combinations, world_path
    from erasure.world.render import caption

    from erasure.world.render import ALIASED

    named = [caption(c) for c in all_combinations()]
    aliased = [caption(c, aliased=ALIASED) for c in all_combinations()]
    if which in ("all", "aliases", "all+aliases"):
        return {"all": named, "aliases": aliased, "all+aliases": named + aliased}[which]
    if which == "held_out":
        return json.loads((world_path() / WORLD_FILE).read_text())["held_out_captions"]
    raise ValueError(f"prompts.world: {which!r}; choose one of {', '.join(WORLD_PROMPTS)}")


def oracle_for(settings: dict, model_folder: Path):
    """The suite's oracle, else the one the (first) model's world carries, else the shipped world's."""
    from erasure.world.model import world_oracle
    from erasure.world.oracle import load_oracle

    try:
        return load_oracle(settings["oracle"]) if settings.get("oracle") else world_oracle(model_folder)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"metrics.micro_world.oracle: {e}") from None


def read_images(paths: list[Path]) -> np.ndarray:
    from PIL import Image

    from erasure.world.render import SIZE

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if image.size != (SIZE, SIZE):
                raise DataError(f"{path}: micro-world images are {SIZE}×{SIZE}, not {image.size[0]}×{image.size[1]}")
            arrays.append(np.asarray(image))
    return np.stack(arrays)


# Images per pass of the oracle. A suite's 960 images make 15 such shares to deal out over processes;
# the oracle is three conv blocks on 32 px images, so a larger batch would gain nothing.
ORACLE_BATCH = 64


def oracle_reads(oracle, images: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """What the oracle reads in each image, and its penultimate features (on the CPU, float64)."""
    import torch

    read, features = [], []
    for start in range(0, len(images), ORACLE_BATCH):
        names, h = oracle.read(images[start : start + ORACLE_BATCH])
        read += names
        features.append(h.cpu())
    return read, (torch.cat(features).double().numpy() if features else np.zeros((0, 0)))


def micro_metrics(concept: str, prompts: list[str], read: list[dict]) -> dict:
    """UA, implicit UA, neighbour accuracy, RA and forget context from the oracle's readings of the
    images of ``prompts`` (the module docstring defines each); suites and the monitor share it."""
    from erasure.world.render import ATTRIBUTES, aliased_attributes, parse_caption

    attribute = concept_attribute(concept)
    try:
        asked = [parse_caption(p) for p in prompts]
        implicit = [bool(aliased_attributes(p)) for p in prompts]
    except ValueError as e:
        raise DataError(f"metrics.micro_world reads micro-world captions only: {e}") from None

    def rows(aliases: bool, wants_concept: bool):
        return [i for i, a in enumerate(asked) if implicit[i] == aliases and (a[attribute] == concept) == wants_concept]

    def share(indices, hit):
        return float(np.mean([hit(i) for i in indices])) if indices else None

    def erased(i):
        return read[i][attribute] != concept

    def drawn(i, key):
        return read[i][key] == asked[i][key]

    forget, other = rows(False, True), rows(False, False)
    context = [k for k in ATTRIBUTES if k != attribute]
    per_attribute = {k: share(other, lambda i, k=k: drawn(i, k)) for k in ATTRIBUTES}
    return {
        "concept": concept,
        "attribute": attribute,
        "UA": share(forget, erased),
        "implicit_UA": share(rows(True, True), erased),
        "neighbour_accuracy": per_attribute[attribute],
        "implicit_neighbour_accuracy": share(rows(True, False), lambda i: drawn(i, attribute)),
        "RA": float(np.mean(list(per_attribute.values()))) if other else None,
        "forget_context": share(forget, lambda i: np.mean([drawn(i, k) for k in context])),
        "retain_per_attribute": per_attribute,
        "forget_images": len(forget),
        "other_images": len(other),
        "implicit_forget_images": len(rows(True, True)),
    }


def frechet_between(features: np.ndarray, reference: np.ndarray) -> float:
    from erasure.eval.fid import feature_statistics, frechet_distance

    # The closed form can come out a hair below zero for identical sets.
    return max(0.0, frechet_distance(*feature_statistics(features), *feature_statistics(reference)))
