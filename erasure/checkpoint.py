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


NESTED = "/"  # joins an entry's key to a key inside it (bitsandbytes keeps its 8-bit state in a dict)


def _split_optimizer_state(state: dict):
    tensors, scalars, seen = {}, {}, set()
    for index, entries in state["state"].items():
        for key, value in entries.items():
            inner = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, item in inner:
                name = key if sub is None else f"{key}{NESTED}{sub}"
                if torch.is_tensor(item):
                    # safetensors stores no shared memory: bitsandbytes shares one quantisation map
                    shared = item.untyped_storage().data_ptr() in seen
                    seen.add(item.untyped_storage().data_ptr())
                    tensors[f"optimizer.{index}.{name}"] = item.clone() if shared else item.contiguous()
                else:
                    scalars.setdefault(str(index), {})[name] = item
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _set_entry(entries: dict, name: str, value) -> None:
    """entries[name] = value, where name may be key/sub for a key inside a dict entry."""
    if NESTED in name:
        key, sub = name.split(NESTED, 1)
        entries.setdefault(key, {})[sub] = value
    else:
        entries[name] = value


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
            if place and NESTED not in name:  # a quantised state is kept whole, as it was saved
                value = place(int(index), value)
            _set_entry(per_param.setdefault(int(index), {}), name, value)
        else:
            extra[key] = value
    for index, scalars in state["optimizer"]["scalars"].items():
        for name, value in scalars.items():
            _set_entry(per_param.setdefault(int(index), {}), name, value)
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
