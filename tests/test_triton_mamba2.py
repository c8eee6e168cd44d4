"""The Triton log-linear Mamba-2 kernels against the oracles, on the interpreter (CPU) or a GPU.

Tiny shapes with C = 16 so that trees are several levels deep; fresh random inputs every run.
Every stage is also checked against its counterpart in ``torch_chunked``.
"""

import pytest
import torch

from ctxpar.kernels import torch_chunked
from ctxpar.kernels.triton import chunked, common, unavailable_reason
from tests.factories import random_documents
from tests.oracle_check import check_against_reference, check_half_precision, reference_run

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

C = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, T, H, HK, K, V, L, dtype=torch.float64):
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    q, k, v = rand(B, T, HK, K), rand(B, T, HK, K) * 0.3, rand(B, T, H, V)
    g = -torch.rand(B, T, H, dtype=dtype, device=DEVICE) * 0.3
    lam = torch.rand(B, T, H, L, dtype=dtype, device=DEVICE) + 0.5
    return q, k, v, g, lam


CASES = {
    # name: (B, T, H, Hk, K, V, L, spans, initial positions or None, final state)
    "one_sequence_ragged_end": (1, 150, 2, 2, 16, 32, 9, [(0, 0, 150)], None, False),
    "batch_hk1": (2, 70, 4, 1, 32, 16, 8, [(0, 0, 70), (1, 0, 70)], None, True),
    "hk_divisor": (1, 40, 4, 2, 16, 16, 7, [(0, 0, 40)], None, False),
    "packed_documents": (1, 130, 2, 1, 16, 16, 8, [(0, 0, 37), (0, 37, 41), (0, 41, 130)], None, True),
    "initial_state_chunk_and_sub_chunk_bits": (1, 90, 2, 2, 16, 16, 9, [(0, 0, 90)], [91], True),
    # K x V over the backward stages' budget: V split into tiles that add their shares (common.v_tile)
    "wide_k_split_v": (1, 70, 2, 1, 256, 48, 9, [(0, 0, 70)], [45], True),
    "packed_with_states": (1, 100, 2, 1, 16, 16, 9, [(0, 0, 40), (0, 40, 47), (0, 47, 100)], [75, 32, 5], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_against_reference(case):
    B, T, H, HK, K, V, L, spans, positions, final = CASES[case]
    q, k, v, g, lam = make_inputs(B, T, H, HK, K, V, L)
    check_against_reference(chunked, (q, k, v, g, None, lam), spans, positions, final, chunk_size=C, segment=2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    """Half-precision q, k, v, lambda (g float32) on packed documents with initial and final
    states: bf16 through the tree's bf16 copy, products with bf16-rounded states and dg's split
    products, fp16 through tf32. Outputs and gradients come back in the input dtypes and match the
    float64 oracle on the rounded inputs to the inputs' precision (on the interpreter, as bf16
    computes on the GPU: tests/interpreter.py)."""
    spans, positions = [(0, 0, 40), (0, 40, 47), (0, 47, 100)], (75, 32, 5)
    q, k, v, g, lam = make_inputs(1, 100, 2, 1, 16, 16, 9)
    check_half_precision(chunked, (q, k, v, g, None, lam), spans, positions, True, dtype, 4e-3, 1e-2, chunk_size=C)


def test_random_documents_and_states():
    """Random packed documents (a single last token among them) with random initial positions
    (0 too), Hk = 1 against H = 4 heads, the final state out."""
    T, spans, positions, L = random_documents()
    q, k, v, g, lam = make_inputs(1, T, 4, 1, 16, 16, L)
    check_against_reference(chunked, (q, k, v, g, None, lam), spans, positions, True, chunk_size=C, segment=2)


def test_heads_of_a_group_over_several_programs(monkeypatch):
    """Four heads per q/k group, two per query_grad program: two programs add their heads' dq
    shares into each row (as H = 32, Hk = 1 does with eight)."""
    monkeypatch.setattr(common, "GROUP_HEADS", 2)
    assert common.group_heads(4, 1) == 2
    q, k, v, g, lam = make_inputs(1, 70, 4, 1, 16, 16, 8)
    check_against_reference(chunked, (q, k, v, g, None, lam), [(0, 0, 70)], None, False, chunk_size=C, segment=2)


def test_float32_and_torch_backend_agree():
    q, k, v, g, lam = make_inputs(1, 96, 2, 2, 16, 16, 8, dtype=torch.float32)
    spans = [(0, 0, 96)]
    o, _ = chunked(q, k, v, g, None, lam, spans, chunk_size=C)
    expected, _ = torch_chunked.chunked(q, k, v, g, None, lam, spans, chunk_size=C)
    assert o.dtype == torch.float32
    assert rel(o, expected) < 1e-5


def test_levels_past_lambda_weigh_zero_as_in_the_torch_backend():
    """Called with fewer levels than the sequence needs (the public op refuses that; the kernels
    must still not write past them), reads at the missing levels weigh zero and every gradient
    matches the torch backend's. query_grad once wrote those levels' dlambda into the next head's
    first levels (and past the end of the buffer for the last head); K = 256 splits V into tiles
    that add their dlambda shares (common.v_tile), so such a write adds to what source_grad adds."""
    q, k, v, g, lam = make_inputs(1, 150, 3, 1, 256, 48, 7)  # 150 tokens need 9 levels
    spans = [(0, 0, 150)]
    leaves = [x.requires_grad_() for x in (q, k, v, g, lam)]
    do = torch.randn_like(v)
    o, _ = chunked(q, k, v, g, None, lam, spans, chunk_size=C)
    grads = torch.autograd.grad((o * do).sum(), leaves)
    expected, _ = torch_chunked.chunked(q, k, v, g, None, lam, spans, chunk_size=C)
    expected_grads = torch.autograd.grad((expected * do).sum(), leaves)
    assert rel(o, expected) < 1e-5
    for name, a, b in zip("q k v g lambda".split(), grads, expected_grads):
        assert rel(a, b) < 1e-5, (name, rel(a, b))


def test_stages_match_torch_chunked():
    """chunk_state == chunk_stage's U (odd chunks: build_tree's height-1 node, the up-sweep's first
    height folded in), and after the up-sweep slot c holds build_tree's node of height ones(c)
    ending at chunk c."""
    from ctxpar.kernels.triton.chunk_state import chunk_states, cumulative_decay
    from ctxpar.kernels.triton.layout import build_layout, trailing_ones
    from ctxpar.kernels.triton.tree import up_sweep

    H, K, V, NC = 2, 16, 16, 11
    q, k, v, g, lam = make_inputs(1, NC * C, H, H, K, V, 8, dtype=torch.float32)
    layout = build_layout([(0, 0, NC * C)], [0], NC * C, C, 2, DEVICE)
    states, _, totals = chunk_states(k[0], v[0], g[0], layout, "ieee")
    per_chunk = lambda x: x[0].transpose(0, 1).unflatten(1, (NC, C))[None]  # noqa: E731
    stage = torch_chunked.chunk_stage(per_chunk(q), per_chunk(k), per_chunk(v), per_chunk(g), None)
    tree = torch_chunked.build_tree(stage["U"], stage["M"], 0, (NC - 1).bit_length(), None, C.bit_length() - 1)
    for c in range(NC):
        h = c & 1
        assert rel(states[c], tree.node(h, torch.tensor([(c + 1 >> h) - 1]))[0, :, 0]) < 1e-5, c
    assert rel(states[0::2].transpose(0, 1), stage["U"][0, :, 0::2]) < 1e-5

    up_sweep(states, None, None, cumulative_decay(totals, layout), layout)
    for c, h in enumerate(trailing_ones(torch.arange(NC)).tolist()):
        if h < tree.heights:
            node = tree.node(h, torch.tensor([(c + 1 >> h) - 1]))[0, :, 0]
            assert rel(states[c], node) < 1e-5, (c, h)


@pytest.mark.parametrize("documents", ["fixed", "random", "positions_only"])
def test_bf16_copy_of_the_tree_holds_every_finished_node(monkeypatch, documents):
    """The tree's bf16 copy (the nodes bf16 readers take), written where each node is finished:
    by chunk_state, at the up-sweep height that finishes it, and again where the host adds
    sub-chunk initial buckets. After the forward's build it must equal the float32 tree built
    without a copy, rounded, slot by slot; and the float32 tree built beside the copy, which
    skips nodes nothing reads in float32, must still give the same final-state nodes. Packed
    documents from initial positions whose first chunk is odd (an initial node at height 0), even
    with sub-chunk bits (a folded pair), random ones, and the fixed ones from states that hold
    nothing (a context-parallel piece: no initial nodes, trees that start mid-way). Bit for bit:
    the interpreter rounds casts to bf16 as the GPU and torch do (tests/interpreter.py)."""
    from ctxpar.kernels.state import FenwickState
    from ctxpar.kernels.triton import function as F

    if documents == "random":
        T, spans, positions, L = random_documents()
    else:
        T, spans, positions, L = 100, [(0, 0, 40), (0, 40, 47), (0, 47, 100)], [91, 32, 5], 9
    q, k, v, g, lam = make_inputs(1, T, 2, 1, 16, 16, L, dtype=torch.float32)
    if documents == "positions_only":
        init = FenwickState.empty(len(spans), 2, 16, 16, positions, device=DEVICE)
    else:
        nbits = max(p.bit_length() for p in positions)
        init = FenwickState(torch.randn(len(spans), 2, nbits, 16, 16, device=DEVICE) * 0.3, positions)
    build, checked = F.build_tree, []

    def build_both(k, v, g, init_nodes, leaf_extra, plan, prec, copy):
        expected, _, gc = build(k, v, g, init_nodes, leaf_extra, plan, prec, copy=False)
        states, half, _ = build(k, v, g, init_nodes, leaf_extra, plan, prec, copy=True)
        assert torch.equal(half, expected.bfloat16())
        assert plan.finals
        assert torch.equal(F._gather_finals(states, init_nodes, plan), F._gather_finals(expected, init_nodes, plan))
        checked.append(plan)
        return expected, None, gc  # the float32 run goes on as before

    monkeypatch.setattr(F, "build_tree", build_both)
    chunked(q, k, v, g, None, lam, spans, initial_state=init, output_final_state=True, chunk_size=C, segment=2)
    assert checked


def test_public_op_dispatches_to_the_kernels():
    """log_linear_mamba2(backend="triton") validates, scales q and keeps Hk = 1 unexpanded."""
    from ctxpar import log_linear_mamba2

    q, k, v, g, lam = make_inputs(1, 100, 4, 1, 16, 16, 8, dtype=torch.float32)
    cu = torch.tensor([0, 30, 100], device=DEVICE)
    q.requires_grad_(True)
    o, state = log_linear_mamba2(q, k, v, g, lam, scale=0.5, cu_seqlens=cu, output_final_state=True,
                                 backend="triton")
    (dq,) = torch.autograd.grad(o.square().sum(), q)
    q64 = q.detach().double().requires_grad_(True)
    o_ref, s_ref = log_linear_mamba2(q64, k.double(), v.double(), g.double(), lam.double(), scale=0.5,
                                     cu_seqlens=cu, output_final_state=True, backend="reference")
    (dq_ref,) = torch.autograd.grad(o_ref.square().sum(), q64)
    assert o.dtype == torch.float32
    assert rel(o, o_ref) < 1e-5 and rel(dq, dq_ref) < 1e-5
    assert state.positions == (30, 70) and rel(state.buckets, s_ref.buckets) < 1e-5


def test_g_gradient_does_not_cancel_over_a_long_sequence():
    """dg_r sums the pairs that straddle r; the per-token terms q.dq - k.dk are far larger. With
    q ~ k and do ~ v each token's self pair is ~K*V while a decay of 4-8 per token (head 0) leaves
    dg ~ 1e-2, so a reversed sum of per-token float32 terms is off by ~3e-3 after 512 tokens (the
    old formulation measured here); head 1 decays slowly, so the tree's shares carry its dg."""
    T, H, K, V, L = 512, 2, 16, 16, 10
    gen = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(1, T, H, K, generator=gen)
    q = k + 0.1 * torch.randn(1, T, H, K, generator=gen)
    v = torch.randn(1, T, H, V, generator=gen)
    do = v + 0.1 * torch.randn(1, T, H, V, generator=gen)
    g = -torch.rand(1, T, H, generator=gen) * torch.tensor([4.0, 0.02]) - torch.tensor([4.0, 0.0])
    lam = torch.rand(1, T, H, L, generator=gen) + 0.5
    spans = [(0, 0, T)]

    def g_grad(backend, dtype):
        gl = g.to(DEVICE, dtype).requires_grad_()
        o, _ = backend(*(x.to(DEVICE, dtype) for x in (q, k, v)), gl, None, lam.to(DEVICE, dtype), spans, chunk_size=C)
        (dg,) = torch.autograd.grad((o * do.to(DEVICE, dtype)).sum(), gl)
        return dg

    dg, expected = g_grad(chunked, torch.float32), g_grad(torch_chunked.chunked, torch.float64)
    for h in range(H):
        assert rel(dg[..., h], expected[..., h]) < 1e-4, (h, rel(dg[..., h], expected[..., h]))


def test_straddle_sums_each_chunks_shares_by_their_definition():
    """dg.straddle (a suffix scan, then per-slot differences of it) against its shares summed slot
    by slot: documents of random lengths, two of them starting mid-tree (an initial state's t0)."""
    from ctxpar.kernels.triton.dg import straddle
    from ctxpar.kernels.triton.layout import build_layout

    lengths = torch.randint(1, 400, (3,)).tolist()
    spans = [(0, 0, lengths[0]), (1, 0, lengths[1]), (1, lengths[1], lengths[1] + lengths[2])]
    starts = [0] + torch.randint(1, 300, (2,)).tolist()
    layout = build_layout(spans, starts, max(lengths[0], lengths[1] + lengths[2]), C, 4, DEVICE)
    S, H, NH = layout.num_slots, 3, max(layout.heights, 1)
    xs, ys = (torch.randn(S, H, NH, device=DEVICE) for _ in range(2))
    docs, slot_doc, slot_chunk = layout.docs.tolist(), layout.host["slot_doc"].tolist(), layout.host["slot_chunk"]
    expected = torch.zeros(S, H, dtype=torch.float64)
    for i in range(S):
        c = int(slot_chunk[i])
        c0, c_last, first = docs[slot_doc[i]][3:6]
        for h in range(NH):
            if (c >> h) & 1:  # c sits in a right child: its block's later reads and parent cross it
                block_end = c | ((1 << h) - 1)
                end = first + min(block_end, c_last) - c0
                expected[i] += xs[i + 1 : end + 1, :, h].double().sum(0).cpu()
                if block_end <= c_last:
                    expected[i] += ys[end, :, h].double().cpu()
    assert expected.abs().max() > 0
    torch.testing.assert_close(straddle(xs, ys, layout).cpu().double(), expected, rtol=1e-6, atol=1e-6)


def test_cumulative_decay_restarts_at_each_document():
    """cumulative_decay (one scan per document and head, in float64) against a running sum taken
    document by document: random lengths, documents starting mid-tree, one longer than a scan block."""
    from ctxpar.kernels.triton.chunk_state import cumulative_decay
    from ctxpar.kernels.triton.common import SCAN_BLOCK
    from ctxpar.kernels.triton.layout import build_layout

    lengths = torch.randint(1, 400, (3,)).tolist() + [C * SCAN_BLOCK + 5]
    ends = torch.tensor(lengths[1:]).cumsum(0).tolist()
    spans = [(0, 0, lengths[0])] + [(1, e - n, e) for n, e in zip(lengths[1:], ends)]
    starts = [0] + torch.randint(0, 300, (3,)).tolist()
    layout = build_layout(spans, starts, max(lengths[0], ends[-1]), C, 4, DEVICE)
    totals = -torch.rand(layout.num_slots, 3, device=DEVICE)
    expected = torch.empty(layout.num_slots, 3, dtype=torch.float64)
    for first, count in zip(layout.first_slot, (c1 - c0 + 1 for c0, c1 in zip(layout.c0, layout.c_last))):
        expected[first : first + count] = totals[first : first + count].double().cpu().cumsum(0)
    torch.testing.assert_close(cumulative_decay(totals, layout).cpu(), expected, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_rows_first_is_the_permuted_cast(dtype):
    """dlambda's [H, L, rows] -> [rows, H, L] copy against torch's permuted cast, bit for bit, on
    sizes that leave partial tiles along both axes."""
    from ctxpar.kernels.triton.rows_first import BC, BR, rows_first

    H, L, R = 3, torch.randint(BC // 3 + 1, BC, ()).item(), torch.randint(BR + 1, 3 * BR, ()).item()
    x = torch.randn(H, L, R, device=DEVICE)
    assert torch.equal(rows_first(x, dtype), x.permute(2, 0, 1).to(dtype))


def test_node_gradients_cover_every_slot():
    """node_grads stores where it is a node's only writer, so the backward zeroes only
    layout.shared_slots: a NaN-filled buffer with those zeroed must end like a zeroed one, NaN-free."""
    from ctxpar.kernels.triton.chunk_state import chunk_states, cumulative_decay
    from ctxpar.kernels.triton.layout import build_layout
    from ctxpar.kernels.triton.node_grad import node_grads

    spans = [(0, 0, 40), (0, 40, 300), (1, 0, 300)]
    q, k, v, g, lam = make_inputs(2, 300, 2, 1, 16, 16, 10, dtype=torch.float32)
    flat = lambda x: x.reshape(600, *x.shape[2:]).contiguous()  # noqa: E731
    q, k, v, g, lam = (flat(x) for x in (q, k, v, g, lam))
    layout = build_layout(spans, [0] * 3, 300, C, 2, DEVICE)
    states, _, totals = chunk_states(k, v, g, layout, "ieee")
    gc = cumulative_decay(totals, layout)
    do = torch.randn_like(v)
    zeroed = torch.zeros_like(states)
    node_grads(q, do, g, lam, gc, zeroed, None, layout, "ieee")
    poisoned = torch.full_like(states, float("nan"))
    poisoned.index_fill_(0, layout.shared_slots, 0)
    node_grads(q, do, g, lam, gc, poisoned, None, layout, "ieee")
    assert 0 < layout.shared_slots.numel() < layout.num_slots
    assert not torch.isnan(poisoned).any() and torch.equal(poisoned, zeroed)


def test_float16_states_past_the_fp16_range():
    """fp16 inputs whose states pass 65504, fp16's largest value (little decay, large v): the
    kernels' state products once split states into fp16 parts, inf there and NaN after. Queries
    and output gradients are small, so outputs and gradients stay in fp16's range."""
    T, H, K, V, L = 600, 2, 16, 16, 11
    q = torch.randn(1, T, H, K, device=DEVICE) * 2.5e-3
    k = torch.randn(1, T, H, K, device=DEVICE)
    v = torch.randn(1, T, H, V, device=DEVICE) * 4e3
    g = -torch.rand(1, T, H, device=DEVICE) * 1e-3
    lam = torch.rand(1, T, H, L, device=DEVICE) + 0.5
    spans = [(0, 0, T)]
    half = [x.half().requires_grad_() for x in (q, k, v)] + [g.requires_grad_(), lam.half().requires_grad_()]
    exact = [x.detach().double().requires_grad_() for x in half]
    do = torch.randn(1, T, H, V, device=DEVICE, dtype=torch.float64) * 2.5e-4

    o, _ = chunked(*half[:4], None, half[4], spans, chunk_size=C)
    ref, _ = reference_run(*exact[:4], None, exact[4], spans, None, False)
    first = [x[0, :256].detach() for x in exact[1:3]]
    assert torch.einsum("thk,thv->hkv", *first).abs().max() > 65504  # the node of the first 256 tokens, undecayed
    assert o.dtype == torch.float16 and torch.isfinite(o).all()
    assert rel(o, ref) < 2e-3
    grads = torch.autograd.grad((o.double() * do).sum(), half)
    expected = torch.autograd.grad((ref * do).sum(), exact)
    for name, a, b in zip(["q", "k", "v", "g", "level_scales"], grads, expected):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-2, (name, rel(a, b))
