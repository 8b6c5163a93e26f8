"""Paired forget/retain images rendered by a base pipeline, in the folder layout the trainer reads.

Each line of a JSONL prompts file is a pair ("a nude person on a beach" / "a person on a beach").
Both twins of a pair are rendered from the same seed, so they differ by the concept and not by the
noise. The output is two `datasets` image folders, `OUT/forget` and `OUT/retain` (PNGs plus
`metadata.jsonl`), and `OUT/generation.json` with the settings.

A run can be killed at any point and rerun: every PNG appears under its final name only once it is
complete (written to a temporary name, then renamed), a rerun renders only the missing ones, and each
image's noise comes from its own generator seeded by (seed, pair, k), so the rerun's images are the
ones the first run would have made, whatever the batch size. `metadata.jsonl` is written last, so a
folder without it is visibly unfinished.
"""

from __future__ import annotations

import hashlib
import json
import math
from itertools import zip_longest
from pathlib import Path

from erasure.data.paired import numbered_jsonl
from erasure.atomic import TMP_SUFFIX, write_atomically
from erasure.generation import Job, drawn_size, process_state, render
from erasure.config import MAX_SEED
from erasure.errors import DataError, RecipeError

SIDES = ("forget", "retain")
# Columns each metadata row sets itself; a prompts file may not carry keys that would overwrite them
# ("image" is the column `datasets` image folders decode into).
RESERVED = {"file_name", "prompt", "seed", "pair", "steps", "guidance", "image"}
# Settings that change the pixels: a rerun that differs in any of them must not add to the folder.
# The model is compared by its weights (a model retrained at the same path is another model).
# (count / limit is left out on purpose: pair i's images do not depend on how many pairs there are.)
COMPARED = ("weights_sha256", "steps", "guidance", "size", "seed", "images_per_prompt", "dtype", "prompts_sha256")


def read_pairs(prompts_file: Path) -> list[dict]:
    """The pairs of a JSONL file, validated; errors name the file and the line."""
    if not prompts_file.is_file():
        raise DataError(f"prompts file {prompts_file} does not exist")
    pairs = []
    for number, row in numbered_jsonl(prompts_file, "prompts"):
        for key in ("forget_prompt", "retain_prompt"):
            if key not in row:
                raise DataError(f"{prompts_file} line {number} has no {key!r} (keys: {', '.join(row) or 'none'})")
            if not isinstance(row[key], str) or not row[key].strip():
                raise DataError(f"{prompts_file} line {number}: {key} is {row[key]!r}, expected non-empty text")
        clash = sorted(RESERVED & set(row))
        if clash:
            raise DataError(f"{prompts_file} line {number} has key(s) {', '.join(clash)}, which the "
                            "generated metadata sets itself; rename them")
        pairs.append(row)
    if not pairs:
        raise DataError(f"prompts file {prompts_file} is empty; expected one JSON object per line with "
                        "forget_prompt and retain_prompt")
    return pairs


def _write_json(path: Path, value) -> None:
    write_atomically(path, lambda f: f.write((json.dumps(value, indent=2) + "\n").encode()))


DTYPES = ("auto", "float32", "float16", "bfloat16")


def load_pipeline(folder: Path, device: str, dtype: str):
    import torch
    from diffusers import DiffusionPipeline

    from erasure.backbones import has_t5, is_sd3

    index = json.loads((folder / "model_index.json").read_text())
    extra = {}
    if is_sd3(folder) and not has_t5(folder):
        # diffusers does not list text_encoder_3 among SD3's optional components, so a base saved
        # without T5 only loads when told so.
        extra = {"text_encoder_3": None, "tokenizer_3": None}
    if "safety_checker" in index:
        # The forget set must show the concept: SD 1.x's safety checker would black out exactly the
        # images (nudity) this set exists to hold.
        extra.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, dtype=getattr(torch, dtype), **extra)
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per call
    pipe = pipe.to(torch.device(device))
    if pipe.device.type == "cuda" and getattr(pipe, "unet", None) is not None:
        # A UNet's convolutions run faster channels-last on tensor cores (diffusers' speed guide);
        # benchmarks/generation_speed.py measures the whole routine against a plain pipeline call.
        pipe.unet.to(memory_format=torch.channels_last)
    return pipe


def _check_settings(path: Path, settings: dict) -> None:
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise DataError(f"{path} is not a generation record; use another out_dir (or delete that folder)")
    differ = [k for k in COMPARED if old.get(k) != settings[k]]
    if differ:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {settings[k]!r} now" for k in differ)
        raise DataError(f"{path.parent} holds images generated with different settings ({detail}); "
                        "use another out_dir, or the same settings and model to resume")


def check_sampling(steps: int | None, guidance: float | None, size: int | None, seed: int, **counts) -> None:
    """Sampler settings a user typed, checked before any model loads; `counts` must be ≥ 1 (None: unset)."""
    if guidance is not None and not math.isfinite(guidance):
        raise RecipeError(f"guidance: must be a finite number, got {guidance}")
    if not 0 <= seed < MAX_SEED:
        raise RecipeError(f"seed: must be an integer in [0, 2**32), got {seed}")
    for name, value in {"steps": steps, **counts}.items():
        if value is not None and value < 1:
            raise RecipeError(f"{name}: must be at least 1, got {value}")
    if size is not None and (size < 8 or size % 8):
        raise RecipeError(f"size: must be a multiple of 8 (the VAE's factor), at least 8; got {size}")


def generate_pairs(prompts_file: str | Path, model: str, out_dir: str | Path, *, steps: int | None = None,
                   guidance: float | None = None, size: int | None = None, batch_size: int = 4, seed: int = 0,
                   images_per_prompt: int = 1, limit: int | None = None, device: str | None = None,
                   dtype: str = "auto", show_progress: bool = True) -> Path:
    """Render `images_per_prompt` images per side for each pair of `prompts_file` into `out_dir`
    (forget/, retain/, generation.json); resumes a killed run. Returns `out_dir`.

    Image k of pair i (i counts the file's non-blank lines from 0) is `{i:06d}_{k}.png` on both
    sides, rendered from seed `seed * 1_000_003 + i * images_per_prompt + k`. `steps` and `guidance`
    default to the model's own sampler (erasure.world.model.default_sampler).

    For a class-conditional model (DiT) the prompts are class names: the forget side the class to
    forget, the retain side another class; an unconditional model (DDPM) ignores them."""
    from tqdm.auto import tqdm

    from erasure.backbones import resolve_model, weights_sha256
    from erasure.world.model import default_sampler

    model = str(model)
    check_sampling(steps, guidance, size, seed, batch_size=batch_size, images_per_prompt=images_per_prompt,
                   limit=limit)
    if dtype not in DTYPES:
        raise RecipeError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    prompts_file, out = Path(prompts_file), Path(out_dir)
    pairs = read_pairs(prompts_file)[:limit]  # the whole file is validated, even under a limit
    folder = resolve_model(model)
    default_steps, default_guidance = default_sampler(folder)
    steps = default_steps if steps is None else steps
    guidance = default_guidance if guidance is None else guidance

    if Path(model).expanduser().is_dir():  # a local folder is recorded absolute, so reruns match
        model = str(Path(model).expanduser().resolve())
    # Under `accelerate launch` / torchrun each process draws its share of the batches on its own
    # device; the main process alone writes the records.
    state = process_state()
    device = device or str(state.device)
    if dtype == "auto":  # half precision where it is fast and usual (GPUs), full where it is not
        dtype = "float32" if device.startswith("cpu") else "float16"
    pipe = load_pipeline(folder, device, dtype)
    settings = {
        "model": model, "weights_sha256": weights_sha256(folder), "steps": int(steps), "guidance": float(guidance),
        "size": int(drawn_size(pipe, size, [guidance])), "seed": int(seed),
        "images_per_prompt": int(images_per_prompt), "dtype": dtype,
        "prompts_file": str(prompts_file.resolve()),
        "prompts_sha256": hashlib.sha256(prompts_file.read_bytes()).hexdigest(),
        "count": len(pairs), "device": device,
    }
    _check_settings(out / "generation.json", settings)  # every process: each refuses alike
    state.wait_for_everyone()
    if state.is_main_process:
        for side in SIDES:
            (out / side).mkdir(parents=True, exist_ok=True)
        # A killed run's partial writes (never seen under a final name, but not left lying around).
        for stray in [*out.glob(f".generation.json.*{TMP_SUFFIX}"),
                      *(s for side in SIDES for s in (out / side).glob(f".*{TMP_SUFFIX}"))]:
            stray.unlink(missing_ok=True)
        # Written before any image, so every PNG in the folder was made with recorded settings.
        _write_json(out / "generation.json", settings)
    state.wait_for_everyone()

    def image_seed(i: int, k: int) -> int:
        return seed * 1_000_003 + i * images_per_prompt + k

    jobs = [(i, k) for i in range(len(pairs)) for k in range(images_per_prompt)]
    todo = {side: [(i, k) for i, k in jobs if not (out / side / f"{i:06d}_{k}.png").exists()]
            for side in SIDES}
    state.wait_for_everyone()  # every process has seen what is missing before anything changes
    if (todo["forget"] or todo["retain"]) and state.is_main_process:
        for side in SIDES:  # the folders are about to change: no longer look finished
            (out / side / "metadata.jsonl").unlink(missing_ok=True)

    def chunks(side):
        return [[Job(out / side / f"{i:06d}_{k}.png", pairs[i][f"{side}_prompt"], image_seed(i, k), guidance)
                 for i, k in todo[side][s:s + batch_size]] for s in range(0, len(todo[side]), batch_size)]

    def refuse_nonfinite(batch, finite):
        if not all(finite):
            job = batch[finite.index(False)]
            raise DataError(f"model: {model} draws NaN or inf for {job.prompt!r} ({job.path.name}); its weights "
                            "are broken (a diverged run?) — nothing was written for it")

    total = 2 * len(jobs)
    bar = tqdm(total=total, initial=total - len(todo["forget"]) - len(todo["retain"]),
               desc="generating pairs" + (f" ({state.num_processes} processes; main's share shown)"
                                          if state.num_processes > 1 else ""),
               unit="image", disable=not (show_progress and state.is_main_process))
    # Forget and retain batches alternate, so a killed run leaves mostly complete twins behind.
    ordered = [job for twins in zip_longest(chunks("forget"), chunks("retain")) for chunk in twins if chunk
               for job in chunk]
    render(pipe, ordered, steps=steps, size=settings["size"], batch_size=batch_size, bar=bar,
           on_drawn=refuse_nonfinite, process=(state.process_index, state.num_processes))
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return out

    for side in SIDES:
        rows = []
        for i, k in jobs:
            extras = {key: v for key, v in pairs[i].items() if key not in ("forget_prompt", "retain_prompt")}
            rows.append({"file_name": f"{i:06d}_{k}.png", "prompt": pairs[i][f"{side}_prompt"],
                         "seed": image_seed(i, k), "pair": i, "steps": steps, "guidance": guidance, **extras})
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        write_atomically(out / side / "metadata.jsonl", lambda f, t=text: f.write(t.encode("utf-8")))
    return out
