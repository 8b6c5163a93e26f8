"""SD3: SD3Transformer2DModel, rectified flow, with or without the T5 encoder.

x_t = (1 - s) x0 + s eps and the network predicts the velocity v = eps - x0 (Esser et al. 2024,
eq. 2 and §3.1); timesteps are s·1000 drawn from a logit-normal density, with the loss weights of
diffusers.training_utils.
"""

from __future__ import annotations

import copy

import torch

from erasure.backbones.base import Backbone, Conditioning, Noised, broadcast_to, token_segments


T5_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.encode_prompt's default max_sequence_length


class StableDiffusion3Backbone(Backbone):
    family = "sd3"
    denoiser_component = "transformer"
    # Joint attention: the context stream's projections are SD3's cross-attention analogue.
    cross_attention = r"\battn\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\."
    noxattn_excluded = r"^(time_text_embed|norm_out|proj_out)\."
    # diffusers' SD3 LoRA training default (train_dreambooth_lora_sd3.py).
    lora_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]

    def __init__(self, pipe, use_t5: bool = True, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        super().__init__(pipe, use_t5)
        # A private copy: set_timesteps during sampling must not move the training timesteps.
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.weighting = dict(weighting_scheme=weighting_scheme, logit_mean=logit_mean,
                              logit_std=logit_std, mode_scale=mode_scale)

    @property
    def text_encoders(self):
        encoders = [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]
        return [e for e in encoders if e is not None]

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=device,
            do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def token_segments(self, prompts):
        # encode_prompt's sequence: the CLIP tokens (both CLIP encoders, side by side in the feature
        # dimension), then the T5 tokens (zeros when T5 is not loaded: nothing to pick there).
        clip = self.pipe.tokenizer
        segments = [[s] for s in token_segments(clip, prompts, clip.model_max_length)]
        if self.pipe.text_encoder_3 is not None:
            t5 = token_segments(self.pipe.tokenizer_3, prompts, T5_SEQUENCE_LENGTH, offset=clip.model_max_length)
            for per_prompt, s in zip(segments, t5):
                per_prompt.append(s)
        return segments

    def text_projections(self):
        # In joint attention the context stream is rewritten by every block (it attends to the image
        # tokens), so a block's context key/value projections do not read the text embeddings; the
        # maps that do are the context embedder and the pooled-text embedder's first layer, which is
        # what UCE's reference code edits in FLUX, the same architecture.
        t = self.pipe.transformer
        return {"encoder_hidden_states": [("context_embedder", t.context_embedder)],
                "pooled_projections": [("time_text_embed.text_embedder.linear_1",
                                        t.time_text_embed.text_embedder.linear_1)]}

    def sample_timesteps(self, n, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(batch_size=n, generator=generator, **self.weighting)
        indices = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return self.scheduler.timesteps[indices]

    def _sigma(self, timesteps, like):
        # The scheduler's timesteps are s · num_train_timesteps (FlowMatchEulerDiscreteScheduler).
        return broadcast_to(timesteps.float() / self.num_train_timesteps, like)

    def add_noise(self, x0, noise, timesteps) -> Noised:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        s = self._sigma(timesteps, x0)
        x_t = (1 - s) * x0 + s * noise
        weight = compute_loss_weighting_for_sd3(self.weighting["weighting_scheme"], s.flatten())
        return Noised(x_t, timesteps, noise - x0, weight.float())

    def inert(self, name):
        # A context_pre_only block (the last one) discards the context stream's attention output,
        # so its context query projection never reaches the prediction.
        last = self.denoiser.config.num_layers - 1
        return name.startswith(f"transformer_blocks.{last}.attn.add_q_proj.") or \
            name.startswith(f"transformer_blocks.{last}.attn.norm_added_q.")

    def predict(self, model, x_t, timesteps, cond):
        return model(hidden_states=x_t, timestep=timesteps, return_dict=False, **cond)[0]

    def to_eps(self, pred, x_t, timesteps):
        # x0 = eps - v, so x_t = eps - (1 - s) v: eps_hat = x_t + (1 - s) v_hat (DESIGN.md table).
        return x_t + (1 - self._sigma(timesteps, x_t)) * pred

    def sampling_scheduler(self):
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    def save_lora(self, directory, lora_state_dict, metadata):
        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=lora_state_dict,
                                          transformer_lora_adapter_metadata=metadata)
