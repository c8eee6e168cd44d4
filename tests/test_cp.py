"""Context parallelism in simulated mode (P virtual ranks on threads of one process): outputs,
final states and gradients of every input equal the single-process result (float64, torch
backend), for both variants and both exchange schemes; plus the communication volume.

The same checks run on gloo processes in test_cp_dist.py; ``check_ranks`` below is shared.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctxpar.cp import SCHEMES, CPContext, SimGroup, simulate
from ctxpar.cp.plan import hypercube_rounds, layout
from ctxpar.kernels import FenwickState, log_linear_gdn, log_linear_mamba2, num_levels
from tests.factories import attention_inputs, rel_err

VARIANTS = ("mamba2", "gdn")
H, K, V = 2, 4, 3
TOL = 1e-10


def op(variant, xs, backend="torch", **kwargs):
    q, k, v, g, beta, lam = xs
    if variant == "gdn":
        return log_linear_gdn(q, k, v, g, beta, lam, backend=backend, **kwargs)
    return log_linear_mamba2(q, k, v, g, lam, backend=backend, **kwargs)


def cases(P, n=64):
    """(name, slice length, global cu_seqlens or None, batch rows), adapted to P ranks."""
    T = P * n
    span3 = [0, 10, min(10 + 2 * n + 30, T - 1), T] if T > 40 else [0, T]
    return [
        ("one long document", n, None, 1),
        ("two rows, one document each", n, None, 2),
        ("a document cut mid-slice", n, [0, n // 2 + (P // 2) * n + 7, T], 1),
        ("many short documents", n, sorted({*range(0, T, 23), 1, T}), 1),
        ("documents spanning three ranks", n, span3, 1),
    ]


def inputs(variant, B, T, init, dims=(H, K, V)):
    """Global leaves: q, k, v, g, beta, lam, and an initial state (or None) at positions ``init``."""
    H, K, V = dims
    xs = attention_inputs(B, T, H, K, V, gdn=variant == "gdn", levels=num_levels(T + max(init or [0])))
    xs = [None if x is None else x.requires_grad_() for x in xs]
    state = None
    if init is not None:
        nbits = max(p.bit_length() for p in init)
        state = FenwickState(torch.randn(len(init), H, nbits, K, V, dtype=torch.float64, requires_grad=True), init)
    return xs, state


def leaves(xs, state):
    """The differentiable inputs (a state of empty prefixes has no buckets to differentiate)."""
    return [x for x in xs if x is not None] + ([state.buckets] if state is not None and state.buckets.numel() else [])


def reference(variant, xs, state, cu, do):
    o, _ = op(variant, xs, cu_seqlens=cu, initial_state=state)
    return o, torch.autograd.grad((o * do).sum(), leaves(xs, state))


def rank_slice(xs, lo, hi):
    return [None if x is None else x[:, lo:hi] for x in xs]


def check_ranks(variant, scheme, lengths, cu, B, init=None, final=False):
    """Every rank's output, gradient share and (``final``) final state vs one process, simulated
    with ``lengths[r]`` tokens on rank r."""
    offsets = [sum(lengths[:r]) for r in range(len(lengths) + 1)]
    xs, state = inputs(variant, B, offsets[-1], init)
    o_ref, grads_ref = reference(variant, xs, state, cu, do := torch.randn_like(xs[2]))

    def rank(ctx):
        part = rank_slice(xs, offsets[ctx.rank], offsets[ctx.rank + 1])
        return op(variant, part, cu_seqlens=cu, cp=ctx, initial_state=state, output_final_state=final)

    results = simulate(len(lengths), rank, cu_seqlens=cu, scheme=scheme, slice_lengths=lengths)
    o = torch.cat([r[0] for r in results], 1)
    grads = torch.autograd.grad((o * do).sum(), leaves(xs, state))
    assert rel_err(o, o_ref) < TOL
    for got, want in zip(grads, grads_ref):
        assert rel_err(got, want) < TOL
    if final:
        for r, (_, got) in enumerate(results):
            want = prefix_final_state(variant, xs, state, cu, offsets[r], offsets[r + 1])
            assert got.positions == want.positions
            assert rel_err(got.buckets, want.with_bits(got.buckets.shape[2]).buckets) < TOL


def prefix_final_state(variant, xs, state, cu, lo, hi):
    """One process's final states of the documents that meet [lo, hi), cut at ``hi``."""
    head = [None if x is None else x[:, :hi] for x in xs]
    docs = [0, hi] if cu is None else [c for c in cu if c < hi] + [hi]
    if cu is not None and state is not None:
        state = FenwickState(state.buckets[: len(docs) - 1], state.positions[: len(docs) - 1])
    _, final = op(variant, head, cu_seqlens=None if cu is None else docs, initial_state=state, output_final_state=True)
    if cu is None:
        return final
    meet = [i for i in range(len(docs) - 1) if docs[i + 1] > lo]
    return FenwickState(final.buckets[meet], tuple(final.positions[i] for i in meet))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("P", [1, 2, 3, 4, 8])
def test_ranks_equal_one_process(P, variant, scheme):
    for _, n, cu, B in cases(P):
        check_ranks(variant, scheme, [n] * P, cu, B)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_initial_and_final_states(variant, scheme):
    """A global initial state enters at each document's first rank; every rank's final state is the
    one-process state at its slice end; the state's gradient (summed over ranks) matches."""
    check_ranks(variant, scheme, [64] * 3, None, 2, init=(100, 100), final=True)
    check_ranks(variant, scheme, [64] * 4, [0, 50, 70, 200, 256], 1, init=(5, 0, 77, 1), final=True)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.sampled_from([64, 128, 192]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 6 * 192 - 1), max_size=6),
    init=st.none() | st.lists(st.integers(0, 300), min_size=7, max_size=7),
    variant=st.sampled_from(VARIANTS),
    scheme=st.sampled_from(SCHEMES),
)
def test_random_ranks_slices_documents_and_states(lengths, cuts, init, variant, scheme):
    T = sum(lengths)
    cu = sorted({0, T, *(c for c in cuts if c < T)})
    cu = cu if len(cu) > 2 else None
    init = None if init is None else tuple(init[: 1 if cu is None else len(cu) - 1])
    check_ranks(variant, scheme, lengths, cu, 1, init=init, final=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_inputs_match_float64_within_bf16_error(variant, backend):
    """bf16 q meets the float32 incoming state rounded to bf16: outputs and gradients of bf16
    inputs stay within bf16 error of the float64 one-process result, with a document cut mid-slice.
    On the Triton kernels too (the tree's bf16 copy; interpreted on the CPU, where bf16 computes as
    on the GPU and the virtual ranks' launches take turns: tests/interpreter.py)."""
    P, n = 2, 128
    cu = [0, 77, 2 * n]
    xs, _ = inputs(variant, 1, P * n, None, (4, 16, 16))
    o_ref, grads_ref = reference(variant, xs, None, cu, do := torch.randn_like(xs[2]))
    half = [None if x is None else x.detach().to(torch.bfloat16 if x is not xs[3] else x.dtype).requires_grad_()
            for x in xs]

    def run(ctx):
        return op(variant, rank_slice(half, ctx.rank * n, (ctx.rank + 1) * n), backend, cp=ctx, cu_seqlens=cu)[0]

    o = torch.cat(simulate(P, run, cu_seqlens=cu), 1)
    grads = torch.autograd.grad((o.double() * do).sum(), [x for x in half if x is not None])
    assert rel_err(o.double(), o_ref) < 1e-2
    for got, want in zip(grads, grads_ref):
        assert rel_err(got.double(), want) < 2e-2


def test_invalid_slices_and_schemes_are_refused():
    sim = SimGroup(2)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        CPContext.simulated(sim, 0, cu_seqlens=[0, 100, 200])
    with pytest.raises(ValueError, match="scheme"):
        CPContext.simulated(sim, 0, scheme="ring")
    ctx = CPContext.simulated(sim, 0)
    xs, _ = inputs("mamba2", 1, 96, None)
    with pytest.raises(ValueError, match="multiple of the chunk"):
        op("mamba2", xs, cp=ctx)
    with pytest.raises(ValueError, match="global cu_seqlens"):
        op("mamba2", xs, cp=ctx, cu_seqlens=[0, 50, 96])


# --- communication volume ---------------------------------------------------------------------


def bytes_per_rank(variant, scheme, P, n, dtype=torch.float64):
    """Forward bytes each simulated rank sends for one long document of P * n tokens."""
    xs, _ = inputs(variant, 1, P * n, None)
    xs = [None if x is None else x if x is xs[3] else x.to(dtype) for x in xs]  # g stays float
    run = lambda ctx: (op(variant, rank_slice(xs, ctx.rank * n, (ctx.rank + 1) * n), cp=ctx), ctx.bytes_sent())  # noqa: E731
    return [sent for _, sent in simulate(P, run, scheme=scheme)]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_bytes_per_rank_do_not_depend_on_T(variant, scheme):
    assert bytes_per_rank(variant, scheme, 4, 64) == bytes_per_rank(variant, scheme, 4, 512)


@pytest.mark.parametrize("variant", VARIANTS)
def test_log_p_volume_grows_as_log_p(variant):
    """Each rank sends ceil(log2 P) summaries of one aligned block each, at most one bucket plus a
    transition; the all-gather sends P - 1 of them."""
    trans = 1 if variant == "mamba2" else K
    summary = 8 * H * (K * V + trans * trans)
    for P in (2, 8, 64):
        logp = bytes_per_rank(variant, "logp", P, 64)
        assert max(logp) <= math.ceil(math.log2(P)) * summary
        assert max(logp) >= (math.ceil(math.log2(P)) - 1) * summary
    assert max(bytes_per_rank(variant, "allgather", 8, 64)) == 7 * summary


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summaries_travel_in_float32_below_float64(dtype):
    wide = bytes_per_rank("gdn", "allgather", 2, 64)
    assert bytes_per_rank("gdn", "allgather", 2, 64, dtype) == [b // 2 for b in wide]


def test_log_p_sends_only_what_short_documents_need():
    """Documents shorter than a slice: a rank needs only the summary of the document crossing into
    it, so the liveness pass leaves about one real message per rank at any P (a long document needs
    nearly ceil(log2 P))."""

    def messages_per_rank(P, cu):
        docs = list(zip(cu, cu[1:]))
        lay = layout(0, [64 * r for r in range(P + 1)], docs, [0] * len(docs))
        rounds = hypercube_rounds(lay.summaries)
        return sum(r.useful[q] for r in rounds for q in range(P) if q ^ r.step < P) / P

    for P in (8, 64, 1024):
        assert messages_per_rank(P, [*range(0, 64 * P, 40), 64 * P]) < 2
        assert messages_per_rank(P, [0, 64 * P]) > math.log2(P) - 1.5


@pytest.mark.parametrize("n", [1, 63, 64, 65, 5000])
def test_blocked_decay_matches_exp_of_cumsum(n):
    """The crossing-in piece's decays come from blocks (local._decay): float64 values and gradient
    equal exp(cumsum) on both sides of a block boundary; float32 ones stay within float32 error."""
    from ctxpar.cp.local import _decay

    g = (-0.1 * torch.rand(2, n, 3, dtype=torch.float64)).requires_grad_()
    d = torch.randn(2, n, 3, dtype=torch.float64)
    got, want = _decay(g), g.cumsum(1).exp()
    assert torch.allclose(got, want, rtol=1e-11, atol=0)  # every value, down to exp(-250)
    assert rel_err(*(torch.autograd.grad(y, g, d)[0] for y in (got, want))) < 1e-12
    mild = g.detach() * 0.1
    truth = mild.cumsum(1).exp()
    assert rel_err(_decay(mild.float()).double(), truth) < 1e-6
