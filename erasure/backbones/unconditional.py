"""Unconditional UNet2DModel (DDPMPipeline): DDPM in pixel space, conditioned on nothing (Ho et al. 2020;
MSGM's setting, a class forgotten by its images alone).

There is no VAE: the "latent" is the image itself. There are no prompts: a set's prompts, whatever
they say, are read as nothing, so any image set serves. What guides or relabels (ESD, SalUn) or reads
text (UCE) has no meaning here and is refused; so are xattn / noxattn (no cross-attention) and lora.
"""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning
from erasure.backbones.ddpm import DDPMBackbone, eps_half
from erasure.errors import ModelError

NO_CROSS_ATTENTION = "UNet2DModel has no cross-attention (nothing in it reads a conditioning)"


class UnconditionalBackbone(DDPMBackbone):
    family = "ddpm"
    conditioning = "none"
    denoiser_component = "unet"
    cross_attention = r"(?!)"  # matches no name: the scopes that would read it are refused
    noxattn_excluded = r"(?!)"
    lora_targets = []
    scope_refusals = {"xattn": NO_CROSS_ATTENTION, "noxattn": NO_CROSS_ATTENTION,
                      "lora": "UNet2DModel takes no peft adapter in diffusers (it is not a PeftAdapterMixin)"}

    def __init__(self, pipe, use_t5: bool = True):
        super().__init__(pipe, use_t5)
        config = pipe.unet.config
        if config.num_class_embeds is not None or config.class_embed_type is not None:
            raise ModelError(f"model: this DDPMPipeline's UNet2DModel is class-conditional (num_class_embeds "
                             f"{config.num_class_embeds}, class_embed_type {config.class_embed_type}), but "
                             "DDPMPipeline samples it without class labels; erasure trains unconditional ones")
        size = config.sample_size
        if not isinstance(size, int) and len(set(size)) != 1:
            raise ModelError(f"model: UNet2DModel sample_size {list(size)} is not square; erasure trains square images")

    @property
    def text_encoders(self):
        return []

    @property
    def encoders(self):
        return []

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        return {}

    @torch.no_grad()
    def encode_images(self, pixels):
        # The image is its own latent, with no posterior to draw from: std 0.
        return pixels, torch.zeros_like(pixels)

    def latents(self, mean, std, noise):
        return mean

    def predict(self, model, x_t, timesteps, cond):
        return eps_half(model(x_t, timesteps, return_dict=False)[0], x_t.shape[1])
