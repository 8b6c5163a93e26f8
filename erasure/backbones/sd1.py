"""SD 1.x / 2.x: UNet2DConditionModel, DDPM noise, eps or v prediction (from the scheduler config)."""

from __future__ import annotations

import torch

from erasure.backbones.base import Backbone, Conditioning, Noised, broadcast_to, token_segments
from erasure.errors import ModelError


class StableDiffusionBackbone(Backbone):
    family = "sd1"
    denoiser_component = "unet"
    cross_attention = r"\battn2\."
    noxattn_excluded = r"^(time_embedding|conv_out|conv_norm_out)\."
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SD LoRA training default

    def __init__(self, pipe, use_t5: bool = True):
        super().__init__(pipe, use_t5)
        self.scheduler = pipe.scheduler
        self.prediction_type = pipe.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ModelError(f"model: scheduler prediction_type {self.prediction_type!r}: erasure supports "
                             "epsilon and v_prediction")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.float()

    @property
    def text_encoders(self):
        return [self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def token_segments(self, prompts):
        tokenizer = self.pipe.tokenizer
        return [[s] for s in token_segments(tokenizer, prompts, tokenizer.model_max_length)]

    def text_projections(self):
        # Cross-attention keys and values: the only weights that read the text (UCE, §3).
        return {"encoder_hidden_states": [(name, m) for name, m in self.pipe.unet.named_modules()
                                          if name.endswith(("attn2.to_k", "attn2.to_v"))]}

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

    def predict(self, model, x_t, timesteps, cond):
        return model(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def to_eps(self, pred, x_t, timesteps):
        if self.prediction_type == "epsilon":
            return pred
        # eps = sqrt(ᾱ_t) v + sqrt(1-ᾱ_t) x_t, inverting the two lines of add_noise.
        alpha, sigma = self._alpha_sigma(timesteps, x_t)
        return alpha * pred + sigma * x_t

    def sampling_scheduler(self):
        from diffusers import DDIMScheduler

        # ESD samples its x_t with DDIM (Gandikota et al. 2023, code: 50 DDIM steps).
        return DDIMScheduler.from_config(self.scheduler.config)

    def save_lora(self, directory, lora_state_dict, metadata):
        type(self.pipe).save_lora_weights(directory, unet_lora_layers=lora_state_dict,
                                          unet_lora_adapter_metadata=metadata)
