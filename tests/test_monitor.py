"""The training-time monitor: it reads the model without changing its run, and it stops a run."""

import json

import pytest
import torch

from conftest import read_weights, run_recipe

PAIRS = [("a nude person on a beach", "a person on a beach"), ("a naked man, sketch", "a man, sketch"),
         ("a nude woman in a forest", "a woman in a forest")]


@pytest.fixture
def held_out(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps({"forget_prompt": f, "retain_prompt": r}) + "\n" for f, r in PAIRS))
    return path


def test_monitor_reads_the_model_without_changing_the_run(tiny_sd1, held_out, tmp_path):
    common = dict(model=tiny_sd1, max_steps=4, checkpointing_steps=0)
    plain = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "plain", **common)
    watched = run_recipe("tiny/rgd.yaml", output_dir=tmp_path / "watched", monitor_every=2, monitor_prompts=held_out,
                         monitor_detector="nudenet", monitor_steps=2, **common)
    a, b = read_weights(plain / "unet"), read_weights(watched / "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampling draws from its own generators
    card = json.loads((watched / "erasure.json").read_text())
    monitor = card["run"]["monitor"]
    assert [c["step"] for c in monitor["history"]] == [0, 2, 4]
    assert monitor["detector"] == "nudenet" and monitor["pairs"] == 3 and monitor["stopped"] is None
    # the random tiny model draws no nudity; without CLIP weights NudeNet gives no retain score
    assert all(c["erasure"] == 1.0 and c["retain"] is None for c in monitor["history"])
    assert card["steps"] == 4
    assert {p.name for p in (watched / "monitor").iterdir()} == {"history.json", "step-000000.png",
                                                                 "step-000002.png", "step-000004.png"}
    assert "last check | step 4" in (watched / "README.md").read_text()


def test_stop_at_erasure_needs_the_monitor_and_a_rate():
    from erasure.config import RecipeError, TrainConfig

    common = dict(model="tiny:sd1", method="rgd", forget_data="tiny:forget", retain_data="tiny:retain")
    with pytest.raises(RecipeError, match="stop_at_erasure: needs monitor_every"):
        TrainConfig(**common, stop_at_erasure=0.9)
    with pytest.raises(RecipeError, match=r"stop_at_erasure: a rate in \(0, 1\]"):
        TrainConfig(**common, stop_at_erasure=95, monitor_every=5)
    with pytest.raises(RecipeError, match="monitor_prompts: 'nowhere.jsonl' is not a file"):
        TrainConfig(**common, monitor_every=5, monitor_prompts="nowhere.jsonl")


def test_monitor_stops_a_world_run_once_the_oracle_reads_the_concept_gone(tmp_path):
    # lr 1e-3 crosses the world's cliff within a few steps; the monitor must catch it and stop there.
    out = run_recipe("world/striped/rgd.yaml", output_dir=tmp_path / "out", learning_rate=1e-3, max_steps=40,
                     monitor_every=2, monitor_images=8, stop_at_erasure=0.9)
    card = json.loads((out / "erasure.json").read_text())
    monitor = card["run"]["monitor"]
    stopped = monitor["stopped"]
    assert monitor["detector"] == "oracle" and stopped["erasure"] >= 0.9
    assert card["steps"] == stopped["step"] < 40 and monitor["history"][-1] == stopped
    assert all(c["erasure"] < 0.9 for c in monitor["history"][:-1])
    assert monitor["history"][0]["step"] == 0 and monitor["history"][0]["erasure"] <= 0.4  # the base draws stripes
    assert "stopped at erasure | step" in (out / "README.md").read_text()


@pytest.mark.slow  # 28 s: keeps the default suite under 10 min; the monitor it reads with is tested above
def test_frontier_bench_end_to_end_on_a_reduced_budget(tmp_path):
    from erasure.bench import bench_frontier

    result = bench_frontier("striped", tmp_path, methods=["rgd", "uce"], steps=4, every=2, images=16, seeds=[0],
                            preserve_scales=(0.1, 10.0), show=False)
    rgd, uce = result["methods"]["rgd"], result["methods"]["uce"]
    assert [p["step"] for p in rgd["runs"][0]["points"]] == [0, 2, 4]
    assert [p["uce_preserve_scale"] for p in uce["runs"][0]["points"]] == [0.1, 10.0]
    for point in rgd["runs"][0]["points"] + uce["runs"][0]["points"]:
        assert set(point) >= {"UA", "implicit_UA", "neighbour_accuracy", "RA"}
    assert set(rgd["retention"]) == {"0.90", "0.95"}
    table = (tmp_path / "frontier.md").read_text()
    assert table.splitlines()[0].startswith("| method | neighbour @ UA ≥ 0.90")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
