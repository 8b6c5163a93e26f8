"""Resumable training state, in safetensors and JSON only (no pickle is ever loaded).

accelerate's `save_state` pickles the optimizer and RNG states; ours stores the trainable weights,
the optimizer's tensors and any SalUn mask as safetensors, and the rest (step, learning-rate
schedule, loss scaler, recipe) as JSON. RNG state is not needed: every step's randomness is drawn
from a generator seeded by (seed, step), so a resumed run draws what the uninterrupted one drew.
Checkpoints are written to a temporary folder and renamed, so a kill never leaves a half one.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from erasure.atomic import replace_folder
from erasure.errors import DataError, one_line

PATTERN = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(root: Path) -> list[Path]:
    found = [p for p in Path(root).glob("checkpoint-*") if PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def _split_optimizer_state(state: dict):
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value.contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(root: Path, step: int, weights: dict[str, torch.Tensor], optimizer_state: dict, lr_scheduler,
                    scaler, extra_tensors: dict[str, torch.Tensor], record: dict,
                    total_limit: int | None) -> Path:
    """``optimizer_state``: the optimizer's state_dict with whole tensors (erasure.sharding.whole)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=root))
    tmp.chmod(0o755)
    opt_tensors, opt_json = _split_optimizer_state(optimizer_state)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, tmp / "trainable.safetensors")
    save_file({k: v.cpu() for k, v in {**opt_tensors, **extra_tensors}.items()}, tmp / "optimizer.safetensors")
    state = {"step": step, "optimizer": opt_json, "lr_scheduler": lr_scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None, **record}
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=float))
    target = root / f"checkpoint-{step}"
    replace_folder(tmp, target)
    if total_limit:
        for old in checkpoints(root)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(folder: Path, optimizer, lr_scheduler, scaler, place=None):
    """Restores optimizer, schedule and scaler in place; returns (state, weights, extra tensors).
    ``place(index, tensor)`` lays a whole optimizer tensor out as parameter ``index`` is (sharded)."""
    folder = Path(folder)
    if not (folder / "state.json").is_file():
        raise DataError(f"resume: {folder} is not a checkpoint (no state.json)")
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(folder / "trainable.safetensors")
        stored = load_file(folder / "optimizer.safetensors")
        if not isinstance(state, dict) or "optimizer" not in state:
            raise ValueError("state.json is not a checkpoint's state")
    except (OSError, ValueError, SafetensorError) as e:  # truncated or edited by hand
        raise DataError(f"resume: checkpoint {folder} is damaged ({one_line(e)}); delete it to resume from "
                        "an earlier one, or start over without --resume") from None
    per_param: dict[int, dict] = {}
    extra = {}
    for key, value in stored.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = place(int(index), value) if place else value
        else:
            extra[key] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        per_param.setdefault(int(index), {}).update(scalars)
    groups = state["optimizer"]["param_groups"]
    for group in groups:  # JSON turned tuples (Adam's betas) into lists
        for key, value in group.items():
            if isinstance(value, list) and key != "params":
                group[key] = tuple(value)
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return state, weights, extra
