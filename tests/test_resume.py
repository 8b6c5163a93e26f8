"""A training process killed mid-run and resumed ends at the same weights, bit for bit (CPU)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import RECIPES, read_weights, run_recipe

STEPS = 40


@pytest.mark.parametrize("method", ["rgd", "salun"])
def test_kill_and_resume_equals_uninterrupted(method, tiny_sd1, tmp_path):
    common = dict(model=tiny_sd1, max_steps=STEPS, checkpointing_steps=2, checkpoints_total_limit=2)
    uninterrupted = run_recipe(f"tiny/{method}.yaml", output_dir=tmp_path / "full", **common)

    killed = tmp_path / "killed"
    argv = [sys.executable, "-m", "erasure.cli", "train", "--recipe", str(RECIPES / f"tiny/{method}.yaml"),
            "--output_dir", str(killed)]
    for key, value in common.items():
        argv += [f"--{key}", str(value)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "checkpoint-4").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model_index.json").exists()  # it really was cut short

    resumed = run_recipe(f"tiny/{method}.yaml", output_dir=killed, resume="latest", **common)
    a, b = read_weights(uninterrupted / "unet"), read_weights(resumed / "unet")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_recipe(tiny_sd1, tmp_path):
    run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "o", max_steps=4, checkpointing_steps=2,
               keep_checkpoints=True)
    assert (tmp_path / "o" / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match=r"learning_rate"):
        run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "o", max_steps=4,
                   checkpointing_steps=2, resume="latest", learning_rate=0.5)
