"""SalUn's weight saliency mask (Fan et al. 2024, eq. 5).

saliency = |Σ ∇ l_f| accumulated over the forget set; the top `ratio` of weights, ranked globally
over all trainable tensors, are updated and the rest stay at their base values. The global threshold
is found by bisection on counts, so no flattened copy of the model is made.
"""

from __future__ import annotations

import torch


def global_threshold(tensors: list[torch.Tensor], ratio: float, iterations: int = 60) -> float:
    """The value t such that a share `ratio` of all elements is ≥ t (to bisection precision)."""
    total = sum(t.numel() for t in tensors)
    keep = max(1, int(round(ratio * total)))
    lo, hi = 0.0, max(float(t.max()) for t in tensors)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        count = sum(int((t >= mid).sum()) for t in tensors)
        if count >= keep:
            lo = mid
        else:
            hi = mid
    return lo


def saliency_mask(gradient_sums: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Boolean masks, one per tensor, selecting the top `ratio` of |Σ ∇ l_f| globally."""
    saliency = [g.abs() for g in gradient_sums]
    if ratio >= 1:
        return [torch.ones_like(s, dtype=torch.bool) for s in saliency]
    threshold = global_threshold(saliency, ratio)
    return [s >= threshold for s in saliency]
