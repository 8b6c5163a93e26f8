"""The micro-world model: its tokenizer, its build, the shipped world, and the micro-world suites."""

import json
from pathlib import Path

import pytest
import torch

from erasure.world import model as world
from erasure.world.render import ALIASED, ATTRIBUTES, caption

MB = 1_000_000


def test_cut_down_vocabulary_tokenizes_captions_like_clip():
    from erasure.tiny import clip_tokenizer

    full, small = clip_tokenizer(world.TOKEN_LENGTH), world.world_tokenizer()
    assert len(small) < 1000
    for combo in world.all_combinations()[::7] + [{"shape": "cross", "colour": "orange", "background": "navy",
                                                   "texture": "checkered"}]:
        text = caption(combo)
        assert small.convert_ids_to_tokens(small(text).input_ids) == full.convert_ids_to_tokens(full(text).input_ids)
    # any other text still tokenizes, into smaller pieces
    pieces = small.convert_ids_to_tokens(small("a zebra").input_ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>" and len(pieces) > 4


def test_held_out_combinations_are_disjoint_and_cover_every_value():
    train, held = world.split_combinations(seed=0, held_out=48)
    assert len(train) == 432 and len(held) == 48
    assert not {caption(c) for c in train} & {caption(c) for c in held}
    for key, values in ATTRIBUTES.items():
        assert {c[key] for c in train} == set(values)
    assert world.split_combinations(seed=0, held_out=48) == (train, held)
    assert world.split_combinations(seed=1, held_out=48)[1] != held


def test_recipe_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown world recipe keys.*stepz"):
        world.WorldRecipe.from_dict({"stepz": 3})


def test_min_snr_weight_caps_low_noise_steps():
    abar = torch.tensor([0.999, 0.5, 0.01])
    w = world.min_snr_weight(abar, torch.arange(3), gamma=5.0)
    snr = abar / (1 - abar)
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 0.01 and w[1] == 1 and w[2] == 1


SHORT = ["--set", "oracle_steps=4", "--set", "vae_steps=3", "--set", "steps=3", "--set", "quality_per_combo=1",
         "--set", "held_out=8"]


def test_world_build_is_complete_loadable_and_reproducible(tmp_path, capsys):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from erasure.cli import main

    for name in ("a", "b"):
        main(["world", "build", "--out", str(tmp_path / name), *SHORT])
    printed = capsys.readouterr().out
    assert "oracle read-back on 8 held-out captions" in printed and "texture" in printed
    record = json.loads((tmp_path / "a" / world.WORLD_FILE).read_text())
    assert record["recipe"]["steps"] == 3 and len(record["held_out_captions"]) == 8
    assert set(record["quality_held_out"]) == set(ATTRIBUTES)
    assert not list(tmp_path.glob(".a.*"))  # no staging folder left beside it
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "oracle/model.safetensors"):
        a, b = load_file(str(tmp_path / "a" / part)), load_file(str(tmp_path / "b" / part))
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert next(iter(load_file(str(tmp_path / "a" / "unet/diffusion_pytorch_model.safetensors")).values())).dtype \
        == torch.float16
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "a")
    image = pipe("a red circle on a black background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)


def test_world_build_refuses_unknown_setting(tmp_path, capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["world", "build", "--out", str(tmp_path / "w"), "--set", "stepz=3"])
    assert stop.value.code == 2
    assert "--set 'stepz=3'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_shipped_world_meets_its_bar_and_size():
    record = json.loads((world.SHIPPED / world.WORLD_FILE).read_text())
    assert all(v >= record["quality_bar"] == 0.9 for v in record["quality_held_out"].values()), record
    # every alias is drawn as its main word: the same held-out captions, texture and shape by alias
    assert all(v >= record["quality_bar"] for v in record["quality_held_out_aliases"].values()), record
    assert record["sampler"]["num_inference_steps"] <= 25
    size = sum(f.stat().st_size for f in world.SHIPPED.rglob("*") if f.is_file())
    assert size <= 15 * MB, size
    assert world.world_path("world:micro") == world.SHIPPED
    with pytest.raises(ValueError, match="world:micro"):
        world.world_path("world:macro")


def test_shipped_world_draws_what_it_is_asked():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(world.SHIPPED)
    pipe.set_progress_bar_config(disable=True)
    oracle = world.world_oracle(world.SHIPPED)
    combos = world.all_combinations()[5::40]  # 12 captions, every attribute value at least once
    for aliased in ((), ALIASED):  # "a red striped circle …" and "a red banded disc …" alike
        images = world.sample(pipe, [caption(c, aliased=aliased) for c in combos], seed=7, steps=20,
                              guidance_scale=3.0)
        read = world.read_back(oracle, images, combos)
        # chance is 1/4 to 1/6 per attribute; the shipped world reads back ≥ 90 % on held-out captions
        assert all(v >= 0.75 for v in read.values()), (aliased, read)


def test_micro_suite_scores_the_shipped_world(tmp_path):
    from erasure.eval.runner import evaluate
    from erasure.eval.suite import load_suite

    suite = load_suite(Path("eval/micro-striped.yaml"), {"prompts": {"limit": 40}, "generation": {"batch_size": 40}})
    report = evaluate(suite, ["world:micro", "world:micro"], tmp_path, show=False)
    first, second = (m["metrics"]["micro_world"] for m in report["models"])
    assert first["attribute"] == "texture" and first["forget_images"] == 10 and first["other_images"] == 30
    assert first["implicit_UA"] is None  # the first 40 captions of all+aliases name every attribute
    assert first["UA"] <= 0.3  # the base world draws stripes when asked
    assert first["neighbour_accuracy"] >= 0.7 and first["RA"] >= 0.8
    assert first == {**second, "frechet_to_first": first["frechet_to_first"]}
    assert second["frechet_to_first"] < 1e-6
    text = (tmp_path / "report.md").read_text()
    assert "Micro world (erased: texture 'striped'" in text and (tmp_path / "micro_world.png").is_file()

    # asked by the alias ("banded"), the base world still draws stripes: implicit UA is low too
    aliases = load_suite(Path("eval/micro-striped.yaml"), {"prompts": {"world": "aliases", "limit": 40},
                                                           "generation": {"batch_size": 40}})
    implicit = evaluate(aliases, ["world:micro"], tmp_path / "aliases", show=False)["models"][0]["metrics"]["micro_world"]
    assert implicit["UA"] is None and implicit["implicit_forget_images"] == 10
    assert implicit["implicit_UA"] <= 0.3 and implicit["implicit_neighbour_accuracy"] >= 0.7


def test_micro_suite_refuses_a_concept_outside_the_world(tmp_path):
    from erasure.eval.suite import SuiteError, load_suite

    with pytest.raises(SuiteError, match="'nudity' is not a micro-world attribute value"):
        load_suite(Path("eval/micro-striped.yaml"), {"metrics": {"micro_world": {"concept": "nudity"}}})


def test_world_concept_specs_build_parseable_pairs(tmp_path):
    from erasure.prompts.build import build_prompt_sets
    from erasure.prompts.spec import load_spec
    from erasure.world.render import aliased_attributes, parse_caption

    for concept, attribute in (("striped", "texture"), ("triangle", "shape")):
        spec = load_spec(Path(f"prompts/world-{concept}.yaml"))
        for uniform in (False, True):
            out = tmp_path / f"{concept}-{uniform}"
            build_prompt_sets(spec, out, uniform=uniform)
            rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
            for row in rows:
                # forget prompts name the concept: its alias stays out, so that implicit UA measures
                # what an erasure of the word leaves reachable
                assert not aliased_attributes(row["forget_prompt"]) and not aliased_attributes(row["retain_prompt"])
                forget, retain = parse_caption(row["forget_prompt"]), parse_caption(row["retain_prompt"])
                assert forget[attribute] == concept and retain[attribute] != concept
                assert {k: v for k, v in forget.items() if k != attribute} == \
                    {k: v for k, v in retain.items() if k != attribute}
            assert len({r["forget_prompt"] for r in rows}) == (1 if uniform else len(rows))
