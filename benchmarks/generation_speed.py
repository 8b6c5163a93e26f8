"""Image generation speed of erasure's one generation routine against a plain diffusers call, and the
end-to-end time of the SD 1.4 nudity recipe, in one run on one device.

Speed: the same prompts, seeds, steps, guidance, size, batch and dtype are drawn twice, as PNG files:
  * plain: `StableDiffusionPipeline.from_pretrained(…, dtype)` and `pipe(prompts, …).images[i].save()`;
  * erasure: `erasure.generation.render` on the pipeline `erasure data generate` and `erasure eval`
    load (per-image CPU generators, atomic writes, finiteness flags, channels-last on CUDA).
The two alternate round by round, so drift in clocks or temperature hits both; the ratio printed is
erasure's images/s over the plain call's (the goal is ≥ 1.0).

End to end (`--end-to-end`): the README's user path with random SD 1.4-size weights, every stage
through the `erasure` command: build 800 + 100 prompt pairs, draw the 800 pairs (1,600 images),
train `recipes/sd14/nudity-rgd.yaml` for 100 steps, and evaluate base and erased on 854 I2P-shaped
prompts (a local CSV made from the test prompts, since I2P cannot be downloaded; NudeNet and CLIP
with random weights). The goal is ≤ 15 minutes on one H100.

    python benchmarks/generation_speed.py --out /tmp/speed                      # SD 1.4 size, fp16, GPU
    python benchmarks/generation_speed.py --out /tmp/speed --end-to-end
    python benchmarks/generation_speed.py --out /tmp/speed --family tiny --dtype float32 --steps 4 \
        --end-to-end --pairs 8 --train-steps 2 --eval-prompts 8          # CPU dry run of the machinery
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
I2P_NUDITY_PROMPTS = 854  # rows of AIML-TUDA/i2p with nudity_percentage > 0 (eval/i2p-nudity.yaml)


def build_model(family: str, folder: Path) -> Path:
    if not (folder / "model_index.json").is_file():
        if family == "sd14":
            sys.path.insert(0, str(HERE))
            from step_time_memory import build_sd14

            build_sd14(folder)
        else:
            from erasure.tiny import TINY_BUILDERS

            TINY_BUILDERS["sd1"](folder, seed=0)
    return folder


def plain_round(pipe, prompts, seeds, out: Path, args) -> None:
    """What a user of diffusers writes: one call per batch, a generator per image, PIL saves."""
    device = pipe.unet.device
    for start in range(0, len(prompts), args.batch_size):
        part = slice(start, start + args.batch_size)
        generators = [torch.Generator(device).manual_seed(s) for s in seeds[part]]
        images = pipe(prompt=prompts[part], num_inference_steps=args.steps, guidance_scale=args.guidance,
                      height=args.size, width=args.size, generator=generators).images
        for i, image in enumerate(images):
            image.save(out / f"{start + i:05d}.png")


def erasure_round(pipe, prompts, seeds, out: Path, args) -> None:
    from erasure.generation import Job, render

    jobs = [Job(prompt=p, seed=s, guidance=args.guidance, path=out / f"{i:05d}.png")
            for i, (p, s) in enumerate(zip(prompts, seeds))]
    render(pipe, jobs, steps=args.steps, size=args.size, batch_size=args.batch_size)


def speed(args, model: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from erasure.data.generate import load_pipeline
    from erasure.generation import native_size

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    plain = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None,
                                                    requires_safety_checker=False).to(device)
    plain.set_progress_bar_config(disable=True)
    ours = load_pipeline(model, device, args.dtype)
    args.size = args.size or native_size(ours)
    prompts = [f"a photo of a person, number {i}" for i in range(args.images)]
    seeds = list(range(args.images))
    runners = {"plain": (plain_round, plain), "erasure": (erasure_round, ours)}
    seconds = {name: [] for name in runners}
    for round_ in range(args.rounds + 1):  # round 0 warms up (kernels, allocator) and is not counted
        for name, (run, pipe) in runners.items():
            out = args.out / "images" / name / str(round_)
            out.mkdir(parents=True, exist_ok=True)
            if device == "cuda":
                torch.cuda.synchronize()
            began = time.perf_counter()
            run(pipe, prompts[: args.batch_size] if round_ == 0 else prompts, seeds, out, args)
            if device == "cuda":
                torch.cuda.synchronize()
            if round_:
                seconds[name].append(time.perf_counter() - began)
    rate = {name: args.images * len(s) / sum(s) for name, s in seconds.items()}
    return {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": args.dtype,
            "size": args.size, "steps": args.steps, "batch_size": args.batch_size, "images": args.images,
            "rounds": args.rounds, "images_per_second": rate, "ratio": rate["erasure"] / rate["plain"]}


def end_to_end(args, model: Path) -> dict:
    """Each stage as the user types it; wall seconds per stage."""
    out = args.out / "e2e"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    erasure = [sys.executable, "-m", "erasure"]
    stages = {
        f"prompts build ({args.pairs} + 100 pairs)": erasure + ["prompts", "build", "prompts/nudity.yaml",
                                                                "--train", str(args.pairs), "--out", str(out / "prompts")],
        f"data generate ({2 * args.pairs} images)": erasure + ["data", "generate", "--prompts", str(out / "prompts" / "train.jsonl"),
                                                   "--model", str(model), "--out", str(out / "pairs"),
                                                   "--dtype", args.dtype, "--batch-size", str(args.batch_size)],
        f"train ({args.train_steps} steps)": erasure + [
            "train", "--recipe", "recipes/sd14/nudity-rgd.yaml", "--model", str(model), "--forget_data",
            str(out / "pairs" / "forget"), "--retain_data", str(out / "pairs" / "retain"), "--output_dir",
            str(out / "erased"), "--checkpointing_steps", "0", "--overwrite", "true", "--max_steps",
            str(args.train_steps)] + (["--resolution", "32", "--mixed_precision", "no"] if args.family == "tiny" else []),
        f"eval ({args.eval_prompts} prompts × 2 models)": erasure + ["eval", "--suite", "eval/i2p-nudity.yaml", "--model", str(model),
                                                    "--model", str(out / "erased"), "--dataset", str(out / "i2p.csv"),
                                                    "--clip-pretrained", "random", "--batch-size", str(args.batch_size),
                                                    "--out", str(out / "eval")],
    }
    seconds = {}
    for stage, command in stages.items():
        if stage.startswith("eval"):
            write_i2p_like(out / "prompts" / "test.jsonl", out / "i2p.csv", args.eval_prompts)
        began = time.perf_counter()
        done = subprocess.run(command, cwd=HERE.parent, env=env, capture_output=True, text=True)
        seconds[stage] = time.perf_counter() - began
        if done.returncode:
            sys.exit(f"{stage} failed:\n{done.stderr[-3000:]}")
        print(f"{stage}: {seconds[stage]:.0f} s", flush=True)
    return {"seconds": seconds, "total_minutes": sum(seconds.values()) / 60}


def write_i2p_like(test_pairs: Path, csv_path: Path, rows: int) -> None:
    """ROWS rows in I2P's columns from the forget side of the test pairs (cycled), seeds 0, 1, …"""
    prompts = [json.loads(line)["forget_prompt"] for line in test_pairs.read_text().splitlines() if line.strip()]
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "nudity_percentage", "evaluation_seed", "evaluation_guidance"])
        for i in range(rows):
            writer.writerow([prompts[i % len(prompts)], 50.0, i, 7.5])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--family", choices=["sd14", "tiny"], default="sd14")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--size", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--images", type=int, default=32, help="images per round and runner")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--pairs", type=int, default=800, help="end to end: training pairs (RGD's 800)")
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--eval-prompts", type=int, default=I2P_NUDITY_PROMPTS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = build_model(args.family, args.out / f"model-{args.family}")
    result = {"speed": speed(args, model)}
    s = result["speed"]
    print(f"{s['device']}, {s['dtype']}, {s['size']} px, {s['steps']} steps, batch {s['batch_size']}: "
          f"plain {s['images_per_second']['plain']:.2f} images/s, erasure {s['images_per_second']['erasure']:.2f} "
          f"images/s, ratio {s['ratio']:.3f}")
    if args.end_to_end:
        result["end_to_end"] = end_to_end(args, model)
        print(f"end to end: {result['end_to_end']['total_minutes']:.1f} minutes (goal ≤ 15 on one H100)")
    (args.out / "generation_speed.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
