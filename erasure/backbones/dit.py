"""DiT (Peebles & Xie 2023): DiTTransformer2DModel in a VAE's latent space, conditioned on a class label.

DDPM noise and an eps prediction with learned variance: the transformer outputs 2×C channels, eps
and the variance interpolation, and DiTPipeline samples from the eps half only; erasure trains that
half (the variance half is left as it is, unread by the pipeline's scheduler step).

The class enters through adaLN-Zero: every block embeds (timestep, class) and regresses its norms'
scale and shift from it. There is no cross-attention; the weights that read the class are each block's
label-embedding table, which the xattn scope (ESD-x) trains, as SD's attn2 reads the text.
"""

from __future__ import annotations

import torch

from erasure.backbones.base import Conditioning
from erasure.backbones.classes import ClassLabels
from erasure.backbones.ddpm import DDPMBackbone, eps_half


def dit_classes(pipe) -> ClassLabels:
    """A DiTPipeline's class names → label ids, as its get_label_ids reads them (every synonym of an
    id2label value such as "tench, Tinca tinca" names the class); training and drawing both use it."""
    # The label-embedding table's last row is the null class; DiTPipeline hard-codes it as 1000,
    # ImageNet DiT's num_embeds_ada_norm, which is what the table says for every DiT.
    null_class = pipe.transformer.config.num_embeds_ada_norm
    # A DiT saved without its id2label map is addressed by label ids written as numbers.
    names = dict(pipe.labels) or {str(i): i for i in range(null_class)}
    return ClassLabels(names, null_class, f"DiT model {getattr(pipe, 'name_or_path', None) or ''}".strip())


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
