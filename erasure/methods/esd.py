"""ESD's training inputs: x_t drawn by sampling the model being trained, part of the way.

ESD (Gandikota et al. 2023, §4 and code) starts from noise, samples with the concept prompt and
guidance 3 for a random number of the sampler's steps, and trains at the timestep reached.
"""

from __future__ import annotations

import torch

from erasure.backbones import Backbone, Conditioning


def concat(a: Conditioning, b: Conditioning) -> Conditioning:
    return {key: torch.cat([a[key], b[key]]) for key in a}


@torch.no_grad()
def sample_partial_trajectory(backbone: Backbone, model, start_noise: torch.Tensor, cond: Conditioning,
                              uncond: Conditioning, guidance: float, num_steps: int, stop: int):
    """Run `stop` of `num_steps` guided sampler steps; returns x_t and its timesteps."""
    scheduler = backbone.sampling_scheduler(num_steps, start_noise)
    # Flow-matching schedulers start at unit noise and take the input unscaled.
    x = start_noise * getattr(scheduler, "init_noise_sigma", 1.0)
    scale = getattr(scheduler, "scale_model_input", lambda sample, t: sample)
    both = concat(uncond, cond)
    for t in scheduler.timesteps[:stop]:
        model_input = scale(x, t)
        timesteps = t.expand(2 * len(x))
        unconditional, conditional = backbone.predict(
            model, torch.cat([model_input, model_input]), timesteps, both).chunk(2)
        guided = unconditional + guidance * (conditional - unconditional)
        x = scheduler.step(guided, t, x).prev_sample
    return x, scheduler.timesteps[stop].expand(len(x))
