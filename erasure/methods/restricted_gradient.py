"""The restricted gradient (RGD, Ko, Li et al., Theorem 4; for two tasks it is PCGrad, Yu et al. 2020).

With d = <g_f, g_r>, when the forget and retain gradients conflict (d < 0) each is projected onto
the normal plane of the other's ORIGINAL gradient:

    δ_f = g_f - d/‖g_r‖² · g_r        δ_r = g_r - d/‖g_f‖² · g_f
    update = δ_f + λ δ_r

so that, to first order, a step along the update lowers both losses. Both parts are linear in
(g_f, g_r): the update is a·g_f + b·g_r with scalar a, b, which is how it is applied in place,
without a flattened copy of the model and without a buffer beyond the one holding g_f.
"""

from __future__ import annotations

import torch

from erasure.sharding import all_reduce_sum


def restricted_gradient_coefficients(dot: float, ff: float, rr: float):
    """Coefficients of δ_f = c[0][0] g_f + c[0][1] g_r and δ_r = c[1][0] g_f + c[1][1] g_r.

    dot = <g_f, g_r>, ff = ‖g_f‖², rr = ‖g_r‖². A zero norm means there is nothing to project
    against (and no conflict: d = 0), which the `> 0` guards make explicit for round-off."""
    if dot >= 0:
        return (1.0, 0.0), (0.0, 1.0)
    return (1.0, -dot / rr if rr > 0 else 0.0), (-dot / ff if ff > 0 else 0.0, 1.0)


def update_coefficients(dot: float, ff: float, rr: float, retain_weight: float, restricted: bool):
    """(a, b) such that the update is a·g_f + b·g_r: δ_f + λ δ_r, or g_f + λ g_r when summed."""
    if not restricted:
        return 1.0, retain_weight
    (ff_c, fr_c), (rf_c, rr_c) = restricted_gradient_coefficients(dot, ff, rr)
    return ff_c + retain_weight * rf_c, fr_c + retain_weight * rr_c


def global_inner_products(g_f: list[torch.Tensor], g_r: list[torch.Tensor], sharded: bool = False):
    """<g_f, g_r>, ‖g_f‖², ‖g_r‖² as sums over parameter tensors (per-tensor partials summed in
    float64; one fused kernel for the norms, one dot per tensor, no flattened copy of the model).

    Under sharded training (FSDP) each process holds a slice of every gradient, so the per-shard
    partial sums are all-reduced; under DDP gradients are already identical on every process."""
    if not g_f:
        return 0.0, 0.0, 0.0
    dots = torch.stack([torch.dot(f.reshape(-1), r.reshape(-1)) for f, r in zip(g_f, g_r)])
    norms_f, norms_r = torch.stack(torch._foreach_norm(g_f)), torch.stack(torch._foreach_norm(g_r))
    sums = torch.stack([dots.double().sum(), norms_f.double().pow(2).sum(), norms_r.double().pow(2).sum()])
    dot, ff, rr = all_reduce_sum(sums, sharded).tolist()
    return dot, ff, rr


def cosine(dot: float, ff: float, rr: float) -> float:
    return dot / (ff * rr) ** 0.5 if ff > 0 and rr > 0 else 0.0
