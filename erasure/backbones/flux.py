"""FLUX.1: FluxTransformer2DModel (double- then single-stream blocks), rectified flow
(erasure.backbones.flow), packed latents, and, in the guidance-distilled [dev], a guidance embedding.

The trainer's latents stay the VAE's (B, 16, h, w); the transformer reads them as 2×2 patches packed
into a sequence of (h/2)(w/2) tokens of 64 channels, with each token's (0, row, column) position ids
for the rotary embedding, and the text tokens at position 0. `predict` packs, calls and unpacks, so
the noise process and every method see the same tensors as on SD3.

The text: T5's hidden states are the sequence the blocks attend to; CLIP gives only the pooled
vector, which joins the time step. T5 is therefore required (`use_t5: false` is refused).
"""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning, token_segments
from erasure.backbones.flow import FlowMatchingBackbone
from erasure.errors import RecipeError

T5_SEQUENCE_LENGTH = 512  # FluxPipeline.encode_prompt's default max_sequence_length
# The distilled guidance the transformer is told during training, when it has a guidance embedding
# (FLUX.1 [dev]): FluxPipeline's default guidance_scale, and the default of diffusers' FLUX
# DreamBooth scripts. [schnell] has no guidance embedding and takes none.
TRAINING_GUIDANCE = 3.5


class FluxBackbone(FlowMatchingBackbone):
    family = "flux"
    # The double-stream blocks' context projections, as SD3's; the single-stream blocks share one set
    # of weights between text and image tokens, so they have no text-only projection to pick.
    cross_attention = r"^transformer_blocks\.\d+\.attn\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\."
    noxattn_excluded = r"^(time_text_embed|norm_out|proj_out)\."
    # diffusers' FLUX DreamBooth LoRA default (train_dreambooth_lora_flux.py): both streams'
    # attention projections and feed-forward layers.
    lora_targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                    "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                    "ff_context.net.0.proj", "ff_context.net.2"]

    @classmethod
    def check_recipe(cls, config, pipeline):
        super().check_recipe(config, pipeline)
        if not config.use_t5:
            raise RecipeError(f"use_t5: false on {pipeline}: FLUX's transformer attends to T5's hidden states "
                              "only (CLIP gives the pooled vector), so it cannot run without T5; set use_t5: true")

    @property
    def text_encoders(self):
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def latent_shape(self, resolution):
        side = resolution // self.latent_scale
        return (self.pipe.vae.config.latent_channels, side, side)

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=device,
                                                    max_sequence_length=T5_SEQUENCE_LENGTH)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def token_segments(self, prompts):
        return [[s] for s in token_segments(self.pipe.tokenizer_2, prompts, T5_SEQUENCE_LENGTH)]

    def text_projections(self):
        # As on SD3 (and as UCE's reference code edits FLUX): the context embedder reads T5's states,
        # the pooled-text embedder's first layer reads CLIP's pooled vector.
        t = self.pipe.transformer
        return {"encoder_hidden_states": [("context_embedder", t.context_embedder)],
                "pooled_projections": [("time_text_embed.text_embedder.linear_1",
                                        t.time_text_embed.text_embedder.linear_1)]}

    def sampling_scheduler(self, num_steps, like):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        # FluxPipeline's own timesteps: σ from 1 to 1/N, shifted by μ, which grows with the image's
        # token count (a resolution-dependent shift).
        config = self.pipe.scheduler.config
        scheduler = type(self.pipe.scheduler).from_config(config)
        tokens = (like.shape[-2] // 2) * (like.shape[-1] // 2)
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device=like.device, mu=mu)
        return scheduler

    def predict(self, model, x_t, timesteps, cond):
        from diffusers import FluxPipeline

        b, c, h, w = x_t.shape
        tokens = FluxPipeline._pack_latents(x_t, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
        text = cond["encoder_hidden_states"]
        text_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((b,), TRAINING_GUIDANCE, device=x_t.device, dtype=torch.float32)
        # FluxPipeline gives the transformer s = t / 1000, which it scales back by 1000 itself.
        out = model(hidden_states=tokens, timestep=timesteps.float() / self.num_train_timesteps,
                    guidance=guidance, pooled_projections=cond["pooled_projections"],
                    encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return FluxPipeline._unpack_latents(out, h * self.latent_scale, w * self.latent_scale, self.latent_scale)
