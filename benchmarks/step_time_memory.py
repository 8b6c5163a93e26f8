"""Step time and peak GPU memory of every method at SD 1.4, SDXL, SD3-medium and FLUX.1 size, in one run.

The models are built from config with random weights (no weights can be downloaded), in the real
sizes: SD 1.4 (UNet 860 M, CLIP ViT-L/14 text, the SD VAE) and SD3-medium (MMDiT 2 B, CLIP-L and
CLIP-G, the 16-channel VAE; T5 left out, i.e. `use_t5: false`). Each method then trains through
`erasure.trainer.train` exactly as `erasure train` would, on the built-in tiny pair set resized to
the model's resolution, and the card's timings are tabulated. The ratios printed at the end are the
memory and time of each method relative to GradDiff, measured in this one run: the restricted
gradient must cost at most one gradient-sized buffer more than GradDiff (issue 2), and in this
implementation it costs none.

    python benchmarks/step_time_memory.py --family sd1 --out /tmp/bench
    python benchmarks/step_time_memory.py --family sdxl --out /tmp/bench --extra gradient_checkpointing=true
    python benchmarks/step_time_memory.py --family flux --out /tmp/bench --methods graddiff rgd \
        --extra scope=lora lora_rank=16 gradient_checkpointing=true
    python benchmarks/step_time_memory.py --family tiny --out /tmp/bench   # CPU dry run
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from pathlib import Path

import torch


def build_sd14(folder: Path):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasure.tiny import clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=clip_tokenizer(), scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)


def build_sd3_medium(folder: Path):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from erasure.tiny import clip_tokenizer

    transformer = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=24,
                                        attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                        caption_projection_dim=1536, pooled_projection_dim=2048,
                                        out_channels=16, pos_embed_max_size=192)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5305)
    clip_l = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                        num_attention_heads=12, projection_dim=768))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    StableDiffusion3Pipeline(transformer=transformer, vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(),
                             text_encoder_2=clip_g, tokenizer_2=clip_tokenizer(), text_encoder_3=None,
                             tokenizer_3=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0)
                             ).save_pretrained(folder)


def build_sdxl_base(folder: Path):
    """SDXL base 1.0's sizes: UNet 2.6 B (three levels, 1/2/10 transformer layers), CLIP-L and
    OpenCLIP bigG text encoders, the SD VAE."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from erasure.tiny import clip_tokenizer

    unet = UNet2DConditionModel(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                                cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=1024, scaling_factor=0.13025)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    clip_g = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                        num_attention_heads=20, projection_dim=1280, hidden_act="gelu"))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(), text_encoder_2=clip_g,
                              tokenizer_2=clip_tokenizer(), scheduler=scheduler, add_watermarker=False
                              ).save_pretrained(folder)


def build_flux_dev(folder: Path):
    """FLUX.1 [dev]'s sizes: the 12 B transformer (diffusers' defaults are [dev]'s, with the guidance
    embedding), CLIP-L, T5-XXL (4.7 B), the 16-channel VAE. Saved in bf16 (≈ 34 GB; the device's disk
    is 64 GB); erasure loads it in fp32 as any base."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from erasure.tiny import clip_tokenizer, t5_tokenizer

    transformer = FluxTransformer2DModel(guidance_embeds=True)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, layers_per_block=2,
                        sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.1159, scaling_factor=0.3611)
    clip_l = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
    # T5 v1.1 XXL's encoder; the tiny tokenizer's ids are all in range of its 32,128-row table.
    t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                 feed_forward_proj="gated-gelu"))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, vae=vae, text_encoder=clip_l, tokenizer=clip_tokenizer(),
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer(max_length=512), scheduler=scheduler)
    pipe.to(torch.bfloat16).save_pretrained(folder)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["sd1", "sdxl", "sd3", "flux", "tiny"], required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="+",
                        default=["graddiff", "rgd", "finetune", "esd-x", "salun", "msgm-obtuse"])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--mixed_precision", default="bf16")
    parser.add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE",
                        help="more recipe values for every run, e.g. gradient_checkpointing=true")
    parser.add_argument("--keep_exports", action="store_true", help="keep each run's exported pipeline")
    args = parser.parse_args()

    from erasure.config import parse_config
    from erasure.tiny import build_atomically, build_tiny_sd1
    from erasure.trainer import train

    builder = {"sd1": build_sd14, "sdxl": build_sdxl_base, "sd3": build_sd3_medium, "flux": build_flux_dev,
               "tiny": build_tiny_sd1}[args.family]
    began = time.perf_counter()
    model = build_atomically(args.out / f"model-{args.family}", builder)
    print(f"model ready in {time.perf_counter() - began:.0f} s: {model}", flush=True)
    rows = []
    for method in args.methods:
        argv = ["--model", str(model), "--method", method, "--concept", "nudity", "--forget_data", "tiny:forget",
                "--retain_data", "tiny:retain", "--max_steps", str(args.steps), "--batch_size", str(args.batch_size),
                "--mixed_precision", args.mixed_precision, "--checkpointing_steps", "0", "--report_to", "none",
                "--output_dir", str(args.out / f"run-{args.family}-{method}"), "--esd_sample_steps", "10",
                *[part for pair in args.extra for part in ("--" + pair.split("=", 1)[0], pair.split("=", 1)[1])]]
        if args.resolution:
            argv += ["--resolution", str(args.resolution)]
        out = train(parse_config(argv))
        card = json.loads((out / "erasure.json").read_text())
        rows.append((method, card["config"]["scope"], card["run"]["mean_step_seconds"], card["run"]["peak_gpu_memory_gib"]))
        print(f"{method}: {rows[-1]}", flush=True)
        if not args.keep_exports:  # an SD3-medium export is 11 GB
            shutil.rmtree(out)
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        PartialState._reset_state()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    reference = {m: (t, mem) for m, _, t, mem in rows}.get("graddiff")
    print(f"\n{args.family}, {device}, batch {args.batch_size} per set, {args.mixed_precision}, {args.steps} steps "
          f"(mean of steps 2..{args.steps})")
    print("| method | scope | s / step | peak GiB | time ÷ GradDiff | memory ÷ GradDiff |")
    print("|---|---|---|---|---|---|")
    for method, scope, seconds, memory in rows:
        t_ratio = f"{seconds / reference[0]:.2f}" if reference else "—"
        m_ratio = f"{memory / reference[1]:.3f}" if reference and memory and reference[1] else "—"
        print(f"| {method} | {scope} | {seconds:.3f} | {memory if memory is None else round(memory, 2)} | "
              f"{t_ratio} | {m_ratio} |")


if __name__ == "__main__":
    main()
