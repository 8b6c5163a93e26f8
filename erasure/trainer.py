"""The erasure training loop on accelerate.

Reading order: `train()` prepares data, model and optimizer; `Erasure.step()` is one update —
forget gradient g_f, retain gradient g_r, combined by the method's update rule (erasure.methods).

Design choices that make runs reproducible:
- `batch_size` is the global batch per step (the papers' number), split over processes and then
  over gradient-accumulation micro-batches.
- Every step's randomness (which rows, VAE-posterior draws, noise, timesteps) is drawn for the
  whole global batch from a generator seeded by (seed, step), then sliced for this process. So N
  processes see exactly the rows and noise one process would, and a resumed run draws what the
  uninterrupted run drew, with no RNG state in the checkpoint.
- Latents (the VAE posterior's mean/std) and prompt embeddings are computed once, before training:
  the VAE and text encoders are frozen.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erasure.backbones import Backbone, check_model, load_backbone, resolve_model
from erasure.checkpoint import checkpoints, load_checkpoint, save_checkpoint
from erasure.config import TrainConfig
from erasure.data.paired import PromptImageSet, decode_image, load_prompt_image_set
from erasure.errors import DataError, DivergedError, RecipeError
from erasure.methods import METHOD_TABLE
from erasure.methods.esd import sample_partial_trajectory
from erasure.methods.objectives import (adversarial_twin_loss, concept_vector, denoising_loss, denoising_losses,
                                        distillation_loss, element_capped_losses, esd_loss, forget_ascent,
                                        guided_denoising_loss, msgm_loss, per_sample_ascent, salun_relabel_loss,
                                        twin_target)
from erasure.methods.restricted_gradient import cosine, global_inner_products, update_coefficients
from erasure.methods.saliency import saliency_mask
from erasure.sharding import local, shard_like, whole, whole_from_local

# Recipe keys that may change between a checkpoint and its resumption.
RESUMABLE_CHANGES = {"resume", "max_steps", "checkpointing_steps", "checkpoints_total_limit",
                     "keep_checkpoints", "report_to", "output_dir", "overwrite",
                     # the monitor only reads the model (its sampling has its own generators)
                     "monitor_every", "monitor_prompts", "monitor_images", "monitor_detector",
                     "monitor_clip_pretrained", "monitor_steps", "monitor_guidance", "stop_at_erasure"}
SEED_STRIDE = 1_000_003
# What a run writes into output_dir before its export (tracker logs, the monitor's images and
# history): the export swaps in a whole new folder and carries these over.
RUN_FILES = ("logs", "monitor")


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * SEED_STRIDE + step * 7919 + salt)


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, salt: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=step_generator(seed, epoch, salt)).tolist())


def batch_rows(n: int, batch: int, step: int, seed: int, salt: int) -> list[int]:
    """Rows of a fresh permutation per epoch, read `batch` at a time (epochs may straddle steps)."""
    rows = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        rows.append(_permutation(n, seed, salt, epoch)[offset])
    return rows


@dataclass
class EncodedSet:
    """A forget or retain set after the frozen encoders: prompt ids and latent posteriors."""
    data: PromptImageSet
    prompt_ids: torch.Tensor  # row → index into the prompt-embedding table
    mean: torch.Tensor | None  # VAE posterior per row (None for prompt-only sets)
    std: torch.Tensor | None


class PromptTable:
    """Every distinct prompt of the run, encoded once."""

    def __init__(self, backbone: Backbone, prompts: list[str], device, dtype, show: bool):
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        chunks = []
        ordered = list(self.index)
        for start in tqdm(range(0, len(ordered), 32), desc="encoding prompts", disable=not show):
            cond = backbone.encode_prompts(ordered[start:start + 32], device)
            # class labels stay integers; embeddings take the run's precision
            chunks.append({k: v.to("cpu", dtype) if v.is_floating_point() else v.cpu() for k, v in cond.items()})
        self.table = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    def ids(self, prompts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[p] for p in prompts])

    def cond(self, ids: torch.Tensor, device) -> dict:
        return {k: v[ids].to(device) for k, v in self.table.items()}


@torch.no_grad()
def encode_images(backbone: Backbone, data: PromptImageSet, resolution: int, device, show: bool):
    means, stds = [], []
    for start in tqdm(range(0, len(data), 8), desc=f"encoding {data.name}", disable=not show):
        pixels = torch.stack([decode_image(data.images[i], resolution, data.name, i)
                              for i in range(start, min(start + 8, len(data)))])
        mean, std = backbone.encode_images(pixels.to(device))
        means.append(mean.float().cpu())
        stds.append(std.float().cpu())
    return torch.cat(means), torch.cat(stds)


class Erasure:
    """One run: holds what a step needs and performs steps."""

    def __init__(self, config: TrainConfig, accelerator, backbone: Backbone, model, params,
                 optimizer, lr_scheduler, prompts: PromptTable, forget: EncodedSet | None,
                 retain: EncodedSet | None, frozen, latent_shape):
        self.config, self.accelerator, self.backbone = config, accelerator, backbone
        self.model, self.params, self.optimizer, self.lr_scheduler = model, params, optimizer, lr_scheduler
        self.prompts, self.forget, self.retain, self.frozen = prompts, forget, retain, frozen
        self.method = METHOD_TABLE[config.method]
        self.latent_shape = latent_shape
        self.device = accelerator.device
        self.per_process = config.batch_size // accelerator.num_processes
        self.micro = self.per_process // config.gradient_accumulation_steps
        self.g_f: list[torch.Tensor] | None = None  # the one extra gradient-sized buffer
        self.mask: list[torch.Tensor] | None = None
        self.sharded = accelerator.distributed_type.name in ("FSDP",)
        # base_pull's θ₀: the weights before the first step (a resumed run still pulls toward these)
        self.start_weights = [local(p).detach().clone() for p in params] if config.base_pull else None
        # concept_vector_adversary's c: the run's own twins (forget row i, retain row i), encoded once
        self.concept_vector = None
        if config.concept_vector_adversary:
            self.concept_vector = concept_vector(prompts.cond(forget.prompt_ids, self.device),
                                                 prompts.cond(retain.prompt_ids, self.device))

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    # ---- randomness: drawn for the global batch, sliced for this process ---------------------
    def draw(self, data: EncodedSet, step: int, salt: int, row_salt: int | None = None) -> list[dict]:
        """``row_salt`` picks the rows apart from the noise (twin batches take the forget set's rows)."""
        B, g = self.config.batch_size, step_generator(self.config.seed, step, salt)
        rows = torch.tensor(batch_rows(len(data.data), B, step, self.config.seed,
                                       salt if row_salt is None else row_salt))
        shape = (B, *self.latent_shape)
        drawn = {"rows": rows, "latent_noise": torch.randn(shape, generator=g),
                 "noise": torch.randn(shape, generator=g),
                 "timesteps": self.backbone.sample_timesteps(B, g),
                 "esd_stop": torch.randint(self.config.esd_sample_steps, (1,), generator=g).expand(B),
                 "relabel": torch.rand(B, generator=g),  # SalUn's other class (class-conditional models)
                 "adversary": torch.rand(B, generator=g)}  # concept_vector_adversary's η / η_max (drawn last:
        # a key added here leaves every earlier draw, and so every earlier run, as it was)
        lo = self.accelerator.process_index * self.per_process
        return [{k: v[lo + i: lo + i + self.micro] for k, v in drawn.items()}
                for i in range(0, self.per_process, self.micro)]

    def inputs(self, data: EncodedSet, micro: dict):
        rows = micro["rows"]
        cond = self.prompts.cond(data.prompt_ids[rows], self.device)
        x0 = None
        if data.mean is not None:
            x0 = self.backbone.latents(data.mean[rows], data.std[rows], micro["latent_noise"]).to(self.device)
        return x0, micro["noise"].to(self.device), micro["timesteps"].to(self.device), cond

    @contextmanager
    def base_model(self):
        """θ₀ for the objectives that read the base model: the frozen copy, or with LoRA the same
        model with its adapter switched off (no second copy). Forward passes only, no gradient."""
        if self.frozen is not None:
            yield self.frozen
            return
        model = self.unwrapped
        model.disable_adapters()
        try:
            yield model
        finally:
            model.enable_adapters()

    def fixed_cond(self, prompt: str, n: int) -> dict:
        return self.prompts.cond(self.prompts.ids([prompt] * n), self.device)

    # ---- the objectives (formulas in erasure.methods.objectives) --------------------------------
    def forget_objective(self, micro: dict):
        """(what to minimise, what to log) for one forget micro-batch."""
        c, kind = self.config, self.method.forget
        x0, noise, t, cond = self.inputs(self.forget, micro)
        if kind == "ascent" and c.forget_loss == "twin":
            # forget row i's twin is retain row i (checked when the sets load)
            twin = self.prompts.cond(self.retain.prompt_ids[micro["rows"]], self.device)
            if self.concept_vector is not None:
                noised = self.backbone.add_noise(x0, noise, t)
                target = self.base_target(noised, t, cond, twin, c.twin_negative_guidance)
                strengths = c.concept_vector_adversary * micro["adversary"].to(self.device)
                loss = adversarial_twin_loss(self.backbone, self.model, noised, t, cond, self.concept_vector,
                                             strengths, target)
                return c.forget_weight * loss, loss
            loss = self.distill(x0, noise, t, cond, twin, away_from=c.twin_negative_guidance)
            return c.forget_weight * loss, loss
        if kind == "ascent" and c.forget_loss_cap_per_element:
            losses = element_capped_losses(self.backbone, self.model, x0, noise, t, cond, c.forget_loss_cap)
            return forget_ascent(losses.mean(), None, c.forget_weight), losses.mean()
        if kind == "ascent":
            if not (c.forget_loss_cap_per_sample or c.forget_loss_cap_relative):
                loss = denoising_loss(self.backbone, self.model, x0, noise, t, cond)
                return forget_ascent(loss, c.forget_loss_cap, c.forget_weight), loss
            cap = c.forget_loss_cap
            if c.forget_loss_cap_relative:
                with torch.no_grad(), self.base_model() as base:
                    cap = c.forget_loss_cap_relative * denoising_losses(self.backbone, base, x0, noise, t, cond)
            losses = denoising_losses(self.backbone, self.model, x0, noise, t, cond)
            return per_sample_ascent(losses, cap, c.forget_weight), losses.mean()
        if kind == "relabel":
            # A class-conditional model relabels each forget image to a random other class (Fan et al.
            # 2024, class-wise forgetting); a text model to the anchor prompt.
            anchor = self.backbone.other_class(cond, micro["relabel"])
            if anchor is None:
                anchor = self.fixed_cond(c.salun_anchor_prompt, len(noise))
            loss = salun_relabel_loss(self.backbone, self.model, self.unwrapped, x0, noise, t, cond, anchor)
            return loss, loss
        if kind in ("orthogonal", "obtuse"):
            loss = msgm_loss(self.backbone, self.model, x0, noise, t, cond, kind, c.msgm_rho,
                             c.msgm_orthogonal_form)
            return c.msgm_forget_weight * loss, loss
        if kind == "esd":
            uncond = self.fixed_cond("", len(noise))
            x_t, t = sample_partial_trajectory(self.backbone, self.unwrapped, noise, cond, uncond,
                                               c.esd_start_guidance, c.esd_sample_steps,
                                               int(micro["esd_stop"][0]))
            loss = esd_loss(self.backbone, self.model, self.frozen, x_t, t, cond, uncond,
                            c.esd_negative_guidance)
            return loss, loss
        raise ValueError(f"unknown forget objective {kind!r}")

    def retain_objective(self, micro: dict):
        x0, noise, t, cond = self.inputs(self.retain, micro)
        if self.config.retain_loss == "denoising":
            loss = denoising_loss(self.backbone, self.model, x0, noise, t, cond)
            return loss, loss
        loss = self.distill(x0, noise, t, cond, cond, with_denoising=self.config.retain_loss == "both")
        return loss, loss

    def distill(self, x0, noise, t, cond, base_cond, with_denoising: bool = False, away_from: float = 0.0):
        """The model under ``cond`` toward the base model under ``base_cond`` at the same x_t (and
        ``away_from`` > 0: past it, away from the base under ``cond``; objectives.twin_target)."""
        noised = self.backbone.add_noise(x0, noise, t)
        base_prediction = self.base_target(noised, t, cond, base_cond, away_from)
        return distillation_loss(self.backbone, self.model, noised, t, cond, base_prediction, with_denoising)

    @torch.no_grad()
    def base_target(self, noised, t, cond, base_cond, away_from: float):
        """pred_θ₀(x_t, c'), and with ``away_from`` η > 0 twin_target's step past it, away from pred_θ₀(x_t, c)."""
        with self.base_model() as base:
            base_prediction = self.backbone.predict(base, noised.x_t, t, base_cond)
            if away_from:
                base_prediction = twin_target(base_prediction, self.backbone.predict(base, noised.x_t, t, cond),
                                              away_from)
        return base_prediction

    def forget_active(self, step: int) -> bool:
        if self.method.forget is None:
            return False
        # MSGM applies its forget term every k-th step (public code: k = 4).
        return self.method.forget not in ("orthogonal", "obtuse") or step % self.config.msgm_every == 0

    # ---- gradients ------------------------------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        """The gradients, this process's slices under FSDP (erasure.sharding): the update is made
        in place on them, from scalars reduced over the whole model."""
        for p in self.params:
            if p.grad is None:  # a weight the loss did not reach still takes part in the update
                p.grad = torch.zeros_like(p)
        return [local(p.grad) for p in self.params]

    def accumulate(self, objective, micro_batches) -> float:
        """Backward over micro-batches; DDP all-reduces once, after the last."""
        logged = 0.0
        for i, micro in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with (nullcontext() if last else self.accelerator.no_sync(self.model)), self.accelerator.autocast():
                minimise, log_value = objective(micro)
            self.accelerator.backward(minimise / len(micro_batches))
            logged += log_value.detach().float() / len(micro_batches)
        return float(self.accelerator.reduce(logged.reshape(1).to(self.device), "mean"))

    def step(self, step: int) -> dict:
        log = {"forget": None, "retain": None, "cos": None}
        has_forget, has_retain = self.forget_active(step), self.method.retain
        if has_forget:
            log["forget"] = self.accumulate(self.forget_objective, self.draw(self.forget, step, 1))
            if has_retain:
                if self.g_f is None:
                    self.g_f = [torch.empty_like(g) for g in self.grads()]
                torch._foreach_copy_(self.g_f, self.grads())
                torch._foreach_zero_(self.grads())
        if has_retain:
            twins = self.config.twin_batches
            draws = self.draw(self.retain, step, 1 if twins == "twins_shared_noise" else 2,
                              row_salt=1 if twins == "twins" else None)
            log["retain"] = self.accumulate(self.retain_objective, draws)
        grads = self.grads()
        if has_forget and has_retain:
            dot, ff, rr = global_inner_products(self.g_f, grads, self.sharded)
            a, b = update_coefficients(dot, ff, rr, self.config.retain_weight, self.method.restricted)
            torch._foreach_mul_(grads, b)
            torch._foreach_add_(grads, self.g_f, alpha=a)  # update = a·g_f + b·g_r, in place
            log["cos"] = cosine(dot, ff, rr)
            log["forget_grad_norm"], log["retain_grad_norm"] = ff ** 0.5, rr ** 0.5
        elif has_retain:
            torch._foreach_mul_(grads, self.config.retain_weight)
        if self.start_weights is not None:  # base_pull: update += μ (θ − θ₀)
            torch._foreach_add_(grads, torch._foreach_sub([local(p).detach() for p in self.params], self.start_weights),
                                alpha=self.config.base_pull)
        if self.mask is not None:
            for g, m in zip(grads, self.mask):
                g.mul_(m)
        if self.config.max_grad_norm:
            self.accelerator.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=False)
        return log

    def diverged(self, log: dict, weights: bool = False) -> str | None:
        """What went non-finite — a loss of this step, or with ``weights`` the trainable weights — or
        None. One NaN makes every later weight NaN, and the export would draw black images that an
        evaluation reads as a perfect erasure. The losses (already on the host) are read every step;
        a non-finite update shows in the next step's loss, so the weights themselves are read only
        where they are about to be kept: before a checkpoint and before the export (every process
        calls it then: sharded weights must all agree)."""
        for name, value in log.items():
            if value is not None and not math.isfinite(value):
                return f"the {name.replace('_', ' ')} is {value}"
        if not weights:
            return None
        finite = torch.stack([torch.isfinite(local(p)).all() for p in self.params]).all().float().reshape(1)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite.to(self.device), "min")
        return None if finite.item() else "the updated weights hold NaN or inf"

    # ---- SalUn ----------------------------------------------------------------------------------
    def compute_saliency(self, show: bool):
        """|Σ ∇ l_f| over the whole forget set, on every process alike (no DDP traffic; under FSDP
        the reduce-scatter averages equal sums); l_f is the guided prediction's loss when
        salun_mask_guidance > 0 (SalUn's generate_mask)."""
        model = self.unwrapped
        n = len(self.forget.data)
        # drawn for the whole set at once: the mask does not depend on how many processes share a batch
        g = step_generator(self.config.seed, 0, salt=3)
        drawn = {"latent_noise": torch.randn(n, *self.latent_shape, generator=g),
                 "noise": torch.randn(n, *self.latent_shape, generator=g),
                 "timesteps": self.backbone.sample_timesteps(n, g)}
        for start in tqdm(range(0, n, self.micro), desc="SalUn saliency", disable=not show):
            rows = torch.arange(start, min(start + self.micro, n))
            micro = {"rows": rows, **{k: v[rows] for k, v in drawn.items()}}
            x0, noise, t, cond = self.inputs(self.forget, micro)
            with self.accelerator.autocast():
                if self.config.salun_mask_guidance:
                    loss = guided_denoising_loss(self.backbone, model, x0, noise, t, cond,
                                                 self.fixed_cond("", len(rows)), self.config.salun_mask_guidance)
                else:
                    loss = denoising_loss(self.backbone, model, x0, noise, t, cond)
            loss.backward()
        self.mask = saliency_mask(self.grads(), self.config.salun_mask_ratio, self.sharded)
        self.optimizer.zero_grad(set_to_none=False)


def _trackers(report_to: str):
    from accelerate.tracking import get_available_trackers

    if report_to in ("none", "", None) or (report_to == "all" and not get_available_trackers()):
        return None
    return report_to


def train(config: TrainConfig) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env, set_seed
    from diffusers.optimization import get_scheduler

    if parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        raise RecipeError(SHARDING_HELP["deepspeed"])
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision, log_with=_trackers(config.report_to),
            project_config=ProjectConfiguration(project_dir=config.output_dir,
                                                logging_dir=str(Path(config.output_dir) / "logs")))
    except ValueError as e:  # accelerate's own checks of the setup, e.g. fp16 without a GPU
        raise RecipeError(f"mixed_precision / report_to: {e}") from None
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # accelerate lets it through
        raise RecipeError("mixed_precision: fp16 needs a GPU; on a CPU train with mixed_precision: no")
    main = accelerator.is_main_process
    world = accelerator.num_processes
    sharded = accelerator.distributed_type.name == "FSDP"
    if sharded:
        _check_sharding(accelerator, config)
    if config.batch_size % (world * config.gradient_accumulation_steps):
        raise RecipeError(f"batch_size: {config.batch_size} must be divisible by processes × "
                          f"gradient_accumulation_steps = {world} × {config.gradient_accumulation_steps}")
    if main:  # before any data or model loads: the export must have somewhere safe to go
        from erasure.export import check_output_dir

        check_output_dir(Path(config.output_dir), config.model, config.overwrite)
    accelerator.wait_for_everyone()
    method = METHOD_TABLE[config.method]
    if main:
        print(f"erasure: {config.method} on {accelerator.device}, {world} process{'es' if world > 1 else ''}, "
              f"{config.batch_size} pairs per step", flush=True)
    set_seed(config.seed)
    out = Path(config.output_dir)
    if method.closed_form:
        return _closed_form_edit(config, accelerator, out)

    # Data first: a bad data folder fails before minutes of model loading.
    forget_data = retain_data = None
    if config.forget_data and method.forget is not None:
        forget_data = load_prompt_image_set("forget_data", config.forget_data, config.prompt_column,
                                            config.image_column, need_images=method.forget != "esd")
    if method.retain:
        retain_data = load_prompt_image_set("retain_data", config.retain_data, config.prompt_column,
                                            config.image_column)
    for key, paired in (("twin_batches", config.twin_batches != "independent"),
                        ("forget_loss", method.forget == "ascent" and config.forget_loss == "twin")):
        if paired and forget_data and retain_data and len(forget_data) != len(retain_data):
            raise DataError(f"{key}: {getattr(config, key)} pairs forget row i with retain row i (its twin); "
                            f"forget_data has {len(forget_data)} rows and retain_data {len(retain_data)}")
    if forget_data is None and config.is_esd:  # ESD with no set: the concept itself is the prompt
        forget_data = PromptImageSet("forget_data", "concept", [config.concept], None, "")

    with accelerator.main_process_first():
        base_folder = resolve_model(config.model, config.revision)
    backbone = load_backbone(base_folder, config)
    if config.export_single_file:  # a weight the original layout has no name for fails now, not after training
        backbone.single_file_state_dict()
    resolution = config.resolution or backbone.native_resolution()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    device = accelerator.device

    # Frozen parts on the device only while they encode; the exported copies stay float32.
    prompts = (forget_data.prompts if forget_data else []) + (retain_data.prompts if retain_data else [])
    if config.concept_vector_adversary and backbone.conditioning != "text":
        raise RecipeError(f"concept_vector_adversary: {backbone.family} is not conditioned on text; the concept "
                          "vector is a direction of text embeddings (set it to 0)")
    relabels_to_anchor = config.method == "salun" and backbone.conditioning == "text"  # else to other classes
    prompts += [""] + ([config.salun_anchor_prompt] if relabels_to_anchor else [])
    for module in backbone.encoders:
        module.to(device)
    with accelerator.autocast():
        table = PromptTable(backbone, prompts, device, weight_dtype, main)
        encoded = {}
        for data in (forget_data, retain_data):
            if data is not None:
                mean = std = None
                if data.images is not None:
                    mean, std = encode_images(backbone, data, resolution, device, main)
                encoded[data.name] = EncodedSet(data, table.ids(data.prompts), mean, std)
    for module in backbone.encoders:
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # The base model θ₀ for ESD's targets, retain distillation and the relative cap: a frozen copy,
    # except that a LoRA run (other than ESD's) reads it by switching its adapter off.
    reads_base = (method.forget == "esd" or (method.retain and config.retain_loss != "denoising")
                  or (method.forget == "ascent" and (config.forget_loss_cap_relative or config.forget_loss == "twin")))
    copies_base = reads_base and (method.forget == "esd" or config.scope != "lora")
    frozen = backbone.frozen_copy(weight_dtype).to(device) if copies_base else None
    trainable = backbone.select_trainable(config.scope, config.lora_rank, config.lora_alpha)
    names = [n for n, _ in trainable]
    params = [p for _, p in trainable]
    model = backbone.denoiser
    denoiser_class = type(model)  # FSDP2 swaps the module's class for a sharded subclass
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    if config.optimizer == "sgd":  # the step is the combined update itself (times lr, with momentum)
        optimizer = torch.optim.SGD(params, lr=config.learning_rate, momentum=config.sgd_momentum,
                                    weight_decay=config.weight_decay)
    else:
        adamw = torch.optim.AdamW
        if config.optimizer == "adamw8bit":  # same update, moments kept blockwise in 8 bits
            from bitsandbytes.optim import AdamW8bit as adamw
        optimizer = adamw(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                          eps=config.adam_epsilon, weight_decay=config.weight_decay)
    # The schedule is stepped once per update by us, not by accelerate (which steps it per process).
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_steps)
    # FSDP2 needs model and optimizer prepared together: accelerate swaps the optimizer's parameters
    # for the sharded ones, which the update reads by name from here on.
    model, optimizer = accelerator.prepare(model, optimizer)
    if sharded:
        now = dict(model.named_parameters())
        params = [now[n] for n in names]
    latent_shape = backbone.latent_shape(resolution)
    run = Erasure(config, accelerator, backbone, model, params, optimizer, lr_scheduler, table,
                  encoded.get("forget_data"), encoded.get("retain_data"), frozen, latent_shape)

    start = 0
    # The data's hashes go into every checkpoint: a resume on other data at the same path is refused.
    record = {"config": config.to_dict(), "family": backbone.family,
              "data_sha256": {name: e.data.sha256 for name, e in encoded.items()}}
    if config.resume:
        start, record["monitor"] = _resume(config, run, names, out, record["data_sha256"])
    if method.saliency_mask and run.mask is None:
        run.compute_saliency(main)

    if accelerator.log_with:
        accelerator.init_trackers("erasure", config={k: v for k, v in config.to_dict().items()
                                                     if isinstance(v, (int, float, str, bool))})
    monitor = None
    if config.monitor_every:
        from erasure.monitor import Monitor

        monitor = Monitor(config, accelerator, backbone, base_folder, out)
        # one list: a resumed run keeps the checks it made, and checkpoints save the ones to come
        monitor.history = record["monitor"] = record.get("monitor", [])
        if main:
            print(monitor.info, flush=True)
    stopped = None

    def meets_stop(check: dict) -> bool:
        return (config.stop_at_erasure is not None and check["erasure"] is not None
                and check["erasure"] >= config.stop_at_erasure)

    if monitor and start == 0:  # the base model's point: where the frontier starts
        if meets_stop(monitor.check(0)):
            stopped = monitor.history[-1]
    def stop_if_diverged(problem: str | None, at_step: int):
        if problem:
            kept = checkpoints(out / "checkpoints")
            raise DivergedError(
                f"training diverged at step {at_step}: {problem} (learning_rate {config.learning_rate} too high?); "
                f"nothing was exported" + (f"; the last good checkpoint stays in {kept[-1]}" if kept else ""))

    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps,
               desc=f"{config.method} [{backbone.family}, {config.scope}]", disable=not main)
    log = {}
    step_seconds = []
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    for step in bar:
        if stopped:
            break
        began = time.perf_counter()
        log = run.step(step)  # ends in .item() of the losses, so the device has finished the step
        step_seconds.append(time.perf_counter() - began)
        stop_if_diverged(run.diverged(log), step + 1)
        shown = {k: f"{v:.4f}" for k, v in log.items() if v is not None and "grad" not in k}
        bar.set_postfix(shown, refresh=False)
        accelerator.log({"grad_cosine" if k == "cos" else k if "grad" in k else f"loss/{k}": v
                         for k, v in log.items() if v is not None}, step=step + 1)
        done = step + 1
        if monitor and (done % config.monitor_every == 0 or done == config.max_steps):
            check = monitor.check(done)
            bar.set_postfix({**shown, "erased": f"{check['erasure']:.2f}",
                             **({"kept": f"{check['retain']:.2f}"} if check["retain"] is not None else {})})
            if meets_stop(check):
                stopped = check
                if main:
                    bar.write(f"stop_at_erasure: erasure rate {check['erasure']:.3f} ≥ {config.stop_at_erasure} "
                              f"at step {done} ({check['detector']}); exporting")
                break
        if config.checkpointing_steps and done % config.checkpointing_steps == 0 and done < config.max_steps:
            stop_if_diverged(run.diverged(log, weights=True), done)
            accelerator.wait_for_everyone()
            _save(run, names, out, done, record)
    bar.close()
    stop_if_diverged(run.diverged(log, weights=True), (stopped or {}).get("step", config.max_steps))
    accelerator.wait_for_everyone()

    timed = step_seconds[1:] or step_seconds  # the first step pays for allocation and autotuning
    stats = {"processes": world, "device": str(device), "steps_done": (stopped or {}).get("step", config.max_steps),
             "mean_step_seconds": sum(timed) / len(timed) if timed else None,
             "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}
    if monitor:
        stats["monitor"] = {"detector": monitor.detector, "pairs": len(monitor.forget), "stopped": stopped,
                            "history": monitor.history}
    model = run.unwrapped
    if sharded:  # every process gives its slices; the main one exports a whole, unsharded copy
        whole_weights = accelerator.get_state_dict(run.model)
        if main:
            model = denoiser_class.from_config(backbone.denoiser.config)
            model.load_state_dict(whole_weights)
            backbone.replace_denoiser(model)
    if main:
        _export(model, config, backbone, base_folder, out, {k: e.data for k, e in encoded.items()}, log, stats)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


# What sharded training supports, and what to do instead (README "Several GPUs").
SHARDING_HELP = {
    "deepspeed": "DeepSpeed is not supported (untested): train under DDP, or shard with FSDP2 "
                 "(accelerate config: distributed_type FSDP, fsdp_version 2)",
    "fsdp_version": "FSDP1 is not supported: set fsdp_version: 2 in the accelerate config (or FSDP_VERSION=2); "
                    "erasure trains under FSDP2, whose parameters it reads as DTensors",
    "lora": "scope: lora under FSDP: an adapter of a few MB needs no sharding; train it under DDP "
            "(without FSDP in the accelerate config)",
    "monitor_every": "monitor_every under FSDP: the monitor draws different prompts on every process, "
                     "which a sharded model cannot; set monitor_every: 0 (evaluate the export with "
                     "`erasure eval`) or train under DDP",
}


def _check_sharding(accelerator, config: TrainConfig) -> None:
    """What FSDP training supports, refused before any model loads."""
    if accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise RecipeError(SHARDING_HELP["fsdp_version"])
    if config.scope == "lora" and not METHOD_TABLE[config.method].closed_form:
        raise RecipeError(SHARDING_HELP["lora"])
    if config.monitor_every:
        raise RecipeError(SHARDING_HELP["monitor_every"])


def _save(run: Erasure, names, out: Path, step: int, record: dict):
    """Every process calls it: under FSDP each tensor is gathered whole, one at a time (the other
    processes drop it at once), and the main process writes the checkpoint."""
    main = run.accelerator.is_main_process

    def kept(tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor.detach().cpu() if main else None

    weights = {n: kept(whole(p)) for n, p in zip(names, run.params)}
    extra = ({f"mask.{n}": kept(whole_from_local(m, p)) for n, m, p in zip(names, run.mask, run.params)}
             if run.mask is not None else {})
    optimizer_state = run.optimizer.state_dict()
    optimizer_state["state"] = {index: {key: kept(whole(value)) if torch.is_tensor(value) else value
                                        for key, value in entries.items()}
                                for index, entries in optimizer_state["state"].items()}
    if main:
        save_checkpoint(out / "checkpoints", step, weights, optimizer_state, run.lr_scheduler,
                        run.accelerator.scaler, extra, record, run.config.checkpoints_total_limit)


def _resume(config: TrainConfig, run: Erasure, names, out: Path, data_sha256: dict) -> int:
    if config.resume == "latest":
        found = checkpoints(out / "checkpoints")
        if not found:
            print(f"resume: no checkpoint in {out / 'checkpoints'}; starting from step 0")
            return 0, []
        folder = found[-1]
    else:
        folder = Path(config.resume)
    state, weights, extra = load_checkpoint(folder, run.optimizer, run.lr_scheduler, run.accelerator.scaler,
                                            place=lambda index, tensor: shard_like(tensor, run.params[index]))
    saved, now = state["config"], config.to_dict()
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        raise RecipeError(f"resume: {folder} was trained with a different recipe; changed keys: "
                         + ", ".join(f"{k} ({saved.get(k)!r} → {now[k]!r})" for k in changed))
    recorded = state.get("data_sha256", {})
    moved = [k for k in sorted(data_sha256) if recorded.get(k, data_sha256[k]) != data_sha256[k]]
    if moved:
        raise DataError(f"resume: {', '.join(moved)} changed since {folder} was written (sha256 "
                        + ", ".join(f"{recorded[k][:12]}… → {data_sha256[k][:12]}…" for k in moved)
                        + "); resume only on the data the run started with, or start a new run")
    missing = [n for n in names if n not in weights]
    if missing:
        raise DataError(f"resume: {folder} lacks trainable weights such as {missing[:3]}")
    with torch.no_grad():
        for name, param in zip(names, run.params):
            local(param).copy_(local(shard_like(weights[name], param)))
    if any(k.startswith("mask.") for k in extra):
        run.mask = [local(shard_like(extra[f"mask.{n}"].to(run.device), p)) for n, p in zip(names, run.params)]
    return int(state["step"]), state.get("monitor", [])


def _closed_form_edit(config: TrainConfig, accelerator, out: Path) -> Path:
    """UCE: the edit is computed once from prompts (no images, no steps) and exported like a run."""
    from erasure.methods.uce import uce_edit

    with accelerator.main_process_first():
        base_folder = resolve_model(config.model, config.revision)
    check_model(base_folder, config)  # UCE needs text projections: refused on other families before the data
    data = {}
    for key in ("forget_data", "retain_data"):
        if getattr(config, key):
            data[key] = load_prompt_image_set(key, getattr(config, key), config.prompt_column,
                                              config.image_column, need_images=False)
    edit = data["forget_data"].prompts if "forget_data" in data else [config.concept]
    if "retain_data" in data:
        # RGD's twins: forget row i and retain row i differ only in the concept.
        if len(data["retain_data"]) != len(edit):
            raise DataError(f"uce maps forget_data row i to its twin, retain_data row i: got {len(edit)} forget "
                             f"and {len(data['retain_data'])} retain rows")
        guide = data["retain_data"].prompts
    else:
        guide = [config.uce_guide_prompt] * len(edit)
    pairs = list(dict.fromkeys(zip(edit, guide)))
    preserve = [p.strip() for p in (config.uce_preserve_prompts or "").split(";") if p.strip()]
    preserve = list(dict.fromkeys(preserve + (data["retain_data"].prompts if "retain_data" in data else [])))

    stats = {"processes": accelerator.num_processes, "device": str(accelerator.device)}
    if accelerator.is_main_process:  # seconds of work: one process edits and exports, the others wait
        backbone = load_backbone(base_folder, config)
        began = time.perf_counter()
        done = uce_edit(backbone, [e for e, _ in pairs], [g for _, g in pairs], preserve,
                        config.uce_erase_scale, config.uce_preserve_scale, config.uce_lambda,
                        config.uce_token_span, accelerator.device)
        stats.update(edit_seconds=time.perf_counter() - began, uce=done)
        print(f"uce: edited {len(done['projections'])} projections from {len(pairs)} prompt pairs and "
              f"{len(preserve)} preserved prompts in {stats['edit_seconds']:.1f} s")
        if config.monitor_every:  # no steps to watch: one check of the edited model
            from erasure.monitor import Monitor

            monitor = Monitor(config, accelerator, backbone, base_folder, out, processes=1)
            check = monitor.check(0)
            stats["monitor"] = {"detector": monitor.detector, "pairs": len(monitor.forget), "stopped": None,
                                "history": monitor.history}
            print(f"monitor: erasure rate {check['erasure']:.3f}, retain score {check['retain']}")
        _export(backbone.denoiser, config, backbone, base_folder, out, data, {}, stats)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _export(model, config: TrainConfig, backbone: Backbone, base_folder: Path, out: Path,
            data: dict, log: dict, stats: dict):
    from erasure.export import export_pipeline

    lora = lora_metadata = None
    if config.scope == "lora":
        from peft.utils import get_peft_model_state_dict

        lora = get_peft_model_state_dict(model)  # peft key format, which load_lora_weights reads
        lora_metadata = model.peft_config["default"].to_dict()  # rank and alpha travel with the weights
        model.fuse_lora()  # the pipeline folder holds the erased model itself,
        model.unload_lora()  # the adapter file holds the difference
    model.to("cpu")
    # after the fuse: with scope lora the single file is the fused model, as the folder is
    single_file = backbone.single_file_state_dict() if config.export_single_file else None
    card = {"base_model": config.model, "family": backbone.family,
            "method": config.method, "concept": config.concept,
            "steps": stats.get("steps_done", 0 if METHOD_TABLE[config.method].closed_form else config.max_steps),
            "final_losses": {"forget": log.get("forget"), "retain": log.get("retain"),
                             "grad_cosine": log.get("cos"), "forget_grad_norm": log.get("forget_grad_norm"),
                             "retain_grad_norm": log.get("retain_grad_norm")},
            "data": {name: d.describe() for name, d in data.items()},
            "run": stats, "config": config.to_dict()}
    # The folder is what users ship; checkpoints only serve a resume, unless asked to stay.
    export_pipeline(backbone.pipe, out, base_folder, card, lora,
                    partial(backbone.save_lora, metadata=lora_metadata),
                    carry=RUN_FILES + (("checkpoints",) if config.keep_checkpoints else ()), single_file=single_file)
    print(f"exported the erased pipeline to {out}")
    if config.push_to_hub:
        from erasure.hub import push_export

        print(f"pushed to {push_export(out, config.hub_model_id, private=config.hub_private)}")


def main(argv: list[str] | None = None) -> None:
    from erasure.config import parse_config

    train(parse_config(argv))
