"""Paired forget/retain image sets drawn by the shipped micro world, built on first use.

``world:striped/forget`` and ``world:striped/retain`` (likewise ``triangle``, and ``…-uniform`` for
RGD's uniform baseline) name the two halves of a set: the concept spec ``prompts/world-<concept>.yaml``
is built into prompt pairs with the prompt builder, and the shipped world renders both sides of every
pair with its own sampler. The set is cached per world weights, so rebuilding the world rebuilds it.
"""

from __future__ import annotations

from pathlib import Path

from erasure.shipped import shipped

CONCEPTS = ("striped", "triangle")
SIDES = ("forget", "retain")
IMAGES_PER_PROMPT = 2


def set_names() -> list[str]:
    return [f"{c}{mode}" for c in CONCEPTS for mode in ("", "-uniform")]


def parse_source(source: str) -> tuple[str, str]:
    """``world:striped/forget`` → ("striped", "forget"); a clear error for anything else."""
    name, _, side = source.removeprefix("world:").partition("/")
    if name not in set_names() or side not in SIDES:
        known = ", ".join(f"world:{n}/{s}" for n in set_names() for s in SIDES)
        raise ValueError(f"{source!r} is not a micro-world pair set; known: {known}")
    return name, side


def spec_path(concept: str) -> Path:
    path = shipped("prompts", f"world-{concept}.yaml")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: micro-world pair sets are built from the concept specs "
                                "shipped in erasure/shipped/prompts/")
    return path


def world_pairs(name: str) -> Path:
    """The folder holding forget/ and retain/ for set ``name`` (built in the erasure cache if missing)."""
    from erasure.backbones import cache_dir, weights_sha256
    from erasure.atomic import build_atomically
    from erasure.world.model import world_path

    concept, uniform = name.removesuffix("-uniform"), name.endswith("-uniform")
    world = world_path()

    def build(folder: Path):
        from erasure.data.generate import generate_pairs
        from erasure.prompts.build import build_prompt_sets
        from erasure.prompts.spec import load_spec

        build_prompt_sets(load_spec(spec_path(concept)), folder / "prompts", uniform=uniform)
        generate_pairs(folder / "prompts" / "train.jsonl", str(world), folder,  # the world's own sampler
                       images_per_prompt=IMAGES_PER_PROMPT, batch_size=64, seed=0, show_progress=False)

    return build_atomically(cache_dir() / "world" / f"{name}-{weights_sha256(world)[:12]}", build)
