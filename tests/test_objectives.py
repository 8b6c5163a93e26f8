"""Every forget objective on a toy backbone whose predictions are known in closed form."""

import pytest
import torch

from conftest import read_weights, run_recipe
from erasure.backbones.base import Backbone, Noised
from erasure.methods.objectives import (denoising_loss, denoising_losses, element_capped_losses, esd_loss,
                                        forget_ascent, guided_denoising_loss, msgm_loss, per_sample_ascent,
                                        distillation_loss, salun_relabel_loss)


class ToyBackbone(Backbone):
    """x_t = x0 + eps, target eps, prediction = model(x_t) + the conditioning vector."""

    family = "toy"

    def __init__(self):
        pass

    def add_noise(self, x0, noise, timesteps):
        return Noised(x0 + noise, timesteps, noise)

    def predict(self, model, x_t, timesteps, cond):
        return model(x_t) + cond["encoder_hidden_states"]

    def to_eps(self, pred, x_t, timesteps):
        return pred


def toy(seed=0, dim=6, n=5):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(dim, dim)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x0, noise = torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)
    cond = {"encoder_hidden_states": torch.randn(n, dim, generator=g)}
    uncond = {"encoder_hidden_states": torch.randn(n, dim, generator=g)}
    return model, x0, noise, torch.zeros(n, dtype=torch.long), cond, uncond


def grads(loss, model):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


def test_forget_ascent_climbs_below_the_cap_and_stops_past_it():
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    loss = denoising_loss(backbone, model, x0, noise, t, cond)
    plain = grads(loss, model)
    below = grads(forget_ascent(denoising_loss(backbone, model, x0, noise, t, cond), cap=loss.item() + 1, weight=2.0),
                  model)
    for g, p in zip(below, plain):
        torch.testing.assert_close(g, -2.0 * p)
    past = grads(forget_ascent(denoising_loss(backbone, model, x0, noise, t, cond), cap=loss.item() / 2), model)
    assert all(torch.count_nonzero(g) == 0 for g in past)


def test_per_sample_cap_silences_only_the_samples_past_it():
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    losses = denoising_losses(backbone, model, x0, noise, t, cond)
    ordered = losses.detach().sort().values
    cap = (ordered[2] + ordered[3]) / 2  # three samples below the cap, two past it (no ties)
    below = losses.detach() < cap
    assert 0 < int(below.sum()) < len(losses)
    got = grads(per_sample_ascent(denoising_losses(backbone, model, x0, noise, t, cond), cap, weight=2.0), model)
    # only the samples below the cap ascend, each with weight 2/n
    expected = grads(-2.0 * (denoising_losses(backbone, model, x0, noise, t, cond) * below).sum() / len(losses), model)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_per_element_cap_silences_only_the_elements_past_it():
    """RGD's class-wise truncation: mean_j min(err_j², cap); an element past the cap adds its cap and no
    gradient, the rest add their squared error as usual."""
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    noised = backbone.add_noise(x0, noise, t)
    error = backbone.predict(model, noised.x_t, t, cond) - noised.target
    squared = error.detach().pow(2)
    cap = float(squared.flatten().median())  # about half the elements past it
    below = squared < cap
    assert 0 < int(below.sum()) < below.numel()
    losses = element_capped_losses(backbone, model, x0, noise, t, cond, cap)
    torch.testing.assert_close(losses, torch.where(below, squared, torch.full_like(squared, cap)).mean(1))
    got = grads(forget_ascent(element_capped_losses(backbone, model, x0, noise, t, cond, cap).mean(), None, 2.0),
                model)
    kept = backbone.predict(model, noised.x_t, t, cond) - noised.target
    expected = grads(-2.0 * (kept.pow(2) * below).mean(1).mean(), model)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_per_element_cap_trains_rgd_and_is_refused_where_it_means_nothing(tiny_sd1, tmp_path):
    from erasure.config import parse_config
    from erasure.errors import RecipeError

    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "run", max_steps=2,
                     checkpointing_steps=0, forget_loss_cap=0.5, forget_loss_cap_per_element="true")
    base, moved = read_weights(tiny_sd1 / "unet"), read_weights(out / "unet")
    assert any(not torch.equal(base[k], moved[k]) for k in base)
    for extra, message in ((["--forget_loss_cap", "null"], "set forget_loss_cap"),
                           (["--forget_loss_cap_per_sample", "true"], "one truncation at a time"),
                           (["--method", "finetune"], "finetune does not ascend")):
        with pytest.raises(RecipeError, match=message):
            parse_config(["--recipe", "recipes/tiny/rgd.yaml", "--forget_loss_cap_per_element", "true", *extra])


def test_relative_cap_is_k_times_the_base_loss_of_each_sample():
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    base, *_ = toy(seed=1)
    with torch.no_grad():
        cap = 1.5 * denoising_losses(backbone, base, x0, noise, t, cond)
    losses = denoising_losses(backbone, model, x0, noise, t, cond)
    active = losses.detach() < cap
    loss = per_sample_ascent(losses, cap)
    torch.testing.assert_close(loss, -torch.minimum(losses, cap).mean())
    got = grads(loss, model)
    expected = grads(-(denoising_losses(backbone, model, x0, noise, t, cond) * active).sum() / len(losses), model)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert all(p.grad is None for p in base.parameters())


@pytest.mark.parametrize("with_denoising", [False, True])
def test_retain_distillation_targets_the_base_prediction_at_the_same_x_t(with_denoising):
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    base, *_ = toy(seed=1)
    noised = backbone.add_noise(x0, noise, t)
    with torch.no_grad():
        base_prediction = backbone.predict(base, noised.x_t, t, cond)
    loss = distillation_loss(backbone, model, noised, t, cond, base_prediction, with_denoising)
    prediction = model(x0 + noise) + cond["encoder_hidden_states"]
    expected = (prediction - base_prediction).pow(2).mean()
    if with_denoising:
        expected = expected + denoising_loss(backbone, model, x0, noise, t, cond)
    torch.testing.assert_close(loss, expected)
    # at the base itself the distillation term is exactly zero, and so is its gradient
    at_base = distillation_loss(backbone, base, noised, t, cond, base_prediction)
    assert at_base.item() == 0
    assert all(torch.count_nonzero(g) == 0 for g in grads(at_base, base))


@pytest.mark.parametrize("eta", [1.0, 2.0])
def test_esd_target_is_the_negatively_guided_frozen_prediction(eta):
    backbone, (model, _, x_t, t, cond, uncond) = ToyBackbone(), toy()
    frozen, *_ = toy(seed=1)
    loss = esd_loss(backbone, model, frozen, x_t, t, cond, uncond, eta)
    e_0, e_c = frozen(x_t) + uncond["encoder_hidden_states"], frozen(x_t) + cond["encoder_hidden_states"]
    target = e_0 - eta * (e_c - e_0)
    torch.testing.assert_close(loss, (model(x_t) + cond["encoder_hidden_states"] - target).pow(2).mean())
    loss.backward()
    assert all(p.grad is None for p in frozen.parameters())  # the frozen model is only read


def test_salun_relabels_to_the_anchor_prediction_without_gradient_through_it():
    backbone, (model, x0, noise, t, cond, anchor) = ToyBackbone(), toy()
    loss = salun_relabel_loss(backbone, model, model, x0, noise, t, cond, anchor)
    x_t = x0 + noise
    target = (model(x_t) + anchor["encoder_hidden_states"]).detach()
    torch.testing.assert_close(loss, (model(x_t) + cond["encoder_hidden_states"] - target).pow(2).mean())
    # the target is a constant: the gradient is that of ‖pred(c) − const‖², i.e. 2·(c − anchor)-driven
    w_grad = grads(loss, model)[0]
    diff = (cond["encoder_hidden_states"] - anchor["encoder_hidden_states"])
    torch.testing.assert_close(w_grad, 2 * diff.T @ x_t / diff.numel())


def test_guided_loss_is_salun_generate_mask_loss():
    backbone, (model, x0, noise, t, cond, uncond) = ToyBackbone(), toy()
    x_t = x0 + noise
    p_c, p_u = model(x_t) + cond["encoder_hidden_states"], model(x_t) + uncond["encoder_hidden_states"]
    expected = (noise - (p_c + 7.5 * (p_c - p_u))).pow(2).mean()
    torch.testing.assert_close(guided_denoising_loss(backbone, model, x0, noise, t, cond, uncond, 7.5), expected)
    torch.testing.assert_close(guided_denoising_loss(backbone, model, x0, noise, t, cond, uncond, 0.0),
                               denoising_loss(backbone, model, x0, noise, t, cond))


def test_msgm_forms_and_the_obtuse_sign():
    backbone, (model, x0, noise, t, cond, _) = ToyBackbone(), toy()
    eps_hat = model(x0 + noise) + cond["encoder_hidden_states"]
    product = noise * eps_hat
    torch.testing.assert_close(msgm_loss(backbone, model, x0, noise, t, cond, "orthogonal", 0.5, "elementwise"),
                               0.5 * product.pow(2).mean())
    torch.testing.assert_close(msgm_loss(backbone, model, x0, noise, t, cond, "orthogonal", 0.5, "inner"),
                               0.5 * product.mean(1).pow(2).mean())
    torch.testing.assert_close(msgm_loss(backbone, model, x0, noise, t, cond, "obtuse", 0.5), 0.5 * product.mean())

    def alignment_after_a_step(rho):
        m, *_ = toy()
        loss = msgm_loss(backbone, m, x0, noise, t, cond, "obtuse", rho)
        loss.backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= 0.05 * p.grad
            return (noise * (m(x0 + noise) + cond["encoder_hidden_states"])).sum().item()

    before = product.sum().item()
    assert alignment_after_a_step(+1.0) < before  # ρ > 0: eps_hat turns away from eps (forgets)
    assert alignment_after_a_step(-1.0) > before  # the paper's printed ρ < 0: toward eps (learns)
    with pytest.raises(ValueError, match="orthogonal or obtuse"):
        msgm_loss(backbone, model, x0, noise, t, cond, "acute", 1.0)


def test_salun_mask_keeps_unsalient_weights_exactly_at_the_base(tiny_sd1, tmp_path):
    from safetensors.torch import load_file

    out = run_recipe("tiny/salun.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=2,
                     checkpointing_steps=1, keep_checkpoints=True)
    saved = {}
    for file in (out / "checkpoints").rglob("*.safetensors"):
        saved.update(load_file(file))
    masks = {k.removeprefix("mask."): v for k, v in saved.items() if k.startswith("mask.")}
    assert masks
    before, after = read_weights(tiny_sd1 / "unet"), read_weights(out / "unet")
    kept = moved = 0
    for name, mask in masks.items():
        frozen = ~mask.bool()
        assert torch.equal(after[name][frozen], before[name][frozen]), name
        kept += int(frozen.sum())
        moved += int((after[name][mask.bool()] != before[name][mask.bool()]).sum())
    assert kept > 0 and moved > 0
