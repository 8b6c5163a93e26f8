"""The micro-world recipe search behind erasure/world/model.py's defaults (README, "The micro world").

    python benchmarks/world_recipe_search.py prep DIR [--crisp-oracle] [--device cuda] [--set KEY=VALUE]
    python benchmarks/world_recipe_search.py run DIR NAME [--device cuda]     # NAME: a key of ROUND1/ROUND2
    python benchmarks/world_recipe_search.py speed                              # CPU step time, 2 threads

`prep` trains the oracle and the VAE once (shared by every `run`) and prints the oracle's read-back
of VAE reconstructions of held-out captions; `run` trains one world model on top and prints, per
(sampler steps, guidance), the oracle's read-back on held-out and on training captions.
benchmarks/world_recipe_search.sh ROUND DIR runs every config of a round on one GPU. Round 1
(logs in benchmarks/results/world-search/call*.log) changed the defaults of its time (THEN) and ran
with the renderer of commit 6ca3c12 (5–6 px texture periods) and the full CLIP vocabulary; round 2
(benchmarks/results/world-search/round2*.log) changes today's WorldRecipe defaults, on today's
renderer (7–9 px periods), and repeats configs over seeds because texture read-back varied by
±0.15 between runs of one recipe.
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

# Round 1: the defaults when it ran; each config changes the named fields.
THEN = {"text_hidden": 48, "lr": 1e-3, "ema_decay": 0.999, "quality_per_combo": 4, "steps": 3000}
ROUND1 = {
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
    "text-64-lr-2e-3": {"text_hidden": 64, "lr": 2e-3, "ema_decay": 0.9995},  # today's default
    "text-64-unet-96-2500": {"text_hidden": 64, "unet_channels": [32, 64, 96], "steps": 2500},
}
# Round 2: changes to today's WorldRecipe defaults. `seed` moves the diffusion model's
# initialisation, batches and held-out split (the shared oracle and VAE stay those of seed 0).
ROUND2 = {
    "default": {},
    "default-seed-1": {"seed": 1},
    "text-128": {"text_hidden": 128},
    "text-128-seed-1": {"text_hidden": 128, "seed": 1},
    "text-128-seed-2": {"text_hidden": 128, "seed": 2},
    "text-96": {"text_hidden": 96},
    "text-128-3-layers": {"text_hidden": 128, "text_layers": 3},
    "text-128-attention-16px": {"text_hidden": 128, "unet_attention": [True, True, True]},
}
# Round 3: the texture geometry (erasure/world/render.py TEXTURE_GEOMETRY). Round 2 left texture at
# 0.71–0.80 for every recipe; the world models drew checks as smeared diagonal waves — the two
# diagonal gratings a checkerboard is made of — which the oracle read as stripes.
# "axis": stripes only near-horizontal or near-vertical, so no stripe looks like half a checkerboard;
# "coarse-checks": 6.5–7.5 px cells, a scale apart from the stripes; "axis-coarse-checks": both.
# (The geometry chosen, axis-coarse-checks, is today's default.)
GEOMETRY = {
    "any-angle-5px-checks": {"stripe_angles": None, "stripe_angle_jitter": 0.0, "check_cell": (4.5, 5.5)},  # round 2
    "axis": {"stripe_angles": (0.0, math.pi / 2), "stripe_angle_jitter": 0.2},
    "coarse-checks": {"check_cell": (6.5, 7.5)},
    "axis-coarse-checks": {"stripe_angles": (0.0, math.pi / 2), "stripe_angle_jitter": 0.2,
                           "check_cell": (6.5, 7.5)},
}
ROUND3 = {f"{g}-seed-{s}": {"seed": s} for g in GEOMETRY for s in (0, 1)}
ROUNDS = {"1": (THEN, ROUND1), "2": ({}, ROUND2), "3": ({}, ROUND3)}


def use_geometry(name: str | None) -> None:
    """Switch the renderer to a GEOMETRY variant (for prep and run alike)."""
    if name:
        render.TEXTURE_GEOMETRY.update(GEOMETRY[name])


def config(name: str) -> dict:
    for base, configs in ROUNDS.values():
        if name in configs:
            return {**base, **configs[name]}
    raise KeyError(name)
GRID = [(20, 3.0), (20, 2.0), (15, 3.0)]


def _uint8(x: torch.Tensor):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def prep(out: Path, crisp_oracle: bool, device: str, overrides: dict) -> None:
    recipe = world.WorldRecipe.from_dict(overrides)
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

    recipe = world.WorldRecipe.from_dict(config(name))
    oracle = load_oracle(shared / "oracle")
    vae = AutoencoderKL.from_pretrained(shared / "vae").to(device)
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
    p.add_argument("--crisp-oracle", action="store_true", help="train the oracle on clean renders only")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change a WorldRecipe default")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("name", choices=sorted(set(ROUND1) | set(ROUND2) | set(ROUND3)))
    r.add_argument("--device", default="cpu")
    sub.add_parser("speed")
    for sp in (p, r):
        sp.add_argument("--geometry", choices=sorted(GEOMETRY), help="a texture GEOMETRY variant")
    args = parser.parse_args()
    use_geometry(getattr(args, "geometry", None))
    if args.command == "prep":
        import yaml

        prep(args.dir, args.crisp_oracle, args.device,
             {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)})
    elif args.command == "run":
        run(args.dir, args.name, args.device)
    else:
        speed()
