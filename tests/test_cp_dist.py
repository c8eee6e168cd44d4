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
from tests.test_cp import TOL, VARIANTS, H, K, V, cases, inputs, leaves, op, prefix_final_state, reference


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


def check_rank(variant, scheme, n, cu, B, init=None, backend="torch", dims=(H, K, V), tol=TOL, lengths=None):
    """This rank's output, gradient shares and final state vs one process (float64, torch
    backend), the rank running ``backend`` on ``lengths[rank]`` tokens (default ``n`` each)."""
    rank, P = dist.get_rank(), dist.get_world_size()
    lengths = lengths or [n] * P
    part = share(rank, lengths)
    xs, state = inputs(variant, B, sum(lengths), init, dims)  # the same draw on every rank
    do = torch.randn(B, sum(lengths), dims[0], dims[2], dtype=torch.float64)
    o_ref, grads_ref = reference(variant, xs, state, cu, do)

    mine = own_leaves(xs, part)
    my_state = None if state is None else type(state)(state.buckets.detach().clone().requires_grad_(), state.positions)
    cp = CPContext(None, cu, scheme, slice_lengths=lengths)
    o, final = op(variant, mine, backend, cu_seqlens=cu, initial_state=my_state, output_final_state=True, cp=cp)
    grads = torch.autograd.grad((o * do[:, part]).sum(), leaves(mine, my_state))
    assert rel_err(o, o_ref[:, part]) < tol, (variant, scheme, cu)
    sliced_ref = [x[:, part] for x in grads_ref[: len(mine) - mine.count(None)]]
    for got, want in zip(grads, sliced_ref):
        assert rel_err(got, want) < tol, (variant, scheme, cu)
    if state is not None:  # each document's state is consumed (and differentiated) on one rank
        total = grads[-1].clone()
        dist.all_reduce(total)
        assert rel_err(total, grads_ref[-1]) < tol, (variant, scheme, cu)
    want = prefix_final_state(variant, [x if x is None else x.detach() for x in xs], state, cu, part.start, part.stop)
    assert final.positions == want.positions, (variant, scheme, cu)
    assert rel_err(final.buckets, want.with_bits(final.buckets.shape[2]).buckets.detach()) < tol, (variant, scheme, cu)


def test_cp_over_triton_kernels():
    """The CP op over the Triton kernels of both variants (interpreted on CPU, float32 inside),
    3 ranks: each rank's summary is its local op's final state, so the incoming state's gradient
    must reach the sender's kernel backward through that output. Outputs, gradients and final
    states: two rows; unequal slices, where the middle rank's final state has a bucket that ends
    before its first chunk; a document crossing two boundaries, one cut mid-slice; initial states
    entering on rank 0."""
    run_distributed(check_triton, 3, random.randrange(2**31))


def check_triton(seed):
    torch.manual_seed(seed)
    cases = [
        (None, 2, None, [128, 128, 128]),
        (None, 1, None, [128, 64, 128]),
        ([0, 300, 384], 1, (128, 0), [128, 128, 128]),
        ([0, 100, 150, 192], 1, (70, 0, 3), [64, 64, 64]),
    ]
    for variant in VARIANTS:
        for cu, B, init, lengths in cases:
            check_rank(variant, "allgather", None, cu, B, init, backend="triton", dims=(2, 16, 16), tol=1e-5,
                       lengths=lengths)


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
    part = share(rank, [n] * P)
    mine = own_leaves(xs, part)
    o = two_layers(mine, cp=CPContext(None, cu, scheme))
    (grad,) = torch.autograd.grad(o.square().sum(), mine[2])
    assert rel_err(o, o_ref[:, part]) < TOL, (variant, scheme)
    assert rel_err(grad, grad_ref[:, part]) < TOL, (variant, scheme)


def share(rank, lengths):
    """This rank's token range of the global sequence, ``lengths[r]`` tokens on rank r."""
    return slice(sum(lengths[:rank]), sum(lengths[: rank + 1]))


def own_leaves(xs, part):
    """This rank's slice of the global inputs, as its own leaves."""
    return [None if x is None else x[:, part].detach().clone().requires_grad_() for x in xs]


def check_bytes_do_not_depend_on_T(variant, scheme):
    rank, P = dist.get_rank(), dist.get_world_size()
    sent = []
    for n in (64, 256):
        xs, _ = inputs(variant, 1, P * n, None)
        mine = own_leaves(xs, share(rank, [n] * P))
        reset_comm_stats()
        o, _ = op(variant, mine, cp=CPContext(None, None, scheme))
        o.square().sum().backward()
        sent.append(comm_stats())
    assert sent[0] == sent[1], (variant, scheme, sent)
    assert (sent[0] > 0) == (P > 1)
