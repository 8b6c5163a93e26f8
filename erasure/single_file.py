"""The erased pipeline as one checkpoint in its original layout: the file A1111 and ComfyUI load.

Stable Diffusion was released as single checkpoints of the code it was trained with, whose module
names are not diffusers': CompVis' latent-diffusion ("ldm": SD 1.x and 2.x) and Stability's
generative-models ("sgm": SDXL). diffusers reads these files (`from_single_file`,
diffusers.loaders.single_file_utils) but writes none; this module writes them, the inverse of
diffusers' readers, one function per component:

- UNet: `model.diffusion_model.` (ldm's UNetModel; SDXL's is the same, its added conditioning as `label_emb`);
- VAE: `first_stage_model.` (ldm's AutoencoderKL, in both layouts);
- text encoder, SD 1.x: `cond_stage_model.transformer.` + transformers' own CLIP names (OpenAI CLIP);
- text encoder, SD 2.x: `cond_stage_model.model.` + OpenCLIP's names. diffusers keeps 23 of OpenCLIP
  ViT-H's 24 layers (SD 2 reads the penultimate one) and so does the file; the 24th is never read;
- text encoders, SDXL: `conditioner.embedders.0.transformer.` (OpenAI CLIP ViT-L, as SD 1.x's) and
  `conditioner.embedders.1.model.` (OpenCLIP ViT-bigG, with its text projection).

The UNet's and the VAE's names are computed from the model's own blocks (levels, layers per level,
which levels attend, transformer depth), so any UNet2DConditionModel maps, not only SD's four levels
of two layers. Every weight gets exactly one name or the export fails naming the weight.

The file holds weights only, float32 as in the pipeline folder: no noise schedule (the tools take it
from their own config; diffusers from the `config` folder it is given), no EMA copy.
"""

from __future__ import annotations

import torch

from erasure.errors import ModelError

# A module of diffusers → (its name in the file, renames of its children), for `_renamed`.
Table = dict[str, tuple[str, dict[str, str]]]

# ResnetBlock2D's children in the UNet (ldm's ResBlock: in_layers = norm, SiLU, conv; out_layers = norm,
# SiLU, dropout, conv) ...
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# ... and in the VAE, where only the shortcut's name differs.
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# The VAE's mid-block attention (ldm's AttnBlock, whose projections are 1×1 convolutions).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# The MLP sequence (linear, SiLU, linear) of the time embedding and of SDXL's added conditioning.
TIME_MLP = {"linear_1": "0", "linear_2": "2"}
# One OpenCLIP residual block's children, but for q/k/v, which OpenCLIP keeps as one in_proj.
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def _renamed(what: str, state: dict[str, torch.Tensor], table: Table, prefix: str) -> dict[str, torch.Tensor]:
    """Each weight under the name `table` gives its module (the longest module path that holds it)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:cut])
            if module in table:
                name, children = table[module]
                rest = ".".join(parts[cut:])
                for ours, theirs in children.items():
                    if rest.startswith(ours + "."):
                        rest = theirs + rest[len(ours):]
                        break
                out[f"{prefix}{name}.{rest}"] = value
                break
        else:
            raise ModelError(f"export_single_file: the {what} weight {key!r} has no name in the original "
                             "single-file layout; export without export_single_file")
    return out


# ---- UNet ----------------------------------------------------------------------------------------
def unet_table(unet) -> Table:
    """ldm's UNetModel is three flat sequences: input_blocks (conv_in, then per level a resnet (+ its
    transformer) per layer and a downsampler), middle_block (resnet, transformer, resnet), output_blocks
    (per level a resnet (+ transformer) per layer, the upsampler inside the level's last one)."""
    table: Table = {"conv_in": ("input_blocks.0.0", {}), "time_embedding": ("time_embed", TIME_MLP),
                    "add_embedding": ("label_emb.0", TIME_MLP),  # SDXL's pooled text and size embedding
                    "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {})}
    n = 1
    for b, block in enumerate(unet.down_blocks):
        attends = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{n}.0", UNET_RESNET)
            if attends:
                table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{n}.1", {})
            n += 1
        if block.downsamplers:
            table[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", {})
            n += 1
    mid = unet.mid_block
    if mid is not None:
        for k in range(len(mid.resnets)):  # resnet, transformer, resnet, …
            table[f"mid_block.resnets.{k}"] = (f"middle_block.{2 * k}", UNET_RESNET)
            if k < len(getattr(mid, "attentions", ())):
                table[f"mid_block.attentions.{k}"] = (f"middle_block.{2 * k + 1}", {})
    n = 0
    for b, block in enumerate(unet.up_blocks):
        attends = bool(getattr(block, "attentions", None))
        for j in range(len(block.resnets)):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{n}.0", UNET_RESNET)
            if attends:
                table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{n}.1", {})
            n += 1
        if block.upsamplers:
            table[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{n - 1}.{2 if attends else 1}.conv", {})
    return table


def unet_state_dict(unet, prefix: str = "model.diffusion_model.") -> dict[str, torch.Tensor]:
    # A transformer's children (norm, proj_in, transformer_blocks.i.attn1/attn2/ff, proj_out) keep their
    # names, and their shapes: proj_in/proj_out are 1×1 convolutions in both layouts, or linear in both
    # when the UNet uses linear projections (ldm's use_linear_in_transformer).
    return _renamed("UNet", unet.state_dict(), unet_table(unet), prefix)


# ---- VAE -----------------------------------------------------------------------------------------
def vae_table(vae) -> Table:
    """ldm's Encoder/Decoder: down.i / up.i hold `block` (resnets) and `downsample` / `upsample`; the
    decoder's up.i are numbered from the lowest resolution up, the reverse of diffusers' up_blocks."""
    table: Table = {f"{part}.{name}": (f"{part}.{name}", {}) for part in ("encoder", "decoder")
                    for name in ("conv_in", "conv_out")}
    table |= {"encoder.conv_norm_out": ("encoder.norm_out", {}), "decoder.conv_norm_out": ("decoder.norm_out", {}),
              "quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for i, block in enumerate(vae.encoder.down_blocks):
        for j in range(len(block.resnets)):
            table[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
        if block.downsamplers:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", {})
    levels = len(vae.decoder.up_blocks)
    for i, block in enumerate(vae.decoder.up_blocks):
        level = levels - 1 - i
        for j in range(len(block.resnets)):
            table[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{level}.block.{j}", VAE_RESNET)
        if block.upsamplers:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{level}.upsample.conv", {})
    for part in ("encoder", "decoder"):
        mid = getattr(vae, part).mid_block
        for k in range(len(mid.resnets)):
            table[f"{part}.mid_block.resnets.{k}"] = (f"{part}.mid.block_{k + 1}", VAE_RESNET)
        for k, attention in enumerate(mid.attentions):
            if attention is not None:
                table[f"{part}.mid_block.attentions.{k}"] = (f"{part}.mid.attn_{k + 1}", VAE_ATTENTION)
    return table


def vae_state_dict(vae, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    out = _renamed("VAE", vae.state_dict(), vae_table(vae), prefix)
    # The attention's q, k, v and proj_out are 1×1 convolutions there, linear layers here.
    return {k: v[:, :, None, None] if ".mid.attn_" in k and k.endswith(".weight") and v.ndim == 2 else v
            for k, v in out.items()}


# ---- text encoders -------------------------------------------------------------------------------
def _text_weights(encoder) -> dict[str, torch.Tensor]:
    # transformers ≥ 5.6 names CLIPTextModel's weights without the `text_model.` its checkpoints carry
    return {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}


def openai_clip_state_dict(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """transformers' own CLIP names, under `prefix` + `text_model.` (the projection, if any, beside it)."""
    return {prefix + (k if k.startswith("text_projection.") else f"text_model.{k}"): v
            for k, v in _text_weights(encoder).items()}


def open_clip_state_dict(encoder, prefix: str) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower: q, k and v as one `in_proj` (rows q, then k, then v), the projection as the
    matrix the pooled output is multiplied by (the transpose of a linear layer's weight)."""
    state = _text_weights(encoder)
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias")}
    if "text_projection.weight" in state:
        out[prefix + "text_projection"] = state.pop("text_projection.weight").T.contiguous()
    for i in range(encoder.config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{p}_proj.{kind}") for p in "qkv"])
            for name, theirs_name in OPEN_CLIP_LAYER.items():
                out[f"{theirs}{theirs_name}.{kind}"] = state.pop(f"{ours}{name}.{kind}")
    if state:
        raise ModelError(f"export_single_file: the text encoder weight {next(iter(state))!r} has no name in "
                         "OpenCLIP's layout; export without export_single_file")
    return out


# ---- whole pipelines -----------------------------------------------------------------------------
def ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """SD 1.x / 2.x. The two differ in the text encoder (OpenAI CLIP ViT-L, OpenCLIP ViT-H) and, with
    it, in the UNet's projections (linear only in 2.x, ldm's v2 configs' use_linear_in_transformer),
    which is how the tools tell them apart and how it is told here."""
    sd2 = bool(pipe.unet.config.use_linear_projection)
    text = (open_clip_state_dict(pipe.text_encoder, "cond_stage_model.model.") if sd2
            else openai_clip_state_dict(pipe.text_encoder, "cond_stage_model.transformer."))
    return unet_state_dict(pipe.unet) | vae_state_dict(pipe.vae) | text


def sgm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """SDXL: ldm's UNet and VAE, and the conditioner's two text embedders."""
    return (unet_state_dict(pipe.unet) | vae_state_dict(pipe.vae)
            | openai_clip_state_dict(pipe.text_encoder, "conditioner.embedders.0.transformer.")
            | open_clip_state_dict(pipe.text_encoder_2, "conditioner.embedders.1.model."))


LAYOUTS = {"ldm": ldm_state_dict, "sgm": sgm_state_dict}


def single_file_state_dict(pipe, layout: str) -> dict[str, torch.Tensor]:
    return LAYOUTS[layout](pipe)
