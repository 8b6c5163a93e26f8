"""The micro-world model: a tiny SD 1.x-format text-to-image pipeline trained on rendered captions.

``build_world`` runs four stages, each with a progress bar:

1. the oracle (``oracle.train_oracle``),
2. an AutoencoderKL (f = 2: 3×32×32 images ↔ 4×16×16 latents), trained for reconstruction,
3. a CLIPTextModel and a UNet2DConditionModel trained jointly with the DDPM noise-prediction loss
   on captions of the *training* combinations, with caption dropout so classifier-free guidance
   works, Min-SNR-γ loss weights (Hang et al. 2023, eq. 10 for ε-prediction) and an EMA of the
   weights;
4. the quality bar: images sampled with the world's own scheduler for caption combinations held
   out of training, read back by the oracle.

Why not SD's noise schedule: SD's ``scaled_linear`` betas (0.00085 → 0.012) leave
ᾱ_T ≈ 0.0047 — a signal-to-noise ratio that is harmless at 64×64 latents but leaves the coarse
layout of a 16×16 latent visible at t = T (Chen 2023, "On the importance of noise scheduling";
Hoogeboom et al. 2023). The world uses the original DDPM ``linear`` schedule (1e-4 → 0.02,
ᾱ_T ≈ 4e-5), which was designed for 32×32 images, and samples with DPM-Solver++ (2M) from
t = T ("trailing" spacing, Lin et al. 2024) so that a few steps suffice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from erasure.atomic import replace_folder, staging_beside
from erasure.backbones.dit import NULL_CLASS  # DiTPipeline's null class: a class world's table has its row
from erasure.errors import ModelError

from .oracle import Oracle, accuracy, load_oracle, save_oracle, to_tensor, train_oracle
from .render import ALIASED, ALIASES, ATTRIBUTES, SIZE, caption, render

SHIPPED = Path(__file__).parent / "micro"  # `erasure world build --out erasure/world/micro` made it
# The shipped worlds by model id, each built by `erasure world build --kind KIND --out erasure/world/<folder>`.
WORLDS = {"world:micro": ("micro", "text"), "world:class": ("class", "class"), "world:uncond": ("uncond", "none")}
KINDS = ("text", "class", "none")
SAMPLERS = ("dpm-solver++", "ddim-clip")  # WorldRecipe.sampler
WORLD_FILE = "world.json"
ORACLE_DIR = "oracle"
TOKEN_LENGTH = 16  # the longest caption is 10 tokens with <bos>/<eos>


@dataclass
class WorldRecipe:
    """Everything that determines a world; ``erasure world build`` records it in ``world.json``."""

    seed: int = 0
    held_out: int = 48  # caption combinations never shown in training (10 % of 480)
    oracle_steps: int = 2500  # 1500 left texture at 0.979 on clean renders (the bar is 0.98)
    vae_steps: int = 1000
    vae_batch_size: int = 32
    vae_lr: float = 5e-3
    vae_kl_weight: float = 1e-6  # SD's VAE: a KL term only to keep the latent scale sane
    vae_channels: tuple[int, ...] = (16, 32)
    text_hidden: int = 64
    text_layers: int = 2
    unet_channels: tuple[int, ...] = (32, 64, 128)
    # Cross-attention per resolution (16, 8, 4 latent px). None at 16×16: attention over 256 tokens
    # costs 15–30 % more per CPU step (`python benchmarks/world_recipe_search.py speed`), and every
    # config that met the bar in the search went without it.
    unet_attention: tuple[bool, ...] = (False, True, True)
    unet_mid_attention: bool = True
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    ema_decay: float = 0.9995
    caption_dropout: float = 0.1
    # Share of training captions that name the texture (and, independently, the shape) by its alias
    # (render.ALIASES), so the world draws an alias exactly as its main word.
    alias_rate: float = 0.3
    min_snr_gamma: float = 5.0
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # The world's sampler: "dpm-solver++" (DPM-Solver++ (2M), Lu et al. 2022) or "ddim-clip" (DDIM, Song
    # et al. 2021, with the predicted x0 clipped to [-1, 1] at every step as in Ho et al.'s DDPM sampler:
    # in pixel space it keeps samples inside the images' range, where DPM-Solver++ drew saturated ones).
    sampler: str = "dpm-solver++"
    sample_steps: int = 20
    guidance_scale: float = 3.0
    quality_per_combo: int = 5
    # What the model is conditioned on: "text" (the shipped world: a captioned SD 1.x pipeline), "class"
    # (a DiTPipeline whose class is the shape, every other attribute random, as the rest of a CIFAR
    # image varies; RGD's class-wise setting) or "none" (an unconditional pixel-space DDPMPipeline;
    # MSGM's setting). `for_kind` gives each kind's defaults.
    conditioning: str = "text"
    # The class world's denoiser: "unet", a class-conditional UNet2DModel (the text world's UNet with a
    # class table instead of cross-attention), or "dit", a DiTTransformer2DModel. Both sit in a
    # DiTPipeline. A DiT of width 128 × 6 blocks (patch 2) read back 0.62 after 4,000 steps at lr 1e-3
    # (README, "The class and unconditional worlds"): a DiT this small on CPU learns shapes too slowly.
    class_denoiser: str = "unet"
    dit_hidden: int = 128
    dit_layers: int = 6
    dit_patch: int = 2
    # The oracle and the VAE see only renders, never captions, so a world of another kind may take
    # them from a built world ("world:micro") instead of training them again ("": train).
    oracle_from: str = ""
    vae_from: str = ""
    quality_per_class: int = 200  # class / unconditional worlds: samples per class read back at build

    @classmethod
    def for_kind(cls, kind: str, settings: list[str] = (), base: dict | None = None) -> "WorldRecipe":
        """The recipe of a world of ``kind`` (``KIND_DEFAULTS``), changed by ``base`` and ``--set`` items."""
        if kind not in KINDS:
            raise ValueError(f"--kind {kind!r}; choose one of {', '.join(KINDS)}")
        return cls.from_settings(list(settings), {**KIND_DEFAULTS[kind], **(base or {})})

    @classmethod
    def from_dict(cls, data: dict) -> "WorldRecipe":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"unknown world recipe keys {unknown}; known: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        defaults = cls()
        for key, value in values.items():  # the type of each field's default; an int may stand for a float
            want = type(getattr(defaults, key))
            if want is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as text
                try:
                    value = values[key] = float(value)
                except ValueError:
                    pass
            ok = (isinstance(value, want) and not (want is not bool and isinstance(value, bool))
                  or (want is float and isinstance(value, int) and not isinstance(value, bool)))
            if want is tuple:
                inner = type(getattr(defaults, key)[0])
                ok = ok and len(value) > 0 and all(type(v) is inner for v in value)
            if want in (int, float) and ok and not (math.isfinite(value) and value >= 0):
                ok = False  # every number of a world recipe is a count, a rate or a size
            if not ok:
                raise ValueError(f"world recipe {key}: {value!r} is not like its default {getattr(defaults, key)!r}")
        if values.get("class_denoiser", "unet") not in ("unet", "dit"):
            raise ValueError(f"world recipe class_denoiser: {values['class_denoiser']!r}; choose unet or dit")
        if values.get("sampler", "dpm-solver++") not in SAMPLERS:
            raise ValueError(f"world recipe sampler: {values['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
        if values.get("conditioning", "text") not in KINDS:
            raise ValueError(f"world recipe conditioning: {values['conditioning']!r}; choose one of {', '.join(KINDS)}")
        if values.get("conditioning", "text") != "text" and values.get("quality_per_class", 1) < 1:
            raise ValueError("world recipe quality_per_class: a class or unconditional world's quality bar needs ≥ 1 "
                             f"sample per class, got {values['quality_per_class']}")
        return cls(**values)

    @classmethod
    def from_settings(cls, items: list[str], base: dict | None = None) -> "WorldRecipe":
        """``base`` changed by ``KEY=VALUE`` items (``--set`` of `erasure world build`; values are YAML)."""
        import yaml

        fields = {f.name for f in dataclasses.fields(cls)}
        data = dict(base or {})
        for item in items:
            key, sep, value = item.partition("=")
            if not sep or key not in fields:
                raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
            data[key] = yaml.safe_load(value)  # YAML scalars and lists, as train's flags
        return cls.from_dict(data)


# Each kind's departures from the text world's recipe (README, "The class and unconditional worlds").
KIND_DEFAULTS = {
    "text": {},
    # The class world is told the shape alone, over every one of the 480 combinations (nothing held
    # out); its oracle and VAE are the text world's, which see only renders. Three times the text
    # world's steps: the shape leaves colour, texture and background for the model to choose, and it
    # drew some too faint to read at 3,000 steps (read-back 0.83 at guidance 3, 0.89 at 5) and 6,000
    # (0.945); 9,000 read back 0.981 (README). Guidance 5: at 3,000 steps the read-back rose with it
    # up to 5 and stayed flat beyond (0.90 at 7.5 and 10).
    "class": {"conditioning": "class", "held_out": 0, "steps": 9000, "guidance_scale": 5.0,
              "oracle_from": "world:micro", "vae_from": "world:micro"},
    # DDPM in pixel space (Ho et al. 2020's CIFAR-10 setting, scaled down): self-attention at 8×8 only,
    # the text world's choice one level down (it left out attention over 256 positions for its cost).
    # Drawn as Ho et al. draw it, x0 clipped to the images' range, with DDIM's 50 steps: the first build
    # (3,000 steps, DPM-Solver++ 20 steps) drew saturated and blank images, 16 points from uniform; the
    # same weights with this sampler were 6.8 points from it. 6,000 steps: 5.2 points; 9,000: 1.6, within
# the 2-point bar (erasure/world/README.md).
    "none": {"conditioning": "none", "held_out": 0, "unet_attention": (False, False, True), "steps": 9000,
             "sampler": "ddim-clip", "sample_steps": 50, "guidance_scale": 1.0, "oracle_from": "world:micro",
             "quality_per_class": 500},
}


def world_path(model: str = "world:micro") -> Path:
    """The folder behind a ``world:`` model id: the shipped worlds (``WORLDS``)."""
    if model not in WORLDS:
        raise ModelError(f"model: {model!r}; the shipped worlds are {', '.join(WORLDS)}")
    folder, kind = WORLDS[model]
    path = SHIPPED.parent / folder
    if not (path / "model_index.json").is_file():
        raise ModelError(f"model: {model} is missing from this installation ({path}); rebuild it with "
                         f"`erasure world build --kind {kind} --out {path}`")
    return path


def world_sampler(folder=None) -> tuple[int, float]:
    """(steps, guidance) of a world folder's own sampler, as its build recorded them (default: the shipped world)."""
    sampler = json.loads((Path(folder or world_path()) / WORLD_FILE).read_text())["sampler"]
    return sampler["num_inference_steps"], sampler["guidance_scale"]


# (steps, guidance) of pipelines that do not sample like Stable Diffusion 1.x: their own __call__
# defaults in diffusers 0.42. SDXL: 50 steps at 5.0; SD3: 28 at 7.0; FLUX: 28 at a distilled guidance
# of 3.5 ([dev]'s embedding; [schnell] ignores it and is drawn in 4 steps, which the user sets). DiTPipeline: num_inference_steps=50, guidance_scale=4.0 (its DDIM
# sampler; the DiT paper's own samples take 250 DDPM steps at cfg 1.5 for FID, 4.0 for pictures).
# DDPMPipeline: num_inference_steps=1000 and no guidance (1: the model's prediction alone).
PIPELINE_SAMPLERS = {"StableDiffusionXLPipeline": (50, 5.0), "StableDiffusion3Pipeline": (28, 7.0),
                     "FluxPipeline": (28, 3.5), "DiTPipeline": (50, 4.0), "DDPMPipeline": (1000, 1.0)}


def default_sampler(folder) -> tuple[int, float]:
    """(steps, guidance) a pipeline folder is drawn with when nobody says otherwise: a world's own
    sampler (the one its quality bar and its suites use), the pipeline's own defaults, else
    Stable Diffusion 1.x's (50 steps, 7.5)."""
    if (Path(folder) / WORLD_FILE).is_file():
        return world_sampler(folder)
    from erasure.backbones import pipeline_class

    return PIPELINE_SAMPLERS.get(pipeline_class(Path(folder)), (50, 7.5))


def world_oracle(folder) -> Oracle:
    """The oracle a world folder carries (``oracle/``), or the shipped world's."""
    folder = Path(folder)
    return load_oracle(folder / ORACLE_DIR if (folder / ORACLE_DIR).is_dir() else world_path() / ORACLE_DIR)


def all_combinations() -> list[dict[str, str]]:
    """Every attribute combination, in a fixed order."""
    combos = [{}]
    for key, values in ATTRIBUTES.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos


def split_combinations(seed: int, held_out: int) -> tuple[list[dict], list[dict]]:
    """(training, held-out) combinations; every attribute value stays in the training half."""
    combos = all_combinations()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(combos))
    held = sorted(int(i) for i in order[:held_out])
    train = [c for i, c in enumerate(combos) if i not in set(held)]
    for key, values in ATTRIBUTES.items():
        missing = set(values) - {c[key] for c in train}
        if missing:  # cannot happen for held_out ≤ 10 %, but say so if someone asks for more
            raise ValueError(f"held_out={held_out} removes every training caption with {key} {sorted(missing)}")
    return train, [combos[i] for i in held]


def world_words() -> list[str]:
    """Every word of every caption (the world's whole language)."""
    words = {"a", "an", "on", "background"}
    for values in ATTRIBUTES.values():
        words.update(values)
    for table in ALIASES.values():
        words.update(table.values())
    return sorted(words)


def alias_variants() -> list[tuple[str, ...]]:
    """Every subset of the aliased attributes, in a fixed order: () first, all of them last."""
    variants = [()]
    for key in ALIASED:
        variants += [v + (key,) for v in variants]
    return variants


def world_tokenizer():
    from ..tiny import clip_tokenizer

    return clip_tokenizer(max_length=TOKEN_LENGTH, words=world_words())


def new_text_encoder(recipe: WorldRecipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = world_tokenizer()
    heads = max(1, recipe.text_hidden // 16)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden,
        intermediate_size=4 * recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=heads,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=recipe.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )
    return CLIPTextModel(config)


def new_vae(recipe: WorldRecipe):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=tuple(recipe.vae_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(recipe.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(recipe.vae_channels),
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def new_unet(recipe: WorldRecipe):
    from diffusers import UNet2DConditionModel

    kinds = list(recipe.unet_attention)
    if len(kinds) != len(recipe.unet_channels):
        raise ValueError("unet_attention needs one flag per unet_channels entry")
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in kinds)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(kinds))
    return UNet2DConditionModel(
        sample_size=SIZE // 2 ** (len(recipe.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(recipe.unet_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=1,
        cross_attention_dim=recipe.text_hidden,
        mid_block_type="UNetMidBlock2DCrossAttn" if recipe.unet_mid_attention else "UNetMidBlock2D",
        # diffusers reads attention_head_dim as the number of heads here: 32 channels per head.
        attention_head_dim=tuple(max(1, c // 32) for c in recipe.unet_channels),
        norm_num_groups=16,
    )


def new_dit(recipe: WorldRecipe):
    """The class world's denoiser: a DiT over the VAE's latents, its class through adaLN-Zero."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=max(1, recipe.dit_hidden // 32),
        attention_head_dim=32,
        in_channels=4,
        out_channels=4,  # eps only: DiTPipeline samples with the scheduler's fixed variance then
        num_layers=recipe.dit_layers,
        sample_size=SIZE // 2 ** (len(recipe.vae_channels) - 1),
        patch_size=recipe.dit_patch,
        num_embeds_ada_norm=NULL_CLASS,
    )


def new_class_unet(recipe: WorldRecipe):
    """The class world's UNet: the text world's layout over the latents, the class added to the time
    embedding through a table with DiTPipeline's null class at row 1000 (erasure.backbones.dit)."""
    return _unet2d(recipe, SIZE // 2 ** (len(recipe.vae_channels) - 1), 4, num_class_embeds=NULL_CLASS + 1)


def new_pixel_unet(recipe: WorldRecipe):
    """The unconditional world's denoiser: a UNet2DModel on the 3×32×32 images themselves."""
    return _unet2d(recipe, SIZE, 3)


def _unet2d(recipe: WorldRecipe, size: int, channels: int, **extra):
    from diffusers import UNet2DModel

    kinds = list(recipe.unet_attention)
    if len(kinds) != len(recipe.unet_channels):
        raise ValueError("unet_attention needs one flag per unet_channels entry")
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(recipe.unet_channels),
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in kinds),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(kinds)),
        layers_per_block=1,
        attention_head_dim=32,
        norm_num_groups=16,
        **extra,
    )


def shape_classes() -> tuple[str, ...]:
    """A class world's classes: the shapes, label i the i-th."""
    return ATTRIBUTES["shape"]


def noise_schedulers(recipe: WorldRecipe):
    """(training DDPM scheduler, the world's sampler) sharing one beta schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    betas = dict(
        num_train_timesteps=1000,
        beta_start=recipe.beta_start,
        beta_end=recipe.beta_end,
        beta_schedule=recipe.beta_schedule,
        prediction_type="epsilon",
        steps_offset=1,
    )
    train = DDPMScheduler(**betas, clip_sample=False)
    if recipe.sampler == "ddim-clip":
        sample = DDIMScheduler(**betas, clip_sample=True, clip_sample_range=1.0, timestep_spacing="trailing")
    else:
        sample = DPMSolverMultistepScheduler(
            **betas, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
        )
    return train, sample


def _images(attrs: list[dict], seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    arr = np.stack([render(a, rng) for a in attrs])
    return to_tensor(arr) * 2 - 1


def _batch_seeds(seed: int, stage: int, steps: int) -> np.ndarray:
    return np.random.SeedSequence([seed, stage]).generate_state(max(steps, 1), dtype=np.uint64)


def train_vae(recipe: WorldRecipe, train_combos: list[dict], show_progress: bool = True, device="cpu"):
    """Reconstruction + a tiny KL term; the scaling factor makes latents unit-variance, as SD's 0.18215 does."""
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    vae = new_vae(recipe).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, recipe.vae_steps, max(1, recipe.vae_steps // 10))
    seeds = _batch_seeds(recipe.seed, 1, recipe.vae_steps)
    bar = tqdm(range(recipe.vae_steps), desc="vae", disable=not show_progress)
    for step in bar:
        rng = np.random.default_rng(int(seeds[step]))
        attrs = [train_combos[i] for i in rng.integers(len(train_combos), size=recipe.vae_batch_size)]
        x = _images(attrs, int(seeds[step]) + 1).to(device)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == recipe.vae_steps - 1:
            bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    with torch.no_grad():
        x = _images([train_combos[i % len(train_combos)] for i in range(512)], recipe.seed + 7).to(device)
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


def _warmup_cosine(opt, steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10 % of the peak."""

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class _Ema:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, params, decay: float):
        self.params = list(params)
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - decay)

    @torch.no_grad()
    def copy_to_params(self):
        for s, p in zip(self.shadow, self.params):
            p.copy_(s)


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ for ε-prediction (Hang et al. 2023, eq. 10): w_t = min(SNR_t, γ) / SNR_t."""
    abar = alphas_cumprod[timesteps]
    snr = abar / (1 - abar)
    return torch.clamp(snr, max=gamma) / snr


def train_diffusion(recipe: WorldRecipe, vae, train_combos: list[dict], show_progress: bool = True, device="cpu"):
    """Train the world's denoiser with the DDPM loss; returns (text_encoder or None, denoiser) holding
    the EMA weights. A text world trains its text encoder jointly; a class world's labels (the
    shape's index, the null class when dropped) enter its denoiser's class table; an unconditional
    world's denoiser sees the images alone, in pixel space."""
    from tqdm.auto import tqdm

    kind = recipe.conditioning
    torch.manual_seed(recipe.seed + 2)
    text_encoder = None
    if kind == "text":
        tokenizer = world_tokenizer()
        text_encoder = new_text_encoder(recipe).to(device).train()
    build = {"text": new_unet, "class": new_dit if recipe.class_denoiser == "dit" else new_class_unet,
             "none": new_pixel_unet}[kind]
    denoiser = build(recipe).to(device).train()
    if kind == "class":
        from diffusers.models.embeddings import LabelEmbedding

        for module in denoiser.modules():  # labels are dropped below, from the seeded draws
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0
    train_sched, _ = noise_schedulers(recipe)
    alphas_cumprod = train_sched.alphas_cumprod.to(device)

    # One caption per (combination, alias variant); which variant a sample uses is drawn per step.
    variants = alias_variants()
    if kind == "text":
        captions = [caption(c, aliased=v) for c in train_combos for v in variants] + [""]
        ids = tokenizer(captions, padding="max_length", max_length=TOKEN_LENGTH, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        empty = len(captions) - 1
    variant_of = {v: i for i, v in enumerate(variants)}
    labels_of = torch.tensor([shape_classes().index(c["shape"]) for c in train_combos])

    params = [p for m in (text_encoder, denoiser) if m is not None for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    sched = _warmup_cosine(opt, recipe.steps, recipe.warmup_steps)
    ema = _Ema(params, recipe.ema_decay)
    seeds = _batch_seeds(recipe.seed, 2, recipe.steps)
    bar = tqdm(range(recipe.steps), desc=f"world ({kind})", disable=not show_progress)
    smooth = None
    for step in bar:
        rng = np.random.default_rng(int(seeds[step]))
        which = rng.integers(len(train_combos), size=recipe.batch_size)
        x = _images([train_combos[i] for i in which], int(seeds[step]) + 1).to(device)
        drop = rng.random(recipe.batch_size) < recipe.caption_dropout
        # Drawn last, so alias_rate 0 trains exactly the world an alias-free recipe trained.
        alias = rng.random((recipe.batch_size, len(ALIASED))) < recipe.alias_rate
        gen = torch.Generator().manual_seed(int(seeds[step]) % 2**63)
        if vae is None:  # pixel space: the image is the latent
            latents = x
        else:
            with torch.no_grad():
                posterior = vae.encode(x).latent_dist
                eps_post = torch.randn(posterior.mean.shape, generator=gen).to(device)
                latents = (posterior.mean + posterior.std * eps_post) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, train_sched.config.num_train_timesteps, (recipe.batch_size,), generator=gen).to(device)
        noisy = train_sched.add_noise(latents, noise, t)
        if kind == "text":
            variant = [variant_of[tuple(k for k, on in zip(ALIASED, row) if on)] for row in alias]
            rows = np.where(drop, empty, which * len(variants) + np.asarray(variant))
            pred = denoiser(noisy, t, text_encoder(ids[torch.from_numpy(rows).to(device)])[0]).sample
        elif kind == "class":
            labels = torch.where(torch.from_numpy(drop), NULL_CLASS, labels_of[torch.from_numpy(which)]).to(device)
            pred = denoiser(noisy, timestep=t, class_labels=labels).sample
        else:
            pred = denoiser(noisy, t).sample
        per_sample = (pred.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weight(alphas_cumprod, t, recipe.min_snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 10 == 0 or step == recipe.steps - 1:
            bar.set_postfix(loss=f"{smooth:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    ema.copy_to_params()
    return (text_encoder.eval() if text_encoder is not None else None), denoiser.eval()


def assemble_pipeline(recipe: WorldRecipe, vae, text_encoder, unet):
    """The world as the diffusers pipeline of its kind: StableDiffusionPipeline, DiTPipeline (``unet``
    is then the class denoiser, its ``transformer``) or DDPMPipeline."""
    from diffusers import DDPMPipeline, DiTPipeline, StableDiffusionPipeline

    _, sampler = noise_schedulers(recipe)
    if recipe.conditioning == "class":
        return DiTPipeline(transformer=unet, vae=vae, scheduler=sampler,
                           id2label={i: name for i, name in enumerate(shape_classes())})
    if recipe.conditioning == "none":
        return DDPMPipeline(unet=unet, scheduler=sampler)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=world_tokenizer(),
        unet=unet,
        scheduler=sampler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, steps: int, guidance_scale: float, batch_size: int = 64,
           show_progress: bool = False) -> np.ndarray:
    """uint8 N×32×32×3 images for ``prompts``, image i from seed ``seed + i`` (erasure.generation.draw)."""
    from tqdm.auto import tqdm

    from erasure.generation import draw

    out = [np.zeros((0, SIZE, SIZE, 3), np.uint8)]
    for start in tqdm(range(0, len(prompts), batch_size), desc="sampling", disable=not show_progress):
        chunk = prompts[start : start + batch_size]
        out.append(draw(pipe, chunk, [seed + start + i for i in range(len(chunk))], steps=steps,
                        guidance=guidance_scale, size=SIZE)[0])
    return np.concatenate(out)


def read_back(oracle: Oracle, images: np.ndarray, attrs: list[dict]) -> dict[str, float]:
    """Share of images whose prompted value the oracle reads back, per attribute."""
    preds = oracle.predict(images)
    return {k: float(np.mean([p[k] == a[k] for p, a in zip(preds, attrs)])) for k in ATTRIBUTES}


def quality(pipe, oracle: Oracle, combos: list[dict], recipe: WorldRecipe, seed: int = 1000,
            steps: int | None = None, guidance_scale: float | None = None, batch_size: int = 48,
            show_progress: bool = False, aliased=()) -> tuple[dict[str, float], np.ndarray]:
    """Oracle read-back on ``recipe.quality_per_combo`` samples of each combination (captions with
    the attributes in ``aliased`` written by their alias), and the samples."""
    attrs = [c for c in combos for _ in range(recipe.quality_per_combo)]
    images = sample(pipe, [caption(a, aliased=aliased) for a in attrs], seed,
                    steps or recipe.sample_steps,
                    recipe.guidance_scale if guidance_scale is None else guidance_scale,
                    batch_size=batch_size, show_progress=show_progress)
    return read_back(oracle, images, attrs), images


def image_grid(images: np.ndarray, columns: int) -> np.ndarray:
    """N×H×W×3 images as one grid, ``columns`` wide, the last row padded with black."""
    rows = -(-len(images) // columns)
    pad = rows * columns - len(images)
    if pad:
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    h, w = images.shape[1:3]
    return images.reshape(rows, columns, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, columns * w, 3)


def class_quality(pipe, oracle: Oracle, recipe: WorldRecipe, seed: int = 1000, batch_size: int = 64,
                  show_progress: bool = False) -> tuple[dict, np.ndarray]:
    """The quality bar of a world without captions, on ``quality_per_class`` samples per class (its own
    sampler). Class world: the share of each class's samples the oracle reads as that shape, and
    their mean (bar: ≥ 0.95). Unconditional world: the share of samples the oracle reads as each
    shape, and the largest distance from uniform (bar: ≤ 0.02)."""
    classes = shape_classes()
    n = recipe.quality_per_class * len(classes)
    prompts = [c for c in classes for _ in range(recipe.quality_per_class)]  # read as nothing when unconditional
    images = sample(pipe, prompts, seed, recipe.sample_steps, recipe.guidance_scale, batch_size=batch_size,
                    show_progress=show_progress)
    read = [p["shape"] for p in oracle.predict(images)]
    if recipe.conditioning == "class":
        per_class = {c: float(np.mean([r == c for r, want in zip(read, prompts) if want == c])) for c in classes}
        mean = float(np.mean(list(per_class.values())))
        return {"read_back": per_class, "mean_read_back": mean, "bar": 0.95, "passed": mean >= 0.95,
                "samples": n}, images
    frequency = {c: read.count(c) / n for c in classes}
    gap = max(abs(f - 1 / len(classes)) for f in frequency.values())
    return {"frequency": frequency, "largest_gap_from_uniform": gap, "bar": 0.02, "passed": gap <= 0.02,
            "samples": n}, images


def build_world(out, recipe: WorldRecipe | None = None, show_progress: bool = True, device: str = "cpu",
                log=print) -> dict:
    """Train the oracle, the VAE and the world model; write a complete pipeline folder to ``out``.

    A world of another kind than text may take its oracle and VAE from a built world (``oracle_from``,
    ``vae_from``). The folder is written next to ``out`` and renamed into place at the end, so an
    interrupted build leaves no half-written world. Returns the record also written to ``world.json``.
    """
    from PIL import Image

    from ..export import versions

    recipe = recipe or WorldRecipe()
    out = Path(out)
    kind = recipe.conditioning
    train_combos, held = split_combinations(recipe.seed, recipe.held_out)
    timings = {}

    start = time.perf_counter()
    if recipe.oracle_from:
        oracle = world_oracle(world_path(recipe.oracle_from))
        log(f"oracle: {recipe.oracle_from}'s")
    else:
        oracle = train_oracle(recipe.oracle_steps, seed=recipe.seed, show_progress=show_progress)
    timings["oracle_s"] = time.perf_counter() - start
    oracle_accuracy = accuracy(oracle.float())
    log("oracle on fresh renders: " + ", ".join(f"{k} {v:.3f}" for k, v in oracle_accuracy.items()))

    start = time.perf_counter()
    vae = None
    if kind == "none":
        pass  # pixel space
    elif recipe.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(world_path(recipe.vae_from) / "vae", torch_dtype=torch.float32).to(device)
        log(f"VAE: {recipe.vae_from}'s")
    else:
        vae = train_vae(recipe, train_combos, show_progress=show_progress, device=device)
    timings["vae_s"] = time.perf_counter() - start

    start = time.perf_counter()
    text_encoder, unet = train_diffusion(recipe, vae, train_combos, show_progress=show_progress, device=device)
    timings["world_s"] = time.perf_counter() - start

    pipe = assemble_pipeline(recipe, vae, text_encoder, unet)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    record = {
        "kind": "erasure micro world",
        "conditioning": kind,
        "recipe": dataclasses.asdict(recipe),
        "sampler": {"scheduler": type(pipe.scheduler).__name__, "num_inference_steps": recipe.sample_steps,
                    "guidance_scale": recipe.guidance_scale},
    }
    if kind == "text":
        held_quality, images = quality(pipe, oracle, held, recipe, show_progress=show_progress)
        alias_quality, _ = quality(pipe, oracle, held, recipe, show_progress=show_progress, aliased=ALIASED)
        record.update({
            "held_out_captions": [caption(c) for c in held],
            "quality_held_out": held_quality,
            "quality_held_out_aliases": alias_quality,  # the same captions, texture and shape by their aliases
            "quality_bar": 0.9,
        })
        shown = images[: 8 * 12]
    else:
        record["classes"] = list(shape_classes())
        record["quality"], images = class_quality(pipe, oracle, recipe, show_progress=show_progress)
        # Twelve samples of each class in a row (unconditional: the first 60 samples).
        shown = (images.reshape(len(shape_classes()), -1, SIZE, SIZE, 3)[:, :12].reshape(-1, SIZE, SIZE, 3)
                 if kind == "class" else images[:60])
    timings["quality_s"] = time.perf_counter() - start
    record.update({"oracle_accuracy": oracle_accuracy, "timings_s": {k: round(v, 1) for k, v in timings.items()},
                   "versions": versions()})

    def write(tmp: Path):
        # fp16 on disk, except the text encoder (0.5 MB in fp32): transformers 5 loads weights in
        # their saved dtype while diffusers loads in fp32, and a plain from_pretrained must sample.
        halved = [m for name, m in pipe.components.items() if name in ("unet", "transformer", "vae")]
        for module in halved:
            module.to(torch.float16)
        if kind == "class":
            from erasure.backbones.dit import save_dit

            save_dit(pipe, tmp, dict(enumerate(shape_classes())))
        else:
            pipe.save_pretrained(tmp, safe_serialization=True)
        for module in halved:
            module.to(torch.float32)
        save_oracle(oracle.half(), tmp / ORACLE_DIR)
        rows = -(-len(shown) // 12)
        Image.fromarray(image_grid(shown, 12)).resize((12 * SIZE * 3, rows * SIZE * 3), Image.NEAREST).save(
            tmp / ("held_out_samples.png" if kind == "text" else "samples.png"))
        (tmp / WORLD_FILE).write_text(json.dumps(record, indent=2) + "\n")

    staging = staging_beside(out, "build")
    write(staging)
    replace_folder(staging, out)
    return record
