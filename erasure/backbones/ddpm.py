"""The DDPM noise process (Ho et al. 2020), read from the pipeline scheduler's ᾱ_t: eps or v prediction.

Every family trained on it shares this: SD 1.x / 2.x, DiT, UNet2DModel.
"""

from __future__ import annotations

import torch

from erasure.backbones.base import Backbone, Noised, broadcast_to
from erasure.errors import ModelError


class DDPMBackbone(Backbone):
    def __init__(self, pipe, use_t5: bool = True):
        super().__init__(pipe, use_t5)
        self.scheduler = pipe.scheduler
        self.prediction_type = pipe.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"model: scheduler prediction_type {self.prediction_type!r}: erasure supports "
                             "epsilon and v_prediction")
        if getattr(pipe.scheduler, "alphas_cumprod", None) is None:
            raise ModelError(f"model: scheduler {type(pipe.scheduler).__name__} has no DDPM noise schedule "
                             "(alphas_cumprod); expected a DDPM/DDIM-family scheduler")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float()

    def sample_timesteps(self, n, generator):
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=generator)

    def _alpha_sigma(self, timesteps, like):
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return broadcast_to(abar.sqrt(), like), broadcast_to((1 - abar).sqrt(), like)

    def add_noise(self, x0, noise, timesteps) -> Noised:
        # x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) eps (Ho et al. 2020, eq. 4)
        alpha, sigma = self._alpha_sigma(timesteps, x0)
        x_t = alpha * x0 + sigma * noise
        # v = sqrt(ᾱ_t) eps - sqrt(1-ᾱ_t) x0 (Salimans & Ho 2022)
        target = noise if self.prediction_type == "epsilon" else alpha * noise - sigma * x0
        return Noised(x_t, timesteps, target)

    def to_eps(self, pred, x_t, timesteps):
        if self.prediction_type == "epsilon":
            return pred
        # eps = sqrt(ᾱ_t) v + sqrt(1-ᾱ_t) x_t, inverting the two lines of add_noise.
        alpha, sigma = self._alpha_sigma(timesteps, x_t)
        return alpha * pred + sigma * x_t

    def sampling_scheduler(self, num_steps, like):
        from diffusers import DDIMScheduler

        # ESD samples its x_t with DDIM (Gandikota et al. 2023, code: 50 DDIM steps).
        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(num_steps, device=like.device)
        return scheduler


def eps_half(output: torch.Tensor, channels: int) -> torch.Tensor:
    """A learned-variance model's output is 2×C channels, eps then the variance interpolation (Nichol &
    Dhariwal 2021; DiT): the eps half, as DiTPipeline splits it. Other outputs are returned as they are."""
    return output[:, :channels] if output.shape[1] == 2 * channels else output
