"""The `erasure` command: train, tiny, demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The embedded default the demo runs: RGD on the tiny SD 1.x fixture and the built-in tiny pairs
# (recipes/tiny/rgd.yaml says the same for `erasure train`; the demo must not need the repo).
DEMO = {"method": "rgd", "concept": "nudity", "forget_data": "tiny:forget", "retain_data": "tiny:retain",
        "max_steps": 8, "batch_size": 4, "learning_rate": 1e-4, "forget_loss_cap": 5.0,
        "checkpointing_steps": 0, "report_to": "none"}


def _tiny(args) -> None:
    from erasure.tiny import TINY_BUILDERS

    TINY_BUILDERS[args.family](Path(args.dir), seed=args.seed)
    print(f"wrote a tiny {args.family} pipeline to {args.dir}")


def _demo(args) -> None:
    """The main job on the embedded default: build the tiny fixture, erase with RGD, export, load
    the export back, generate."""
    import torch
    from diffusers import DiffusionPipeline

    from erasure.backbones import resolve_model
    from erasure.config import TrainConfig
    from erasure.trainer import train

    out = Path(args.out).resolve()
    base = resolve_model("tiny:sd1")
    print(f"base model: tiny SD 1.x pipeline at {base}")
    config = TrainConfig(model=str(base), output_dir=str(out), **DEMO)
    train(config)
    pipe = DiffusionPipeline.from_pretrained(out)
    image = pipe(config.concept or "a photo of a nude person", num_inference_steps=10, height=32,
                 width=32, generator=torch.Generator().manual_seed(0)).images[0]
    sample = out / "sample.png"
    image.save(sample)
    print("\nwhere everything went:")
    print(f"  erased pipeline  {out}  (DiffusionPipeline.from_pretrained loads it)")
    print(f"  erasure card     {out / 'README.md'}, {out / 'erasure.json'}")
    print(f"  sample image     {sample}")
    print(f"  tiny base model  {base}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # all of train's flags come from the recipe dataclass
        from erasure.trainer import main as train_main

        return train_main(argv[1:])
    parser = argparse.ArgumentParser(prog="erasure", description="Concept erasure for diffusers models.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train", help="erase a concept: erasure train --recipe R.yaml [--key value …]")
    tiny = commands.add_parser("tiny", help="write a tiny random pipeline for tests and demos")
    tiny.add_argument("family", choices=["sd1", "sd1-v", "sd3"])
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_tiny)
    demo = commands.add_parser("demo", help="erase a concept from the tiny model end to end")
    demo.add_argument("--out", default="erasure-demo", help="where the erased pipeline goes")
    demo.set_defaults(run=_demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
