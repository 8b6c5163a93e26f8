"""The backbone seam: noising and eps conversion agree with the equations in DESIGN.md."""

import pytest
import torch

from erasure.backbones import load_backbone
from erasure.tiny import build_tiny_sd1


@pytest.fixture(scope="module")
def backbones(tiny_sd1, tiny_sd3, tmp_path_factory):
    v_model = build_tiny_sd1(tmp_path_factory.mktemp("v") / "sd1-v", prediction_type="v_prediction")
    return {"eps": load_backbone(tiny_sd1), "v": load_backbone(v_model), "flow": load_backbone(tiny_sd3)}


@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_the_native_target_converts_back_to_the_noise(kind, backbones):
    """A perfect native prediction (the target itself) must give eps_hat == eps."""
    backbone = backbones[kind]
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 16, 16, generator=g), torch.randn(6, 4, 16, 16, generator=g)
    timesteps = backbone.sample_timesteps(6, g)
    noised = backbone.add_noise(x0, noise, timesteps)
    assert torch.allclose(backbone.to_eps(noised.target, noised.x_t, timesteps), noise, atol=1e-4)


def test_flow_matching_interpolates_and_samples_logit_normal(backbones):
    backbone = backbones["flow"]
    g = torch.Generator().manual_seed(0)
    t = backbone.sample_timesteps(4000, g)
    s = t / backbone.num_train_timesteps
    assert 0 < s.min() and s.max() <= 1
    # The logit-normal density, pushed through the scheduler's shift (3.0), puts the median above ½.
    assert 0.6 < s.median() < 0.9
    x0, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    noised = backbone.add_noise(x0, noise, t[:1])
    assert torch.allclose(noised.x_t, (1 - s[:1]).reshape(1, 1, 1, 1) * x0)


def test_sd1_reads_the_prediction_type_from_the_scheduler(backbones):
    assert backbones["eps"].prediction_type == "epsilon" and backbones["v"].prediction_type == "v_prediction"


def test_sdxl_conditions_the_unet_as_its_sampler_does(tiny_sdxl):
    """The backbone's prediction for "" and a prompt is the UNet output StableDiffusionXLPipeline gets
    in its own guided step: the same embeddings, pooled text, zeros for the unconditional half and
    size numbers."""
    backbone = load_backbone(tiny_sdxl)
    seen = {}

    def keep(module, args, kwargs, output):
        seen.update(x=args[0], t=args[1], out=output[0])  # the pipeline calls it with return_dict=False

    handle = backbone.denoiser.register_forward_hook(keep, with_kwargs=True)
    backbone.pipe("a striped cat", num_inference_steps=1, guidance_scale=5.0, height=32, width=32,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    handle.remove()
    cond = backbone.encode_prompts(["", "a striped cat"], "cpu")
    assert not cond["encoder_hidden_states"][0].any() and not cond["text_embeds"][0].any()
    t = seen["t"].expand(2) if seen["t"].ndim else seen["t"].repeat(2)
    pred = backbone.predict(backbone.denoiser, seen["x"], t, cond)
    assert torch.allclose(pred, seen["out"], atol=1e-5)


def test_flux_packs_and_conditions_as_its_sampler_does(tiny_flux):
    """The backbone's velocity for (B, C, h, w) latents is the transformer output FluxPipeline gets in
    its own step, unpacked: the same 2×2 packing, position ids, s = t / 1000, guidance embedding."""
    from diffusers import FluxPipeline

    backbone = load_backbone(tiny_flux)
    seen = {}

    def keep(module, args, kwargs, output):
        seen.update(kwargs=kwargs, out=output[0])

    handle = backbone.denoiser.register_forward_hook(keep, with_kwargs=True)
    backbone.pipe("a striped cat", num_inference_steps=1, guidance_scale=3.5, height=32, width=32,
                  output_type="latent", generator=torch.Generator().manual_seed(0))
    handle.remove()
    scale = backbone.latent_scale
    x_t = FluxPipeline._unpack_latents(seen["kwargs"]["hidden_states"], 32, 32, scale)
    assert x_t.shape == (1, 4, 16, 16)
    pred = backbone.predict(backbone.denoiser, x_t, seen["kwargs"]["timestep"] * 1000,
                            backbone.encode_prompts(["a striped cat"], "cpu"))
    assert torch.equal(pred, FluxPipeline._unpack_latents(seen["out"], 32, 32, scale))


def test_flux_esd_samples_on_the_pipelines_own_timesteps(tiny_flux):
    """FLUX shifts its timesteps by the image's token count; ESD's partial trajectories use the same."""
    backbone = load_backbone(tiny_flux)
    pipe = backbone.pipe
    pipe("a cat", num_inference_steps=6, height=32, width=32, output_type="latent")
    ours = backbone.sampling_scheduler(6, torch.zeros(1, 4, 16, 16))
    assert torch.allclose(ours.timesteps, pipe.scheduler.timesteps)
