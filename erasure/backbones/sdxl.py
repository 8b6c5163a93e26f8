"""SDXL: the SD 1.x UNet recipe with two CLIP text encoders and micro-conditioning (Podell et al. 2023).

The noise process and the eps / v prediction are SD 1.x's (DDPMBackbone). What differs is the
conditioning: the penultimate hidden states of both encoders side by side in the feature dimension
(768 + 1280 = 2048 in SDXL base), the second encoder's pooled projection, and six size numbers
(original size, crop top-left, target size; §2.2) embedded beside the time step.
"""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning
from erasure.backbones.sd1 import StableDiffusionBackbone


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    family = "sdxl"
    # add_embedding embeds the pooled text and the size numbers beside the time step: ESD's noxattn
    # leaves the time embedding alone, and this is part of it.
    noxattn_excluded = r"^(time_embedding|add_embedding|conv_out|conv_norm_out)\."
    single_file_layout = "sgm"  # Stability's generative-models checkpoints (A1111, ComfyUI)

    @property
    def text_encoders(self):
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, device=device,
                                                       do_classifier_free_guidance=False)
        if self.pipe.config.force_zeros_for_empty_prompt:
            # SDXL base's sampler guides away from zeros, not from the encoded empty prompt
            # (force_zeros_for_empty_prompt); the model's unconditional prediction is eps(x_t, 0), so an
            # empty prompt means the same here (ESD's eps(x_t, ""), SalUn's anchors).
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def prompt_arguments(self, cond):
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["text_embeds"]}

    def size_conditioning(self, x_t: torch.Tensor) -> torch.Tensor:
        """The micro-conditioning the sampler gives an image of x_t's size: original size = target size
        = the image's, crop at (0, 0) (StableDiffusionXLPipeline's defaults), one row per sample."""
        h, w = (side * self.latent_scale for side in x_t.shape[-2:])
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=x_t.dtype, device=x_t.device).expand(len(x_t), 6)

    def predict(self, model, x_t, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": self.size_conditioning(x_t)}
        return model(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                     added_cond_kwargs=added).sample
