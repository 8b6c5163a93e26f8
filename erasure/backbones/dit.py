"""DiT (Peebles & Xie 2023): DiTTransformer2DModel in a VAE's latent space, conditioned on a class label.

DDPM noise and an eps prediction with learned variance: the transformer outputs 2×C channels, eps
and the variance interpolation, and DiTPipeline samples from the eps half only; erasure trains that
half (the variance half is left as it is, unread by the pipeline's scheduler step).

The class enters through adaLN-Zero: every block embeds (timestep, class) and regresses its norms'
scale and shift from it. There is no cross-attention; the weights that read the class are each block's
label-embedding table, which the xattn scope (ESD-x) trains, as SD's attn2 reads the text.

A class-conditional UNet2DModel (``num_class_embeds``) has no pipeline of its own in diffusers
(DDPMPipeline samples without labels), but DiTPipeline calls its denoiser as UNet2DModel is called
(``(latents, timestep=…, class_labels=…)``) and reads only the config fields both share, so such a
UNet is trained and drawn as the ``transformer`` of a DiTPipeline folder (diffusers logs that it
expected a DiTTransformer2DModel there). Its class enters through ``class_embedding``, added to the
time embedding; that table is its xattn scope.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erasure.backbones.base import Conditioning
from erasure.backbones.classes import ClassLabels
from erasure.backbones.ddpm import DDPMBackbone, eps_half
from erasure.errors import ModelError

NULL_CLASS = 1000  # DiTPipeline.__call__ guides with class_null = 1000 whatever the model


def dit_classes(pipe) -> ClassLabels:
    """A DiTPipeline's class names → label ids, as its get_label_ids reads them (every synonym of an
    id2label value such as "tench, Tinca tinca" names the class); training and drawing both use it."""
    # The label-embedding table's last row is the null class; DiTPipeline hard-codes it as 1000,
    # ImageNet DiT's num_embeds_ada_norm, which is what the table says for every DiT.
    null_class = NULL_CLASS
    # A DiT saved without its id2label map is addressed by label ids written as numbers.
    names = dict(pipe.labels) or {str(i): i for i in range(null_class)}
    return ClassLabels(names, null_class, f"DiT model {getattr(pipe, 'name_or_path', None) or ''}".strip())


def save_dit(pipe, folder, id2label: dict) -> Path:
    """``pipe.save_pretrained(folder)`` with ``id2label`` in model_index.json: DiTPipeline.save_pretrained
    drops it (erasure.export.INDEX_SETTINGS), and the hub's DiT folders carry it there, where
    from_pretrained reads it back into DiTPipeline."""
    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    index = folder / "model_index.json"
    labels = {str(k): v for k, v in id2label.items()}
    index.write_text(json.dumps({**json.loads(index.read_text()), "id2label": labels}, indent=2, sort_keys=True) + "\n")
    return folder


class DiTBackbone(DDPMBackbone):
    family = "dit"
    conditioning = "class"
    denoiser_component = "transformer"
    cross_attention = r"\.class_embedder\."
    noxattn_excluded = r"(^proj_out_|\.timestep_embedder\.)"  # time embedding and output layer, as for SD
    lora_targets = []
    scope_refusals = {"lora": "DiTTransformer2DModel takes no peft adapter in diffusers (it is not a "
                              "PeftAdapterMixin) and DiTPipeline has no LoRA loader"}

    def __init__(self, pipe, use_t5: bool = True):
        super().__init__(pipe, use_t5)
        config = pipe.transformer.config
        if type(pipe.transformer).__name__ == "UNet2DModel":
            rows = config.num_class_embeds if config.class_embed_type is None else None
            if rows is None or rows <= NULL_CLASS:
                raise ModelError(f"model: a UNet2DModel in a DiTPipeline needs a class table (num_class_embeds, "
                                 f"no class_embed_type) with a row for DiTPipeline's null class {NULL_CLASS}; this "
                                 f"one has num_class_embeds {config.num_class_embeds}, class_embed_type "
                                 f"{config.class_embed_type}")
            self.cross_attention = r"^class_embedding\."
            self.noxattn_excluded = r"^(time_embedding|conv_out|conv_norm_out)\."  # as for SD's UNet
        elif config.num_embeds_ada_norm != NULL_CLASS:
            raise ModelError(f"model: DiT num_embeds_ada_norm {config.num_embeds_ada_norm}; DiTPipeline guides "
                             f"with the null class {NULL_CLASS}, so the table must end there")
        self.classes = dit_classes(pipe)
        # In train mode DiT's label embedding drops 10 % of the labels to the null class (its own CFG
        # training), drawn from the global RNG: erasure sets every sample's conditioning itself, and a
        # dropped forget label would ascend the unconditional loss and break the (seed, step) draws.
        from diffusers.models.embeddings import LabelEmbedding

        for module in pipe.transformer.modules():
            if isinstance(module, LabelEmbedding):
                module.dropout_prob = 0.0

    @property
    def text_encoders(self):
        return []

    @torch.no_grad()
    def encode_prompts(self, prompts, device) -> Conditioning:
        return {"class_labels": self.classes.encode(prompts, device)}

    def other_class(self, cond, u):
        return {"class_labels": self.classes.other(cond["class_labels"], u)}

    def predict(self, model, x_t, timesteps, cond):
        out = model(x_t, timestep=timesteps, class_labels=cond["class_labels"], return_dict=False)[0]
        return eps_half(out, x_t.shape[1])
