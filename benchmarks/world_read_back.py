"""Read a class or unconditional world (or a model erased from one) back with the oracle, at any sampler.

The quality bar of `erasure world build --kind class|none` (erasure.world.model.class_quality: same
seeds, same prompts), with the sampler's steps, guidance and scheduler changeable, and for any model
folder. It reproduces the README's figures that are not a build's own print-out:

    # the 6,000-step class world (`erasure world build --kind class --set steps=6000`) at guidance 7.5
    # (100 samples per class): 0.956
    python benchmarks/world_read_back.py DIR --guidance 7.5 --per-class 100
    # the first unconditional world (`erasure world build --kind none --set steps=3000 --set
    # sampler=dpm-solver++ --set sample_steps=20`) drawn with DDIM, 50 steps, x0 clipped (500
    # samples): 6.8 points from uniform (16 with its own DPM-Solver++); dynamic thresholding: 20
    python benchmarks/world_read_back.py DIR --scheduler ddim-clip --steps 50 --per-class 100
    python benchmarks/world_read_back.py DIR --scheduler dpm-threshold --per-class 100
    # one point of recipes/world-class/rgd.yaml's tuning (its data as `erasure bench micro-class
    # --classes triangle` renders it under OUT/data/triangle/all):
    erasure train --recipe recipes/world-class/rgd.yaml --concept triangle --forget_data D/forget \\
        --retain_data D/retain --learning_rate 3e-5 --max_steps 100 --output_dir /tmp/rgd-3e-5
    python benchmarks/world_read_back.py /tmp/rgd-3e-5 --world world:class --per-class 32
"""

from __future__ import annotations

import argparse

SCHEDULERS = ("own", "dpm-solver++", "ddim-clip", "dpm-threshold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="world:class, world:uncond, or a folder erased from one")
    parser.add_argument("--world", help="the world the model comes from (default: the model itself)")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the world's)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the world's)")
    parser.add_argument("--per-class", type=int, default=200, help="samples per class (default 200, the build's)")
    parser.add_argument("--scheduler", choices=SCHEDULERS, default="own",
                        help="own: the folder's; dpm-solver++ or ddim-clip: a world recipe's sampler of that "
                             "name (erasure.world.model.noise_schedulers); dpm-threshold: DPM-Solver++ with "
                             "dynamic thresholding")
    args = parser.parse_args()

    import dataclasses
    import json

    from diffusers import DPMSolverMultistepScheduler

    from erasure.backbones import resolve_model
    from erasure.data.generate import load_pipeline
    from erasure.world.model import (WORLD_FILE, WorldRecipe, class_quality, noise_schedulers, world_oracle,
                                     world_sampler)

    world = resolve_model(args.world or args.model)
    kind = json.loads((world / WORLD_FILE).read_text())["conditioning"]
    steps, guidance = world_sampler(world)
    recipe = WorldRecipe.for_kind(kind, [f"quality_per_class={args.per_class}", f"sample_steps={args.steps or steps}",
                                         f"guidance_scale={guidance if args.guidance is None else args.guidance}"])
    pipe = load_pipeline(resolve_model(args.model), "cpu", "float32")
    if args.scheduler in ("dpm-solver++", "ddim-clip"):  # on the world's own betas, as a build with it would draw
        built = WorldRecipe.from_dict(json.loads((world / WORLD_FILE).read_text())["recipe"])
        pipe.scheduler = noise_schedulers(dataclasses.replace(built, sampler=args.scheduler))[1]
    elif args.scheduler == "dpm-threshold":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, thresholding=True,
                                                                 sample_max_value=1.0)
    quality, _ = class_quality(pipe, world_oracle(world), recipe, show_progress=True)
    print(json.dumps(quality, indent=2))


if __name__ == "__main__":
    main()
