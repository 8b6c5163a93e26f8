"""What a method may ask of a model family (DESIGN.md, "Backbones").

A backbone wraps a loaded diffusers pipeline and answers: which parameters train for a scope, how
prompts become conditioning, how a clean latent is noised (with the native training target), how a
native prediction becomes a noise prediction, and which scheduler samples from it. Methods only talk
to this interface, so each method is written once for every family.

Conditioning is the one place where "prompt embeddings, class labels or nothing" is decided: the
trainer calls prompts prompts throughout (a class-conditional model's prompts are class names, an
unconditional model's are empty) and `encode_prompts` turns them into what the denoiser takes.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

from pathlib import Path

import torch

from erasure.errors import RecipeError

Conditioning = dict[str, torch.Tensor]  # batch-first tensors the denoiser takes as keyword args
CONDITIONING_WORDS = {"text": "prompt embeddings", "class": "class labels", "none": "nothing (unconditional)"}


@dataclass
class Noised:
    x_t: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor  # the native training target (eps, v or flow velocity)
    weight: torch.Tensor | None = None  # per-sample loss weight (SD3 weighting schemes)


@dataclass
class TokenSegment:
    """One tokenizer's stretch of a conditioning sequence: its positions in the sequence, the token
    ids there (padding included) and how many of them are real tokens (start and end included)."""
    positions: list[int]
    ids: list[int]
    real: int


def token_segments(tokenizer, prompts: list[str], max_length: int, offset: int = 0) -> list[TokenSegment]:
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True)
    return [TokenSegment(list(range(offset, offset + len(ids))), list(ids), int(sum(mask)))
            for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


def latent_scale(pipe) -> int:
    """Pixels per latent pixel: the VAE halves the size in every down block after the first (the
    vae_scale_factor of diffusers' SD pipelines, which DiTPipeline does not define); 1 in pixel space
    (DDPMPipeline has no VAE)."""
    vae = getattr(pipe, "vae", None)
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


class Backbone:
    family: str
    # What the denoiser is conditioned on: "text" (prompt embeddings), "class" (class labels) or
    # "none"; a method that has no meaning for it is refused before the weights load (check_recipe).
    conditioning = "text"
    # Scopes that have no meaning for the family, with the reason (check_recipe says it).
    scope_refusals: dict[str, str] = {}
    # Regexes over parameter names. `cross_attention`: the weights that read the conditioning (ESD-x);
    # `noxattn_excluded`: what ESD-u also leaves alone (time embedding and output layer, as the ESD
    # code's "noxattn" does); `lora_targets`: module names that get LoRA adapters.
    cross_attention: str
    noxattn_excluded: str
    lora_targets: list[str]
    denoiser_component: str  # the pipeline's name for the denoiser ("unet", "transformer")
    # The layout of the family's original single-file checkpoints that erasure writes (erasure.single_file),
    # or None where it writes none (export_single_file is refused before the weights load).
    single_file_layout: str | None = None

    def __init__(self, pipe, use_t5: bool = True):
        self.pipe = pipe
        self.use_t5 = use_t5

    @classmethod
    def check_recipe(cls, config, pipeline: str) -> None:
        """Refuse, before any weights load, a method or scope that has no meaning for this family."""
        from erasure.config import SCOPES
        from erasure.methods import METHOD_TABLE

        method = METHOD_TABLE[config.method]
        if cls.conditioning not in method.runs_on:
            runs = [m for m, entry in METHOD_TABLE.items() if cls.conditioning in entry.runs_on]
            raise RecipeError(f"method: {config.method} {method.needs}; {pipeline} is conditioned on "
                              f"{CONDITIONING_WORDS[cls.conditioning]}. Methods that run on it: {', '.join(runs)}")
        if config.scope in cls.scope_refusals:
            allowed = [s for s in SCOPES if s not in cls.scope_refusals]
            raise RecipeError(f"scope: {config.scope} on {pipeline}: {cls.scope_refusals[config.scope]}; "
                              f"scopes for it: {', '.join(allowed)}")
        if config.export_single_file and cls.single_file_layout is None:
            from erasure.backbones import FAMILIES

            writable = [name for name, family in FAMILIES.items() if family.single_file_layout]
            raise RecipeError(f"export_single_file: erasure writes no original-layout single file for {pipeline} "
                              f"({cls.family}); it writes one for {', '.join(writable)}. The pipeline folder "
                              "is exported either way")
        if config.monitor_every and cls.conditioning != "text":
            raise RecipeError(f"monitor_every: the training monitor samples prompts with a text-to-image "
                              f"pipeline; {pipeline} is conditioned on {CONDITIONING_WORDS[cls.conditioning]}. "
                              "Set monitor_every: 0")

    # ---- the model ----------------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_component)

    def replace_denoiser(self, module: torch.nn.Module) -> None:
        """Puts ``module`` in the pipeline in the denoiser's place (the export of a sharded run)."""
        setattr(self.pipe, self.denoiser_component, module)

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def encoders(self) -> list[torch.nn.Module]:
        """The frozen modules that encode prompts and images (on the device only while they encode)."""
        return self.text_encoders + [self.pipe.vae]

    def inert(self, name: str) -> bool:
        """Weights that cannot affect the prediction (their gradient is always zero)."""
        return False

    @property
    def latent_scale(self) -> int:
        return latent_scale(self.pipe)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.latent_scale
        return (self.denoiser.config.in_channels, side, side)

    def native_resolution(self) -> int:
        from erasure.generation import native_size  # the size the pipeline itself draws at

        return native_size(self.pipe)

    def select_trainable(self, scope: str, lora_rank: int = 4, lora_alpha: float | None = None):
        """Freeze everything, then unfreeze (or attach LoRA to) the scope's weights.

        Returns the (name, parameter) pairs that train."""
        model = self.denoiser
        model.requires_grad_(False)
        if scope == "lora":
            from peft import LoraConfig

            model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank,
                                         init_lora_weights="gaussian", target_modules=self.lora_targets))
            return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = []
        for name, param in model.named_parameters():
            if self.inert(name):
                continue
            xattn = re.search(self.cross_attention, name) is not None
            if (scope == "full" or (scope == "xattn" and xattn)
                    or (scope == "noxattn" and not xattn and not re.search(self.noxattn_excluded, name))):
                param.requires_grad_(True)
                chosen.append((name, param))
        if not chosen:
            raise RecipeError(f"scope: {scope!r} selects no parameter of {type(model).__name__}")
        return chosen

    def frozen_copy(self, dtype: torch.dtype) -> torch.nn.Module:
        """An untrainable copy of the base denoiser (ESD's eps_0)."""
        frozen = copy.deepcopy(self.denoiser).to(dtype)
        frozen.requires_grad_(False)
        return frozen.eval()

    # ---- conditioning and latents (frozen parts; called once per run, not per step) -----------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device) -> Conditioning:
        raise NotImplementedError

    def encode_prompts_differentiably(self, prompts: list[str], device) -> Conditioning:
        """encode_prompts with its autograd graph: textual inversion trains a token's embedding row
        through the text encoder. The family's own encode_prompts, unwrapped from its no_grad."""
        encode = type(self).encode_prompts
        return getattr(encode, "__wrapped__", encode)(self, prompts, device)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels in [-1, 1] → the VAE posterior's mean and std; latents are drawn per step."""
        dist = self.pipe.vae.encode(pixels.to(self.pipe.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae.config
        z = mean + std * noise
        return (z - (getattr(vae, "shift_factor", None) or 0.0)) * vae.scaling_factor

    def other_class(self, cond: Conditioning, u: torch.Tensor) -> Conditioning | None:
        """SalUn's relabelling on a class-conditional model: each sample's class replaced by one drawn
        uniformly (``u`` in [0, 1) per sample) from the model's other classes. None for a model without
        classes, where SalUn relabels to its anchor prompt."""
        return None

    def prompt_arguments(self, cond: Conditioning) -> dict:
        """The pipeline call's keyword arguments that stand for prompts encoded as ``cond`` (`encode_prompts`'
        output, possibly changed: an attack's embeddings), so the pipeline's own sampler draws from them."""
        raise NotImplementedError(f"{type(self.pipe).__name__} takes no prompt embeddings")

    def token_segments(self, prompts: list[str]) -> list[list[TokenSegment]]:
        """Per prompt, the tokenizer segments of its conditioning sequence (UCE picks positions)."""
        raise NotImplementedError

    def text_projections(self) -> dict[str, list[tuple[str, torch.nn.Module]]]:
        """The linear maps of the denoiser that read text embeddings directly, by the conditioning
        key whose vectors they read (UCE edits them in closed form)."""
        raise NotImplementedError

    # ---- the noise process ----------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Noised:
        raise NotImplementedError

    def predict(self, model, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning):
        raise NotImplementedError

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sampling_scheduler(self, num_steps: int, like: torch.Tensor):
        """A fresh scheduler of the family's sampler, its timesteps set for ``num_steps`` steps from
        latents shaped like ``like`` (ESD draws its x_t with it)."""
        raise NotImplementedError

    # ---- export ---------------------------------------------------------------------------------
    def single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole pipeline's weights under the names of the family's original single-file checkpoint."""
        from erasure.single_file import single_file_state_dict

        return single_file_state_dict(self.pipe, self.single_file_layout)

    def save_lora(self, directory, lora_state_dict: dict, metadata: dict) -> None:
        """Write the adapter with its peft config (rank, alpha, targets) as safetensors metadata: without
        it diffusers reloads the adapter at alpha = rank, whatever alpha it was trained with."""
        raise NotImplementedError



def save_kohya_lora(directory, lora_state_dict: dict, metadata: dict, prefix: str = "unet") -> None:
    """The adapter again in kohya-ss's layout, which A1111, ComfyUI and diffusers' load_lora_weights
    read: `lora_unet_<module path with _>.lora_down/lora_up.weight` and a `.alpha` per module. diffusers'
    converter writes alpha = rank; the adapter was trained with lora_alpha, so that is written instead
    (kohya scales each module by alpha / rank, as peft does)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from erasure.hub import KOHYA_LORA

    converted = convert_state_dict_to_kohya({f"{prefix}.{k}": v for k, v in lora_state_dict.items()})
    alpha = torch.tensor(float(metadata["lora_alpha"]))
    tensors = {k: alpha.clone() if k.endswith(".alpha") else v.detach().contiguous().cpu()
               for k, v in converted.items()}
    save_file(tensors, Path(directory) / KOHYA_LORA, metadata={"ss_network_module": "networks.lora",
                                                              "ss_network_dim": str(metadata["r"]),
                                                              "ss_network_alpha": str(metadata["lora_alpha"])})


def broadcast_to(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped to multiply a batch of latents."""
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.device, like.dtype)
