"""Every method on every backbone: a few real steps on CPU; trainable weights move, frozen ones don't."""

import json
import re

import pytest
import torch

from conftest import TEXT_FAMILIES, read_weights, run_recipe
from erasure.backbones import load_backbone
from erasure.config import METHODS, TrainConfig

DENOISER = {"sd1": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}


def expected_trainable(model_dir, method: str) -> set[str]:
    config = TrainConfig(model=str(model_dir), method=method, concept="nudity",
                         forget_data="tiny:forget", retain_data="tiny:retain")
    backbone = load_backbone(model_dir, config)
    return {name for name, _ in backbone.select_trainable(config.scope)}


@pytest.mark.parametrize("family", TEXT_FAMILIES)
@pytest.mark.parametrize("method", [m for m in METHODS if m != "uce"])  # UCE: tests/test_uce.py
def test_method_trains_its_scope_and_nothing_else(method, family, tiny_models, tmp_path):
    base = tiny_models[family]
    out = run_recipe(f"tiny/{method}.yaml", model=base, output_dir=tmp_path / "out", max_steps=2,
                     checkpointing_steps=0)
    trainable = expected_trainable(base, method)
    denoiser = DENOISER[family]
    before, after = read_weights(base / denoiser), read_weights(out / denoiser)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:5]}"
    # SalUn updates only its salient half, so some tensors may stay put; every other method moves
    # every trainable tensor.
    share = len(changed) / len(trainable)
    assert share >= (0.5 if method == "salun" else 1.0), sorted(trainable - changed)[:5]
    for component in ("vae", "text_encoder", "text_encoder_2"):
        assert all(torch.equal(a, b) for a, b in zip(read_weights(base / component).values(),
                                                     read_weights(out / component).values()))


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_scopes_partition_the_denoiser(family, tiny_models):
    config = TrainConfig(model="x", method="finetune", retain_data="tiny:retain")
    names = {}
    for scope in ("full", "xattn", "noxattn"):
        backbone = load_backbone(tiny_models[family], config)
        names[scope] = {n for n, _ in backbone.select_trainable(scope)}
    assert names["xattn"] and names["noxattn"]
    assert names["xattn"] | names["noxattn"] < names["full"]  # noxattn leaves time embedding / output
    assert not names["xattn"] & names["noxattn"]
    pattern = r"attn2\." if family in ("sd1", "sdxl") else r"attn\.(add_|to_add_out|norm_added_)"
    assert all(re.search(pattern, n) for n in names["xattn"])


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_lora_scope_trains_only_adapters(family, tiny_models):
    backbone = load_backbone(tiny_models[family], None)
    trainable = backbone.select_trainable("lora", lora_rank=2)
    assert trainable and all("lora_" in n for n, _ in trainable)
    frozen = [p for n, p in backbone.denoiser.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in frozen)


@pytest.mark.parametrize("method", ["rgd", "msgm-obtuse", "esd-x"])
def test_v_prediction_unet_trains(method, tmp_path):
    """SD 2.x-style v prediction: the target and the eps conversion come from the scheduler config."""
    from erasure.tiny import build_tiny_sd1

    base = build_tiny_sd1(tmp_path / "sd1-v", prediction_type="v_prediction")
    out = run_recipe(f"tiny/{method}.yaml", model=base, output_dir=tmp_path / "out", max_steps=2)
    before, after = read_weights(base / "unet"), read_weights(out / "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gradient_checkpointing_changes_memory_not_the_update(tiny_sd1, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    enabled = []
    original = UNet2DConditionModel.enable_gradient_checkpointing
    monkeypatch.setattr(UNet2DConditionModel, "enable_gradient_checkpointing",
                        lambda self, *a, **k: (enabled.append(True), original(self, *a, **k))[1])
    common = dict(model=tiny_sd1, max_steps=2, checkpointing_steps=0)
    plain = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "plain", **common)
    assert not enabled
    recomputed = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "ckpt", gradient_checkpointing=True, **common)
    assert enabled  # the flag reached the UNet, so the equality below compares two different paths
    a, b = read_weights(plain / "unet"), read_weights(recomputed / "unet")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_bf16_autocast_trains_and_exports_float32(tiny_sd1, tmp_path):
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=2,
                     mixed_precision="bf16")
    before, after = read_weights(tiny_sd1 / "unet"), read_weights(out / "unet")
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for component in ("vae", "text_encoder"):  # the frozen parts are exported untouched, in fp32
        assert all(torch.equal(a, b) for a, b in zip(read_weights(tiny_sd1 / component).values(),
                                                     read_weights(out / component).values()))


def test_twin_batches_share_rows_and_noise_as_named(tiny_sd1, tmp_path):
    """With D_f = D_r, GradDiff at λ = 1 on twin batches that share noise ascends and descends the
    very same loss: g_f = −g_r, the update is zero and nothing moves. Twins with their own noise
    (and independent batches) do move, and the logged cosine says why."""
    common = dict(model=tiny_sd1, retain_data="tiny:forget", retain_weight=1.0, max_steps=2,
                  checkpointing_steps=0)
    base = read_weights(tiny_sd1 / "unet")
    cosines = {}
    for mode in ("twins_shared_noise", "twins", "independent"):
        out = run_recipe("tiny/graddiff.yaml", output_dir=tmp_path / mode, twin_batches=mode, **common)
        after = read_weights(out / "unet")
        moved = any(not torch.equal(base[k], after[k]) for k in base)
        assert moved == (mode != "twins_shared_noise"), mode
        cosines[mode] = json.loads((out / "erasure.json").read_text())["final_losses"]["grad_cosine"]
    assert cosines["twins_shared_noise"] == pytest.approx(-1.0, abs=1e-5)
    assert cosines["twins"] > -0.999


def test_twin_batches_need_paired_sets(tiny_sd1, tmp_path):
    data = tmp_path / "three"
    data.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (64, 64)).save(data / f"{i}.png")
    (data / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "prompt": f"p{i}"}) + "\n"
                                                 for i in range(3)))
    with pytest.raises(ValueError, match="twin_batches: twins pairs forget row i with retain row i"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, retain_data=data, output_dir=tmp_path / "out", twin_batches="twins")


@pytest.mark.parametrize("scope", ["full", "lora"])
def test_the_base_model_is_read_as_it_was_before_the_first_step(scope, tiny_sd1, tmp_path):
    """retain_loss: distill and forget_loss: twin read θ₀ — a frozen copy, or the LoRA adapter switched
    off. At step 0 the model is θ₀, so the distillation loss is exactly 0; after a step it is not,
    which also shows that a LoRA adapter is switched back on for the model being trained."""
    losses = []
    for steps in (1, 3):
        out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / f"{scope}{steps}", max_steps=steps,
                         checkpointing_steps=0, scope=scope, lora_rank=4, learning_rate=1e-2,
                         retain_loss="distill", forget_loss="twin")
        losses.append(json.loads((out / "erasure.json").read_text())["final_losses"])
    assert losses[0]["retain"] < 1e-10  # the same function (a frozen copy may differ in the last bits)
    assert losses[1]["retain"] > 0 and losses[1]["forget"] > 0


def test_twin_negative_guidance_scales_the_first_loss_by_one_plus_eta_squared(tiny_sd1, tmp_path):
    """At step 0 the model is θ₀, so the twin target pred₀(c_twin) − η (pred₀(c_f) − pred₀(c_twin)) is
    (1 + η) times as far from pred_θ(c_f) as the twin itself: the first forget loss grows by (1 + η)²."""
    first = {}
    for eta in (0.0, 1.0, 2.0):
        out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / str(eta), max_steps=1,
                         checkpointing_steps=0, forget_loss="twin", twin_negative_guidance=eta)
        first[eta] = json.loads((out / "erasure.json").read_text())["final_losses"]["forget"]
    assert first[0.0] > 0
    assert first[1.0] == pytest.approx(4 * first[0.0], rel=1e-4)
    assert first[2.0] == pytest.approx(9 * first[0.0], rel=1e-4)


def test_concept_vector_adversary_teaches_the_twin_target_where_the_attack_pushes(tiny_sd1, tmp_path):
    """L_f = ½ [‖pred_θ(E(f)) − y‖² + ‖pred_θ(E(f) + η c) − y‖²]: with η_max → 0 both halves are the
    plain twin loss, so the first loss is the plain one; with η_max = 8 the pushed half reads other
    embeddings, and the run ends elsewhere."""
    common = dict(model=tiny_sd1, max_steps=1, checkpointing_steps=0, forget_loss="twin", learning_rate=1e-2)
    first, weights = {}, {}
    for eta in (0.0, 1e-12, 8.0):
        out = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / str(eta), concept_vector_adversary=eta, **common)
        first[eta] = json.loads((out / "erasure.json").read_text())["final_losses"]["forget"]
        weights[eta] = read_weights(out / "unet")
    assert first[1e-12] == pytest.approx(first[0.0], rel=1e-5)
    assert first[8.0] != pytest.approx(first[0.0], rel=1e-3)
    assert any(not torch.equal(weights[0.0][k], weights[8.0][k]) for k in weights[0.0])


def test_relative_cap_and_base_pull_train_and_are_recorded(tiny_sd1, tmp_path):
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=2, checkpointing_steps=0,
                     forget_loss_cap_relative=2, base_pull=0.5, optimizer="sgd", learning_rate=0.05)
    card = json.loads((out / "erasure.json").read_text())
    assert card["config"]["forget_loss_cap_relative"] == 2 and card["config"]["optimizer"] == "sgd"
    before, after = read_weights(tiny_sd1 / "unet"), read_weights(out / "unet")
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_sgd_steps_along_the_restricted_gradient_and_adam_does_not():
    """With optimizer: sgd (no momentum) the step is −lr·(δ_f + λδ_r), so to first order it cannot raise
    the retain loss (⟨step, g_r⟩ ≤ 0, Theorem 4's guarantee); Adam's per-coordinate rescaling of the
    same update can point uphill for the retain loss — why the option exists."""
    from erasure.methods.restricted_gradient import update_coefficients

    g_f = torch.tensor([1.0, -0.01, 0.02])  # a conflicting pair with coordinates of very different scale
    g_r = torch.tensor([-0.5, 0.02, 0.02])
    dot, ff, rr = float(g_f @ g_r), float(g_f @ g_f), float(g_r @ g_r)
    a, b = update_coefficients(dot, ff, rr, 1.5, restricted=True)
    update = a * g_f + b * g_r
    steps = {}
    for name, make in (("sgd", lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.0)),
                       ("adam", lambda p: torch.optim.AdamW([p], lr=0.1, weight_decay=0.0))):
        p = torch.zeros(3, requires_grad=True)
        optimizer = make(p)
        p.grad = update.clone()
        optimizer.step()
        steps[name] = p.detach().clone()
    torch.testing.assert_close(steps["sgd"], -0.1 * update)
    assert float(steps["sgd"] @ g_r) <= 1e-9  # the retain loss does not rise to first order
    assert float(steps["adam"] @ g_r) > 0  # Adam's sign-like first step climbs it


def test_adamw8bit_keeps_its_moments_in_8_bits_and_resumes_exactly(tiny_sd1, tmp_path):
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    common = dict(model=tiny_sd1, optimizer="adamw8bit", checkpointing_steps=1, keep_checkpoints=True)
    full = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "full", max_steps=3, **common)
    before, after = read_weights(tiny_sd1 / "unet"), read_weights(full / "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = load_file(full / "checkpoints" / "checkpoint-2" / "optimizer.safetensors")
    assert any(v.dtype == torch.uint8 for v in state.values())  # the quantised moments of the large tensors
    resumed = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "resumed", max_steps=3,
                         resume=full / "checkpoints" / "checkpoint-1", **common)
    again = read_weights(resumed / "unet")
    assert all(torch.equal(after[k], again[k]) for k in after)  # the 8-bit state came back as it was


def test_flux_without_t5_is_refused_in_one_line(tiny_flux, tmp_path):
    from erasure.errors import RecipeError

    with pytest.raises(RecipeError, match=r"^use_t5: false on FluxPipeline: .*set use_t5: true$") as refused:
        run_recipe("tiny/rgd.yaml", model=tiny_flux, output_dir=tmp_path / "out", use_t5=False)
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()  # no empty folder left behind
