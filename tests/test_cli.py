"""The commands users type: accelerate launch erasure/train.py, erasure tiny, erasure demo, erasure bench."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest
from diffusers import DiffusionPipeline

from conftest import REPO, RECIPES


def test_accelerate_launch_train_py_with_a_tiny_recipe_on_a_fresh_cache(tmp_path):
    env = {**os.environ, "ERASURE_CACHE": str(tmp_path / "cache")}  # nothing built yet
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "erasure" / "train.py"),
         "--recipe", str(RECIPES / "tiny/rgd.yaml"), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rgd [sd1, full]" in done.stderr  # the progress bar, with its live losses
    assert "forget=" in done.stderr and "cos=" in done.stderr
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe).__name__ == "StableDiffusionPipeline"


@pytest.mark.parametrize("family,cls", [("sd1", "StableDiffusionPipeline"), ("sd3", "StableDiffusion3Pipeline"),
                                        ("dit", "DiTPipeline"), ("uncond", "DDPMPipeline")])
def test_erasure_tiny_writes_a_loadable_pipeline(family, cls, tmp_path):
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "tiny", family, str(tmp_path / family)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((tmp_path / family / "model_index.json").read_text())
    assert index["_class_name"] == cls
    assert not list((tmp_path / family).glob("**/*.bin"))


def test_demo_erases_striped_from_the_world_and_reloads(tmp_path, capsys):
    """A short RGD run moves UA on striped captions well beyond what sampling noise could."""
    from erasure.cli import main

    main(["demo", "--out", str(tmp_path / "demo"), "--limit", "96"])
    printed = capsys.readouterr().out
    assert "where everything went" in printed and str(tmp_path / "demo") in printed
    assert "Micro world (erased: texture 'striped'" in printed
    assert (tmp_path / "demo" / "samples.png").stat().st_size > 0
    card = json.loads((tmp_path / "demo" / "erasure.json").read_text())
    assert card["method"] == "rgd" and card["concept"] == "striped"
    report = json.loads((tmp_path / "demo" / "eval" / "report.json").read_text())
    base, erased = (m["metrics"]["micro_world"] for m in report["models"])
    assert base["forget_images"] == 24
    # 24 forget images: the base world draws stripes on ≈ 90 % of them (UA ≈ 0.1); a rise of ≥ 0.3
    # is ≥ 8 more images that lost their stripes, far outside seed noise (binomial tail < 1e-4).
    assert erased["UA"] >= base["UA"] + 0.3, (base, erased)


def test_the_recommended_recipe_names_no_concept():
    """recipes/world/erase.yaml erases any world concept: concept and data come from flags, and none of
    its values names a world attribute; without them it fails in one line."""
    from erasure.config import read_recipe
    from erasure.world.model import world_words

    recipe = read_recipe(RECIPES / "world" / "erase.yaml")
    assert not {"concept", "forget_data", "retain_data"} & recipe.keys()
    words = set(world_words()) - {"a", "an", "on", "background"}
    assert not [v for v in recipe.values() if set(str(v).lower().split()) & words]
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "train", "--recipe",
                           str(RECIPES / "world" / "erase.yaml")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "_data: required by method rgd" in done.stderr and "Traceback" not in done.stderr


def test_train_help_lists_every_recipe_key():
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--forget-loss-cap VALUE" in done.stdout and "--retain-weight" in done.stdout
    assert "[float; default: 1e-05]" in done.stdout  # learning_rate's type and default


def _parsers(parser):
    """`parser` and every subcommand's parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _parsers(sub)


def test_every_flag_shows_its_type_and_default_and_takes_both_spellings():
    from erasure.cli import build_parser
    from erasure.config import build_parser as train_parser

    parsers = list(_parsers(build_parser())) + [train_parser()]
    assert len(parsers) > 10
    for parser in parsers:
        text = parser.format_help()
        blocks = re.split(r"\n(?=  -)", text.split("options:")[1])[1:]  # one block per option
        options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert len(blocks) == len(options) + 1, parser.prog  # + --help
        for block in blocks[1:]:
            assert re.search(r"\[[^\]]+\]\s*$", block), f"{parser.prog}: {block}"  # [type; default …]
        for action in options:
            for name in action.option_strings:
                other = "--" + (name[2:].replace("-", "_") if "-" in name[2:] else name[2:].replace("_", "-"))
                assert parser._option_string_actions.get(other, action) is action, (parser.prog, name)
    top = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0]
    assert list(top.choices)[:7] == ["prompts", "data", "train", "eval", "attack", "report", "push"]  # the order of the work
    generate = ["data", "generate", "--prompts", "p", "--model", "m", "--out", "o"]
    assert build_parser().parse_args(generate + ["--batch_size", "2"]).batch_size == 2
    assert build_parser().parse_args(generate + ["--batch-size", "3"]).batch_size == 3
    assert build_parser().parse_args(["prompts", "build", "s", "--out", "o", "--llm-model", "x"]).llm_model == "x"
    assert vars(train_parser().parse_args(["--max-steps", "3"])) == vars(train_parser().parse_args(["--max_steps", "3"]))


def test_losses_and_gradient_cosine_reach_the_installed_tracker(tiny_sd1, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import run_recipe

    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=3,
                     report_to="tensorboard")
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss/forget", "loss/retain", "grad_cosine"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("loss/retain")] == [1, 2, 3]
    assert not (out / "checkpoints").exists()  # removed once the export completed


def test_bad_input_is_one_clear_line_with_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "train", "--recipe", str(RECIPES / "tiny/rgd.yaml"),
                           "--method", "rdg"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "erasure: error: method: 'rdg' is not one of" in done.stderr
    spec = tmp_path / "spec.yaml"
    spec.write_text("concept: x\nphrasings: [x]\ntemplates: ['{concept} {mood}']\ndimensions: {subject: [a, b]}\n")
    done = subprocess.run([sys.executable, "-m", "erasure.cli", "prompts", "build", str(spec), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "uses {mood}, but there is no dimension 'mood'" in done.stderr


def test_bench_micro_runs_every_named_method_on_a_reduced_budget(tmp_path, capsys):
    from erasure.cli import main

    out = tmp_path / "bench"
    # striped, like the demo test: the session's cache then draws the world's pair set once
    # erase: the recommended recipe, which names no concept; the bench passes concept and data as flags
    main(["bench", "micro", "--concept", "striped", "--methods", "finetune", "erase", "--steps", "2",
          "--limit", "20", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| method | UA" in printed and "| erase |" in printed and "| base |" in printed
    result = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["base", "finetune", "erase"]
    assert json.loads((out / "models" / "erase" / "erasure.json").read_text())["concept"] == "striped"
    for row in result["rows"][1:]:
        assert row["wall_s"] > 0 and row["peak_rss_mib"] > 100 and row["attribute"] == "texture"
    assert (out / "bench.png").stat().st_size > 0 and (out / "bench.md").read_text().startswith("| method")


def test_bench_micro_names_what_is_missing(tmp_path, capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "micro", "--concept", "striped", "--methods", "rgd", "sgd", "--out", str(tmp_path)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no recipe for sgd" in err and "rgd" in err


@pytest.mark.parametrize("flags, message", [
    (["--monitor_every", "2"], "monitor_prompts: required here: forget_data is neither a world:… set"),
    (["--stop_at_erasure", "0.9"], "stop_at_erasure: needs monitor_every"),
    (["--method", "uce", "--scope", "lora"], "scope: uce edits the text projections in closed form"),
    (["--twin_batches", "zipped"], "twin_batches: 'zipped' is not one of independent, twins, twins_shared_noise"),
    (["--monitor_every", "2", "--monitor_prompts", "world:everything"], "monitor_prompts: 'world:everything'"),
    (["--forget_loss", "twin", "--forget_loss_cap_relative", "2"], "forget_loss_cap_relative: caps the ascent"),
    (["--forget_loss", "twin", "--forget_loss_cap_per_sample", "true"], "forget_loss_cap_per_sample: caps the ascent"),
    (["--method", "esd-x", "--retain_loss", "distill"], "retain_loss: distill; esd-x has no retain objective"),
    (["--forget_loss_cap_relative", "0.5"], "forget_loss_cap_relative: a factor > 1"),
    (["--twin_negative_guidance", "1"], "twin_negative_guidance: shapes forget_loss: twin's target"),
    (["--forget_loss", "twin", "--twin_negative_guidance", "-1"], "twin_negative_guidance: must be ≥ 0"),
    (["--concept_vector_adversary", "3"], "concept_vector_adversary: trains forget_loss: twin's target"),
    (["--forget_loss", "twin", "--concept_vector_adversary", "-1"], "concept_vector_adversary: η_max must be"),
])
def test_new_training_flags_fail_in_one_line(flags, message, tmp_path, capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["train", "--recipe", str(RECIPES / "tiny/rgd.yaml"), "--output_dir", str(tmp_path / "out"), *flags])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("erasure: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--attack"], "--attack: attacks each method at its erasure point, which --frontier finds; add --frontier"),
    (["--frontier", "--attack", "eval/attack-micro-triangle.yaml"],
     "reads triangle; the bench erases 'striped' (e.g. eval/attack-micro-striped.yaml)"),
    (["--frontier", "--limit", "8"], "--limit: with --frontier it limits the attacked captions (add --attack)"),
    (["--frontier", "--attack", "--limit", "0"], "--limit: must be ≥ 1, got 0"),
    (["--limit", "0"], "--limit: must be ≥ 1, got 0"),
])
def test_bench_attacks_are_refused_before_training(flags, message, tmp_path, capsys, monkeypatch):
    from erasure.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        main(["bench", "micro", "--concept", "striped", *flags, "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f").exists()


def test_frontier_budget_must_be_positive(tmp_path, capsys):
    from erasure.cli import main

    with pytest.raises(SystemExit) as stop:
        main(["bench", "micro", "--concept", "striped", "--frontier", "--every", "0", "--out", str(tmp_path / "f")])
    assert stop.value.code == 2
    assert "--every: must be ≥ 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()
