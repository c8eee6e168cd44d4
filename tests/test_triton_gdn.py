"""The Triton log-linear Gated DeltaNet path against the oracles, on the interpreter (CPU) or a GPU.

Tiny shapes with C = 16 (one case with C = 64) so that trees are several levels deep; fresh random
inputs every run. Each stage is also checked against its counterpart in ``torch_chunked``.
"""

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ctxpar.kernels import torch_chunked
from ctxpar.kernels.triton import chunked, unavailable_reason
from tests.factories import attention_inputs, random_documents, rel_err
from tests.oracle_check import NAMES as GRADS
from tests.oracle_check import check_against_reference, check_half_precision

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

C = 16
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B, T, H, HK, K, V, L, dtype=torch.float64):
    q, k, v, g, beta, lam = attention_inputs(B, T, H, K, V, Hk=HK, gdn=True, levels=L, dtype=dtype, device=DEVICE)
    return q * K**-0.5, k, v, g, beta, lam


CASES = {
    # name: (B, T, H, Hk, K, V, L, spans, initial positions or None, final state, chunk)
    "one_sequence_ragged_end": (1, 150, 2, 2, 16, 32, 9, [(0, 0, 150)], None, False, C),
    "batch_hk1_states": (2, 70, 4, 1, 32, 16, 8, [(0, 0, 70), (1, 0, 70)], [37, 37], True, C),
    "hk_divisor": (1, 40, 4, 2, 16, 16, 7, [(0, 0, 40)], None, False, C),
    "packed_documents": (1, 130, 2, 1, 16, 16, 8, [(0, 0, 37), (0, 37, 41), (0, 41, 130)], None, True, C),
    "initial_state_chunk_and_sub_chunk_bits": (1, 90, 2, 2, 16, 16, 9, [(0, 0, 90)], [91], True, C),
    "packed_with_states": (1, 100, 2, 1, 16, 16, 9, [(0, 0, 40), (0, 40, 47), (0, 47, 100)], [75, 32, 5], True, C),
    "chunk_64": (1, 200, 2, 1, 32, 32, 10, [(0, 0, 200)], [70], True, 64),
    # The paper's head sizes: K padded to 256 with masked columns where whole rows load, three K slices of 64
    # where the chunk stage takes them, many dU / dM tiles.
    "paper_heads_k192_v384": (1, 100, 2, 2, 192, 384, 9, [(0, 0, 100)], [37], True, 64),
}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_against_reference(case):
    B, T, H, HK, K, V, L, spans, positions, final, chunk = CASES[case]
    inputs = make_inputs(B, T, H, HK, K, V, L)
    check_against_reference(chunked, inputs, spans, positions, final, chunk_size=chunk)


def test_random_documents_and_states():
    """Random packed documents (single tokens included) with random initial positions (0 too)."""
    T, spans, positions, L = random_documents()
    inputs = make_inputs(1, T, 2, 1, 16, 16, L)
    check_against_reference(chunked, inputs, spans, positions, True, chunk_size=C)


def test_state_that_holds_nothing_only_sets_positions():
    """FenwickState.empty (what CP starts a mid-document piece from) == a zero state there."""
    from ctxpar.kernels.state import FenwickState

    q, k, v, g, beta, lam = make_inputs(1, 60, 2, 1, 16, 16, 9, dtype=torch.float32)
    spans, positions = [(0, 0, 25), (0, 25, 60)], (83, 5)
    o, state = chunked(q, k, v, g, beta, lam, spans, FenwickState.empty(2, 2, 16, 16, positions), True, chunk_size=C)
    expected, expected_state = chunked(q, k, v, g, beta, lam, spans, FenwickState.zeros(2, 2, 16, 16, positions), True,
                                       chunk_size=C)
    assert rel_err(o, expected) < 1e-6 and rel_err(state.buckets, expected_state.buckets) < 1e-6
    assert state.positions == (108, 40)


def test_lambda_one_is_the_gated_delta_rule():
    """With every lambda = 1: S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,
    o_t = S_t^T q_t; outputs and gradients."""
    T, H, K, V = 75, 2, 16, 16
    q, k, v, g, beta, lam = make_inputs(1, T, H, H, K, V, 8)
    lam = torch.ones_like(lam)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta)]

    def delta_rule(q, k, v, g, beta):
        state, out = torch.zeros(H, K, V, dtype=q.dtype, device=DEVICE), []
        for t in range(T):
            kt, bt = k[0, t], beta[0, t, :, None, None]
            k_state = torch.einsum("hk,hkv->hv", kt, state)
            state = g[0, t].exp()[:, None, None] * (state - bt * kt[:, :, None] * k_state[:, None])
            state = state + bt * kt[:, :, None] * v[0, t][:, None, :]
            out.append(torch.einsum("hkv,hk->hv", state, q[0, t]))
        return torch.stack(out)[None]

    expected = delta_rule(*leaves)
    o, _ = chunked(q, k, v, g, beta, lam, [(0, 0, T)], chunk_size=C)
    assert rel_err(o, expected) < 1e-5
    do = torch.randn_like(o)
    for name, a, b in zip(GRADS, torch.autograd.grad((o * do).sum(), leaves),
                          torch.autograd.grad((expected * do).sum(), leaves)):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# hk 2: a q/k head per head, whose dq, dk the backward stores in the dtype; V 160: two of the chunk
# stage's 128-wide V tiles, the second masked (only the GPU tests' shapes reached them before)
@pytest.mark.parametrize("hk, V", [(1, 32), (2, 32), (2, 160)])
def test_half_precision_inputs(dtype, hk, V):
    """Half-precision q, k, v, beta, lambda (g float32): outputs and gradients come back in the
    input dtypes and match the float64 oracle on the rounded inputs to the inputs' precision."""
    check_half_precision(chunked, make_inputs(1, 80, 2, hk, 16, V, 8), [(0, 0, 80)], None, False, dtype, 1e-2, 2e-2,
                         chunk_size=C)


def test_half_precision_nodes_read_by_several_runs(monkeypatch):
    """bf16, no states: a node read by several runs of readers (READ_RUN 2: heights >= 2 here, of
    10 chunks) takes their shares as bf16 atomic adds into the tree's gradients (gdn_carry.node_grad,
    gdn_tree.gradient_dtype); they match the float64 oracle as above."""
    from ctxpar.kernels.triton import gdn_function

    T = 160
    monkeypatch.setattr(gdn_function, "READ_RUN", 2)
    gdn_function._tables.cache_clear()  # tables cached with the other run length
    try:
        layout = gdn_function.build_layout([(0, 0, T)], [0], T, C, gdn_function.READ_RUN, DEVICE)
        assert (layout.segments[:, 1] >= 2).any()  # heights whose node several runs read
        check_half_precision(chunked, make_inputs(1, T, 2, 2, 16, 32, 9), [(0, 0, T)], None, False, torch.bfloat16,
                             1e-2, 2e-2, chunk_size=C)
    finally:
        gdn_function._tables.cache_clear()


def test_float32_and_torch_backend_agree():
    q, k, v, g, beta, lam = make_inputs(1, 96, 2, 2, 16, 16, 8, dtype=torch.float32)
    spans = [(0, 0, 96)]
    o, _ = chunked(q, k, v, g, beta, lam, spans, chunk_size=C)
    expected, _ = torch_chunked.chunked(q, k, v, g, beta, lam, spans, chunk_size=C)
    assert o.dtype == torch.float32
    assert rel_err(o, expected) < 1e-5


@pytest.mark.parametrize("K, V", [(16, 32), (80, 80)])  # 80: several K and V tiles (64 wide)
def test_chunk_stage_matches_torch_chunked(K, V):
    """chunk_stage == torch_chunked's chunk_stage + intra_output (Hk = 1 expanded) on the queries
    q * scale, o_intra in token rows, U and M at the rows asked for, and its backward kernel ==
    autograd through them (dq: q's)."""
    from ctxpar.kernels.triton.gdn_chunk import chunk_stage
    from ctxpar.kernels.triton.gdn_chunk_grad import chunk_stage_grads
    from ctxpar.kernels.triton.gdn_grid import SlotGrid, torch_stage
    from ctxpar.kernels.triton.layout import build_layout

    H, NC = 2, 4 if K == 16 else 2
    q, k, v, g, beta, lam = (x[0] for x in make_inputs(1, NC * C - 5, H, 1, K, V, 9, dtype=torch.float32))
    rows = q.shape[0]
    layout = build_layout([(0, 0, rows)], [0], rows, C, 1, DEVICE)
    tree_rows = torch.arange(NC, device=DEVICE).flip(0)  # any order; this one moves every row
    copies = (torch.empty(NC, H, K, V, device=DEVICE, dtype=torch.bfloat16),
              torch.empty(NC, H, K, K, device=DEVICE, dtype=torch.bfloat16))
    scale = K**-0.5  # the kernels take it in
    stage = chunk_stage(q, k, v, g, beta, lam, scale, layout, "ieee", tree_rows, copies, True)
    for copy, x in zip(copies, stage[2:4]):  # the tree's height 0, in the copy's dtype
        assert torch.equal(copy, x.to(copy.dtype))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, lam)]
    grid = SlotGrid(layout, rows, H, 1, DEVICE)
    expected = torch_stage(leaves[0] * scale, *leaves[1:], grid)
    ours = (grid.tokens(stage[0]), stage[1], stage[2][tree_rows], stage[3][tree_rows])  # all in the slot grid
    for name, a, b in zip(["o_intra", "Qt", "U", "M"], ours, expected):  # Qt in the copies' dtype
        assert rel_err(a.float(), b) < (1e-5 if a.dtype == torch.float32 else 2**-8), name
    per_chunk = [grid.tokens(x, i < 2).transpose(0, 1)[None] for i, x in enumerate((q * scale, k, v, g, beta))]
    pairs = torch_chunked.chunk_stage(*per_chunk)["P"][0].transpose(0, 1)  # kept for the backward
    assert rel_err(stage[5], pairs) < 1e-5
    d_o = torch.randn_like(stage[0])  # in token rows, as the kernels take it; zero at the reference's padding
    d_outputs = [grid.tokens(d_o), *(torch.randn_like(x) for x in expected[1:])]
    d_rows = [d_o, d_outputs[1], *(torch.empty_like(d).index_copy_(0, tree_rows, d) for d in d_outputs[2:])]
    grads = chunk_stage_grads(q, k, v, g, beta, lam, scale, *stage[4:], *d_rows, layout, "ieee", tree_rows)
    for name, a, b in zip(GRADS, grads, torch.autograd.grad(expected, leaves, d_outputs)):
        assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("chunk", [16, 32, 64])  # one, two and four blocks of 16 rows
def test_unit_inverse_against_float64(chunk):
    """The chunk stage's stored N = (I + A)^-1, A = diag(beta) strict(K K^T * Gam), equals the
    float64 triangular solve of I + A built from the same inputs in every slot and head, zero
    above the diagonal; packed documents start and end inside chunks, whose padded positions must
    hold identity rows and columns exactly. Keys share a direction, so that A is far from zero
    (entries to ~0.6) and every term of N's blocks below the diagonal counts. Float32 inputs run
    N in float32 ('ieee'): N - I comes within ~2e-7 (relative); the bound leaves room for rounding
    (C steps of 2^-24), not for a misplaced or missing block."""
    from ctxpar.kernels.triton.gdn_chunk import chunk_stage
    from ctxpar.kernels.triton.gdn_grid import SlotGrid
    from ctxpar.kernels.triton.layout import build_layout

    H, HK, K, V, T = 4, 2, 48, 16, 150  # K = 48: two 32-column slices of k, the second half masked
    q, k, v, g, beta, lam = (x[0] for x in make_inputs(1, T, H, HK, K, V, 9, dtype=torch.float32))
    k = torch.nn.functional.normalize(k + k[:1], dim=-1)
    layout = build_layout([(0, 0, 37), (0, 37, 41), (0, 41, T)], [0, 10, 70], T, chunk, 1, DEVICE)
    S = layout.num_slots
    copies = (torch.empty(S, H, K, V, device=DEVICE), torch.empty(S, H, K, K, device=DEVICE))
    inv = chunk_stage(q, k, v, g, beta, lam, 1.0, layout, "ieee", torch.arange(S, device=DEVICE), copies, False)[4]
    grid = SlotGrid(layout, T, H, HK, DEVICE)
    kc, gc, bc = grid.tokens(k.double(), True), grid.tokens(g.double()), grid.tokens(beta.double())  # 0 if padded
    G = gc.cumsum(-1)
    a = (bc[..., None] * (kc @ kc.transpose(-1, -2)) * (G[..., :, None] - G[..., None, :]).exp()).tril(-1)
    eye = torch.eye(chunk, dtype=torch.float64, device=DEVICE).expand_as(a)
    expected = torch.linalg.solve_triangular(eye + a, eye, upper=False, unitriangular=True)
    assert rel_err(inv.double() - eye, expected - eye) < 1e-5 and not inv.triu(1).any()
    padded = (grid.index == T).view(S, 1, chunk)
    assert padded.any()
    for at in (padded[..., :, None].expand_as(inv), padded[..., None, :].expand_as(inv)):  # rows, columns
        assert torch.equal(inv[at].double(), eye[at])


def test_chunk_not_a_multiple_of_the_inverse_blocks_is_refused():
    """A chunk of 8 (a power of two, which the layout takes) would leave the inverse's 16-row blocks
    half outside the chunk: a clear error before any kernel runs, not a wrong N."""
    q, k, v, g, beta, lam = make_inputs(1, 40, 2, 2, 16, 16, 7, dtype=torch.float32)
    with pytest.raises(ValueError, match="blocks of 16 rows: chunk 8 is not a multiple"):
        chunked(q, k, v, g, beta, lam, [(0, 0, 40)], chunk_size=8)


@pytest.mark.parametrize("K, V", [(16, 16), (128, 160)])  # 160: two V tiles of the reads, chain_grad's V steps
def test_tree_matches_torch_chunked(K, V):                  # and node_grad's tiles, masked
    """From random chunk states, transitions, carried queries and an initial state: after the
    up-sweep the Fenwick slot c holds build_tree's node (state, by slot, and transition) of height
    ones(c) ending at chunk c, and CarryReads (o and output in token rows) equals read_tree summed over
    heights at the real positions, gradients included (runs of at most 4 readers: nodes read by
    8 chunks take two runs' atomic adds)."""
    from ctxpar.kernels.triton.gdn_carry import CarryReads
    from ctxpar.kernels.triton.gdn_grid import SlotGrid
    from ctxpar.kernels.triton.gdn_tree import TreePlan, tree_copies, up_sweep
    from ctxpar.kernels.triton.layout import build_layout, trailing_ones

    H, NC, c0, log_c = 2, 13, 3, C.bit_length() - 1
    t0, rows = c0 * C + 5, NC * C - 9
    layout = build_layout([(0, 0, rows)], [t0], rows, C, 4, DEVICE)
    grid, heights = SlotGrid(layout, rows, H, H, DEVICE), layout.heights
    rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    u, m, qt = rand(NC, H, K, V), rand(NC, H, K, K) * K**-0.5, rand(NC, H, C, K)
    lam, f0 = rand(NC, H, C, log_c + 1 + heights), rand(1, H, t0.bit_length(), K, V)
    o_intra = rand(rows, H, V)  # what the chunk stage's output brings to the reads' sum
    leaves = [x.requires_grad_() for x in (u, m, qt, lam, f0, o_intra)]
    init = f0[:, :, log_c:]
    plan = TreePlan(layout, DEVICE)
    order = layout.host["by_height"].to(DEVICE)  # the chunk stage's row order of u, m
    copies = tree_copies(plan, H, K, V, torch.float32, DEVICE)
    for copy, x in zip(copies, (u, m)):  # height 0: the chunk stage's rows
        copy[:NC] = x[order].detach()
    nodes, trans, copies = up_sweep(u[order], m[order], init, plan, "ieee", copies, True)
    ours = CarryReads.apply(o_intra, qt, lam, init, plan, log_c, "ieee", copies, torch.float32, nodes, *trans)

    per_chunk = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [S, H, ...] -> [1, H, NC, ...]
    tree = torch_chunked.build_tree(per_chunk(u), per_chunk(m), c0, heights, f0, log_c)
    real = per_chunk((grid.index < rows).view(NC, 1, C, 1))  # the random qt reads at padded positions too
    theirs = real * (per_chunk(grid.tokens(o_intra)) + sum(
        torch_chunked.read_tree(tree, per_chunk(qt), per_chunk(lam), c0, h, log_c) for h in range(heights)))
    assert ours.shape == (rows, H, V) and rel_err(per_chunk(grid.tokens(ours)), theirs) < 1e-5
    rank = {int(s): i for i, s in enumerate(layout.host["by_height"])}
    for slot, h in enumerate(trailing_ones(torch.arange(c0, c0 + NC)).tolist()):
        if h < heights:
            index = torch.tensor([(c0 + slot + 1 >> h) - 1])
            assert rel_err(nodes[rank[slot]], tree.node(h, index)[0, :, 0]) < 1e-5, (slot, h)
            assert rel_err(trans[h][rank[slot]], tree.transition(h, index)[0, :, 0]) < 1e-5, (slot, h)
    d_out = rand(rows, H, V)
    grads = torch.autograd.grad((ours * d_out).sum(), leaves)
    expected = torch.autograd.grad((theirs * per_chunk(grid.tokens(d_out))).sum(), leaves)
    for name, a, b in zip(["u", "m", "qt", "lam", "initial_state", "o_intra"], grads, expected):
        assert rel_err(a, b) < 1e-5, name


def test_bf16_tree_without_states_has_no_float32_copy():
    """bf16 inputs, no states in or out: the graph keeps the tree for the backward as the bf16
    copies, joined over the heights (one [nodes, H, K, V] and one [nodes, H, K, K]), and neither
    the forward nor the backward makes a float32 tensor shaped like a tree height ([rows, H, K, V]
    or [rows, H, K, K]): no float32 tree, twice the copies' bytes, and bf16 gradients of it
    (gdn_tree.gradient_dtype). The nodes' copy is by slot, one top node each."""
    from ctxpar.kernels.triton.gdn_tree import TreePlan
    from ctxpar.kernels.triton.layout import build_layout

    T, H, K, V = 150, 2, 32, 24  # K, V unlike C = 16 and each other: no other tensor takes these shapes
    q, k, v, g, beta, lam = (x.float() if i == 3 else x.to(torch.bfloat16).requires_grad_()
                             for i, x in enumerate(make_inputs(1, T, H, H, K, V, 9)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x), Made() as forward:
        o, _ = chunked(q, k, v, g.requires_grad_(), beta, lam, [(0, 0, T)], chunk_size=C)
    with Made() as backward:
        o.sum().backward()  # the kept copies are enough for it
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v, g, beta, lam))
    plan = TreePlan(build_layout([(0, 0, T)], [0], T, C, 1, DEVICE), DEVICE)
    copies = {((plan.layout.num_slots, H, K, V), torch.bfloat16), ((plan.num_nodes, H, K, K), torch.bfloat16)}

    def shaped(tensors):
        return {(tuple(x.shape), x.dtype) for x in tensors if tuple(x.shape[1:]) in ((H, K, V), (H, K, K))}

    assert shaped(saved) == copies
    assert not [s for s in shaped(forward.tensors + backward.tensors) if s[1] == torch.float32]
    assert shaped(backward.tensors) >= copies  # the gradients


class Made(TorchDispatchMode):
    """Records every tensor the ops run under it return."""

    def __enter__(self):
        self.tensors = []
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.tensors += [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
        return out


@pytest.mark.parametrize("V", [16, 160])  # 160: two of the reads' V tiles, so they carry Q first, kept anyway
def test_forward_without_autograd_matches_the_training_forward(V):
    """Under no_grad the reads keep nothing for a backward (no carried queries stored but where
    they carry Q first): the output is the same as with gradients on."""
    q, k, v, g, beta, lam = make_inputs(1, 120, 2, 1, 16, V, 8, dtype=torch.float32)
    with torch.no_grad():
        inference, _ = chunked(q, k, v, g, beta, lam, [(0, 0, 120)], chunk_size=C)
    training, _ = chunked(*(x.requires_grad_() for x in (q, k, v, g, beta, lam)), [(0, 0, 120)], chunk_size=C)
    assert training.requires_grad and rel_err(inference, training.detach()) < 1e-6


def test_slot_grid_gather_and_its_gradient():
    """SlotGrid.tokens (packed documents starting mid-chunk, so slots have padded positions): each
    row lands at its grid position, every row once, padded positions are zero, and the gradient,
    which gathers through the inverse map rather than scatter, passes gradcheck."""
    from ctxpar.kernels.triton.gdn_grid import SlotGrid
    from ctxpar.kernels.triton.layout import build_layout

    layout = build_layout([(0, 0, 20), (0, 20, 50), (1, 0, 50)], [0, 5, 70], 50, C, 2, DEVICE)
    grid = SlotGrid(layout, 100, 2, 2, DEVICE)
    x = torch.randn(100, 2, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    slots = grid.tokens(x).transpose(1, 2).flatten(0, 1)  # [S * C, H, 3], in grid.index's order
    real = grid.index < 100
    assert torch.equal(grid.index[real].sort().values, torch.arange(100, device=DEVICE))
    assert torch.equal(slots[real], x[grid.index[real]]) and not slots[~real].any()
    assert torch.autograd.gradcheck(grid.tokens, (x,))


def test_node_gradients_cover_every_tree_row():
    """node_grads stores where it is a node's only writer, so the reads' backward zeroes only
    plan.zero_ranges of the nodes' gradients (by slot) and the joined transitions': NaN-filled
    buffers with those rows zeroed must end like zeroed ones, NaN-free, but for the right
    children's transitions, which it must leave alone (the up-sweep's backward stores them)
    (packed documents; runs of 2 readers, so nodes from height 2 up take atomic adds)."""
    from ctxpar.kernels.triton.gdn_carry import node_grads
    from ctxpar.kernels.triton.gdn_tree import TreePlan
    from ctxpar.kernels.triton.layout import build_layout

    H, K, V, log_c = 2, 16, 32, C.bit_length() - 1
    layout = build_layout([(0, 0, 40), (0, 40, 300), (1, 0, 300)], [0] * 3, 300, C, 2, DEVICE)
    plan = TreePlan(layout, DEVICE)
    rand = lambda *shape: torch.randn(*shape, device=DEVICE)  # noqa: E731
    qs, dqs = rand(plan.num_reads, H, C, K), rand(plan.num_reads, H, C, K)
    d_out, lam = rand(600, H, V), rand(layout.num_slots, H, C, log_c + 1 + layout.heights)  # 2 x 300 token rows
    zeroed = torch.zeros(layout.num_slots, H, K, V, device=DEVICE), torch.zeros(plan.num_nodes, H, K, K, device=DEVICE)
    node_grads(qs, dqs, d_out, lam, plan, log_c, "ieee", *zeroed, None)
    poisoned = [torch.full_like(x, float("nan")) for x in zeroed]
    for grads, ranges in zip(poisoned, plan.zero_ranges):
        assert 0 < sum(hi - lo for lo, hi in ranges) < grads.shape[0]
        for lo, hi in ranges:
            grads[lo:hi] = 0
    node_grads(qs, dqs, d_out, lam, plan, log_c, "ieee", *poisoned, None)
    assert not torch.isnan(poisoned[0]).any() and torch.equal(poisoned[0], zeroed[0])
    right = torch.zeros(plan.num_nodes, dtype=torch.bool, device=DEVICE)
    for lo, hi in plan.right_children:
        right[lo:hi] = True
    assert right.any()
    assert torch.isnan(poisoned[1][right]).all() and not zeroed[1][right].any()
    assert not torch.isnan(poisoned[1][~right]).any() and torch.equal(poisoned[1][~right], zeroed[1][~right])


def test_up_sweep_backward_stores_the_right_children():
    """Nothing but its parent reads a right child, so the up-sweep's backward stores the right
    children's transition gradients over their incoming rows (which the reads' backward leaves
    unset): the same gradients with those rows NaN as with them zero, and NaN-free (packed
    documents; the gradients themselves are checked against torch_chunked in
    test_tree_matches_torch_chunked)."""
    from ctxpar.kernels.triton.gdn_tree import TreePlan, tree_copies, up_sweep
    from ctxpar.kernels.triton.layout import build_layout

    H, K, V = 2, 16, 24
    layout = build_layout([(0, 0, 200), (0, 200, 300)], [0, 0], 300, C, 2, DEVICE)
    plan, S = TreePlan(layout, DEVICE), layout.num_slots
    u, m = torch.randn(S, H, K, V, device=DEVICE), torch.randn(S, H, K, K, device=DEVICE) * K**-0.5
    leaves = [x.requires_grad_() for x in (u, m)]
    copies = tree_copies(plan, H, K, V, torch.float32, DEVICE)
    copies[0][:S], copies[1][:S] = u.detach(), m.detach()
    nodes, trans, _ = up_sweep(u.clone(), m, None, plan, "ieee", copies, True)  # the nodes overwrite theirs
    outputs = [nodes, *trans]
    incoming = [torch.randn_like(x) for x in outputs]
    for h, (lo, hi) in enumerate(plan.right_children):
        incoming[1 + h][: hi - lo] = 0  # height h's first hi - lo rows
    poisoned = [g.clone() for g in incoming]  # before the backward, which adds into its incoming buffers
    expected = torch.autograd.grad(outputs, leaves, incoming, retain_graph=True)
    for h, (lo, hi) in enumerate(plan.right_children):
        poisoned[1 + h][: hi - lo] = float("nan")
    for a, b in zip(torch.autograd.grad(outputs, leaves, poisoned), expected):
        assert not torch.isnan(a).any() and torch.equal(a, b)


def test_public_op_dispatches_to_the_kernels_with_qk_l2norm():
    """log_linear_gdn(backend="triton", use_qk_l2norm=True) normalises q, k inside the op, keeps
    Hk = 1 unexpanded and matches the reference backend, gradients included (and the torch
    backend normalises alike)."""
    from ctxpar import log_linear_gdn

    q, k, v, g, beta, lam = make_inputs(1, 100, 4, 1, 16, 16, 8, dtype=torch.float32)
    q, k = q * 3, k * 2  # far from unit norm
    cu = torch.tensor([0, 30, 100], device=DEVICE)
    leaves = [x.requires_grad_() for x in (q, k)]
    o, state = log_linear_gdn(q, k, v, g, beta, lam, cu_seqlens=cu, output_final_state=True, backend="triton",
                              use_qk_l2norm=True)
    grads = torch.autograd.grad(o.square().sum(), leaves)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k)]
    o_ref, s_ref = log_linear_gdn(*leaves64, v.double(), g.double(), beta.double(), lam.double(), cu_seqlens=cu,
                                  output_final_state=True, backend="reference", use_qk_l2norm=True)
    ref_grads = torch.autograd.grad(o_ref.square().sum(), leaves64)
    assert o.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(grads, ref_grads))
    assert state.positions == (30, 70) and rel_err(state.buckets, s_ref.buckets) < 1e-5
    on_torch, _ = log_linear_gdn(q, k, v, g, beta, lam, cu_seqlens=cu, backend="torch", use_qk_l2norm=True)
    assert rel_err(on_torch, o_ref) < 1e-5
    unnormalised, _ = log_linear_gdn(q, k, v, g, beta, lam, cu_seqlens=cu, backend="triton")
    assert rel_err(unnormalised, o_ref) > 1e-2


@pytest.mark.parametrize("k_dim, v_dim", [(272, 16), (16, 528)])
def test_public_op_refuses_heads_wider_than_the_kernels_are_built_for(k_dim, v_dim):
    """backend="triton" with K > 256 or V > 512 is a clear error naming the limits and the way
    out, not a shared-memory failure at launch (K = 320 needs 384 KiB on an H200)."""
    from ctxpar import log_linear_gdn

    q, k, v, g, beta, lam = make_inputs(1, 20, 2, 2, k_dim, v_dim, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"K <= 256 and V <= 512.*backend='torch'"):
        log_linear_gdn(q, k, v, g, beta, lam, backend="triton")
    o, _ = log_linear_gdn(q, k, v, g, beta, lam, backend="torch")
    assert o.shape == v.shape and torch.isfinite(o).all()
