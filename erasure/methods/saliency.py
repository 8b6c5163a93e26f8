"""SalUn's weight saliency mask (Fan et al. 2024, eq. 5).

saliency = |Σ ∇ l_f| accumulated over the forget set; the top `ratio` of weights, ranked globally
over all trainable tensors, are updated and the rest stay at their base values. The global threshold
is found by bisection on counts, so no flattened copy of the model is made; under FSDP each process
holds a slice of every tensor and the counts (and the maximum) are summed over processes, so every
process finds the same threshold.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from erasure.sharding import all_reduce_sum


def global_threshold(tensors: list[torch.Tensor], ratio: float, iterations: int = 60,
                     sharded: bool = False) -> float:
    """The value t such that a share `ratio` of all elements is ≥ t (to bisection precision)."""
    def summed(values: list[int]) -> list[int]:
        return all_reduce_sum(torch.tensor(values, dtype=torch.int64, device=tensors[0].device), sharded).tolist()

    total, = summed([sum(t.numel() for t in tensors)])
    keep = max(1, int(round(ratio * total)))
    top = torch.stack([t.max() if t.numel() else t.new_zeros(()) for t in tensors]).max().double()
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    lo, hi = 0.0, float(top)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        count, = summed([sum(int((t >= mid).sum()) for t in tensors)])
        if count >= keep:
            lo = mid
        else:
            hi = mid
    return lo


def saliency_mask(gradient_sums: list[torch.Tensor], ratio: float, sharded: bool = False) -> list[torch.Tensor]:
    """Boolean masks, one per tensor (or per local slice, ``sharded``), selecting the top `ratio` of
    |Σ ∇ l_f| over the whole model."""
    saliency = [g.abs() for g in gradient_sums]
    if ratio >= 1:
        return [torch.ones_like(s, dtype=torch.bool) for s in saliency]
    threshold = global_threshold(saliency, ratio, sharded=sharded)
    return [s >= threshold for s in saliency]
