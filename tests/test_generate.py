"""Paired forget/retain images rendered by a base pipeline: layout, seeds, resume, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_recipe
from erasure.data.generate import generate_pairs
from erasure.data.paired import DataError, load_prompt_image_set

FAST = dict(steps=2, show_progress=False)


def write_prompts(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"forget_prompt": f"a photo of a nude person, scene {i}",
                                "retain_prompt": f"a photo of a person, scene {i}",
                                "subconcepts": ["nudity"]}) + "\n")
    return path


def rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def generated(tiny_sd1, tmp_path_factory):
    """3 pairs on tiny SD 1.x, shared by the tests that only read them."""
    tmp = tmp_path_factory.mktemp("generated")
    return generate_pairs(write_prompts(tmp / "prompts.jsonl", 3), tiny_sd1, tmp / "out", **FAST)


def test_default_sampler_is_the_models_own(tiny_sd1, tiny_flux, tmp_path):
    """Without steps/guidance a micro world draws with its own recorded sampler (the one its quality
    bar and suites use), anything else with Stable Diffusion's 50 steps at guidance 7.5."""
    from erasure.world.model import default_sampler, world_sampler

    assert default_sampler(tiny_sd1) == (50, 7.5)
    assert default_sampler(tiny_flux) == (28, 3.5)  # FluxPipeline's own
    out = generate_pairs(write_prompts(tmp_path / "p.jsonl", 1), "world:micro", tmp_path / "w", show_progress=False)
    settings = json.loads((out / "generation.json").read_text())
    assert (settings["steps"], settings["guidance"]) == world_sampler() == (20, 3.0)
    assert rows(out / "forget")[0]["steps"] == 20


def test_pairs_sd1(generated):
    forget, retain = rows(generated / "forget"), rows(generated / "retain")
    assert len(forget) == len(retain) == 3
    for side, side_rows in (("forget", forget), ("retain", retain)):
        assert sorted(p.name for p in (generated / side).glob("*.png")) == [f"{i:06d}_0.png" for i in range(3)]
        assert [r["pair"] for r in side_rows] == [0, 1, 2]
        assert all(r["steps"] == 2 and r["subconcepts"] == ["nudity"] for r in side_rows)
    assert "nude" in forget[0]["prompt"] and "nude" not in retain[0]["prompt"]
    assert [r["seed"] for r in forget] == [r["seed"] for r in retain] == [0, 1, 2]  # twins share noise
    settings = json.loads((generated / "generation.json").read_text())
    assert settings["size"] == 32 and settings["count"] == 3 and len(settings["prompts_sha256"]) == 64
    assert len(load_prompt_image_set("forget_data", str(generated / "forget"))) == 3
    assert len(load_prompt_image_set("retain_data", str(generated / "retain"))) == 3


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_pairs_on_the_other_text_families(family, tiny_models, tmp_path):
    # size: FluxPipeline draws at 1024 px unless told (the fixture would draw 256); the others' is 32
    out = generate_pairs(write_prompts(tmp_path / "p.jsonl", 1), tiny_models[family], tmp_path / "out", size=32,
                         **FAST)
    for side in ("forget", "retain"):
        assert len(rows(out / side)) == 1
        assert pixels(out / side / "000000_0.png").shape == (32, 32, 3)


def test_batch_size_does_not_change_the_images(tiny_sd1, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    one = generate_pairs(prompts, tiny_sd1, tmp_path / "b1", batch_size=1, **FAST)
    three = generate_pairs(prompts, tiny_sd1, tmp_path / "b3", batch_size=3, **FAST)
    for side in ("forget", "retain"):
        assert rows(one / side) == rows(three / side)
        for name in (f"{i:06d}_0.png" for i in range(3)):
            a, b = pixels(one / side / name), pixels(three / side / name)
            # Same noise per image; a batched convolution sums in another order (≈1e-6 here), which
            # can flip the rounding of a stray pixel by one level — not a different image.
            diff = np.abs(a - b)
            assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (side, name, diff.max())


def test_rerun_renders_only_what_is_missing(tiny_sd1, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", 3)
    out = generate_pairs(prompts, tiny_sd1, tmp_path / "out", batch_size=1, **FAST)
    before = shutil.copytree(out, tmp_path / "before")
    (out / "forget" / "000001_0.png").unlink()
    partial = out / "forget" / ".000001_0.png.4242-deadbeef.tmp"  # as a kill mid-write leaves it
    partial.write_bytes((before / "forget" / "000001_0.png").read_bytes()[:100])
    kept = {p: p.stat().st_mtime_ns for p in out.glob("*/*.png")}

    generate_pairs(prompts, tiny_sd1, out, batch_size=1, **FAST)
    # Rendered alone both times, so exactly the same computation: the same bytes.
    assert (out / "forget" / "000001_0.png").read_bytes() == (before / "forget" / "000001_0.png").read_bytes()
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in kept.items())  # the others untouched
    assert not partial.exists()
    assert rows(out / "forget") == rows(before / "forget")


def test_killed_run_resumes(tiny_sd1, tmp_path):
    prompts, out = write_prompts(tmp_path / "p.jsonl", 12), tmp_path / "out"
    code = ("import sys; from erasure.data.generate import generate_pairs; "
            "generate_pairs(sys.argv[1], sys.argv[2], sys.argv[3], steps=2, batch_size=1, show_progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(prompts), str(tiny_sd1), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while len(list(out.glob("*/*.png"))) < 2:
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "forget" / "metadata.jsonl").exists()  # it really was cut short
    assert len(list(out.glob("*/*.png"))) < 24

    generate_pairs(prompts, tiny_sd1, out, batch_size=4, **FAST)
    for side in ("forget", "retain"):
        assert len(rows(out / side)) == 12
        assert len(list((out / side).glob("*.png"))) == 12
        assert not list((out / side).glob(".*"))  # no temporary files left
        for png in (out / side).glob("*.png"):
            with Image.open(png) as image:
                image.load()


def test_changed_settings_are_refused(generated, tiny_sd1):
    settings = json.loads((generated / "generation.json").read_text())
    with pytest.raises(ValueError, match=r"steps: 2 there, 3 now"):
        generate_pairs(settings["prompts_file"], tiny_sd1, generated, steps=3, show_progress=False)
    assert len(rows(generated / "forget")) == 3  # nothing was touched


@pytest.mark.parametrize("lines, expected", [
    (['{"forget_prompt": "a", "retain_prompt": "b"}', "{not json"], r"line 2 is not JSON"),
    (['{"forget_prompt": "a nude person"}'], r"line 1 has no 'retain_prompt'"),
    (['{"forget_prompt": "a", "retain_prompt": "b", "seed": 3}'], r"line 1 has key\(s\) seed"),
    ([], r"is empty"),
])
def test_bad_prompts_file(lines, expected, tiny_sd1, tmp_path):
    prompts = tmp_path / "bad.jsonl"
    prompts.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(DataError, match=expected) as error:
        generate_pairs(prompts, tiny_sd1, tmp_path / "out", **FAST)
    assert str(prompts) in str(error.value)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_generated_folders_feed_the_trainer(generated, tiny_sd1, tmp_path):
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, forget_data=generated / "forget",
               retain_data=generated / "retain", output_dir=tmp_path / "o", max_steps=1)
    assert (tmp_path / "o" / "model_index.json").is_file()


def test_generation_from_the_command_line_on_a_built_prompt_set(tmp_path):
    from conftest import REPO

    run = lambda *a: subprocess.run([sys.executable, "-m", "erasure.cli", *a], capture_output=True, text=True,
                                    timeout=300)
    built = run("prompts", "build", str(REPO / "prompts/nudity.yaml"), "--out", str(tmp_path / "p"),
                "--train", "3", "--test", "1")
    assert built.returncode == 0, built.stderr[-2000:]
    done = run("data", "generate", "--prompts", str(tmp_path / "p/train.jsonl"), "--model", "tiny:sd1",
               "--out", str(tmp_path / "d"), "--steps", "2", "--batch-size", "3")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(l) for l in (tmp_path / "d/retain/metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("nude" not in r["prompt"] for r in rows)
    assert json.loads((tmp_path / "d/generation.json").read_text())["dtype"] == "float32"


def test_monitor_finds_the_held_out_split_beside_a_generated_set(tiny_sd1, tmp_path):
    """A set rendered from prompts/train.jsonl is monitored on prompts/test.jsonl, through the prompts file
    generation.json records; a set from any other file needs monitor_prompts."""
    from erasure.config import RecipeError, TrainConfig
    from erasure.monitor import held_out_beside

    (tmp_path / "prompts").mkdir()
    train = write_prompts(tmp_path / "prompts" / "train.jsonl", 1)
    out = generate_pairs(train, tiny_sd1, tmp_path / "data", **FAST)
    recipe = dict(model=str(tiny_sd1), method="rgd", concept="nudity", forget_data=str(out / "forget"),
                  retain_data=str(out / "retain"), monitor_every=2, monitor_detector="clip")
    with pytest.raises(RecipeError, match="monitor_prompts: required"):
        TrainConfig(**recipe)
    test = write_prompts(tmp_path / "prompts" / "test.jsonl", 2)
    assert held_out_beside(str(out / "forget")) == test.resolve()
    assert held_out_beside(str(out)) == test.resolve()
    TrainConfig(**recipe)  # no monitor_prompts needed now
    assert held_out_beside(str(tmp_path / "prompts")) is None  # no generation.json: nothing to go by


def test_one_routine_draws_each_image_from_its_own_seed_whatever_the_batch(tiny_sd1):
    import numpy as np

    from erasure.data.generate import load_pipeline
    from erasure.generation import draw, draw_batched, initial_noise

    pipe = load_pipeline(tiny_sd1, "cpu", "float32")
    prompts, seeds = ["a nude person", "a person", "a cat"], [5, 6, 7]
    together, finite = draw(pipe, prompts, seeds, steps=2, guidance=5.0, size=32)
    one_by_one, _ = draw_batched(pipe, prompts, seeds, steps=2, guidance=5.0, size=32, batch_size=1)
    assert together.dtype == np.uint8 and together.shape == (3, 32, 32, 3) and finite == [True] * 3
    # the noise is the same whatever the batch; batched kernels may round a last bit differently
    assert torch.equal(initial_noise(pipe, seeds, 32)[1], initial_noise(pipe, seeds[1:2], 32)[0])
    assert np.abs(together.astype(int) - one_by_one.astype(int)).max() <= 1
    assert not np.array_equal(together[0], draw(pipe, prompts[:1], [8], steps=2, guidance=5.0, size=32)[0][0])


def test_python_dash_m_erasure_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "erasure", "tiny", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "sd1" in done.stdout
