"""Rectified flow (SD3, FLUX): the noise process of the transformer families.

x_t = (1 - s) x0 + s eps and the network predicts the velocity v = eps - x0 (Esser et al. 2024,
eq. 2 and §3.1); timesteps are s·1000 drawn from a density of diffusers.training_utils
(logit-normal by default), with that module's loss weights.
"""

from __future__ import annotations

import copy


from erasure.backbones.base import Backbone, Noised, broadcast_to


class FlowMatchingBackbone(Backbone):
    denoiser_component = "transformer"

    def __init__(self, pipe, use_t5: bool = True, weighting_scheme: str = "logit_normal",
                 logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29):
        super().__init__(pipe, use_t5)
        # A private copy: set_timesteps during sampling must not move the training timesteps.
        self.scheduler = copy.deepcopy(pipe.scheduler)
        self.num_train_timesteps = self.scheduler.config.num_train_timesteps
        self.weighting = dict(weighting_scheme=weighting_scheme, logit_mean=logit_mean,
                              logit_std=logit_std, mode_scale=mode_scale)

    def sample_timesteps(self, n, generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        # The scheduler's timesteps as built (shifted by a fixed `shift`; unshifted where the
        # shift is resolution-dependent, FLUX's use_dynamic_shifting), indexed by u, as diffusers'
        # SD3 and FLUX training scripts do.
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

    def to_eps(self, pred, x_t, timesteps):
        # x0 = eps - v, so x_t = eps - (1 - s) v: eps_hat = x_t + (1 - s) v_hat (DESIGN.md table).
        return x_t + (1 - self._sigma(timesteps, x_t)) * pred

    def sampling_scheduler(self, num_steps, like):
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps, device=like.device)
        return scheduler

    def prompt_arguments(self, cond):
        # SD3's and FLUX's conditioning: the text sequence and the pooled vector
        return {"prompt_embeds": cond["encoder_hidden_states"], "pooled_prompt_embeds": cond["pooled_projections"]}

    def save_lora(self, directory, lora_state_dict, metadata):
        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=lora_state_dict,
                                          transformer_lora_adapter_metadata=metadata)
