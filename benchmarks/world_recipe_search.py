"""The micro-world recipe search behind erasure/world/model.py's defaults (README, "The micro world").

    python benchmarks/world_recipe_search.py prep DIR [--crisp-oracle] [--device cuda]
    python benchmarks/world_recipe_search.py run DIR NAME [--device cuda]     # NAME: a key of CONFIGS
    python benchmarks/world_recipe_search.py speed                              # CPU step time, 2 threads

`prep` trains the oracle and the VAE once (shared by every `run`) and prints the oracle's read-back
of VAE reconstructions of held-out captions; `run` trains one world model on top and prints, per
(sampler steps, guidance), the oracle's read-back on held-out and on training captions.
benchmarks/world_recipe_search.sh runs every config on one GPU; its logs from the search are in
benchmarks/results/world-search/ (taken with the renderer of commit 6ca3c12, 5–6 px texture
periods, and the full CLIP vocabulary).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from erasure.world import model as world
from erasure.world.oracle import accuracy, load_oracle, save_oracle, train_oracle

# The defaults when the search ran; each config changes the named fields.
THEN = {"text_hidden": 48, "lr": 1e-3, "ema_decay": 0.999, "quality_per_combo": 4, "steps": 3000}
CONFIGS = {
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
GRID = [(20, 2.0), (20, 3.0), (20, 5.0), (20, 8.0), (15, 3.0)]


def _uint8(x: torch.Tensor):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def prep(out: Path, crisp_oracle: bool, device: str) -> None:
    recipe = world.WorldRecipe.from_dict(THEN)
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

    recipe = world.WorldRecipe.from_dict({**THEN, **CONFIGS[name]})
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
    for attention in ([False, True, True], [True, True, True]):
        recipe = world.WorldRecipe.from_dict({**THEN, "text_hidden": 64, "unet_attention": attention})
        unet, text_encoder = world.new_unet(recipe), world.new_text_encoder(recipe)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, 1e-4)
        x, t = torch.randn(64, 4, 16, 16), torch.randint(0, 1000, (64,))
        ids = torch.randint(0, text_encoder.config.vocab_size - 1, (64, world.TOKEN_LENGTH))
        for i in range(5):
            if i == 1:
                start = time.perf_counter()
            unet(x, t, text_encoder(ids)[0]).sample.pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        print(f"cross-attention at 16/8/4 px {attention}: {(time.perf_counter() - start) / 4:.3f} s/step")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prep")
    p.add_argument("dir", type=Path)
    p.add_argument("--crisp-oracle", action="store_true", help="train the oracle on clean renders only")
    p.add_argument("--device", default="cpu")
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("name", choices=sorted(CONFIGS))
    r.add_argument("--device", default="cpu")
    sub.add_parser("speed")
    args = parser.parse_args()
    if args.command == "prep":
        prep(args.dir, args.crisp_oracle, args.device)
    elif args.command == "run":
        run(args.dir, args.name, args.device)
    else:
        speed()
