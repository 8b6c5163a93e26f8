"""The restricted gradient on toy vectors (RGD Theorem 4) and its global inner products."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from erasure.methods.restricted_gradient import (cosine, global_inner_products,
                                                 restricted_gradient_coefficients, update_coefficients)


def project(g_f, g_r):
    dot, ff, rr = float(g_f @ g_r), float(g_f @ g_f), float(g_r @ g_r)
    (a, b), (c, d) = restricted_gradient_coefficients(dot, ff, rr)
    return a * g_f + b * g_r, c * g_f + d * g_r


def conflicting_pair(seed):
    g = torch.Generator().manual_seed(seed)
    g_f, g_r = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g, dtype=torch.float64)
    return (g_f, g_r) if g_f @ g_r < 0 else (g_f, -g_r)


@pytest.mark.parametrize("seed", range(5))
def test_each_part_is_orthogonal_to_the_others_original_gradient(seed):
    g_f, g_r = conflicting_pair(seed)
    delta_f, delta_r = project(g_f, g_r)
    assert abs(float(delta_f @ g_r)) < 1e-10 * g_f.norm() * g_r.norm()
    assert abs(float(delta_r @ g_f)) < 1e-10 * g_f.norm() * g_r.norm()
    assert not torch.allclose(delta_f, g_f) and not torch.allclose(delta_r, g_r)


def test_no_change_without_conflict():
    g_f, g_r = conflicting_pair(0)
    g_r = -g_r  # now <g_f, g_r> > 0
    delta_f, delta_r = project(g_f, g_r)
    assert torch.equal(delta_f, g_f) and torch.equal(delta_r, g_r)
    assert update_coefficients(float(g_f @ g_r), 1.0, 1.0, 1.5, restricted=True) == (1.0, 1.5)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("retain_weight", [0.5, 1.5, 5.0])
def test_both_losses_decrease_to_first_order(seed, retain_weight):
    """Descending along u = δ_f + λ δ_r changes loss k by −η <g_k, u> to first order: both < 0."""
    g_f, g_r = conflicting_pair(seed)
    a, b = update_coefficients(float(g_f @ g_r), float(g_f @ g_f), float(g_r @ g_r), retain_weight, True)
    update = a * g_f + b * g_r
    assert float(g_f @ update) > 0 and float(g_r @ update) > 0


def test_quadratic_losses_both_decrease_after_a_small_step():
    target_f, target_r = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.2])
    theta = torch.zeros(2, dtype=torch.float64)
    loss_f = lambda t: ((t - target_f) ** 2).sum()
    loss_r = lambda t: ((t - target_r) ** 2).sum()
    g_f, g_r = 2 * (theta - target_f), 2 * (theta - target_r)
    assert g_f @ g_r < 0
    a, b = update_coefficients(float(g_f @ g_r), float(g_f @ g_f), float(g_r @ g_r), 1.0, True)
    new = theta - 1e-3 * (a * g_f + b * g_r)
    assert loss_f(new) < loss_f(theta) and loss_r(new) < loss_r(theta)


def test_zero_norms_are_guarded():
    g = torch.tensor([1.0, -2.0, 0.0, 3.0])
    assert restricted_gradient_coefficients(0.0, 0.0, float(g @ g)) == ((1.0, 0.0), (0.0, 1.0))
    # round-off can make d slightly negative while a norm is 0: no division by zero
    (a, b), (c, d) = restricted_gradient_coefficients(-1e-30, 0.0, 0.0)
    assert all(map(lambda v: v == v and abs(v) < float("inf"), (a, b, c, d)))
    assert cosine(0.0, 0.0, 1.0) == 0.0


def test_inner_products_over_tensors_equal_the_flattened_ones():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 2, 2)]
    g_f = [torch.randn(s, generator=g) for s in shapes]
    g_r = [torch.randn(s, generator=g) for s in shapes]
    flat_f, flat_r = torch.cat([t.flatten() for t in g_f]).double(), torch.cat([t.flatten() for t in g_r]).double()
    dot, ff, rr = global_inner_products(g_f, g_r)
    assert dot == pytest.approx(float(flat_f @ flat_r), rel=1e-6)
    assert ff == pytest.approx(float(flat_f @ flat_f), rel=1e-6)
    assert rr == pytest.approx(float(flat_r @ flat_r), rel=1e-6)


def _sharded_worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    full_f, full_r = torch.randn(10, generator=g), torch.randn(10, generator=g)
    shard = slice(0, 6) if rank == 0 else slice(6, 10)  # each process holds part of the gradient
    result = global_inner_products([full_f[shard]], [full_r[shard]], sharded=True)
    queue.put((rank, result, (float(full_f @ full_r), float(full_f @ full_f), float(full_r @ full_r))))
    dist.destroy_process_group()


def test_sharded_partial_sums_are_all_reduced():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_sharded_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for _ in range(2):
        rank, got, want = queue.get()
        assert got == pytest.approx(want, rel=1e-5), rank
