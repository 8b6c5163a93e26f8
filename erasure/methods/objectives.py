"""Every loss a method minimises, once, next to the equation it implements (DESIGN.md, "Methods").

Each takes a backbone and a model, so it serves SD 1.x (eps / v) and SD3 (flow velocity) alike.
"""

from __future__ import annotations

import torch

from erasure.backbones import Backbone, Conditioning


def _per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _weighted(per_sample: torch.Tensor, noised) -> torch.Tensor:
    """The backbone's per-timestep loss weight (SD3's density weighting), where it has one."""
    return per_sample if noised.weight is None else per_sample * noised.weight.to(per_sample.device)


def denoising_losses(backbone: Backbone, model, x0, noise, timesteps, cond: Conditioning) -> torch.Tensor:
    """l_i(θ): the backbone's native denoising loss ‖pred − target‖² of each sample, weighted."""
    noised = backbone.add_noise(x0, noise, timesteps)
    return _weighted(_per_sample_mse(backbone.predict(model, noised.x_t, timesteps, cond), noised.target), noised)


def element_capped_losses(backbone: Backbone, model, x0, noise, timesteps, cond: Conditioning,
                          cap: float) -> torch.Tensor:
    """l_i(θ) = mean_j min((pred − target)_j², cap), weighted: the squared error truncated element by
    element before the mean (new option forget_loss_cap_per_element). It is RGD's class-wise forget
    loss: Ko, Li et al. 2024, code CIFAR/training/loss.py, EDMLoss with truncate, weight · min((D − y)², α).
    An element already past the cap has zero gradient, so ascent pushes only where the prediction is
    still close to its target."""
    noised = backbone.add_noise(x0, noise, timesteps)
    squared = (backbone.predict(model, noised.x_t, timesteps, cond).float() - noised.target.float()).pow(2)
    return _weighted(torch.clamp(squared, max=cap).flatten(1).mean(1), noised)


def denoising_loss(backbone: Backbone, model, x0, noise, timesteps, cond: Conditioning):
    """l(θ; batch) = mean_i l_i(θ)."""
    return denoising_losses(backbone, model, x0, noise, timesteps, cond).mean()


def distillation_loss(backbone: Backbone, model, noised, timesteps, cond: Conditioning,
                      base_prediction: torch.Tensor, with_denoising: bool = False):
    """‖pred_θ(x_t, c) − pred_θ₀(x_t, c')‖² [+ ‖pred_θ(x_t, c) − target‖²]: the frozen base's
    prediction at the same x_t is the target (new options; ``noised`` is backbone.add_noise's output,
    shared with the base's forward).

    - retain_loss: distill / both, c' = c on D_r: the minimum is the base function itself, rather than
      wherever 120 noisy targets put it;
    - forget_loss: twin, c = the forget prompt, c' its twin, on the forget image's x_t: the concept
      prompt is taught to denoise as the base does for the prompt without the concept (Kumari et al.
      2023's model-based ablation target, with RGD's twins as the anchors): a bounded objective, no
      ascent to run away."""
    prediction = backbone.predict(model, noised.x_t, timesteps, cond)
    per_sample = _per_sample_mse(prediction, base_prediction)
    if with_denoising:
        per_sample = per_sample + _per_sample_mse(prediction, noised.target)
    return _weighted(per_sample, noised).mean()


def twin_target(twin_prediction: torch.Tensor, concept_prediction: torch.Tensor, guidance: float):
    """forget_loss: twin's target with twin_negative_guidance η (new option): ESD's negative guidance
    (Gandikota et al. 2023, eq. 3-4) with the twin where ESD has the empty prompt,
    pred_θ₀(x_t, c_twin) − η (pred_θ₀(x_t, c_f) − pred_θ₀(x_t, c_twin)): the concept prompt is sent past
    its twin, away from the concept; η = 0 is the twin itself."""
    return twin_prediction - guidance * (concept_prediction - twin_prediction)


def concept_vector(forget: Conditioning, retain: Conditioning) -> Conditioning:
    """Ring-A-Bell's concept vector (Tsai et al. 2024): c = (1/N) Σ_i [E(f_i) − E(r_i)] over N twin
    prompts, per conditioning tensor, shaped as one row. Read by `erasure attack` (the attack) and by
    concept_vector_adversary (the defence)."""
    return {key: (forget[key].float() - retain[key].float()).mean(dim=0, keepdim=True) for key in forget}


def pushed_by_concept_vector(cond: Conditioning, vector: Conditioning, strength) -> Conditioning:
    """E(p) + η c for every tensor of the conditioning; ``strength`` η is a number or one per row."""
    pushed = {}
    for key, value in cond.items():
        eta = torch.as_tensor(strength, dtype=torch.float32, device=value.device)
        eta = eta.reshape(-1, *[1] * (value.dim() - 1)) if eta.dim() else eta
        pushed[key] = (value.float() + eta * vector[key].to(value.device)).to(value.dtype)
    return pushed


def adversarial_twin_loss(backbone: Backbone, model, noised, timesteps, cond: Conditioning, vector: Conditioning,
                          strengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """concept_vector_adversary (new option, ours): forget_loss: twin's target y (distillation_loss,
    twin_target) taught also where Ring-A-Bell pushes the prompt,

        L_f = ½ [ ‖pred_θ(x_t, E(f)) − y‖² + ‖pred_θ(x_t, E(f) + η c) − y‖² ],   η ~ U(0, η_max) per sample,

    with c the concept vector of the run's own forget/retain twins (concept_vector). The attack is
    training-free and the text encoder does not train, so c is fixed: the adversary's inner loop is
    one draw of η per sample (in the manner of AdvUnlearn, Zhang et al. 2024, whose inner loop
    optimises prompt tokens instead)."""
    plain = distillation_loss(backbone, model, noised, timesteps, cond, target)
    pushed = distillation_loss(backbone, model, noised, timesteps, pushed_by_concept_vector(cond, vector, strengths),
                               target)
    return 0.5 * (plain + pushed)


def guided_denoising_loss(backbone: Backbone, model, x0, noise, timesteps, cond: Conditioning,
                          uncond: Conditioning, guidance: float):
    """‖pred(c) + w (pred(c) − pred(∅)) − target‖²: the loss of the classifier-free-guided prediction,
    which SalUn's generate_mask ranks weights by (Fan et al. 2024, code: w = 7.5, on eps)."""
    noised = backbone.add_noise(x0, noise, timesteps)
    conditional = backbone.predict(model, noised.x_t, timesteps, cond)
    unconditional = backbone.predict(model, noised.x_t, timesteps, uncond)
    guided = conditional + guidance * (conditional - unconditional)
    return _weighted(_per_sample_mse(guided, noised.target), noised).mean()


def forget_ascent(loss: torch.Tensor, cap: float | None, weight: float = 1.0) -> torch.Tensor:
    """−λ_f · min(l_f, cap): gradient ascent on the forget set, truncated once l_f passes the cap
    (RGD, §3; the cap keeps ascent from diverging: past it the gradient is zero)."""
    capped = loss if cap is None else torch.clamp(loss, max=cap)
    return -weight * capped


def per_sample_ascent(losses: torch.Tensor, cap, weight: float = 1.0) -> torch.Tensor:
    """−λ_f · mean_i min(l_i, cap_i): the cap applied to each sample (new options
    forget_loss_cap_per_sample, and forget_loss_cap_relative with cap_i = k·l_i(θ₀)), so a sample
    that is already forgotten stops pushing while the rest of the batch still ascends."""
    if cap is None:
        return -weight * losses.mean()
    return -weight * torch.minimum(losses, torch.as_tensor(cap, device=losses.device, dtype=losses.dtype)).mean()


def esd_loss(backbone: Backbone, model, frozen, x_t, timesteps, cond: Conditioning,
             uncond: Conditioning, negative_guidance: float):
    """ESD (Gandikota et al. 2023, eq. 3-4): ‖eps_θ(x_t,c) − [eps_0(x_t,∅) − η (eps_0(x_t,c) − eps_0(x_t,∅))]‖².

    Written on native predictions: the conversion to eps is affine with the same offset for all
    three, so the target is the same point in either space (SD3's loss is scaled by (1 − s)²)."""
    with torch.no_grad():
        e_0 = backbone.predict(frozen, x_t, timesteps, uncond)
        e_c = backbone.predict(frozen, x_t, timesteps, cond)
        target = e_0 - negative_guidance * (e_c - e_0)
    return _per_sample_mse(backbone.predict(model, x_t, timesteps, cond), target).mean()


def salun_relabel_loss(backbone: Backbone, model, anchor_model, x0, noise, timesteps,
                       cond: Conditioning, anchor: Conditioning):
    """SalUn's forget loss for SD (Fan et al. 2024, eq. 7): ‖eps_θ(x_t, c_f) − sg(eps_θ(x_t, c_anchor))‖²,
    i.e. the concept prompt is relabelled to the anchor prompt on the forget images."""
    noised = backbone.add_noise(x0, noise, timesteps)
    with torch.no_grad():
        target = backbone.predict(anchor_model, noised.x_t, timesteps, anchor)
    return _per_sample_mse(backbone.predict(model, noised.x_t, timesteps, cond), target).mean()


def msgm_loss(backbone: Backbone, model, x0, noise, timesteps, cond: Conditioning, variant: str,
              rho: float, orthogonal_form: str = "elementwise"):
    """MSGM's forget losses on the noise prediction eps_hat (supplement, DDPM form).

    orthogonal: ρ·‖eps ⊙ eps_hat‖² (element-wise, as the public code) or ρ·(eps·eps_hat)² (the
                literal reading; the inner product is taken per element, i.e. divided by the
                latent size, so ρ has the same scale in both forms);
    obtuse:     ρ·<eps, eps_hat> per element. With ρ > 0 minimising it drives the angle between the
                predicted and the true noise past 90°: the model forgets. The paper's printed
                negative ρ pulls eps_hat toward eps, i.e. learns the concept (DESIGN.md)."""
    noised = backbone.add_noise(x0, noise, timesteps)
    eps_hat = backbone.to_eps(backbone.predict(model, noised.x_t, timesteps, cond), noised.x_t,
                              timesteps).float()
    product = (noise.float() * eps_hat).flatten(1)
    if variant == "orthogonal":
        per_sample = product.pow(2).mean(1) if orthogonal_form == "elementwise" else product.mean(1).pow(2)
    elif variant == "obtuse":
        per_sample = product.mean(1)
    else:
        raise ValueError(f"MSGM variant {variant!r}: expected orthogonal or obtuse")
    return rho * per_sample.mean()
