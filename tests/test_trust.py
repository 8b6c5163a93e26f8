"""What the toolkit writes can be trusted: one-line errors with exit 2 for bad input, caches that
only hold what they say, no NaN model exported or scored as clean, exports that never lose a file."""

import json
import shutil

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import RECIPES, run_recipe
from erasure.backbones import weights_sha256
from erasure.cli import main
from erasure.errors import OutputError

TINY_RGD = str(RECIPES / "tiny/rgd.yaml")


def strict_json(text: str):
    """JSON as other languages read it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def fails_in_one_line(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    last = err.strip().splitlines()[-1]  # progress bars of the work done before may come first
    assert last.startswith("erasure: error: ") and "Traceback" not in err, err
    return last


def image_set(folder, rows, size=(40, 30)):
    folder.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if isinstance(row, dict) and "file_name" in row:
            Image.new("RGB", size, (200, 10, 10)).save(folder / row["file_name"])
    return folder


def suite_file(tmp_path, name="suite", classes=("cat", "dog"), **prompts):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "prompts": {"classes": list(classes), "template": "a photo of a {}", "seed": 0, "guidance": 5.0,
                                  **prompts},
        "generation": {"steps": 2, "size": 32, "batch_size": 2}, "metrics": {"nudenet": {}}}))
    return str(path)


def i2p_file(tmp_path, seed):
    path = tmp_path / "i2p.csv"
    path.write_text(f"prompt,nudity_percentage,sd_seed,sd_guidance_scale\na nude figure,50,{seed},7\n")
    return str(path)


# ---- the contract: every subcommand turns bad input into one line and exit status 2 -------------

def _spec(tmp_path, **change):
    raw = yaml.safe_load((RECIPES.parent / "prompts/world-striped.yaml").read_text())
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**raw, **change}))
    return str(path)


def _model_with_index(tmp_path, tiny_sd1, text):
    folder = tmp_path / "model"
    shutil.copytree(tiny_sd1, folder)
    (folder / "model_index.json").write_text(text)
    return str(folder)


def _forget_set(tmp_path, metadata: bytes, name="metadata.jsonl"):
    folder = image_set(tmp_path / "forget", [{"file_name": "0.png"}])
    (folder / name).write_bytes(metadata)
    return ["--forget_data", str(folder)]


def _bomb(tmp_path):
    folder = tmp_path / "forget"
    folder.mkdir()
    Image.new("1", (20000, 20000)).save(folder / "0.png")  # 400 M pixels in a few kB: a decompression bomb
    (folder / "metadata.jsonl").write_text('{"file_name": "0.png", "prompt": "a nude person"}\n')
    return ["--forget_data", str(folder), "--retain_data", str(folder)]


def _truncated_checkpoint(tmp_path, tiny_sd1):
    out = tmp_path / "run"
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=out, max_steps=2, checkpointing_steps=1,
               keep_checkpoints=True)
    weights = out / "checkpoints" / "checkpoint-1" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["--output_dir", str(out), "--max_steps", "3", "--checkpointing_steps", "1", "--keep_checkpoints", "true",
            "--resume", str(out / "checkpoints" / "checkpoint-1")]


def _changed_recipe(tmp_path, tiny_sd1):
    out = tmp_path / "run"
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=out, max_steps=2, checkpointing_steps=1,
               keep_checkpoints=True)
    return ["--output_dir", str(out), "--max_steps", "2", "--checkpointing_steps", "1", "--keep_checkpoints", "true",
            "--resume", "latest", "--learning_rate", "0.5"]


TRAIN_CASES = {
    "model typo": (lambda t, m: ["--model", "tiny:sd9"], "model: 'tiny:sd9'; tiny fixtures are"),
    "missing model folder": (lambda t, m: ["--model", str(t / "no" / "model")], "is neither a local pipeline folder"),
    "broken model_index.json": (lambda t, m: ["--model", _model_with_index(t, m, "{not json")],
                                "is not a readable model index"),
    "model_index.json a list": (lambda t, m: ["--model", _model_with_index(t, m, "[1, 2]")],
                                "is not a readable model index"),
    "unsupported pipeline": (lambda t, m: ["--model", _model_with_index(t, m, '{"_class_name": "PixArtAlphaPipeline"}')],
                             "pipeline class PixArtAlphaPipeline is not supported"),
    "negative seed": (lambda t, m: ["--seed", "-1"], "seed: must be an integer in [0, 2**32)"),
    "huge seed": (lambda t, m: ["--seed", "1.0e+30"], "seed: must be an integer in [0, 2**32)"),
    "infinite seed": (lambda t, m: ["--seed", ".inf"], "--seed: inf is not a valid int"),
    "nan learning rate": (lambda t, m: ["--learning_rate", ".nan"], "learning_rate: must be a finite number"),
    "inf guidance": (lambda t, m: ["--forget_loss", "twin", "--twin_negative_guidance", ".inf"],
                     "twin_negative_guidance: must be a finite number"),
    "adam beta out of range": (lambda t, m: ["--adam_beta1", "2"], "adam_beta1 and adam_beta2 must be in [0, 1)"),
    "unknown tracker": (lambda t, m: ["--report_to", "bogus"], "report_to: 'bogus' is not one of"),
    "fp16 on a CPU": (lambda t, m: ["--mixed_precision", "fp16"], "mixed_precision"),
    "include that is a number": (lambda t, m: ["--recipe", str(_write(t / "r.yaml", "include: 5\n"))],
                                 "include: 5; expected the path of another recipe"),
    "empty output_dir": (lambda t, m: ["--output_dir", ""], "output_dir: must name a folder"),
    "output_dir is the base model": (lambda t, m: ["--output_dir", str(m)], "is (or holds) the base model"),
    "output_dir holds the base model": (lambda t, m: ["--output_dir", str(m.parent)], "is (or holds) the base model"),
    "output_dir is someone's folder": (lambda t, m: ["--output_dir", str(_write(t / "mine" / "README.md", "x").parent)],
                                       "is not empty and is not an erasure export"),
    "output_dir is a file": (lambda t, m: ["--output_dir", str(_write(t / "file", "x"))], "is a file, not a folder"),
    "metadata line is a JSON list": (lambda t, m: _forget_set(t, b'["0.png", "a nude person"]\n'),
                                     "line 1 is a JSON list, expected an object"),
    "metadata line is a number": (lambda t, m: _forget_set(t, b"5\n"), "line 1 is a JSON int, expected an object"),
    "metadata.jsonl not UTF-8": (lambda t, m: _forget_set(t, b'{"file_name": "0.png", "prompt": "\xff"}\n'),
                                 "is not UTF-8 text"),
    "metadata.csv not UTF-8": (lambda t, m: _forget_set(t, b"file_name,prompt\n0.png,caf\xe9\n", "metadata.csv"),
                               "is not a UTF-8 CSV table"),
    "decompression bomb": (lambda t, m: _bomb(t), "cannot be decoded"),
    "truncated checkpoint": (lambda t, m: _truncated_checkpoint(t, m), "is damaged"),
    "resume with a changed recipe": (lambda t, m: _changed_recipe(t, m), "changed keys: learning_rate"),
    "resume from no checkpoint": (lambda t, m: ["--resume", str(t)], "is not a checkpoint folder"),
    "resolution not a multiple of 8": (lambda t, m: ["--resolution", "30"], "resolution: a multiple of 8"),
    "checkpoint limit 0": (lambda t, m: ["--checkpoints_total_limit", "0"], "checkpoints_total_limit: must be ≥ 1"),
}


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input_is_one_line_with_status_2(case, tiny_sd1, tmp_path, capsys):
    if case == "fp16 on a CPU" and torch.cuda.is_available():
        pytest.skip("fp16 is valid where there is a GPU")
    flags, message = TRAIN_CASES[case]
    argv = flags(tmp_path, tiny_sd1)
    recipe = ["--recipe", TINY_RGD] if "--recipe" not in argv else []
    defaults = [] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "out")]
    err = fails_in_one_line(["train", *recipe, "--model", str(tiny_sd1), *defaults, *argv], capsys)
    assert message in err


def _pairs(tmp_path, text: bytes):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(text)
    return str(path)


PAIR = b'{"forget_prompt": "a nude person", "retain_prompt": "a person"}\n'
OTHER_CASES = {
    "generate: nan guidance": (lambda t, m: ["data", "generate", "--prompts", _pairs(t, PAIR), "--model", str(m),
                                             "--out", str(t / "d"), "--guidance", "nan"], "guidance: must be a finite"),
    "generate: negative seed": (lambda t, m: ["data", "generate", "--prompts", _pairs(t, PAIR), "--model", str(m),
                                              "--out", str(t / "d"), "--seed", "-1"], "seed: must be an integer"),
    "generate: prompts not UTF-8": (lambda t, m: ["data", "generate", "--prompts", _pairs(t, b'{"a": "\xff"}\n'),
                                                  "--model", str(m), "--out", str(t / "d")], "is not UTF-8 text"),
    "generate: model typo": (lambda t, m: ["data", "generate", "--prompts", _pairs(t, PAIR), "--model", "tiny:sd9",
                                           "--out", str(t / "d")], "tiny fixtures are"),
    "eval: steps 0": (lambda t, m: ["eval", "--suite", suite_file(t), "--model", str(m), "--out", str(t / "e"),
                                    "--steps", "0"], "generation.steps: 0; expected an integer ≥ 1"),
    "eval: nan guidance": (lambda t, m: ["eval", "--suite", suite_file(t, guidance=float("nan")), "--model", str(m),
                                         "--out", str(t / "e")], "prompts.guidance: nan"),
    "eval: huge seed": (lambda t, m: ["eval", "--suite", suite_file(t, seed=10**30), "--model", str(m),
                                      "--out", str(t / "e")], "prompts.seed"),
    "eval: include 5": (lambda t, m: ["eval", "--suite", str(_write(t / "s.yaml", "include: 5\n")), "--model", str(m),
                                      "--out", str(t / "e")], "include: 5"),
    "eval: model typo": (lambda t, m: ["eval", "--suite", suite_file(t), "--model", str(t / "erased"),
                                       "--out", str(t / "e")], "--model: "),
    **{f"eval: I2P seed {seed}": (lambda t, m, seed=seed: [
        "eval", "--suite", str(RECIPES.parent / "eval/i2p-nudity.yaml"), "--dataset", i2p_file(t, seed),
        "--model", str(m), "--out", str(t / "e"), "--steps", "1"], f"sd_seed '{seed}' is not a seed")
       for seed in ("nan", "inf", "1e30", "-3")},
    "prompts: sizes a list": (lambda t, m: ["prompts", "build", _spec(t, sizes=[1, 2]), "--out", str(t / "p")],
                              "sizes: [1, 2]; expected train and/or test pair counts"),
    "prompts: test_fraction text": (lambda t, m: ["prompts", "build", _spec(t, test_fraction="many"),
                                                  "--out", str(t / "p")], "test_fraction: 'many'"),
    "prompts: uniform a list": (lambda t, m: ["prompts", "build", _spec(t, uniform=["a"]), "--out", str(t / "p")],
                                "uniform: expected a mapping"),
    "prompts: unbalanced brace": (lambda t, m: ["prompts", "build", _spec(t, templates=["a {colour {concept}"]),
                                                "--out", str(t / "p")], "templates[0]: template 'a {colour {concept}'"),
    "eval: metrics a list": (lambda t, m: ["eval", "--suite", str(_write(t / "s.yaml", "prompts: {classes: [a]}\n"
                                                                          "metrics: [nudenet]\n")),
                                           "--model", str(m), "--out", str(t / "e")], "metrics: expected a mapping"),
    "eval: threshold 2": (lambda t, m: ["eval", "--suite", str(_write(t / "s.yaml", "prompts: {classes: [a]}\n"
                                                                       "metrics: {nudenet: {threshold: 2}}\n")),
                                        "--model", str(m), "--out", str(t / "e")], "threshold: 2; a detector score"),
    "world build: a count that is text": (lambda t, m: ["world", "build", "--out", str(t / "w"), "--set", "steps=abc"],
                                          "world recipe steps: 'abc' is not like its default 3000"),
    "report: not a report": (lambda t, m: ["report", str(_write(t / "r" / "report.json", "[1]").parent)],
                             "is not a report `erasure eval` wrote"),
    "prompts: --out is a file": (lambda t, m: ["prompts", "build", _spec(t), "--out", str(_write(t / "f", "x"))],
                                 "/f: "),
    "prompts: openai without a base URL": (lambda t, m: ["prompts", "build", _spec(t), "--out", str(t / "p"),
                                                         "--llm", "openai", "--llm-model", "gpt"], "--base-url"),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_other_subcommands_bad_input_is_one_line_with_status_2(case, tiny_sd1, tmp_path, capsys):
    argv, message = OTHER_CASES[case]
    err = fails_in_one_line(argv(tmp_path, tiny_sd1), capsys)
    assert message in err


# ---- non-finite values stop the run ------------------------------------------------------------

def test_a_diverged_run_exits_2_and_exports_nothing(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "out"
    err = fails_in_one_line(["train", "--recipe", TINY_RGD, "--model", str(tiny_sd1), "--output_dir", str(out),
                             "--learning_rate", "1e6", "--max_steps", "6", "--checkpointing_steps", "1"], capsys)
    assert "training diverged at step" in err and "nothing was exported" in err
    assert not (out / "model_index.json").exists() and not (out / "erasure.json").exists()
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):  # what stays was good
        assert all(torch.isfinite(t).all() for t in load_file(checkpoint / "trainable.safetensors").values())


def test_eval_flags_a_model_that_draws_nan_instead_of_scoring_it_clean(tiny_sd1, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd1, broken)
    for file in (broken / "unet").glob("*.safetensors"):
        save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(file).items()}, file)
    main(["eval", "--suite", suite_file(tmp_path), "--model", str(tiny_sd1), "--model", str(broken),
          "--out", str(tmp_path / "e")])
    report = strict_json((tmp_path / "e" / "report.json").read_text())
    base, nan = report["models"]
    assert base["metrics"]["nudenet"] and base["blank_images"] == 0 and "flag" not in base
    assert nan["metrics"] == {} and nan["blank_images"] == 2 and "not scored" in nan["flag"]
    assert "## Flags" in (tmp_path / "e" / "report.md").read_text()


# ---- caches hold only what made them -----------------------------------------------------------

def _images(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_eval_images_are_keyed_by_weights_settings_and_prompts(tiny_sd1, tmp_path):
    from erasure.tiny import build_tiny_sd1

    other = build_tiny_sd1(tmp_path / "b" / "erased", seed=1)
    first = tmp_path / "a" / "erased"
    shutil.copytree(tiny_sd1, first)
    suite, out = suite_file(tmp_path), tmp_path / "e"

    def evaluate(model, out=out, suite=suite, *flags):
        main(["eval", "--suite", suite, "--model", str(model), "--out", str(out), *flags])
        return _images(out / "images" / "0-erased"), strict_json((out / "report.json").read_text())

    a, _ = evaluate(first)
    b, report = evaluate(other)  # another model whose folder has the same name
    assert b == evaluate(other, tmp_path / "fresh-b")[0] and b != a
    assert report["models"][0]["weights_sha256"] == weights_sha256(other)
    shutil.rmtree(first)
    shutil.copytree(other, first)  # retrained at the same path
    assert evaluate(first)[0] == b
    three_steps = evaluate(first, out, suite, "--steps", "3")[0]
    assert three_steps == evaluate(first, tmp_path / "fresh-3", suite, "--steps", "3")[0] != b
    cars = suite_file(tmp_path, "cars", classes=("car", "cup"))  # another prompt set of the same length
    assert evaluate(first, out, cars)[0] == evaluate(first, tmp_path / "fresh-cars", cars)[0]
    detections = [json.loads(line) for line in (out / "images" / "0-erased" / "nudenet.jsonl").read_text().splitlines()]
    assert [d["file_name"] for d in detections] == ["000000_0.png", "000001_0.png"] and all(d["sha256"] for d in detections)


def test_data_generate_refuses_images_of_other_weights_at_the_same_path(tiny_sd1, tmp_path, capsys):
    from erasure.tiny import build_tiny_sd1

    model, pairs = tmp_path / "model", _pairs(tmp_path, PAIR)
    shutil.copytree(tiny_sd1, model)
    argv = ["data", "generate", "--prompts", pairs, "--model", str(model), "--out", str(tmp_path / "d"),
            "--steps", "2", "--size", "32"]
    main(argv)
    shutil.rmtree(model)
    build_tiny_sd1(model, seed=1)  # retrained at the same path
    capsys.readouterr()
    assert "weights_sha256" in fails_in_one_line(argv, capsys)


def test_resume_refuses_data_that_changed_since_the_checkpoint(tiny_sd1, tmp_path, capsys):
    from erasure.data.tiny_pairs import tiny_pairs

    forget = tmp_path / "forget"
    shutil.copytree(tiny_pairs() / "forget", forget)
    common = ["--recipe", TINY_RGD, "--model", str(tiny_sd1), "--forget_data", str(forget), "--output_dir",
              str(tmp_path / "o"), "--checkpointing_steps", "2", "--keep_checkpoints", "true"]
    main(["train", *common, "--max_steps", "4"])
    metadata = forget / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("nude", "naked", 1))
    capsys.readouterr()
    err = fails_in_one_line(["train", *common, "--max_steps", "6", "--resume", "latest"], capsys)
    assert "forget_data changed since" in err


# ---- exports never lose a file -----------------------------------------------------------------

def test_overwrite_replaces_a_foreign_folder_as_a_whole(tiny_sd1, tmp_path):
    out = tmp_path / "mine"
    _write(out / "notes.txt", "mine")
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=out, max_steps=1, overwrite=True)
    assert (out / "model_index.json").is_file() and not (out / "notes.txt").exists()


def test_a_full_export_after_a_lora_export_keeps_no_stale_adapter(tiny_sd1, tmp_path):
    out = tmp_path / "out"
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=out, max_steps=1, scope="lora")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=out, max_steps=1)
    assert not (out / "pytorch_lora_weights.safetensors").exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging or old folder left beside it


def test_exports_and_reports_are_strict_json(tiny_sd1, tmp_path):
    from erasure.atomic import strict_json as dump

    assert strict_json(dump({"a": float("nan"), "b": [float("inf"), 1.5]})) == {"a": None, "b": [None, 1.5]}
    out = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "out", max_steps=1)
    assert strict_json((out / "erasure.json").read_text())["steps"] == 1


def test_a_foreign_folder_is_refused_and_left_as_it_was(tmp_path):
    from erasure.export import check_output_dir

    with pytest.raises(OutputError, match="not an erasure export"):
        check_output_dir(_write(tmp_path / "x" / "a.txt", "keep me").parent, "tiny:sd1", overwrite=False)
    assert (tmp_path / "x" / "a.txt").read_text() == "keep me"
