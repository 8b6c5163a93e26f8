"""The micro-world recipe search behind erasure/world/model.py's and render.py's defaults (README, "The micro world").

    bash benchmarks/world_recipe_search.sh ROUND DIR                              # a whole round on one GPU
    python benchmarks/world_recipe_search.py prep DIR --round ROUND [--device cuda] [--crisp-oracle]
    python benchmarks/world_recipe_search.py run DIR NAME [--device cuda]        # NAME: a config of a round
    python benchmarks/world_recipe_search.py confusion WORLD_DIR                   # texture confusions of a built world
    python benchmarks/world_recipe_search.py confusion PIPE --all --seeds 0 5000 [--guidance 1] [--attribute shape]
                                              # every named caption, per seed (an erased pipeline too)
    python benchmarks/world_recipe_search.py speed                                 # CPU step time, 2 threads

`prep` trains, for every texture geometry the round uses, the oracle and the VAE once into
DIR/<geometry>/ (shared by every `run` of that geometry) and prints the oracle's read-back of fresh
renders and of VAE reconstructions of held-out captions; `run` trains one world model on top and
prints, per (sampler steps, guidance), the oracle's read-back on held-out and on training captions.

Round 1 (logs benchmarks/results/world-search/call*.log) changed the recipe defaults of its time
(THEN) on the 5–6 px textures of commit 6ca3c12, with the full CLIP vocabulary (so today's run of it
differs in the text encoder's initialisation). Round 2 (round2-*.log) changed today's recipe on the
7–9 px any-angle textures of 000a248 and repeated configs over seeds, because texture read-back
varied by ±0.15 between runs of one recipe. Round 3 (round3-*.log) changed the texture geometry.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from erasure.world import model as world
from erasure.world import render
from erasure.world.oracle import accuracy, load_oracle, save_oracle, train_oracle

# Texture geometries (render.TEXTURE_GEOMETRY), each complete, so that a variant means the same
# whatever today's default is.
_ANY_ANGLE = {"stripe_angles": None, "stripe_angle_jitter": 0.0}
_AXIS = {"stripe_angles": (0.0, math.pi / 2), "stripe_angle_jitter": 0.2}
_COARSE = {"stripe_period": (7.0, 9.0), "dot_period": (7.0, 8.0), "dot_radius": 0.28}
GEOMETRY = {
    # renderer of 6ca3c12 (round 1)
    "fine-any-angle": {**_ANY_ANGLE, "stripe_period": (5.0, 7.0), "dot_period": (5.0, 6.0), "dot_radius": 0.26,
                       "check_cell": (3.2, 4.2)},
    # renderer of 000a248 (round 2)
    "any-angle-5px-checks": {**_ANY_ANGLE, **_COARSE, "check_cell": (4.5, 5.5)},
    # round 3: stripes only near-horizontal or near-vertical, so no stripe looks like half a
    # checkerboard; and/or 6.5–7.5 px cells, a scale apart from the stripes
    "axis": {**_AXIS, **_COARSE, "check_cell": (4.5, 5.5)},
    "coarse-checks": {**_ANY_ANGLE, **_COARSE, "check_cell": (6.5, 7.5)},
    "axis-coarse-checks": {**_AXIS, **_COARSE, "check_cell": (6.5, 7.5)},  # today's default
}

# Each config: WorldRecipe changes, plus the geometry it renders with.
THEN = {"text_hidden": 48, "lr": 1e-3, "ema_decay": 0.999, "quality_per_combo": 4, "steps": 3000,
        "geometry": "fine-any-angle"}
ROUND1 = {name: {**THEN, **change} for name, change in {
    "then-default": {},
    "lr-5e-4": {"lr": 5e-4},
    "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    "attention-16px-bs32": {"unet_attention": [True, True, True], "batch_size": 32, "steps": 4000},
    "text-64": {"text_hidden": 64},
    "no-min-snr": {"min_snr_gamma": 1e6},
    "bs32-5000": {"batch_size": 32, "steps": 5000},
    "lr-2e-3-ema-0.9995": {"lr": 2e-3, "ema_decay": 0.9995},
    "text-64-unet-96": {"text_hidden": 64, "unet_channels": [32, 64, 96]},
    "text-64-unet-96-lr-2e-3": {"text_hidden": 64, "unet_channels": [32, 64, 96], "lr": 2e-3, "ema_decay": 0.9995},
    "text-64-lr-2e-3": {"text_hidden": 64, "lr": 2e-3, "ema_decay": 0.9995},  # today's default recipe
    "text-64-unet-96-2500": {"text_hidden": 64, "unet_channels": [32, 64, 96], "steps": 2500},
}.items()}
# `seed` moves the diffusion model's initialisation, batches and held-out split (the shared oracle
# and VAE stay those of seed 0).
ROUND2 = {name: {"geometry": "any-angle-5px-checks", **change} for name, change in {
    "default": {},
    "default-seed-1": {"seed": 1},
    "text-128": {"text_hidden": 128},
    "text-128-seed-1": {"text_hidden": 128, "seed": 1},
    "text-128-seed-2": {"text_hidden": 128, "seed": 2},
    "text-96": {"text_hidden": 96},
    "text-128-3-layers": {"text_hidden": 128, "text_layers": 3},
    "text-128-attention-16px": {"text_hidden": 128, "unet_attention": [True, True, True]},
}.items()}
# Round 2 left texture at 0.71–0.80 for every recipe: the world models drew checks as smeared
# diagonal waves — the two diagonal gratings a checkerboard is made of — read as stripes.
ROUND3 = {f"{g}-seed-{s}": {"geometry": g, "seed": s} for g in ("axis", "coarse-checks", "axis-coarse-checks")
          for s in (0, 1)}
ROUNDS = {"1": ROUND1, "2": ROUND2, "3": ROUND3}
# Oracle training steps of each round's prep (the default was 1500 until round 3's result shipped).
PREP = {"1": {"oracle_steps": 1500}, "2": {"oracle_steps": 2500}, "3": {"oracle_steps": 1500}}
CONFIGS = {name: change for configs in ROUNDS.values() for name, change in configs.items()}


def use_geometry(name: str) -> None:
    render.TEXTURE_GEOMETRY.update(GEOMETRY[name])


GRID = [(20, 3.0), (20, 2.0), (15, 3.0)]


def _uint8(x: torch.Tensor):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def prep(out: Path, round_: str, crisp_oracle: bool, device: str) -> None:
    for geometry in sorted({c["geometry"] for c in ROUNDS[round_].values()}):
        print(f"== {geometry}", flush=True)
        use_geometry(geometry)
        prep_one(out / geometry, world.WorldRecipe.from_dict(PREP[round_]), crisp_oracle, device)


def prep_one(out: Path, recipe: world.WorldRecipe, crisp_oracle: bool, device: str) -> None:
    train, held = world.split_combinations(recipe.seed, recipe.held_out)
    oracle = train_oracle(recipe.oracle_steps, seed=recipe.seed, augment=not crisp_oracle)
    save_oracle(oracle, out / "oracle")
    print("oracle on fresh renders:", accuracy(oracle))
    vae = world.train_vae(recipe, train, device=device)
    vae.save_pretrained(out / "vae")
    x = world._images(held * 10, 5).to(device)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample
    print("oracle on VAE reconstructions of held-out captions:",
          world.read_back(oracle.to("cpu"), _uint8(reconstruction), held * 10))


def run(shared: Path, name: str, device: str) -> None:
    from diffusers import AutoencoderKL

    change = dict(CONFIGS[name])
    geometry = change.pop("geometry")
    use_geometry(geometry)
    recipe = world.WorldRecipe.from_dict(change)
    oracle = load_oracle(shared / geometry / "oracle")
    vae = AutoencoderKL.from_pretrained(shared / geometry / "vae").to(device)
    train, held = world.split_combinations(recipe.seed, recipe.held_out)
    text_encoder, unet = world.train_diffusion(recipe, vae, train, device=device)
    pipe = world.assemble_pipeline(recipe, vae, text_encoder, unet).to(device)
    pipe.set_progress_bar_config(disable=True)
    for steps, guidance in GRID:
        held_out = world.quality(pipe, oracle, held, recipe, steps=steps, guidance_scale=guidance)[0]
        seen = world.quality(pipe, oracle, train[:48], recipe, steps=steps, guidance_scale=guidance)[0]
        print(json.dumps({"config": name, "steps": steps, "guidance": guidance,
                          "held": {k: round(v, 3) for k, v in held_out.items()},
                          "train": {k: round(v, 3) for k, v in seen.items()}}), flush=True)


def confusion(folder: Path, every: bool = False, seeds: tuple[int, ...] = (1000,),
              guidance: float | None = None, attribute: str = "texture") -> None:
    """Prompted → read counts of one attribute (texture unless told) for a world pipeline (a built world,
    or an erasure's export: its own oracle, else the shipped world's): on 160 training captions, or
    with ``every`` on all 480 named captions (seed s + i for caption i, as `erasure eval` draws them);
    one table per sampler seed, at the world's guidance unless ``guidance`` is given."""
    from collections import Counter

    import numpy as np
    from diffusers import DiffusionPipeline

    from erasure.world.render import caption

    torch.set_num_threads(2)
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if every:
        combos = world.all_combinations()
    else:
        train, _ = world.split_combinations(0, 48)
        combos = [train[i] for i in np.random.default_rng(0).choice(len(train), 160, replace=False)]
    # an erasure's export carries no world.json: it samples as the shipped world does
    steps, world_guidance = world.world_sampler(folder if (folder / world.WORLD_FILE).is_file() else None)
    oracle = world.world_oracle(folder)
    for seed in seeds:
        images = world.sample(pipe, [caption(c) for c in combos], seed, steps,
                              world_guidance if guidance is None else guidance)
        read = oracle.predict(images)
        counts = Counter((c[attribute], r[attribute]) for c, r in zip(combos, read))
        print(f"sampler seed {seed}")
        for (asked, seen), n in sorted(counts.items()):
            print(f"{asked:>10} → {seen:<10} {n}")


def speed() -> None:
    """Seconds per world-model training step (UNet + text encoder, batch 64) on 2 CPU threads."""
    torch.set_num_threads(2)
    variants = {"default": {}, "attention-16px": {"unet_attention": [True, True, True]},
                "text-128": {"text_hidden": 128}, "text-128-3-layers": {"text_hidden": 128, "text_layers": 3},
                "no-mid-attention": {"unet_mid_attention": False}}
    for name, change in variants.items():
        recipe = world.WorldRecipe.from_dict(change)
        unet, text_encoder = world.new_unet(recipe), world.new_text_encoder(recipe)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, 1e-4)
        x, t = torch.randn(64, 4, 16, 16), torch.randint(0, 1000, (64,))
        ids = torch.randint(0, text_encoder.config.vocab_size - 1, (64, world.TOKEN_LENGTH))
        for i in range(6):
            if i == 2:
                start = time.perf_counter()
            unet(x, t, text_encoder(ids)[0]).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        print(f"{name:20s} {(time.perf_counter() - start) / 4:.3f} s/step", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prep")
    p.add_argument("dir", type=Path)
    p.add_argument("--round", required=True, choices=sorted(ROUNDS))
    p.add_argument("--crisp-oracle", action="store_true", help="train the oracle on clean renders only")
    p.add_argument("--device", default="cpu")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("name", choices=sorted(CONFIGS))
    r.add_argument("--device", default="cpu")
    c = sub.add_parser("confusion")
    c.add_argument("world", type=Path)
    c.add_argument("--all", action="store_true", help="all 480 named captions, not 160 training ones")
    c.add_argument("--seeds", type=int, nargs="+", default=[1000])
    c.add_argument("--guidance", type=float)
    c.add_argument("--attribute", default="texture", choices=sorted(world.ATTRIBUTES))
    sub.add_parser("speed")
    args = parser.parse_args()
    if args.command == "prep":
        prep(args.dir, args.round, args.crisp_oracle, args.device)
    elif args.command == "run":
        run(args.dir, args.name, args.device)
    elif args.command == "confusion":
        confusion(args.world, args.all, tuple(args.seeds), args.guidance, args.attribute)
    else:
        speed()
