"""The one image-generation routine: every image the toolkit draws (paired data, evaluation, the
training monitor, the micro world's quality check, the demo) goes through `draw`, and every image
it writes to disk through `render`.

An image's starting noise comes from its own generator on the CPU, seeded by the image's own seed:
so its noise depends on neither the batch it was drawn in, nor the number of processes, nor the
device. The pipeline's own sampler does the rest; its batched kernels may round the last bit of a
pixel differently in another batch (measured on the tiny fixture: one grey level on 0.01 % of
pixels between batches of 3 and of 1), so byte-identical images need the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erasure.atomic import write_atomically
from erasure.errors import RecipeError


def process_state():
    """accelerate's view of the processes this command runs in (one, unless started by `accelerate
    launch` or torchrun). `Accelerator` reads ACCELERATE_USE_CPU itself; `PartialState` must be told."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def denoiser(pipe):
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def native_size(pipe) -> int:
    from erasure.backbones.base import latent_scale

    # FLUX's transformer has no sample_size: FluxPipeline draws at its default_sample_size (128
    # latent pixels, 1024 px) unless told otherwise.
    side = getattr(denoiser(pipe).config, "sample_size", None) or pipe.default_sample_size
    return (side if isinstance(side, int) else side[0]) * latent_scale(pipe)


# Pipelines that draw at their native size only (their __call__ takes no height/width) and, for
# DDPMPipeline, without guidance: an unconditional model has no conditional prediction to extrapolate.
FIXED_SIZE = ("DiTPipeline", "DDPMPipeline")
NO_GUIDANCE = 1.0  # the scale at which classifier-free guidance is the conditional prediction alone


def drawn_size(pipe, size: int | None, guidances=()) -> int:
    """The side images are drawn at (``size``, or the model's native one); refuses, before anything
    is drawn, what this pipeline cannot draw: another size for DiT / DDPM, a guidance for DDPM."""
    kind, native = type(pipe).__name__, native_size(pipe)
    if kind in FIXED_SIZE and size not in (None, native):
        raise RecipeError(f"size: {kind} draws only at its native {native} px (its __call__ takes no "
                          f"height or width); got {size}. Leave size unset")
    if kind == "DDPMPipeline" and any(g != NO_GUIDANCE for g in guidances):
        shown = next(g for g in guidances if g != NO_GUIDANCE)
        raise RecipeError(f"guidance: {shown} for DDPMPipeline, an unconditional model: it has no condition "
                          f"to guide towards; use guidance {NO_GUIDANCE:g} (none)")
    return size or native


def initial_noise(pipe, seeds: list[int], size: int) -> torch.Tensor:
    """One latent per seed, each from its own CPU generator."""
    from erasure.backbones.base import latent_scale

    # the VAE's latent channels (the denoiser's input channels, except FLUX's, which packs 2×2 of them)
    vae = getattr(pipe, "vae", None)
    channels = vae.config.latent_channels if vae is not None else denoiser(pipe).config.in_channels
    side = size // latent_scale(pipe)
    return torch.stack([torch.randn(channels, side, side, generator=torch.Generator("cpu").manual_seed(int(s)))
                        for s in seeds])


def sampler_arguments(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                      size: int, prompt_embeds: dict | None = None) -> dict:
    """The pipeline call's keyword arguments: the one place where the families' __call__ differ.

    Text-to-image pipelines take prompts (or, with ``prompt_embeds``, the embeddings a backbone's
    `prompt_arguments` gives, one row per image) and the starting latents. DiTPipeline and DDPMPipeline take
    no latents, only generators: diffusers' randn_tensor draws image j from generator j when given a
    list (``torch.randn((1, …), generator=g[j])`` per image), so one CPU generator per image keeps
    its noise independent of its batch, as the latents do. DDPMPipeline's scheduler steps draw
    their noise from the same generators, image by image; DiT's DDIM steps draw none."""
    kind = type(pipe).__name__
    drawn_size(pipe, size, [guidance])
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    common = dict(num_inference_steps=steps, output_type="np")
    if kind == "DiTPipeline":
        from erasure.backbones.dit import dit_classes

        # Class names are the prompts ("" the null class), as in training; DiT guides with its null
        # class when guidance_scale > 1.
        labels = dit_classes(pipe).encode(list(prompts), "cpu").tolist()
        return dict(class_labels=labels, guidance_scale=guidance, generator=generators, **common)
    if kind == "DDPMPipeline":
        return dict(batch_size=len(seeds), generator=generators, **common)  # prompts mean nothing to it
    model = denoiser(pipe)
    latents = initial_noise(pipe, seeds, size).to(model.device, model.dtype)
    if kind == "FluxPipeline":  # it takes its latents packed, 2×2 patches as tokens
        latents = pipe._pack_latents(latents, *latents.shape)
    text = dict(prompt_embeds) if prompt_embeds is not None else dict(prompt=list(prompts))
    return dict(**text, guidance_scale=guidance, height=size, width=size, latents=latents, **common)


@torch.no_grad()
def draw(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
         size: int | None = None, prompt_embeds: dict | None = None) -> tuple[np.ndarray, list[bool]]:
    """uint8 N×H×W×3 images for ``prompts`` (image j from ``seeds[j]``) with the pipeline's own
    sampler, and per image whether its pixels were finite: a NaN image is returned black and must
    not pass for a clean one. A class-conditional pipeline's prompts are class names; an
    unconditional one's are ignored (one image per seed)."""
    arrays = pipe(**sampler_arguments(pipe, prompts, seeds, steps=steps, guidance=guidance,
                                      size=size or native_size(pipe), prompt_embeds=prompt_embeds)).images
    finite = [bool(np.isfinite(a).all()) for a in arrays]
    arrays = np.nan_to_num(arrays, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(np.rint(arrays * 255), 0, 255).astype(np.uint8), finite


def draw_batched(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float,
                 size: int | None = None, batch_size: int = 16) -> tuple[np.ndarray, list[bool]]:
    """`draw` in batches of ``batch_size`` (the images do not depend on it)."""
    side = size or native_size(pipe)
    images, finite = [np.zeros((0, side, side, 3), np.uint8)], []
    for start in range(0, len(prompts), batch_size):
        part, ok = draw(pipe, prompts[start:start + batch_size], seeds[start:start + batch_size], steps=steps,
                        guidance=guidance, size=side)
        images.append(part)
        finite += ok
    return np.concatenate(images), finite


@dataclass
class Job:
    """One image to write: where, from which prompt, seed and guidance scale; ``conditioning``, when
    given, is drawn from instead of the prompt (a backbone's `prompt_arguments`, one row each: an
    attack's embeddings), the prompt then only naming the image."""
    path: Path
    prompt: str
    seed: int
    guidance: float
    conditioning: dict | None = None


def batches(jobs: list[Job], batch_size: int) -> list[list[Job]]:
    """Consecutive jobs in groups of up to ``batch_size``; a group never mixes guidance scales, nor
    prompts with embeddings."""
    groups = []
    for job in jobs:
        if groups and len(groups[-1]) < batch_size and groups[-1][0].guidance == job.guidance and \
                (groups[-1][0].conditioning is None) == (job.conditioning is None):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def render(pipe, jobs: list[Job], *, steps: int, size: int | None, batch_size: int, bar=None,
           on_drawn=None, on_written=None, process: tuple[int, int] = (0, 1)) -> None:
    """Draw every job's image into its path as PNG (each written atomically: a killed run leaves
    only complete files), batch by batch. ``on_drawn(batch, finite)`` runs before a batch is written
    (it may refuse it by raising), ``on_written(batch, finite)`` once it is on disk (bookkeeping).

    ``process = (index, count)``: the batches are formed over all jobs, then dealt out in turn, so
    each image is drawn in the same batch whatever the number of processes — and is the same to the
    byte on the same kind of device."""
    from PIL import Image

    index, count = process
    for batch in batches(jobs, batch_size)[index::count]:
        embeds = None
        if batch[0].conditioning is not None:
            embeds = {key: torch.cat([j.conditioning[key] for j in batch]) for key in batch[0].conditioning}
        images, finite = draw(pipe, [j.prompt for j in batch], [j.seed for j in batch], steps=steps,
                              guidance=batch[0].guidance, size=size, prompt_embeds=embeds)
        if on_drawn is not None:
            on_drawn(batch, finite)
        for job, image in zip(batch, images):
            write_atomically(job.path, lambda f, im=image: Image.fromarray(im).save(f, format="PNG"))
        if on_written is not None:
            on_written(batch, finite)
        if bar is not None:
            bar.update(len(batch))
