"""Reading weights a user points at (CLIP checkpoints, FID Inception weights): tensors only.

safetensors where possible; otherwise torch.load with weights_only=True, which refuses pickled code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint file; `what` names it in errors ("CLIP checkpoint", …)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:  # noqa: BLE001 - any parse failure means an unreadable file
            raise RuntimeError(f"could not read the {what} {path}: {error}") from error
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - includes weights_only's refusal of pickled code
            raise RuntimeError(
                f"could not read the {what} {path} with torch.load(weights_only=True) "
                f"(only plain tensor checkpoints are accepted; .safetensors is preferred): {error}"
            ) from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RuntimeError(f"the {what} {path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from a DataParallel wrapper
        state = {key[len("module."):]: value for key, value in state.items()}
    return state
