"""Backbones without text: the class-conditional DiT. Every method that has a meaning there trains a few
real steps on the tiny fixture (trainable weights move, frozen ones don't) and exports a pipeline
DiffusionPipeline loads; the rest are refused in one line."""

import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from conftest import read_weights, run_recipe
from erasure.backbones import load_backbone
from erasure.config import METHODS, TrainConfig
from erasure.errors import DataError, RecipeError

RECIPE = "tiny/dit.yaml"
FAST = dict(max_steps=2, batch_size=2, checkpointing_steps=0, esd_sample_steps=4)


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    from erasure.cli import main

    folder = tmp_path_factory.mktemp("tiny") / "dit"
    main(["tiny", "dit", str(folder)])  # what `erasure tiny dit DIR` writes
    return folder


def dit_backbone(folder, method="finetune", **values):
    config = TrainConfig(model=str(folder), method=method, concept="cat", forget_data="tiny:class-forget",
                         retain_data="tiny:class-retain", **values)
    return load_backbone(folder, config), config


@pytest.mark.parametrize("method", [m for m in METHODS if m != "uce"])
def test_method_trains_its_scope_on_dit_and_exports_a_dit_pipeline(method, tiny_dit, tmp_path):
    out = run_recipe(RECIPE, model=tiny_dit, method=method, output_dir=tmp_path / "out", **FAST)
    backbone, config = dit_backbone(tiny_dit, method)
    trainable = {name for name, _ in backbone.select_trainable(config.scope)}
    before, after = read_weights(tiny_dit / "transformer"), read_weights(out / "transformer")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen weights moved: {sorted(changed - trainable)[:5]}"
    # SalUn updates only its salient half; every other method moves every trainable tensor.
    assert len(changed) / len(trainable) >= (0.5 if method == "salun" else 1.0), sorted(trainable - changed)[:5]
    assert all(torch.equal(a, b) for a, b in zip(read_weights(tiny_dit / "vae").values(),
                                                 read_weights(out / "vae").values()))
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == "DiTPipeline" and pipe.get_label_ids(["cat"]) == [3]  # id2label kept
    if method == "rgd":  # the export samples, with the pipeline's own guidance (null class 1000)
        images = pipe(class_labels=[3], num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert images.shape == (1, 16, 16, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_esd_x_trains_only_the_label_embeddings(tiny_dit):
    backbone, config = dit_backbone(tiny_dit, "esd-x")
    names = {name for name, _ in backbone.select_trainable(config.scope)}
    assert names and all(".class_embedder." in n for n in names)


def test_class_names_are_the_prompts_and_the_empty_prompt_is_the_null_class(tiny_dit):
    backbone, _ = dit_backbone(tiny_dit)
    assert backbone.encode_prompts(["cat", " truck ", ""], "cpu")["class_labels"].tolist() == [3, 9, 1000]
    with pytest.raises(DataError, match=r"'kitten' names no class .*such as airplane"):
        backbone.encode_prompts(["kitten"], "cpu")


def test_dit_predicts_the_eps_half_of_its_learned_sigma_output(tiny_dit):
    backbone, _ = dit_backbone(tiny_dit)
    x_t = torch.randn(2, 4, 8, 8)
    cond = backbone.encode_prompts(["cat", ""], "cpu")
    with torch.no_grad():
        full = backbone.denoiser(x_t, timestep=torch.tensor([10, 500]), **cond).sample
        eps = backbone.predict(backbone.denoiser, x_t, torch.tensor([10, 500]), cond)
    assert full.shape[1] == 8 and torch.equal(eps, full[:, :4])


def test_salun_relabels_each_forget_image_to_another_class(tiny_dit):
    backbone, _ = dit_backbone(tiny_dit, "salun")
    labels = torch.full((1000,), 3)
    u = torch.linspace(0, 1, 1001)[:-1]
    others = backbone.other_class({"class_labels": labels}, u)["class_labels"]
    assert 3 not in others.tolist() and set(others.tolist()) == set(range(10)) - {3}


@pytest.mark.parametrize("method, values, message", [
    ("uce", {}, r"^method: uce edits, in closed form, the projections that read text embeddings; DiTPipeline "
                r"is conditioned on class labels\. Methods that run on it: finetune, .*salun"),
    ("rgd", {"scope": "lora"}, r"^scope: lora on DiTPipeline: .*no peft adapter.*; scopes for it: full, xattn, "
                               r"noxattn$"),
])
def test_what_has_no_meaning_on_dit_is_refused_in_one_line(method, values, message, tiny_dit, tmp_path):
    with pytest.raises(RecipeError, match=message) as refused:
        run_recipe(RECIPE, model=tiny_dit, method=method, output_dir=tmp_path / "out", **values)
    assert "\n" not in str(refused.value)


def test_a_dit_run_resumed_from_its_checkpoint_ends_where_the_whole_run_does(tiny_dit, tmp_path):
    common = dict(model=tiny_dit, method="salun", max_steps=4, batch_size=2, checkpointing_steps=2)
    whole = run_recipe(RECIPE, output_dir=tmp_path / "whole", keep_checkpoints=True, **common)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole / "checkpoints" / "checkpoint-2", resumed / "checkpoints" / "checkpoint-2")
    run_recipe(RECIPE, output_dir=resumed, resume="latest", **common)
    a, b = read_weights(whole / "transformer"), read_weights(resumed / "transformer")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
