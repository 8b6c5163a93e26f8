"""SD 1.x / 2.x: UNet2DConditionModel, DDPM noise, eps or v prediction (from the scheduler config)."""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning, save_kohya_lora, token_segments
from erasure.backbones.ddpm import DDPMBackbone


class StableDiffusionBackbone(DDPMBackbone):
    family = "sd1"
    denoiser_component = "unet"
    cross_attention = r"\battn2\."
    noxattn_excluded = r"^(time_embedding|conv_out|conv_norm_out)\."
    lora_targets = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' SD LoRA training default
    single_file_layout = "ldm"  # CompVis latent-diffusion's checkpoints (A1111, ComfyUI)

    @property
    def text_encoders(self):
        return [self.pipe.text_encoder]

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, device, 1, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds}

    def prompt_arguments(self, cond):
        return {"prompt_embeds": cond["encoder_hidden_states"]}

    def token_segments(self, prompts):
        tokenizer = self.pipe.tokenizer
        return [[s] for s in token_segments(tokenizer, prompts, tokenizer.model_max_length)]

    def text_projections(self):
        # Cross-attention keys and values: the only weights that read the text (UCE, §3).
        return {"encoder_hidden_states": [(name, m) for name, m in self.pipe.unet.named_modules()
                                          if name.endswith(("attn2.to_k", "attn2.to_v"))]}

    def predict(self, model, x_t, timesteps, cond):
        return model(x_t, timesteps, encoder_hidden_states=cond["encoder_hidden_states"]).sample

    def save_lora(self, directory, lora_state_dict, metadata):
        type(self.pipe).save_lora_weights(directory, unet_lora_layers=lora_state_dict,
                                          unet_lora_adapter_metadata=metadata)
        save_kohya_lora(directory, lora_state_dict, metadata)  # for A1111 / ComfyUI
