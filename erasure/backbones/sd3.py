"""SD3: SD3Transformer2DModel (MMDiT), rectified flow (erasure.backbones.flow), with or without T5."""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning, token_segments
from erasure.backbones.flow import FlowMatchingBackbone


T5_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.encode_prompt's default max_sequence_length


class StableDiffusion3Backbone(FlowMatchingBackbone):
    family = "sd3"
    # Joint attention: the context stream's projections are SD3's cross-attention analogue.
    cross_attention = r"\battn\.(add_[qkv]_proj|to_add_out|norm_added_[qk])\."
    noxattn_excluded = r"^(time_text_embed|norm_out|proj_out)\."
    # diffusers' SD3 LoRA training default (train_dreambooth_lora_sd3.py).
    lora_targets = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]

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

    def inert(self, name):
        # A context_pre_only block (the last one) discards the context stream's attention output,
        # so its context query projection never reaches the prediction.
        last = self.denoiser.config.num_layers - 1
        return name.startswith(f"transformer_blocks.{last}.attn.add_q_proj.") or \
            name.startswith(f"transformer_blocks.{last}.attn.norm_added_q.")

    def predict(self, model, x_t, timesteps, cond):
        return model(hidden_states=x_t, timestep=timesteps, return_dict=False, **cond)[0]
