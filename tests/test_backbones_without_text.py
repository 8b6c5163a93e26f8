"""Backbones without text: the class-conditional DiT (and a class-conditional UNet2DModel in its
pipeline) and the unconditional DDPM UNet. Every method that
has a meaning there trains a few real steps on the tiny fixture (trainable weights move, frozen ones
don't) and exports a pipeline DiffusionPipeline loads; the rest are refused in one line."""

import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from conftest import read_weights, run_recipe
from erasure.backbones import load_backbone
from erasure.config import METHODS, TrainConfig
from erasure.errors import DataError, RecipeError

# family → its tiny recipe, the pipeline's name for the denoiser, the pipeline class
FAMILIES = {"dit": ("tiny/dit.yaml", "transformer", "DiTPipeline"),
            "class-unet": ("tiny/dit.yaml", "transformer", "DiTPipeline"),
            "uncond": ("tiny/uncond.yaml", "unet", "DDPMPipeline")}
RUNS_ON = {"dit": [m for m in METHODS if m != "uce"],
           "class-unet": [m for m in METHODS if m != "uce"],
           "uncond": ["finetune", "graddiff", "graddiffd", "rg", "rgd", "msgm-orthogonal", "msgm-obtuse"]}
FAST = dict(max_steps=2, batch_size=2, checkpointing_steps=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """What `erasure tiny dit DIR`, `erasure tiny class-unet DIR` and `erasure tiny uncond DIR` write."""
    from erasure.cli import main

    folders = {}
    for family in FAMILIES:
        folders[family] = tmp_path_factory.mktemp("tiny") / family
        main(["tiny", family, str(folders[family])])
    return folders


def backbone_of(folder, method="finetune", **values):
    config = TrainConfig(model=str(folder), method=method, concept="cat", forget_data="tiny:class-forget",
                         retain_data="tiny:class-retain", **values)
    return load_backbone(folder, config), config


@pytest.mark.parametrize("family, method", [(f, m) for f in FAMILIES for m in RUNS_ON[f]])
def test_method_trains_its_scope_and_exports_the_family_pipeline(family, method, tiny, tmp_path):
    recipe, denoiser, pipeline = FAMILIES[family]
    base = tiny[family]
    out = run_recipe(recipe, model=base, method=method, output_dir=tmp_path / "out", **FAST,
                     **({"esd_sample_steps": 4} if method.startswith("esd") else {}))
    backbone, config = backbone_of(base, method)
    trainable = {name for name, _ in backbone.select_trainable(config.scope)}
    before, after = read_weights(base / denoiser), read_weights(out / denoiser)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:5]}"
    # SalUn updates only its salient half; every other method moves every trainable tensor but the
    # attention key biases, whose gradient is zero in exact arithmetic (q·b shifts every logit of a
    # query alike, which the softmax ignores): Adam moves them by rounding noise or not at all.
    trainable -= {n for n in trainable if n.endswith("to_k.bias")}
    assert len(changed & trainable) / len(trainable) >= (0.5 if method == "salun" else 1.0), sorted(trainable - changed)[:5]
    if (base / "vae").is_dir():
        assert all(torch.equal(a, b) for a, b in zip(read_weights(base / "vae").values(),
                                                     read_weights(out / "vae").values()))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == pipeline
    if pipeline == "DiTPipeline":
        assert pipe.get_label_ids(["cat"]) == [3]  # the export keeps id2label
        assert type(pipe.transformer).__name__ == type(DiffusionPipeline.from_pretrained(base).transformer).__name__
    if method == "rgd":  # the export samples with its own pipeline (DiT: guidance on the null class 1000)
        generator = torch.Generator().manual_seed(0)
        images = (pipe(class_labels=[3], num_inference_steps=2, output_type="np", generator=generator)
                  if pipeline == "DiTPipeline"
                  else pipe(batch_size=1, num_inference_steps=2, output_type="np", generator=generator)).images
        assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_esd_x_on_dit_trains_only_the_label_embeddings(tiny):
    backbone, config = backbone_of(tiny["dit"], "esd-x")
    names = {name for name, _ in backbone.select_trainable(config.scope)}
    assert names and all(".class_embedder." in n for n in names)


def test_esd_x_on_a_class_unet_trains_only_its_class_table(tiny):
    backbone, config = backbone_of(tiny["class-unet"], "esd-x")
    assert {name for name, _ in backbone.select_trainable(config.scope)} == {"class_embedding.weight"}


def test_a_class_unet_without_the_null_row_is_refused(tiny, tmp_path):
    import json

    from erasure.errors import ModelError

    folder = tmp_path / "short"
    shutil.copytree(tiny["class-unet"], folder)
    config = folder / "transformer" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_class_embeds": 20}))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # only the config is read first
    from diffusers import UNet2DModel

    UNet2DModel.from_config(json.loads(config.read_text())).save_pretrained(folder / "transformer")
    with pytest.raises(ModelError, match=r"null class 1000; this one has num_class_embeds 20"):
        backbone_of(folder)


def test_class_names_are_the_prompts_and_the_empty_prompt_is_the_null_class(tiny):
    backbone, _ = backbone_of(tiny["dit"])
    assert backbone.encode_prompts(["cat", " truck ", ""], "cpu")["class_labels"].tolist() == [3, 9, 1000]
    with pytest.raises(DataError, match=r"'kitten' names no class of DiT model .*such as "):
        backbone.encode_prompts(["kitten"], "cpu")


def test_dit_predicts_the_eps_half_of_its_learned_sigma_output(tiny):
    backbone, _ = backbone_of(tiny["dit"])
    x_t = torch.randn(2, 4, 8, 8)
    cond = backbone.encode_prompts(["cat", ""], "cpu")
    with torch.no_grad():
        full = backbone.denoiser(x_t, timestep=torch.tensor([10, 500]), **cond).sample
        eps = backbone.predict(backbone.denoiser, x_t, torch.tensor([10, 500]), cond)
    assert full.shape[1] == 8 and torch.equal(eps, full[:, :4])


def test_salun_relabels_each_forget_image_to_another_class(tiny):
    backbone, _ = backbone_of(tiny["dit"], "salun")
    labels = torch.full((1000,), 3)
    u = torch.linspace(0, 1, 1001)[:-1]
    others = backbone.other_class({"class_labels": labels}, u)["class_labels"]
    # the fixture names 20 classes (CIFAR-10's, then Imagenette's)
    assert 3 not in others.tolist() and set(others.tolist()) == set(range(20)) - {3}


NOTHING = r"DDPMPipeline is conditioned on nothing \(unconditional\)\. Methods that run on it: finetune, .*msgm-obtuse$"


@pytest.mark.parametrize("family, method, values, message", [
    ("dit", "uce", {}, r"^method: uce edits, in closed form, the projections that read text embeddings; DiTPipeline "
                       r"is conditioned on class labels\. Methods that run on it: finetune, .*salun"),
    ("dit", "rgd", {"scope": "lora"}, r"^scope: lora on DiTPipeline: .*no peft adapter.*; scopes for it: full, "
                                      r"xattn, noxattn$"),
    ("uncond", "esd-x", {}, r"^method: esd-x guides from the concept's conditioning to the empty one .*; " + NOTHING),
    ("uncond", "salun", {}, r"^method: salun relabels the forget images to an anchor prompt or another class; " + NOTHING),
    ("uncond", "uce", {}, r"^method: uce .*; " + NOTHING),
    ("uncond", "rgd", {"scope": "noxattn"}, r"^scope: noxattn on DDPMPipeline: UNet2DModel has no cross-attention "
                                           r".*; scopes for it: full$"),
])
def test_what_has_no_meaning_is_refused_in_one_line(family, method, values, message, tiny, tmp_path):
    with pytest.raises(RecipeError, match=message) as refused:
        run_recipe(FAMILIES[family][0], model=tiny[family], method=method, output_dir=tmp_path / "out", **values)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("family, method", [("dit", "salun"), ("uncond", "rgd")])
def test_a_run_resumed_from_its_checkpoint_ends_where_the_whole_run_does(family, method, tiny, tmp_path):
    recipe, denoiser, _ = FAMILIES[family]
    common = dict(model=tiny[family], method=method, max_steps=3, batch_size=2, checkpointing_steps=2)
    whole = run_recipe(recipe, output_dir=tmp_path / "whole", keep_checkpoints=True, **common)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    run_recipe(recipe, output_dir=resumed, resume="latest", **common)
    a, b = read_weights(whole / denoiser), read_weights(resumed / denoiser)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
