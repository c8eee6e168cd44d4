"""Context parallelism on real gloo process groups (P = 1, 2, 3, 4, 8): every rank's output and
its share of the gradients of q, k, v, g, beta, level_scales and the initial state equal the
single-process float64 result, for both variants, both schemes and every document layout of
``test_cp.cases``; and the bytes a rank sends (forward and backward) do not depend on T.

Starting processes dominates the cost, so each world size is one spawn that runs every check.
"""

import random

import pytest
import torch
import torch.distributed as dist

from ctxpar.comm.collectives import comm_stats, reset_comm_stats
from ctxpar.cp import SCHEMES, CPContext
from tests.distributed import run_distributed
from tests.factories import rel_err
from tests.test_cp import TOL, VARIANTS, H, K, V, cases, inputs, leaves, op, reference


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_cp_on_gloo(world_size):
    seed = random.randrange(2**31)
    print(f"seed={seed}")
    run_distributed(check_world, world_size, seed)


def check_world(seed):
    P = dist.get_world_size()
    torch.manual_seed(seed)
    for variant in VARIANTS:
        for scheme in SCHEMES:
            for _, n, cu, B in cases(P):
                check_rank(variant, scheme, n, cu, B)
            check_rank(variant, scheme, 64, [0, 20, 64 * P], 1, init=(9, 300))
            check_two_layers_and_one_requested_input(variant, scheme)
            check_bytes_do_not_depend_on_T(variant, scheme)


def check_rank(variant, scheme, n, cu, B, init=None, backend="torch", dims=(H, K, V), tol=TOL):
    """This rank's output and gradient shares vs one process (float64, torch backend), the rank
    running ``backend``."""
    rank, P = dist.get_rank(), dist.get_world_size()
    xs, state = inputs(variant, B, P * n, init, dims)  # the same draw on every rank
    do = torch.randn(B, P * n, dims[0], dims[2], dtype=torch.float64)
    o_ref, grads_ref = reference(variant, xs, state, cu, do)

    mine = own_leaves(xs, rank, n)
    my_state = None if state is None else type(state)(state.buckets.detach().clone().requires_grad_(), state.positions)
    o, _ = op(variant, mine, backend, cu_seqlens=cu, initial_state=my_state, cp=CPContext(None, cu, scheme))
    grads = torch.autograd.grad((o * mine_of(do, rank, n)).sum(), leaves(mine, my_state))
    assert rel_err(o, mine_of(o_ref, rank, n)) < tol, (variant, scheme, cu)
    sliced_ref = [mine_of(x, rank, n) for x in grads_ref[: len(mine) - mine.count(None)]]
    for got, want in zip(grads, sliced_ref):
        assert rel_err(got, want) < tol, (variant, scheme, cu)
    if state is not None:  # each document's state is consumed (and differentiated) on one rank
        total = grads[-1].clone()
        dist.all_reduce(total)
        assert rel_err(total, grads_ref[-1]) < tol, (variant, scheme, cu)


def test_cp_over_triton_kernels():
    """The CP op over the Triton kernels of both variants (interpreted on CPU, float32 inside),
    3 ranks: each rank's summary is its local op's final state, so the incoming state's gradient
    must reach the sender's kernel backward through that output. A document crossing two
    boundaries, one cut mid-slice, and an initial state entering on rank 0."""
    run_distributed(check_triton, 3, random.randrange(2**31))


def check_triton(seed):
    torch.manual_seed(seed)
    for variant in VARIANTS:
        for cu, init in ((None, None), ([0, 100, 150, 192], (70, 0, 3))):
            check_rank(variant, "allgather", 64, cu, 1, init, backend="triton", dims=(2, 16, 16), tol=1e-5)


def check_two_layers_and_one_requested_input(variant, scheme):
    """Two chained CP ops (the second's values are the first's output), differentiated for v alone:
    backward must still run every collective on every rank, in the same order."""
    rank, P, n = dist.get_rank(), dist.get_world_size(), 64
    cu = [0, 30, 64 * P - 1, 64 * P] if P > 1 else None
    xs, _ = inputs(variant, 1, P * n, None)

    def two_layers(xs, **kwargs):
        o, _ = op(variant, xs, cu_seqlens=cu, **kwargs)
        return op(variant, [*xs[:2], o, *xs[3:]], cu_seqlens=cu, **kwargs)[0]

    o_ref = two_layers(xs)
    (grad_ref,) = torch.autograd.grad(o_ref.square().sum(), xs[2])
    mine = own_leaves(xs, rank, n)
    o = two_layers(mine, cp=CPContext(None, cu, scheme))
    (grad,) = torch.autograd.grad(o.square().sum(), mine[2])
    assert rel_err(o, mine_of(o_ref, rank, n)) < TOL, (variant, scheme)
    assert rel_err(grad, mine_of(grad_ref, rank, n)) < TOL, (variant, scheme)


def mine_of(x, rank, n):
    return x[:, rank * n : (rank + 1) * n]


def own_leaves(xs, rank, n):
    """This rank's slice of the global inputs, as its own leaves."""
    return [None if x is None else mine_of(x, rank, n).detach().clone().requires_grad_() for x in xs]


def check_bytes_do_not_depend_on_T(variant, scheme):
    rank, P = dist.get_rank(), dist.get_world_size()
    sent = []
    for n in (64, 256):
        xs, _ = inputs(variant, 1, P * n, None)
        mine = own_leaves(xs, rank, n)
        reset_comm_stats()
        o, _ = op(variant, mine, cp=CPContext(None, None, scheme))
        o.square().sum().backward()
        sent.append(comm_stats())
    assert sent[0] == sent[1], (variant, scheme, sent)
    assert (sent[0] > 0) == (P > 1)
