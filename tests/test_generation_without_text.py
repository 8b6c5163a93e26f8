"""The one generation routine on the families without text: DiT draws class names through its class
labels, DDPM draws one image per seed; `erasure data generate` and `erasure eval` run on them as on SD."""

import json

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_CLIP_CONFIG, read_weights, run_recipe
from erasure.errors import DataError, RecipeError

STEPS = 2  # rough pictures, as deterministic as fifty


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from erasure.tiny import build_tiny_dit, build_tiny_uncond

    root = tmp_path_factory.mktemp("tiny")
    return {"dit": build_tiny_dit(root / "dit"), "uncond": build_tiny_uncond(root / "uncond")}


def test_dit_draws_each_image_from_its_own_seed_whatever_the_batch(tiny):
    from erasure.data.generate import load_pipeline
    from erasure.generation import draw, native_size

    pipe = load_pipeline(tiny["dit"], "cpu", "float32")
    assert native_size(pipe) == 16  # 8 latent pixels × the VAE's 2 (DiTPipeline has no vae_scale_factor)
    names, seeds = ["cat", "church", "Tinca tinca"], [5, 6, 7]  # "Tinca tinca": a synonym in id2label
    together, finite = draw(pipe, names, seeds, steps=STEPS, guidance=4.0)
    assert together.shape == (3, 16, 16, 3) and together.dtype == np.uint8 and finite == [True] * 3
    for j in range(3):  # alone, the image is the one drawn in the batch, to the byte
        alone, _ = draw(pipe, names[j:j + 1], seeds[j:j + 1], steps=STEPS, guidance=4.0)
        assert np.array_equal(alone[0], together[j]), j
    assert not np.array_equal(draw(pipe, ["cat"], [8], steps=STEPS, guidance=4.0)[0][0], together[0])
    assert not np.array_equal(draw(pipe, ["truck"], [5], steps=STEPS, guidance=4.0)[0][0], together[0])
    with pytest.raises(DataError, match=r"^prompt 'a photo of a cat' names no class of DiT model"):
        draw(pipe, ["a photo of a cat"], [0], steps=STEPS, guidance=4.0)
    with pytest.raises(RecipeError, match=r"^size: DiTPipeline draws only at its native 16 px"):
        draw(pipe, ["cat"], [0], steps=STEPS, guidance=4.0, size=32)


def test_ddpm_draws_one_image_per_seed_and_has_no_guidance(tiny):
    from erasure.data.generate import load_pipeline
    from erasure.generation import draw
    from erasure.world.model import default_sampler

    pipe = load_pipeline(tiny["uncond"], "cpu", "float32")
    # the scheduler's steps draw their noise from each image's own generator too
    together, finite = draw(pipe, ["ignored", ""], [3, 4], steps=STEPS, guidance=1.0)
    alone, _ = draw(pipe, ["other words"], [4], steps=STEPS, guidance=1.0)
    assert together.shape == (2, 16, 16, 3) and finite == [True, True]
    assert np.array_equal(alone[0], together[1]) and not np.array_equal(together[0], together[1])
    with pytest.raises(RecipeError, match=r"^guidance: 7.5 for DDPMPipeline, an unconditional model"):
        draw(pipe, [""], [0], steps=STEPS, guidance=7.5)
    assert default_sampler(tiny["uncond"]) == (1000, 1.0)  # DDPMPipeline's own
    assert default_sampler(tiny["dit"]) == (50, 4.0)  # DiTPipeline's own


def test_data_generate_on_class_names_writes_sets_the_trainer_reads(tiny, tmp_path):
    from erasure.backbones import resolve_model
    from erasure.cli import main

    pairs = tmp_path / "classes.jsonl"
    pairs.write_text("".join(json.dumps({"forget_prompt": "church", "retain_prompt": other}) + "\n"
                             for other in ("golf ball", "parachute", "tench")))
    main(["data", "generate", "--prompts", str(pairs), "--model", "tiny:dit", "--out", str(tmp_path / "data"),
          "--steps", str(STEPS)])
    record = json.loads((tmp_path / "data/generation.json").read_text())
    assert (record["steps"], record["guidance"], record["size"]) == (STEPS, 4.0, 16)  # DiT's guidance
    for side, names in (("forget", ["church"] * 3), ("retain", ["golf ball", "parachute", "tench"])):
        rows = [json.loads(line) for line in (tmp_path / "data" / side / "metadata.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == names
        assert all((tmp_path / "data" / side / r["file_name"]).is_file() for r in rows)
    out = run_recipe("tiny/dit.yaml", concept="church", forget_data=tmp_path / "data/forget",
                     retain_data=tmp_path / "data/retain", max_steps=2, batch_size=2, checkpointing_steps=0,
                     output_dir=tmp_path / "out")
    base = read_weights(resolve_model("tiny:dit") / "transformer")
    after = read_weights(out / "transformer")
    assert any(not torch.equal(base[n], after[n]) for n in base)  # it trained on the generated sets


def test_shipped_dit_suite_runs_on_tiny_dit(tmp_path):
    from erasure.cli import main

    clip = tmp_path / "tiny-clip"  # open_clip reads a model from a folder; random weights
    clip.mkdir()
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    torch.manual_seed(0)
    # The first five classes end with the erased one (church); the tiny fixture carries Imagenette's
    # names as DiT-XL-2-256's id2label spells them, so the shipped suite runs as it is.
    main(["eval", "--suite", str(REPO / "eval/dit-class-forgetting.yaml"), "--model", "tiny:dit",
          "--out", str(tmp_path / "e"), "--limit", "5", "--images-per-prompt", "1", "--steps", str(STEPS),
          "--clip-model", f"local-dir:{clip}", "--clip-pretrained", "random"])
    report = json.loads((tmp_path / "e/report.json").read_text())
    result = report["models"][0]["metrics"]["class_forgetting"]
    assert result["n_erased"] == 1 and result["n_retained"] == 4 and 0 <= result["UA"] <= 1 and 0 <= result["RA"] <= 1
    rows = [json.loads(line) for line in (tmp_path / "e/images/0-tiny-dit/metadata.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["tench", "English springer", "cassette player", "chain saw", "church"]
    assert {r["guidance"] for r in rows} == {4.0}


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "recipes/dit").glob("*.yaml")))
def test_dit_recipes_have_a_meaning_for_dit(recipe, tiny):
    """The shipped DiT recipes pass the family's checks (tiny:dit standing in for DiT-XL-2-256)."""
    from erasure.backbones import check_model
    from erasure.config import TrainConfig, read_recipe

    values = read_recipe(REPO / "recipes/dit" / recipe)
    for key in ("forget_data", "retain_data"):
        if values.get(key):
            values[key] = "tiny:class-" + key.split("_")[0]
    check_model(tiny["dit"], TrainConfig(**values))
