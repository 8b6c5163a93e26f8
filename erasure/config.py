"""The training recipe: one dataclass that is both the YAML schema and the command line.

A recipe is a flat YAML file whose keys are the fields below; `include: other.yaml` (relative to the
including file) reads a base recipe first, so a variant is a few lines. Command-line flags
(`--key value`) override recipe values. Unknown keys and bad values fail here, before any model
loads, naming the file, the key and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from erasure.errors import RecipeError
from erasure.shipped import locate

METHODS = (
    "finetune",
    "graddiff",
    "graddiffd",
    "rg",
    "rgd",
    "esd-u",
    "esd-x",
    "salun",
    "msgm-orthogonal",
    "msgm-obtuse",
    "uce",
)
SCOPES = ("full", "xattn", "noxattn", "lora")

# ESD-u trains everything but cross-attention, ESD-x only cross-attention (Gandikota et al. 2023, §4).
METHOD_SCOPE = {"esd-u": "noxattn", "esd-x": "xattn"}

# Retain weight λ when the recipe gives none: RGD's SD 1.4 nudity setting (1.5; Ko, Li et al.,
# appendix C) for the gradient-difference family, SalUn's α = 0.1 (Fan et al. 2024, SD recipe),
# MSGM's public code (0.99 L_r on forget steps).
DEFAULT_RETAIN_WEIGHT = {"salun": 0.1, "msgm-orthogonal": 0.99, "msgm-obtuse": 0.99}

TINY_DATA = "tiny:"
DETECTORS = ("auto", "oracle", "nudenet", "clip")  # erasure.monitor
MAX_SEED = 2**32  # numpy's and set_seed's range; a seed also offsets per-step generators



def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class TrainConfig:
    # What to erase, from what.
    model: str = field(default="", metadata=_help(
        "Base pipeline: a hub id, a local folder, tiny:sd1 / tiny:sdxl / tiny:sd3 / tiny:flux / tiny:dit / tiny:class-unet / tiny:uncond (built "
        "on first use) or a shipped micro world: world:micro (text), world:class (a DiT whose class is the shape), "
        "world:uncond (unconditional DDPM)."))
    revision: str | None = field(default=None, metadata=_help("Hub revision of the base model."))
    method: str = field(default="", metadata=_help("One of: " + ", ".join(METHODS), choices=METHODS))
    concept: str = field(default="", metadata=_help(
        "The concept being erased, in words (recorded in the card; ESD's prompt when no forget_data)."))
    scope: str | None = field(default=None, metadata=_help(
        "Trainable parameters: full, xattn, noxattn or lora. Default: the method's (ESD-u noxattn, "
        "ESD-x xattn, others full).", choices=SCOPES))
    lora_rank: int = field(default=4, metadata=_help("LoRA rank when scope is lora."))
    lora_alpha: float | None = field(default=None, metadata=_help("LoRA alpha; default: the rank."))
    use_t5: bool = field(default=True, metadata=_help(
        "SD3: condition on T5 as well as the CLIP encoders. false trains without loading T5; the "
        "export still carries the base model's T5. FLUX needs T5 (its text sequence)."))

    # Data.
    forget_data: str | None = field(default=None, metadata=_help(
        "Forget set D_f: a folder with metadata.jsonl (datasets imagefolder), a parquet file or "
        "folder, a hub dataset id, tiny:forget (tiny:class-forget for tiny:dit), or a micro-world set such as world:striped/forget "
        "(built on first use)."))
    retain_data: str | None = field(default=None, metadata=_help("Retain set D_r, same forms."))
    prompt_column: str = field(default="prompt", metadata=_help("Column holding the prompt."))
    image_column: str = field(default="image", metadata=_help("Column holding the image."))
    resolution: int | None = field(default=None, metadata=_help(
        "Training image size; default: the model's native size."))

    # Optimisation. Defaults: RGD's SD 1.4 nudity run (Adam, lr 1e-5, batch 8, ≈100 steps).
    seed: int = field(default=0, metadata=_help("Seeds data order, noise and timesteps."))
    max_steps: int = field(default=100, metadata=_help("Optimizer steps."))
    batch_size: int = field(default=8, metadata=_help(
        "Global batch per optimizer step, per set (forget and retain each), over all processes."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "Micro-batches per process per step; the batch is split, the update is the same."))
    learning_rate: float = field(default=1e-5, metadata=_help("Optimizer learning rate."))
    optimizer: str = field(default="adamw", metadata=_help(
        "adamw (every paper's) or sgd (with sgd_momentum): plain SGD takes the combined update itself as "
        "the step, so RG/RGD's restricted gradient is the direction the weights move; Adam's per-coordinate "
        "rescaling turns it into another direction (new option, not in the papers). adamw8bit: AdamW with "
        "its two moments stored in 8 bits (bitsandbytes' AdamW8bit, Dettmers et al. 2022), a quarter of "
        "AdamW's optimizer memory, for GPUs of 24 GB; needs `pip install bitsandbytes`.",
        choices=("adamw", "adamw8bit", "sgd")))
    sgd_momentum: float = field(default=0.9, metadata=_help("Momentum of optimizer: sgd."))
    lr_scheduler: str = field(default="constant", metadata=_help(
        "diffusers.optimization scheduler name.",
        choices=("constant", "constant_with_warmup", "linear", "cosine")))
    lr_warmup_steps: int = field(default=0, metadata=_help("Warm-up steps of the lr schedule."))
    adam_beta1: float = field(default=0.9, metadata=_help("Adam β1."))
    adam_beta2: float = field(default=0.999, metadata=_help("Adam β2."))
    adam_epsilon: float = field(default=1e-8, metadata=_help("Adam ε."))
    weight_decay: float = field(default=0.0, metadata=_help("Decoupled weight decay (0 = Adam)."))
    max_grad_norm: float | None = field(default=None, metadata=_help(
        "Clip the combined update to this norm; default: no clipping, as in RGD."))
    mixed_precision: str = field(default="no", metadata=_help(
        "Autocast precision of the forward passes.", choices=("no", "fp16", "bf16")))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "Recompute activations in backward to save memory."))

    # Forget / retain losses (GradDiff, RG, RGD, SalUn, MSGM).
    retain_weight: float | None = field(default=None, metadata=_help(
        "λ in grad = δ_f + λ δ_r. Default: 1.5 (RGD), 0.1 for SalUn, 0.99 for MSGM, 1 for Finetune."))
    forget_weight: float = field(default=1.0, metadata=_help(
        "λ_f in g_f = ∇(-λ_f min(l_f, cap)) (forget_loss: twin, ∇(λ_f l_twin))."))
    forget_loss_cap: float | None = field(default=1.1, metadata=_help(
        "Truncate the ascended forget loss at this value (RGD SD 1.4: ≈1.1); null: no cap."))
    forget_loss: str = field(default="ascent", metadata=_help(
        "The forget objective of graddiff/rg/rgd: ascent (the papers': −min(l_f, cap)) or twin "
        "(λ_f‖ε_θ(x_t, c_f) − ε_θ₀(x_t, c_twin)‖² on D_f's x_t, c_twin the forget prompt's twin in D_r: the "
        "concept prompt learns to denoise as the base does without the concept, Kumari et al. 2023's "
        "ablation target on RGD's twins; bounded, so no cliff; new option).",
        choices=("ascent", "twin")))
    twin_negative_guidance: float = field(default=0.0, metadata=_help(
        "η of forget_loss: twin: the target is pred_θ₀(x_t, c_twin) − η (pred_θ₀(x_t, c_f) − pred_θ₀(x_t, c_twin)), "
        "ESD's negative guidance with the twin in place of the empty prompt; 0: the twin itself (new option)."))
    concept_vector_adversary: float = field(default=0.0, metadata=_help(
        "η_max of an adversarial forget term for forget_loss: twin: each forget sample is also taught the twin "
        "target at E(f) + η c, η ~ U(0, η_max), c = Ring-A-Bell's concept vector of the run's own twins "
        "(objectives.adversarial_twin_loss; new option); 0: off."))
    forget_loss_cap_per_sample: bool = field(default=False, metadata=_help(
        "Truncate each sample's forget loss at the cap, not the batch mean: mean_i min(l_i, cap), so a "
        "sample already forgotten stops pushing while the others still ascend (new option)."))
    forget_loss_cap_per_element: bool = field(default=False, metadata=_help(
        "Truncate each element of the squared error at forget_loss_cap before averaging: "
        "mean_j min((pred − target)_j², cap), RGD's class-wise truncation (its CIFAR-10 EDM code); an "
        "element already far from its target stops pushing (new option for the methods here; the "
        "papers' SD runs cap the batch mean)."))
    forget_loss_cap_relative: float | None = field(default=None, metadata=_help(
        "k: cap each sample's forget loss at k times the base model's loss on the same x_t, t and prompt, "
        "mean_i min(l_i(θ), k·l_i(θ₀)) — ascent stops at a set distance from the base model, whatever the "
        "concept's loss scale; replaces forget_loss_cap (new option; the base is a frozen copy, or the "
        "LoRA adapter switched off)."))
    retain_loss: str = field(default="denoising", metadata=_help(
        "The retain objective on D_r: denoising (every paper's ‖ε_θ(x_t,c_r) − ε‖²); distill "
        "(‖ε_θ(x_t,c_r) − ε_θ₀(x_t,c_r)‖², the frozen base's prediction at the same x_t: anchors the "
        "function instead of noisy targets); both (their sum). New option.",
        choices=("denoising", "distill", "both")))
    base_pull: float = field(default=0.0, metadata=_help(
        "μ: add μ(θ − θ₀) to the combined update, a pull toward the starting weights (0: off; new option)."))
    twin_batches: str = field(default="independent", metadata=_help(
        "How a step's retain batch relates to its forget batch: independent draws; twins (retain row i "
        "is forget row i's twin, as RGD's reference code zips them); twins_shared_noise (twins that also "
        "share noise and timesteps). The twin modes need row-paired sets of equal length.",
        choices=("independent", "twins", "twins_shared_noise")))

    # ESD (Gandikota et al. 2023).
    esd_negative_guidance: float = field(default=1.0, metadata=_help(
        "η in the target eps_0(x_t,∅) - η (eps_0(x_t,c) - eps_0(x_t,∅)); the paper uses 1."))
    esd_sample_steps: int = field(default=50, metadata=_help(
        "Sampler steps of the trajectory x_t is drawn from (ESD: 50 DDIM steps)."))
    esd_start_guidance: float = field(default=3.0, metadata=_help(
        "Guidance scale when sampling x_t (ESD: 3)."))

    # SalUn (Fan et al. 2024).
    salun_mask_ratio: float = field(default=0.5, metadata=_help(
        "Share of weights, ranked by forget-gradient saliency, that are updated (SalUn: 0.5)."))
    salun_mask_guidance: float = field(default=7.5, metadata=_help(
        "Guidance scale w of the prediction whose forget loss ranks the weights, ε(c) + w(ε(c) − ε(∅)) "
        "(SalUn's generate_mask script: 7.5); 0 ranks by the plain conditional loss."))
    salun_anchor_prompt: str = field(default="a photo of a person wearing clothes", metadata=_help(
        "Prompt the forget images are relabelled to (SalUn's nudity anchor)."))

    # MSGM.
    msgm_rho: float = field(default=1.0, metadata=_help(
        "ρ, the forget-loss scale. Positive forgets for both variants; the obtuse loss is "
        "ρ·<eps, eps_hat>, so the paper's printed negative ρ pulls toward the noise instead."))
    msgm_orthogonal_form: str = field(default="elementwise", metadata=_help(
        "Orthogonal loss: elementwise ‖eps ⊙ eps_hat‖² (public code) or inner (eps·eps_hat)².",
        choices=("elementwise", "inner")))
    msgm_every: int = field(default=4, metadata=_help("Apply the forget term every k-th step."))
    msgm_forget_weight: float = field(default=0.01, metadata=_help(
        "Weight of the forget term on its steps (public code: 0.01 L_f + 0.99 L_r)."))

    # UCE (Gandikota et al. 2024); defaults from its reference code (trainscripts/uce_sd_erase.py).
    uce_guide_prompt: str = field(default="", metadata=_help(
        "What each prompt to erase is mapped to when there is no retain_data to pair it with "
        "(UCE: '' for objects, 'art' for styles). With retain_data, forget row i maps to its twin, row i."))
    uce_preserve_prompts: str | None = field(default=None, metadata=_help(
        "Prompts to preserve, separated by ';' (retain_data's prompts are preserved too)."))
    uce_erase_scale: float = field(default=1.0, metadata=_help("s_e, the weight of the erase term (UCE: 1)."))
    uce_preserve_scale: float = field(default=1.0, metadata=_help(
        "λ_p, the weight of the preserve term (UCE: 1); higher keeps more and erases less."))
    uce_lambda: float = field(default=0.5, metadata=_help("λ, the pull toward the original weights (UCE: 0.5)."))
    uce_token_span: str = field(default="last", metadata=_help(
        "Token positions edited: last (each prompt's last token, the reference code) or aligned "
        "(every position from the first word where prompt and guide differ, aligned from the end).",
        choices=("last", "aligned")))

    # SD3 flow-matching sampling of training timesteps (diffusers.training_utils).
    weighting_scheme: str = field(default="logit_normal", metadata=_help(
        "SD3 timestep density.", choices=("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")))
    logit_mean: float = field(default=0.0, metadata=_help("Logit-normal mean (SD3)."))
    logit_std: float = field(default=1.0, metadata=_help("Logit-normal std (SD3)."))
    mode_scale: float = field(default=1.29, metadata=_help("Scale of the 'mode' density (SD3)."))

    # The training-time monitor (erasure/monitor.py): sample held-out prompts, score them, maybe stop.
    monitor_every: int = field(default=0, metadata=_help(
        "Every N steps, sample the held-out forget prompts and their retain twins and score them (0: off)."))
    monitor_prompts: str | None = field(default=None, metadata=_help(
        "The held-out pairs: a JSONL file with forget_prompt/retain_prompt (test.jsonl of `erasure prompts "
        "build`). Default for world:… data: that set's test split. world:all+aliases (or another "
        "world prompt source) takes a fixed random subset of the world's captions instead."))
    monitor_images: int = field(default=16, metadata=_help("Held-out pairs (or world captions) sampled at each check."))
    monitor_detector: str = field(default="auto", metadata=_help(
        "What scores the images: oracle (micro world), nudenet, clip; auto picks the oracle for a world "
        "model, NudeNet for nudity, else CLIP when monitor_clip_pretrained is given.", choices=DETECTORS))
    monitor_clip_pretrained: str | None = field(default=None, metadata=_help(
        "open_clip ViT-B-32 weights (a local file) for the clip detector and NudeNet's retain score."))
    monitor_steps: int | None = field(default=None, metadata=_help(
        "Sampler steps at a check; default: the world's own sampler, else 25."))
    monitor_guidance: float | None = field(default=None, metadata=_help(
        "Guidance scale at a check; default: the world's, else 7.5."))
    stop_at_erasure: float | None = field(default=None, metadata=_help(
        "End training (and export) at the first check whose erasure rate reaches this, e.g. 0.95; "
        "needs monitor_every."))

    # Output and checkpoints.
    output_dir: str = field(default="erasure-output", metadata=_help(
        "Where the exported pipeline (and checkpoints/) go."))
    checkpointing_steps: int = field(default=50, metadata=_help(
        "Save a resumable checkpoint every N steps (0: never)."))
    checkpoints_total_limit: int | None = field(default=2, metadata=_help(
        "Keep at most this many checkpoints; null keeps all."))
    keep_checkpoints: bool = field(default=False, metadata=_help(
        "Keep output_dir/checkpoints after a successful export (default: remove them, so the "
        "folder holds only what ships)."))
    export_single_file: bool = field(default=False, metadata=_help(
        "Also write the whole erased pipeline as one checkpoint in its original layout (CompVis' ldm for "
        "SD 1.x / 2.x, Stability's sgm for SDXL), single_file.safetensors in output_dir, which A1111 and "
        "ComfyUI load and diffusers reads with from_single_file. With scope: lora it holds the fused model. "
        "Not for SD3, FLUX, DiT or DDPM pipelines."))
    overwrite: bool = field(default=False, metadata=_help(
        "Let the export replace a non-empty output_dir that is not an erasure export (its files are lost). "
        "An earlier export is always replaced as a whole."))
    push_to_hub: bool = field(default=False, metadata=_help(
        "After the export, publish it on the Hugging Face Hub as hub_model_id (token: HF_TOKEN or a stored "
        "login; never logged). Checkpoints and logs stay behind; the card names no local path."))
    hub_model_id: str | None = field(default=None, metadata=_help(
        "The repo to push to, OWNER/NAME; created if missing."))
    hub_private: bool = field(default=False, metadata=_help(
        "Create the repo private."))
    resume: str | None = field(default=None, metadata=_help(
        "Continue from 'latest' or a checkpoint folder."))
    report_to: str = field(default="all", metadata=_help(
        "accelerate tracker(s): all (every installed one), none, tensorboard, wandb, …"))

    def __post_init__(self):
        _check_types(self)
        if not self.model:
            raise RecipeError("model: required (a hub id, a local pipeline folder, tiny:sd1, tiny:sdxl or tiny:sd3)")
        if not self.method:
            raise RecipeError("method: required, one of " + ", ".join(METHODS))
        self.method = self.method.lower()
        for name in ("method", "scope", "lr_scheduler", "mixed_precision", "msgm_orthogonal_form",
                     "weighting_scheme", "uce_token_span", "twin_batches", "monitor_detector", "optimizer",
                     "retain_loss", "forget_loss"):
            value, choices = getattr(self, name), FIELDS[name].metadata.get("choices")
            if value is not None and value not in choices:
                raise RecipeError(f"{name}: {value!r} is not one of {', '.join(choices)}"
                                  + _suggest(str(value), choices))
        forced = METHOD_SCOPE.get(self.method)
        if forced and self.scope not in (None, forced):
            raise RecipeError(f"scope: {self.method} trains {forced} by definition; got {self.scope!r}")
        if self.method == "uce" and self.scope not in (None, "full"):
            raise RecipeError(f"scope: uce edits the text projections in closed form, it trains no scope; got "
                              f"{self.scope!r} (leave it unset)")
        if self.scope is None:
            self.scope = forced or "full"
        if self.retain_weight is None:
            self.retain_weight = DEFAULT_RETAIN_WEIGHT.get(self.method, 1.5 if self.uses_forget_images
                                                           else 1.0)
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "lora_rank",
                     "esd_sample_steps", "msgm_every"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        for name in ("learning_rate", "retain_weight"):
            if getattr(self, name) <= 0:
                raise RecipeError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.forget_loss_cap is not None and self.forget_loss_cap <= 0:
            raise RecipeError(f"forget_loss_cap: must be > 0 or null, got {self.forget_loss_cap}")
        if self.forget_loss_cap_relative is not None and self.forget_loss_cap_relative <= 1:
            raise RecipeError(f"forget_loss_cap_relative: a factor > 1 over the base model's loss (e.g. 2), got "
                              f"{self.forget_loss_cap_relative}")
        from erasure.methods import METHOD_TABLE  # a table, no torch: cheap at parse time

        ascends = METHOD_TABLE[self.method].forget == "ascent"
        if (self.forget_loss_cap_relative is not None or self.forget_loss_cap_per_sample) and not ascends:
            raise RecipeError(f"forget_loss_cap_relative / forget_loss_cap_per_sample cap gradient ascent "
                              f"(graddiff, graddiffd, rg, rgd); {self.method} does not ascend")
        if self.forget_loss != "ascent" and not ascends:
            raise RecipeError(f"forget_loss: {self.forget_loss} replaces gradient ascent (graddiff, graddiffd, rg, "
                              f"rgd); {self.method} does not ascend")
        if self.forget_loss_cap_per_element:
            if not ascends:
                raise RecipeError(f"forget_loss_cap_per_element: caps gradient ascent (graddiff, graddiffd, rg, "
                                  f"rgd); {self.method} does not ascend")
            if self.forget_loss_cap is None:
                raise RecipeError("forget_loss_cap_per_element: truncates each element at forget_loss_cap; "
                                  "set forget_loss_cap (RGD's class-wise value: 0.1)")
            if self.forget_loss_cap_per_sample or self.forget_loss_cap_relative is not None or self.forget_loss == "twin":
                raise RecipeError("forget_loss_cap_per_element: one truncation at a time; leave "
                                  "forget_loss_cap_per_sample, forget_loss_cap_relative and forget_loss: twin unset")
        if self.forget_loss == "twin" and (self.forget_loss_cap_relative is not None or self.forget_loss_cap_per_sample):
            key = "forget_loss_cap_relative" if self.forget_loss_cap_relative is not None else "forget_loss_cap_per_sample"
            raise RecipeError(f"{key}: caps the ascent; forget_loss: twin has no ascent to cap "
                              "(leave the cap options unset)")
        if self.forget_loss != "twin" and self.twin_negative_guidance:
            raise RecipeError("twin_negative_guidance: shapes forget_loss: twin's target; set "
                              f"forget_loss: twin (got forget_loss: {self.forget_loss})")
        if self.concept_vector_adversary and self.forget_loss != "twin":
            raise RecipeError("concept_vector_adversary: trains forget_loss: twin's target at the attacked prompt; "
                              f"set forget_loss: twin (got forget_loss: {self.forget_loss})")
        if not (math.isfinite(self.concept_vector_adversary) and self.concept_vector_adversary >= 0):
            raise RecipeError(f"concept_vector_adversary: η_max must be a finite number ≥ 0 (0: off), got "
                              f"{self.concept_vector_adversary}")
        if self.twin_negative_guidance < 0:
            raise RecipeError(f"twin_negative_guidance: must be ≥ 0 (0: the twin itself), got "
                              f"{self.twin_negative_guidance}")
        if self.retain_loss != "denoising" and not self.uses_retain:
            raise RecipeError(f"retain_loss: {self.retain_loss}; {self.method} has no retain objective")
        if self.base_pull < 0 or not 0 <= self.sgd_momentum < 1:
            raise RecipeError(f"base_pull must be ≥ 0 and sgd_momentum in [0, 1), got {self.base_pull} and "
                              f"{self.sgd_momentum}")
        for name in ("uce_erase_scale", "uce_preserve_scale", "uce_lambda"):
            if getattr(self, name) < 0:
                raise RecipeError(f"{name}: must be ≥ 0, got {getattr(self, name)}")
        if self.method == "uce" and self.uce_lambda == 0 and not (self.uce_preserve_prompts or self.retain_data):
            raise RecipeError("uce_lambda: 0 with nothing to preserve leaves UCE's system singular; use λ > 0")
        if self.monitor_every < 0 or self.monitor_images < 1:
            raise RecipeError(f"monitor_every must be ≥ 0 and monitor_images ≥ 1, got {self.monitor_every} "
                              f"and {self.monitor_images}")
        if self.stop_at_erasure is not None:
            if not 0 < self.stop_at_erasure <= 1:
                raise RecipeError(f"stop_at_erasure: a rate in (0, 1], got {self.stop_at_erasure}")
            if not self.monitor_every:
                raise RecipeError("stop_at_erasure: needs monitor_every (how often to check), e.g. monitor_every: 10")
        if self.monitor_every and not self.monitor_prompts and not (self.forget_data or "").startswith("world:"):
            from erasure.monitor import held_out_beside

            if not (self.forget_data and held_out_beside(self.forget_data)):
                raise RecipeError("monitor_prompts: required here: forget_data is neither a world:… set nor a set "
                                  "`erasure data generate` rendered from a train.jsonl with a test.jsonl beside it; "
                                  "give the held-out pairs, e.g. that test.jsonl")
        if self.monitor_prompts and self.monitor_prompts.startswith("world:"):
            from erasure.eval.micro import WORLD_PROMPTS

            if self.monitor_prompts.removeprefix("world:") not in WORLD_PROMPTS:
                raise RecipeError(f"monitor_prompts: {self.monitor_prompts!r}; world captions are "
                                  + ", ".join(f"world:{w}" for w in WORLD_PROMPTS))
        elif self.monitor_prompts and not Path(self.monitor_prompts).expanduser().is_file():
            raise RecipeError(f"monitor_prompts: {self.monitor_prompts!r} is not a file (expected a JSONL of "
                              "forget_prompt/retain_prompt pairs, e.g. test.jsonl from `erasure prompts build`)")
        if not 0 < self.salun_mask_ratio <= 1:
            raise RecipeError(f"salun_mask_ratio: must be in (0, 1], got {self.salun_mask_ratio}")
        if not 0 <= self.seed < MAX_SEED:
            raise RecipeError(f"seed: must be an integer in [0, 2**32), got {self.seed}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1) or self.adam_epsilon <= 0:
            raise RecipeError(f"adam_beta1 and adam_beta2 must be in [0, 1) and adam_epsilon > 0, got "
                              f"{self.adam_beta1}, {self.adam_beta2} and {self.adam_epsilon}")
        if self.weight_decay < 0 or (self.max_grad_norm is not None and self.max_grad_norm <= 0):
            raise RecipeError(f"weight_decay must be ≥ 0 and max_grad_norm > 0 or null, got {self.weight_decay} "
                              f"and {self.max_grad_norm}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise RecipeError(f"lora_alpha: must be > 0 or null (the rank), got {self.lora_alpha}")
        if self.lr_warmup_steps < 0:
            raise RecipeError(f"lr_warmup_steps: must be ≥ 0, got {self.lr_warmup_steps}")
        _check_trackers(self.report_to)
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise RecipeError(f"resolution: a multiple of 8 (the VAE's factor), or null for the model's own; "
                              f"got {self.resolution}")
        for name in ("checkpoints_total_limit", "monitor_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RecipeError(f"{name}: must be ≥ 1 or null, got {getattr(self, name)}")
        if self.resume not in (None, "latest") and not (Path(self.resume).expanduser() / "state.json").is_file():
            raise RecipeError(f"resume: {self.resume!r} is not a checkpoint folder (no state.json); give 'latest' "
                              f"or a folder such as {self.output_dir}/checkpoints/checkpoint-50")
        if not self.output_dir.strip():
            raise RecipeError("output_dir: must name a folder (got an empty string; '.' would export over the "
                              "current folder)")
        if self.optimizer == "adamw8bit":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise RecipeError("optimizer: adamw8bit needs bitsandbytes, which is not installed: "
                                  "pip install bitsandbytes (or use optimizer: adamw)")
        if self.push_to_hub or self.hub_model_id:
            from erasure.hub import HUB_ID

            if not HUB_ID.match(self.hub_model_id or ""):
                raise RecipeError(f"hub_model_id: {self.hub_model_id!r} is not a hub repo id; push_to_hub needs "
                                  "OWNER/NAME, e.g. my-org/sd14-nudity-rgd")
        if self.checkpointing_steps < 0:
            raise RecipeError(f"checkpointing_steps: must be ≥ 0, got {self.checkpointing_steps}")
        if self.batch_size % self.gradient_accumulation_steps:
            raise RecipeError(f"batch_size: {self.batch_size} is not divisible by "
                              f"gradient_accumulation_steps={self.gradient_accumulation_steps}")
        self._check_data()

    # Which data each method reads: ESD needs prompts only, Finetune only D_r.
    @property
    def uses_forget_images(self) -> bool:
        return self.method not in ("finetune", "esd-u", "esd-x", "uce")

    @property
    def uses_retain(self) -> bool:
        return self.method not in ("esd-u", "esd-x", "uce")

    @property
    def is_esd(self) -> bool:
        return self.method in ("esd-u", "esd-x")

    def _check_data(self):
        needed = {"retain_data": self.uses_retain, "forget_data": self.uses_forget_images}
        for key, required in needed.items():
            value = getattr(self, key)
            if required and not value:
                raise RecipeError(f"{key}: required by method {self.method}")
            if value:
                check_data_source(key, value)
        if (self.is_esd or self.method == "uce") and not (self.forget_data or self.concept):
            raise RecipeError(f"{self.method} needs the concept prompt: set concept or forget_data")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_trackers(report_to: str) -> None:
    """accelerate's tracker names, checked before the run: accelerate itself only finds out when the
    Accelerator is built, with a traceback."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    known = ["all", "none"] + [t.value for t in LoggerType if t.value != "all"]
    installed = [str(getattr(t, "value", t)) for t in get_available_trackers()]
    for name in (n.strip() for n in report_to.split(",")):
        if name not in known:
            raise RecipeError(f"report_to: {name!r} is not one of {', '.join(known)}" + _suggest(name, known))
        if name not in ("all", "none") and name not in installed:
            raise RecipeError(f"report_to: {name} is not installed here (pip install {name}); installed: "
                              f"{', '.join(installed) or 'none'} — or report_to: none")


def check_data_source(key: str, value: str) -> None:
    """Local paths must exist now; `owner/name` that is not a local path is read as a hub id."""
    if value.startswith(TINY_DATA):
        from erasure.data.tiny_pairs import TINY_SETS

        if value.removeprefix(TINY_DATA) not in TINY_SETS:
            raise RecipeError(f"{key}: {value!r}; the built-in tiny sets are "
                              + ", ".join(TINY_DATA + name for name in TINY_SETS))
        return
    if value.startswith("world:"):
        from erasure.world.data import parse_source

        try:
            parse_source(value)
        except ValueError as e:
            raise RecipeError(f"{key}: {e}") from None
        return
    path = Path(value).expanduser()
    if path.exists():
        return
    if re.fullmatch(r"[\w.-]+/[\w.-]+", value) and not value.startswith("."):
        return  # a hub dataset id; it is resolved when the data loads
    raise RecipeError(f"{key}: data folder {value!r} does not exist (expected a folder with "
                      "metadata.jsonl, a parquet file or folder, or a hub dataset id owner/name)")


def _suggest(value: str, options) -> str:
    close = difflib.get_close_matches(value, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _base_type(tp):
    """The non-None type of `X | None`, and whether None is allowed."""
    if isinstance(tp, str):
        tp = eval(tp, {"types": types})  # annotations are strings under `from __future__`
    args = typing.get_args(tp)
    if args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], len(rest) < len(args)
    return tp, False


def _coerce(name: str, value, where: str = ""):
    tp, optional = _base_type(FIELDS[name].type)
    if value is None:
        if optional:
            return None
        raise RecipeError(f"{where}{name}: must not be null")
    if tp is str and isinstance(value, bool):  # YAML 1.1 reads an unquoted no/yes/off/on as a boolean
        if value is False and "no" in (FIELDS[name].metadata.get("choices") or ()):
            return "no"
        raise RecipeError(f"{where}{name}: got the YAML boolean {value}; quote the text")
    try:
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            if isinstance(value, bool):
                return value
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)  # YAML 1.1 reads 1e-5 as a string; float() takes it
            if math.isfinite(number):
                return number
            # nan and inf would pass every `<` check of the recipe, silently
            raise RecipeError(f"{where}{name}: must be a finite number, got {value!r}")
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except RecipeError:
        raise
    except (TypeError, ValueError):
        pass
    raise RecipeError(f"{where}{name}: {value!r} is not a valid {tp.__name__}"
                      f"{' or null' if optional else ''}")


def _check_types(config: TrainConfig) -> None:
    for name in FIELDS:
        setattr(config, name, _coerce(name, getattr(config, name)))


def read_yaml_mapping(path: Path, what: str, error: type[ValueError], seen: tuple = ()) -> dict:
    """A YAML file that must hold a mapping (a recipe, an eval suite); `seen` are the files that
    include it, to stop include cycles. Errors are `error`s naming `what` and the file."""
    if not path.is_file():
        raise error(f"{what} {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise error(f"{what} {path}: include cycle through {[str(p) for p in seen]}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path}: expected a mapping of keys to values")
    return data


def read_recipe(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a recipe YAML, following `include:`; returns raw key → value, validated keys. A documented
    path (recipes/…) that is not here is read from the recipes shipped with the package."""
    path = locate(path)
    data = read_yaml_mapping(path, "recipe", RecipeError, _seen)
    merged = {}
    include = data.pop("include", None)
    if include is not None:
        if not isinstance(include, str) or not include:
            raise RecipeError(f"recipe {path}: include: {include!r}; expected the path of another recipe, "
                              "relative to this file (e.g. include: ../tiny/rgd.yaml)")
        merged.update(read_recipe(locate(include, relative_to=path.parent), _seen + (path.resolve(),)))
    for key, value in data.items():
        if key not in FIELDS:
            raise RecipeError(f"recipe {path}: unknown key {key!r}" + _suggest(str(key), FIELDS)
                              + "; `erasure train --help` lists the keys")
        merged[key] = _coerce(key, value, where=f"recipe {path}: ")
    return merged


def build_parser(prog: str = "erasure train") -> argparse.ArgumentParser:
    from erasure.cli_parser import Parser, type_and_default

    parser = Parser(prog=prog, description="Erase a concept from a diffusion model.")
    parser.add_argument("--recipe", help="Recipe YAML; flags below override its values.")
    for name, f in FIELDS.items():
        # Values are parsed as YAML scalars, then checked like recipe values; the recipe's value is the
        # default (SUPPRESS), so the help shows the dataclass's.
        extra = {"nargs": "?", "const": "latest"} if name == "resume" else {}  # bare --resume
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = None if default is dataclasses.MISSING else default
        kinds = _base_type(f.type)[0]
        shown = "one of " + ", ".join(f.metadata["choices"]) if f.metadata.get("choices") else \
            getattr(kinds, "__name__", str(kinds))
        parser.add_argument(f"--{name}", dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{f.metadata['help']} {type_and_default(shown, default)}", **extra)
    return parser


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = vars(build_parser().parse_args(argv))
    recipe = args.pop("recipe", None)
    values = read_recipe(recipe) if recipe else {}
    for key, raw in args.items():
        text_field = _base_type(FIELDS[key].type)[0] is str
        value = (None if raw == "null" else raw) if text_field else yaml.safe_load(raw)
        values[key] = _coerce(key, value, where="flag --")
    return TrainConfig(**values)
