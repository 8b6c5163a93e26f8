"""Two CPU processes do what one does: the same DDP update, the same images, the same scores.

The two processes are started by torchrun with ACCELERATE_USE_CPU=true, accelerate's multi-CPU path
without MPI: in accelerate 1.15 `accelerate launch --cpu --num_processes 2` starts a single process
unless an MPI host file is configured, which would make this test compare a run with itself.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from diffusers import DiffusionPipeline

from conftest import REPO, RECIPES, TINY_CLIP_CONFIG, read_weights, run_recipe


def torchrun() -> list[str]:
    """The arguments that start what follows them as two processes on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(port)]


def train_on_two_processes(args: list[str], output_dir, timeout: int, script=REPO / "erasure" / "train.py",
                           env: dict | None = None, succeed: bool = True) -> subprocess.CompletedProcess:
    """SCRIPT ARGS (erasure/train.py) under torchrun, two CPU processes."""
    launched = subprocess.run(
        [sys.executable, *torchrun(), str(script), *args, "--output_dir", str(output_dir)],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "ACCELERATE_USE_CPU": "true", **(env or {})})
    if succeed:
        assert launched.returncode == 0, launched.stderr[-3000:]
    return launched


def test_two_process_ddp_equals_one_process(tiny_sd1, tmp_path):
    # With ε ≫ √v Adam's step is lr·m/ε, linear in the gradient, so the comparison measures the
    # gradients themselves; with ε = 1e-8 it would amplify round-off in near-zero elements.
    linear = dict(max_steps=3, checkpointing_steps=0, adam_epsilon=1.0, learning_rate=1.0)
    args = ["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--model", str(tiny_sd1)]
    for key, value in linear.items():
        args += [f"--{key}", str(value)]
    launched = train_on_two_processes(args, tmp_path / "ddp", timeout=240)
    assert "2 processes" in launched.stdout + launched.stderr
    single = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "single", **linear)
    base, ddp, one = (read_weights(p / "unet") for p in (tiny_sd1, tmp_path / "ddp", single))
    moved = max((one[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-4
    # Equal up to float reassociation: each process averages half the batch, DDP averages the two.
    gap = max((ddp[k] - one[k]).abs().max().item() for k in base)
    assert gap < 1e-4 * moved, (gap, moved)
    assert DiffusionPipeline.from_pretrained(tmp_path / "ddp") is not None


def test_gradient_accumulation_equals_the_full_batch(tiny_sd1, tmp_path):
    common = dict(model=tiny_sd1, max_steps=3, checkpointing_steps=0, adam_epsilon=1.0, learning_rate=1.0)
    full = run_recipe("tiny/rg.yaml", output_dir=tmp_path / "full", **common)
    accumulated = run_recipe("tiny/rg.yaml", output_dir=tmp_path / "acc", gradient_accumulation_steps=2, **common)
    base, a, b = (read_weights(p / "unet") for p in (tiny_sd1, full, accumulated))
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    assert max((a[k] - b[k]).abs().max().item() for k in base) < 1e-4 * moved


def test_monitor_under_two_processes_scores_what_one_process_scores(tmp_path):
    """Each rank samples its share of the check's captions; the oracle's readings are gathered, so
    both runs score the same 24 images of the base world at step 0."""
    watch = dict(max_steps=2, checkpointing_steps=0, monitor_every=2, monitor_prompts="world:all+aliases",
                 monitor_images=24)
    args = ["--recipe", str(RECIPES / "world/striped/rgd.yaml")]
    for key, value in watch.items():
        args += [f"--{key}", str(value)]
    single = run_recipe("world/striped/rgd.yaml", output_dir=tmp_path / "single", **watch)
    train_on_two_processes(args, tmp_path / "ddp", timeout=400)
    one, two = (json.loads((p / "erasure.json").read_text())["run"]["monitor"]["history"]
                for p in (single, tmp_path / "ddp"))
    assert [c["step"] for c in one] == [c["step"] for c in two] == [0, 2]
    assert one[0] == two[0]  # the base world: the same images, read the same
    assert set(one[0]["world"]) >= {"UA", "implicit_UA", "neighbour_accuracy", "RA"}


def test_data_generate_on_two_processes_equals_one_process_byte_for_byte(tiny_sd1, tmp_path):
    """Each process draws every second batch; the batches are the same as one process's, so the images are too."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(f'{{"forget_prompt": "a nude person {i}", "retain_prompt": "a person {i}"}}\n'
                             for i in range(5)))
    common = ["-m", "erasure", "data", "generate", "--prompts", str(pairs), "--model", str(tiny_sd1), "--steps", "2",
              "--size", "32", "--batch-size", "2"]
    # One CPU thread each (torchrun's default for several processes): a CPU kernel's summation order,
    # and so a pixel's last bit, depends on the thread count, not on the number of processes.
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for run, launcher in (("two", torchrun()), ("one", [])):
        done = subprocess.run([sys.executable, *launcher, *common, "--out", str(tmp_path / run)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("2 processes; main's share shown" in done.stderr) == (run == "two")  # really split
    for side in ("forget", "retain"):
        one, two = (sorted(p.name for p in (tmp_path / run / side).iterdir()) for run in ("one", "two"))
        assert one == two and len(one) == 6  # five PNGs and metadata.jsonl
        for name in one:
            assert (tmp_path / "one" / side / name).read_bytes() == (tmp_path / "two" / side / name).read_bytes()


def test_scoring_is_dealt_out_in_turn_and_gathered_in_order(tmp_path):
    """`score_in_shares` under two processes: each scores every second part, every process gets all
    results in the items' order, and a process with no part of its own still joins the gathering."""
    script = tmp_path / "shares.py"
    script.write_text(  # each process writes its own file: the two share one stdout, line by line or not
        "import json, sys\n"
        "from erasure.eval.runner import score_in_shares\n"
        "from erasure.generation import process_state\n"
        "state = process_state()\n"
        "scored = score_in_shares(lambda part: [(item, state.process_index) for item in part], list(range(7)), 2,\n"
        "                         state)\n"
        "alone = score_in_shares(lambda part: [state.process_index for _ in part], ['only'], 4, state)\n"
        "with open(f'{sys.argv[1]}/{state.process_index}.json', 'w') as f:\n"
        "    json.dump({'scored': scored, 'alone': alone}, f)\n"
        "from erasure.cli import close_process_group\n"
        "close_process_group()  # as the commands do\n")
    done = subprocess.run([sys.executable, *torchrun(), str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for run in runs:  # parts [0, 1], [2, 3], [4, 5], [6] go to processes 0, 1, 0, 1
        assert run["scored"] == [[0, 0], [1, 0], [2, 1], [3, 1], [4, 0], [5, 0], [6, 1]]
        assert run["alone"] == [0]


@pytest.mark.slow  # ≈ 50 s: the default suite keeps two-process drawing (data generate) and scoring (the monitor)
def test_eval_on_two_processes_equals_one_process(tiny_sd1, tmp_path):
    """Both processes draw and score their shares (the blank check, NudeNet, CLIP alignment and the
    micro world's oracle, each in parts dealt out in turn): the same images, byte for byte, the same
    NudeNet record and the same report as one process."""
    clip = tmp_path / "tiny-clip"  # open_clip reads a model from a folder; random weights, as in test_eval_clip
    clip.mkdir()
    (clip / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"include": str(REPO / "eval/micro-striped.yaml"),
                                     "generation": {"size": 32, "batch_size": 24},
                                     "metrics": {"nudenet": {}, "clip_alignment": {"model": f"local-dir:{clip}",
                                                                                   "pretrained": None}}}))
    # 72 images a model: NudeNet's parts of 8, CLIP's of 32 and the oracle's of 64 each go to both processes.
    # Four sampler steps: rough pictures, as deterministic as twenty.
    common = ["-m", "erasure", "eval", "--suite", str(suite), "--model", "world:micro", "--model", str(tiny_sd1),
              "--limit", "72", "--steps", "4"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}  # as in the test above
    for run, launcher in (("two", torchrun()), ("one", [])):
        done = subprocess.run([sys.executable, *launcher, *common, "--out", str(tmp_path / run)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("## NudeNet") == 1  # one report, printed by the main process
    for model in ("0-world-micro", "1-sd1"):
        files = {run: {p.name: p.read_bytes() for p in (tmp_path / run / "images" / model).iterdir()
                       if p.suffix in (".png", ".jsonl")} for run in ("one", "two")}
        assert len(files["one"]) == 74 and files["one"] == files["two"]  # images, metadata and NudeNet's record
    reports = [json.loads((tmp_path / run / "report.json").read_text())["models"] for run in ("one", "two")]
    assert reports[0] == reports[1]
    world, sd1 = reports[0]
    assert world["metrics"]["micro_world"]["forget_images"] > 0
    assert sd1["metrics"]["micro_world"]["frechet_to_first"] > 0  # the first model's features, gathered too
    assert world["metrics"]["clip_alignment"]["n"] == 72 and world["metrics"]["nudenet"]["images"] == 72
