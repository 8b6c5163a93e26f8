"""Trainable tensors under FSDP2, seen from one process.

accelerate's FSDP2 (`fully_shard`) turns every parameter of the denoiser into a DTensor: each process
holds one slice along dim 0, and so do the gradient and the optimizer's moments. The update rules
work on this process's slice (`local`) and all-reduce the few scalars they need over the whole model
(the restricted gradient's inner products, SalUn's threshold counts). Checkpoints and the export hold
whole tensors: `whole` gathers one (every process must call it, in the same order) and
`shard_like` cuts a whole tensor back as a parameter is cut. Without FSDP every
tensor is whole and all three are the identity, so the training code has one path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch without DTensor cannot run FSDP2 either
    DTensor = distribute_tensor = None


def is_sharded(tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice (it shares storage: in-place changes reach the parameter or gradient)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (an all-gather under FSDP: collective)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def whole_from_local(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A local slice shaped like parameter ``like``'s (a SalUn mask), gathered whole (collective)."""
    if not is_sharded(like):
        return piece
    return DTensor.from_local(piece, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as parameter ``like`` is cut (a DTensor, as the optimizer's moments are), or
    ``full`` itself when ``like`` is whole or is not shaped like it (Adam's step count)."""
    if not is_sharded(like) or full.shape != like.shape:
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


def all_reduce_sum(values: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Sums over processes the partial sums each computed on its slices (in place, returned)."""
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values
