"""Sharded training: accelerate's FSDP2 on two CPU processes makes the update one process makes.

accelerate turns FSDP on only for accelerator devices, so the processes start through
tests/fsdp_on_cpu.py, which sets accelerate's state to FSDP after the Accelerator is built (read
its docstring); `prepare`, `fully_shard`, gloo's collectives and `get_state_dict` then run for real.
What is compared: the exported weights against one unsharded process (the restricted gradient's
inner products and SalUn's threshold are reduced over the slices), and a sharded resume against the
uninterrupted sharded run (checkpoints gather the slices whole, a resume cuts them again).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, RECIPES, read_weights, run_recipe
from test_distributed import train_on_two_processes

FSDP = {"FSDP_VERSION": "2"}
# Adam made linear in the gradient (ε ≫ √v), as in test_distributed: the comparison reads the
# gradients themselves, not round-off amplified where v ≈ 0.
LINEAR = dict(max_steps=4, adam_epsilon=1.0, learning_rate=1.0)


def fsdp_train(recipe: str, output_dir, succeed: bool = True, **overrides):
    args = ["--recipe", str(RECIPES / recipe)]
    for key, value in overrides.items():
        args += [f"--{key}", str(value)]
    return train_on_two_processes(args, output_dir, timeout=300, script=REPO / "tests" / "fsdp_on_cpu.py",
                                  env=FSDP, succeed=succeed)


def gap_and_move(a: dict, b: dict, base: dict) -> tuple[float, float]:
    moved = max((a[k] - base[k]).abs().max().item() for k in base)
    return max((a[k] - b[k]).abs().max().item() for k in base), moved


def test_fsdp_rgd_equals_one_process(tiny_sd1, tmp_path):
    fsdp_train("tiny/rgd.yaml", tmp_path / "fsdp", model=tiny_sd1, checkpointing_steps=0, **LINEAR)
    single = run_recipe("tiny/rgd.yaml", model=tiny_sd1, output_dir=tmp_path / "single", checkpointing_steps=0,
                        **LINEAR)
    base, sharded, one = (read_weights(p / "unet") for p in (tiny_sd1, tmp_path / "fsdp", single))
    assert sharded.keys() == one.keys()  # whole tensors, under their own names
    gap, moved = gap_and_move(sharded, one, base)
    assert moved > 1e-4 and gap < 1e-4 * moved, (gap, moved)
    card = json.loads((tmp_path / "fsdp" / "erasure.json").read_text())
    assert card["run"]["processes"] == 2


@pytest.mark.slow  # ≈ 45 s (three two-process runs): the default suite keeps FSDP's RGD test and SalUn's one-process resume
def test_fsdp_salun_resume_equals_uninterrupted(tiny_sd1, tmp_path):
    """SalUn's mask is found over the slices; a checkpoint taken under FSDP resumes bit for bit."""
    common = dict(model=tiny_sd1, checkpointing_steps=2, **LINEAR)
    fsdp_train("tiny/salun.yaml", tmp_path / "full", keep_checkpoints="true", **common)
    fsdp_train("tiny/salun.yaml", tmp_path / "resumed", resume=tmp_path / "full" / "checkpoints" / "checkpoint-2",
               **common)
    single = run_recipe("tiny/salun.yaml", output_dir=tmp_path / "single", **common)
    base, full, resumed, one = (read_weights(p / "unet") for p in (tiny_sd1, tmp_path / "full",
                                                                     tmp_path / "resumed", single))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    gap, moved = gap_and_move(full, one, base)
    assert moved > 1e-4
    # The mask is the same but for weights whose saliency ties the threshold within round-off: the
    # sharded gradient is summed in another order, so such a weight may fall on either side (measured:
    # 3 of 253,364 under one thread per process). Every other weight makes the same update.
    flipped = {k: (full[k] == base[k]) != (one[k] == base[k]) for k in base}
    assert sum(f.sum().item() for f in flipped.values()) <= 1e-4 * sum(f.numel() for f in flipped.values())
    assert all((((full[k] - one[k]).abs() < 1e-4 * moved) | flipped[k]).all() for k in base), (gap, moved)
    # the mask kept the same tensors still: exactly the unmoved ones agree between the runs
    unmoved = {k for k in base if torch.equal(one[k], base[k])}
    assert unmoved and unmoved == {k for k in base if torch.equal(full[k], base[k])}


def children_refused(launched, line: str) -> bool:
    """Both processes printed LINE and left with status 2, without a traceback of their own (the
    one after them is torchrun's report on its children)."""
    theirs = launched.stderr.split("failed (exitcode")[0]
    return (launched.returncode != 0 and theirs.count(f"erasure: error: {line}") == 2
            and "exitcode: 2" in launched.stderr and "Traceback" not in theirs)


def test_what_fsdp_does_not_support_is_refused_in_one_line(tiny_sd1, tmp_path):
    refused = fsdp_train("tiny/rgd.yaml", tmp_path / "lora", succeed=False, model=tiny_sd1, scope="lora")
    assert children_refused(refused, "scope: lora under FSDP"), refused.stderr[-2000:]
    refused = train_on_two_processes(["--recipe", str(RECIPES / "tiny/rgd.yaml"), "--model", str(tiny_sd1)],
                                     tmp_path / "v1", timeout=300, script=REPO / "tests" / "fsdp_on_cpu.py",
                                     env={"FSDP_VERSION": "1"}, succeed=False)
    assert children_refused(refused, "FSDP1 is not supported: set fsdp_version: 2"), refused.stderr[-2000:]
    assert not any((tmp_path / run / "model_index.json").exists() for run in ("lora", "v1"))


def test_deepspeed_is_refused_in_one_line(tiny_sd1, tmp_path):
    done = subprocess.run([sys.executable, "-m", "erasure", "train", "--recipe", str(RECIPES / "tiny/rgd.yaml"),
                           "--model", str(tiny_sd1), "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"})
    assert done.returncode == 2 and done.stderr.startswith("erasure: error: DeepSpeed is not supported")
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
