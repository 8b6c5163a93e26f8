"""Tiny SD 1.x, SDXL, SD3, FLUX, DiT and unconditional DDPM pipelines built from config, for tests and the demo.

No weights can be downloaded here, so these fixtures are built in-process in seconds: the same
diffusers and transformers classes as the real models, at a few hundred thousand parameters, with
random weights. The CLIP tokenizer is the real one, built from the BPE vocabulary that open_clip's
wheel ships; the T5 tokenizer is a small Unigram vocabulary made in-process (its ids only need to be
in range for the tiny T5 encoder).
"""

from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path

import torch

# CLIP's byte-level BPE: 256 byte symbols, their end-of-word twins, 48,894 merges, 2 special tokens
# = 49,408 ids (Radford et al. 2021, and open_clip's SimpleTokenizer, which reads the same file).
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map, which CLIP's BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary and merges, read from the file open_clip ships (no download).

    The file is located without importing open_clip, whose import pulls in torchvision and timm."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("open_clip_torch is not installed; its wheel ships CLIP's BPE "
                                  "vocabulary, which the tiny fixtures' tokenizer is built from")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : CLIP_VOCAB_SIZE - 256 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def _merges_applied(word: str, ranks: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    """The merges CLIP's BPE applies to one lower-case word (lowest rank first, until none applies)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    used = set()
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        used.add(best)
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return used


def clip_bpe_subset(words) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary cut down to the 512 byte symbols, the merges ``words`` need, and the specials.

    ``words`` tokenize exactly as with the full vocabulary; any other text still tokenizes (into
    smaller pieces, down to bytes). The micro world speaks only its captions, and a 49,408-row
    embedding table would be most of its size.
    """
    _, merges = clip_bpe()
    ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
    needed = set()
    for word in words:
        needed |= _merges_applied(word.lower(), ranks)
    kept = [m for m in merges if tuple(m.split()) in needed]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in kept]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, kept


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH, words=None):
    """CLIP's tokenizer; with ``words``, over the cut-down vocabulary of :func:`clip_bpe_subset`."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe() if words is None else clip_bpe_subset(words)
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges])
    tok.model_max_length = max_length
    return tok


def t5_tokenizer(max_length: int = 256):
    """A small Unigram vocabulary over lower-case words and characters, in the T5 format."""
    from transformers import T5TokenizerFast

    words = sorted(html.unescape(w.replace("</w>", "")) for w in list(clip_bpe()[0])[512:1512])
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["<pad>", "</s>", "<unk>"] + ["▁" + c for c in chars] + chars
    pieces += ["▁" + w for w in words if w.isalpha() and "▁" + w not in pieces]
    vocab = [(p, 0.0) for p in pieces[:3]] + [(p, -float(i + 1)) for i, p in enumerate(pieces[3:])]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    tok.model_max_length = max_length
    return tok


def _tiny_vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        **extra,
    )


def _tiny_clip(with_projection: bool, hidden: int = 32, projection: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _tiny_text_unet(**extra):
    """A two-level UNet2DConditionModel, cross-attention at the lower level (SD 1.x's and SDXL's)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **extra,
    )


def _tiny_t5(tokenizer, width: int):
    """A two-layer T5 encoder over ``tokenizer``'s ids (SD3's third and FLUX's second text encoder)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1))


def build_tiny_sd1(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny StableDiffusionPipeline (UNet, eps or v prediction), saved with `save_pretrained`."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    unet = _tiny_text_unet(cross_attention_dim=32, attention_head_dim=8)
    # SD 1.4's noise schedule (scaled_linear, 0.00085 → 0.012, 1000 steps).
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_tiny_vae(),
        text_encoder=_tiny_clip(with_projection=False),
        tokenizer=clip_tokenizer(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline: two CLIP encoders, pooled text and size micro-conditioning,
    SDXL base's Euler scheduler; the second level has two transformer layers, as SDXL's deeper ones."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    time_embed_dim, pooled_dim = 8, 32
    unet = _tiny_text_unet(
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,  # the two encoders' hidden states side by side (32 + 32)
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        # six size numbers, each embedded in time_embed_dim, beside the pooled text (2816 in SDXL base)
        projection_class_embeddings_input_dim=6 * time_embed_dim + pooled_dim,
    )
    # SDXL base's scheduler config: SD's noise schedule, Euler sampling, "leading" spacing.
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    tokenizer_2 = clip_tokenizer()
    tokenizer_2.pad_token = "!"  # the second (OpenCLIP) encoder pads with "!" (id 0), as in SDXL
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        scheduler=scheduler,
        vae=_tiny_vae(scaling_factor=0.13025),
        text_encoder=_tiny_clip(with_projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_clip(with_projection=True, projection=pooled_dim),
        tokenizer_2=tokenizer_2,
        add_watermarker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_sd3(out_dir: str | Path, seed: int = 0, t5: bool = True) -> Path:
    """A tiny StableDiffusion3Pipeline (flow matching), with or without its T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    torch.manual_seed(seed)
    joint_dim = 32
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = t5_tokenizer()
        text_encoder_3 = _tiny_t5(tokenizer_3, joint_dim)
    # The two CLIP encoders' hidden states are concatenated (16 + 16 = joint_dim) and their pooled
    # projections too (16 + 16 = pooled_projection_dim), as in SD3 (768 + 1280 = 2048).
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_tiny_clip(True, hidden=16, projection=16),
        tokenizer=clip_tokenizer(),
        text_encoder_2=_tiny_clip(True, hidden=16, projection=16),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny FluxPipeline in the layout of FLUX.1 [dev]: double- and single-stream blocks, a guidance
    embedding, CLIP (pooled) and T5 (the sequence), 2×2-packed latents, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    latent_channels, text_dim = 4, 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # a 2×2 patch of latents per token
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=text_dim,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),  # rotary dimensions per position axis; they sum to the head's
    )
    tokenizer_2 = t5_tokenizer(max_length=512)
    text_encoder_2 = _tiny_t5(tokenizer_2, text_dim)
    # FLUX.1 [dev]'s scheduler config: the shift grows with the image's token count.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=_tiny_vae(latent_channels=latent_channels, shift_factor=0.1159, scaling_factor=0.3611,
                      use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_tiny_clip(with_projection=False),
        tokenizer=clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


# Imagenette's ten classes (fast.ai's ImageNet subset, ESD's object-erasure classes) as ImageNet's
# WordNet names, which DiT's id2label carries (timm's imagenet_synset_to_lemma.txt), with their
# ImageNet-1k label ids; DiTPipeline accepts each comma-separated synonym ("tench", "Tinca tinca").
IMAGENETTE_IDS = {
    "tench, Tinca tinca": 0,
    "English springer, English springer spaniel": 217,
    "cassette player": 482,
    "chain saw, chainsaw": 491,
    "church, church building": 497,
    "French horn, horn": 566,
    "garbage truck, dustcart": 569,
    "gas pump, gasoline pump, petrol pump, island dispenser": 571,
    "golf ball": 574,
    "parachute, chute": 701,
}


def build_tiny_dit(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny DiTPipeline: class-conditional DiT with learned sigma, CIFAR-10's and Imagenette's class names."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from erasure.backbones.dit import save_dit

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,  # eps and the variance interpolation, as DiT-XL/2
        num_layers=2,
        sample_size=8,
        patch_size=2,
        norm_num_groups=4,
        # 1000 label rows and the null class at 1000, as ImageNet DiT: DiTPipeline hard-codes that
        # null class for guidance. Ten of them are named.
        num_embeds_ada_norm=1000,
    )
    # DiT's noise schedule (ADM's linear betas, 1000 steps).
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    # CIFAR-10's names at 0–9 (tiny:class-forget / -retain), then Imagenette's ten as DiT-XL-2-256's
    # id2label spells them (at 10–19 here; ImageNet's ids are in IMAGENETTE_IDS), so the shipped
    # eval/dit-class-forgetting.yaml runs on this fixture as it is.
    pipe = DiTPipeline(transformer=transformer, vae=_tiny_vae(), scheduler=scheduler, id2label=_tiny_id2label())
    return save_dit(pipe, out_dir, _tiny_id2label())


def _tiny_id2label() -> dict[str, str]:
    from erasure.data.tiny_pairs import CLASS_NAMES

    return {str(i): name for i, name in enumerate(list(CLASS_NAMES) + list(IMAGENETTE_IDS))}


def build_tiny_class_unet(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny class-conditional UNet2DModel (num_class_embeds) as the denoiser of a DiTPipeline, the one
    diffusers pipeline that samples with class labels (erasure.backbones.dit); tiny:dit's class names."""
    from diffusers import DDIMScheduler, DiTPipeline

    from erasure.backbones.dit import NULL_CLASS, save_dit

    torch.manual_seed(seed)
    # the null class's row at 1000, where DiTPipeline looks for it
    unet = _tiny_unet2d(size=8, channels=4, num_class_embeds=NULL_CLASS + 1)
    scheduler = DDIMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    pipe = DiTPipeline(transformer=unet, vae=_tiny_vae(), scheduler=scheduler, id2label=_tiny_id2label())
    return save_dit(pipe, out_dir, _tiny_id2label())


def _tiny_unet2d(size: int, channels: int, **extra):
    """A two-level UNet2DModel with self-attention at the lower level."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
        **extra,
    )


def build_tiny_uncond(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny DDPMPipeline: an unconditional pixel-space UNet2DModel with self-attention at 8×8."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    unet = _tiny_unet2d(size=16, channels=3)
    # DDPM's own schedule (linear betas 1e-4 → 0.02, 1000 steps; Ho et al. 2020).
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


TINY_BUILDERS = {
    "sd1": build_tiny_sd1,
    "sd1-v": lambda out, seed=0: build_tiny_sd1(out, seed, prediction_type="v_prediction"),
    "sdxl": build_tiny_sdxl,
    "sd3": build_tiny_sd3,
    "flux": build_tiny_flux,
    "dit": build_tiny_dit,
    "class-unet": build_tiny_class_unet,
    "uncond": build_tiny_uncond,
}
