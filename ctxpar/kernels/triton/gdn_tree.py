"""GDN stage 2 (counterparts: ``torch_chunked.build_tree`` + ``read_tree``): the tree over chunks.

Across chunks every step is a batched [K, K] @ [K, K or V] product, one launch per tree height
with every node of that height in the batch (bf16 tensor cores on the tree's bf16 copies for
half-precision inputs; see up_kernel): a
parent's node and transition from one launch, tiles of both, and in the backward all four of its
children's gradients from one launch (the gathered products before, two launches per height
forward and four backward plus a copy, a clone and adds, re-read each operand). The up-sweep is
one autograd Function with its own backward, which needs nothing but the tree (autograd over
torch ops would keep a gathered copy of every left child). H200, 128K tokens, H=16, K=V=128, same
run: the op's fwd+bwd 105.4 -> 101.3 ms with these kernels; their own time equals the gathered
products' (22.6 against 22.7 ms), the gain is the copies and adds they spare
(benchmarks/results/2026-12-01-h200-gdn-session17-ab.json).

Nodes use the layout's Fenwick numbering (layout.py): the node of height h ending at chunk c is
slot c's once ones(c) >= h. ``trans[h]`` holds the transitions at height h of the slots with
ones >= h, in ``by_height`` order (a prefix of it), so that the parents of a height are the first
entries of its children's array. The states are kept by slot instead, one row each, in the same
order: a parent overwrites its right child (its own slot's node one height down), which leaves
every slot its top node, of height ones(c). Nothing needs a lower one: a node below its slot's
top is a right child, which no chunk and no final state reads (both read nodes ending where a set
bit of a chunk index is cleared, which have exactly h ones), so its only reader is its parent,
and its gradient is its parent's - every node of a slot has the same gradient, one row of it a
slot (as Mamba-2's tree, whose slot holds one node). Against every height's nodes kept apart
(and up_grad copying each parent's gradient to its right child), the op at 128K tokens on an H200
(bf16) went 61.4 -> 60.5 ms and its peak 19.2 -> 16.2 GiB at H=16, K=V=128, and 91.6 -> 91.1 ms,
19.0 -> 14.0 GiB at H=6, K=192, V=384 (results/2026-12-02-h200-gdn-session20.json). A left child before the
document's first chunk is the initial state's node of that height, with identity transition (its
content is already carried to t0).

Chunk c reads, at each set bit h, the node ending at a - 1 (a = c with its low h bits cleared),
carried to c's start through the nodes it reads below h (gdn_carry.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import register_cap, store_tile, tiles_adjacent


@dataclass
class Up:
    """Height h -> h + 1 of the up-sweep: the parents are the first ``count`` entries of trans[h]
    (their right children; the same rows of the nodes by slot); parent p's left child is row
    left[p], or where left[p] < 0 the initial node of document doc[p] (carried to t0 already:
    identity transition)."""

    count: int
    left: torch.Tensor
    doc: torch.Tensor


class TreePlan:
    """Host-built index tables of the up-sweep and the reads (device tensors)."""

    def __init__(self, layout, device):
        doc, chunk, order = (layout.host[x] for x in ("slot_doc", "slot_chunk", "by_height"))
        c0 = torch.tensor(layout.c0)[doc]
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        self.layout, self.num_docs, self.rank_host = layout, layout.num_docs, rank
        self.rank = rank.to(device)
        self.up = []
        for h in range(layout.heights):
            right = order[: layout.at_least[h + 1]]
            if right.numel() == 0:
                break
            inside = chunk[right] - (1 << h) >= c0[right]
            left = torch.where(inside, rank[(right - (1 << h)).clamp(min=0)], -1)
            self.up.append(Up(right.numel(), left.to(device), torch.where(inside, 0, doc[right]).to(device)))
        # The reads' tables (gdn_carry.py): the joined tree's first row of each height, and
        # each (slot, height) read's row among all reads (-1: no read), at every set bit of the
        # chunk (reads of initial nodes included, read or not).
        self.sizes = [layout.at_least[h] for h in range(len(self.up) + 1)]  # nodes of each height
        sizes = torch.tensor(self.sizes)
        self.num_nodes, self.device = int(sizes.sum()), device
        self.offsets_host = torch.cumsum(sizes, 0) - sizes
        self.node_offsets = self.offsets_host.to(device)
        bits = (chunk[:, None] >> torch.arange(layout.heights)) & 1
        self.read_row = torch.where(bits == 1, torch.cumsum(bits.flatten(), 0).view_as(bits) - 1, -1).to(device)
        self.num_reads = int(bits.sum())

    @property
    def right_children(self) -> list[tuple[int, int]]:
        """Row ranges [lo, hi) of the joined transitions holding right children (rows
        [0, at_least[h + 1]) of height h): a right child's only reader is its parent (see the module
        docstring), so the up-sweep's backward stores their gradients (UpSweep) over whatever the
        rows hold (against zero fills and adds: the op at 128K tokens 65.6 -> 63.4 ms, bf16, H=16,
        K=V=128, an H200; results/2026-12-02-h200-gdn-session20.json)."""
        return [(int(self.offsets_host[h]), int(self.offsets_host[h]) + up.count) for h, up in enumerate(self.up)]

    @cached_property
    def zero_ranges(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Row ranges [lo, hi) that need zeros before node_grad (gdn_carry.py), of the node
        gradients (by slot) and of the joined transitions': those without a single node_grad
        writer - nodes no chunk reads (at a document's end) and nodes read by several runs (atomic
        adds) - but for the right children's transitions, which the up-sweep's backward stores.
        Every other row's one writer stores. Ranges, not rows, because one fill of a contiguous
        range runs at bandwidth where index_fill_ over the same rows took longer than filling the
        whole buffer (H200). Built on first use, by a backward."""
        height, slot = self.layout.sole_writers
        by_slot = torch.zeros(self.layout.num_slots, dtype=torch.bool)
        by_slot[self.rank_host[slot]] = True
        joined = torch.zeros(self.num_nodes, dtype=torch.bool)
        joined[self.offsets_host[height] + self.rank_host[slot]] = True
        for lo, hi in self.right_children:
            joined[lo:hi] = True
        return _unset_ranges(by_slot), _unset_ranges(joined)

    def slot_rank(self, n, chunk):
        """Position of document n's chunk in the by_height order (host int)."""
        return int(self.rank_host[self.layout.first_slot[n] + chunk - self.layout.c0[n]])


def _unset_ranges(single: torch.Tensor) -> list[tuple[int, int]]:
    """The ranges [lo, hi) of False rows of a host bool vector."""
    single = torch.cat([single, torch.ones(1, dtype=torch.bool)])  # closes a last range
    edges = torch.nonzero(single[1:] != single[:-1])[:, 0] + 1
    bounds = ([0] if not single[0] else []) + edges.tolist()
    return list(zip(bounds[::2], bounds[1::2]))


def initial_node(init, h, like, num_docs):
    """[N, H, K, V]: the initial state's node of height h (zeros where it has none)."""
    if init is None or h >= init.shape[2]:
        return like.new_zeros(num_docs, *like.shape[1:])
    return init[:, :, h]


def operand_dtype(dtype: torch.dtype) -> torch.dtype:
    """The tree copy's dtype for inputs of ``dtype``."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def tree_copies(plan, H, K, V, dtype, device):
    """The copies of the tree the kernels read (no gradients), in ``dtype``, unfilled: nodes by slot
    [S, H, K, V] (each slot's top node) and transitions joined over the heights [num_nodes, H, K, K];
    the chunk stage stores height 0 (its U and M: rows [0, S)), the up-sweep the rest."""
    return (torch.empty(plan.layout.num_slots, H, K, V, device=device, dtype=dtype),
            torch.empty(plan.num_nodes, H, K, K, device=device, dtype=dtype))


def gradient_dtype(filled, copies_dtype):
    """The dtype of the tree's gradients (of U, M, the nodes and transitions). float32 where
    ``filled``: the float32 tree is then read by torch ops (an initial or a final state), and
    autograd casts a gradient to its tensor's dtype. Else the copies' (bf16 for half-precision
    inputs): there is then no float32 tree, only stand-ins (``stand_in``) that carry the
    gradients, so these take the dtype the kernels read their operands in, half the bytes of
    float32 in every kernel that stores, adds into or reads them (node_grad, up_grad, the chunk
    stage's backward). On an H200 (bf16, one run) the op went, with bf16 gradients and then with
    no float32 tree either (the up-sweep adding right children from the copies): 9.68 -> 8.58 ->
    8.19 ms at 8K tokens x 4, H=16, K=V=128, 41.57 -> 37.18 -> 35.76 at 128K (peak 15.20 -> 12.20
    GiB); H=6, K=192, V=384: 11.11 -> 9.95 -> 9.47 and 50.48 -> 45.74 -> 44.03. bf16 errors against
    float64 (tests/precision_gdn.py, 4096 tokens in chunks of 16): o 2.67e-3 -> 2.67e-3 -> 2.74e-3,
    the gradients' largest 3.56e-3 -> 3.61e-3 -> 3.62e-3 (results/2026-12-02-h200-gdn-session26.json)."""
    return torch.float32 if filled else copies_dtype


def stand_in(shape, dtype, device):
    """A tensor of ``shape`` that only gives a gradient its shape and dtype: one row of NaNs
    expanded (no kernel reads or writes it)."""
    return torch.full((1, *shape[1:]), float("nan"), device=device, dtype=dtype).expand(shape)


def float_tree(shape, filled, dtype, device):
    """Float32 tree rows of ``shape`` (U, M, the nodes, a height's transitions) where ``filled``
    (where an initial or a final state asks for them); else a stand-in of ``dtype``
    (gradient_dtype): the kernels read the copies, and the float32 tree then only gives its
    gradients a shape. At 128K tokens, H=16, K=128 the filled transitions are 4.3 GB written: the
    op on an H200 went 48.83 -> 47.72 ms without them (H=6, K=192, V=384: 60.68 -> 59.98;
    results/2026-12-02-h200-gdn-session22.json); its peak, in the backward, stayed 16.20 GiB."""
    return torch.empty(shape, device=device) if filled else stand_in(shape, dtype, device)


def up_sweep(u, m, init, plan, prec, copies, filled):
    """Chunk end states u [S, H, K, V] and transitions m [S, H, K, K], in by_height order (row
    plan.rank[i] for slot i: the chunk stage writes them so), and ``copies`` (tree_copies) with
    height 0 stored -> (nodes, trans, copies): every slot's top node [S, H, K, V] (u itself,
    overwritten), the transitions per height (``float_tree``, as m), and the copies completed,
    with the initial nodes' (or None) in their dtype. Unless ``filled`` there is no float32 tree:
    u, the nodes and the transitions are stand-ins in the gradients' dtype (gradient_dtype,
    float_tree), and the parents add their right children from the copies.
    init: [N, H, NI, K, V] initial-state nodes (height h at index h) or None."""
    nodes, *trans, node_ops, trans_ops = UpSweep.apply(u, m, init, plan, prec, filled, *copies)
    init_ops = None if init is None else init.detach().to(node_ops.dtype).contiguous()
    return nodes, trans, (node_ops, trans_ops, init_ops)


@triton.jit
def tile_of(ptr, item, R, CN, r, c, TRANS: tl.constexpr, on=True):
    """Rows r, columns c of op(x) for x = ptr's [items, R, CN] entry ``item`` (op: x or x^T);
    zeros, and no traffic, where ``on`` is False."""
    base = ptr + item.to(tl.int64) * R * CN
    if TRANS:
        x = tl.load(base + c[None, :] * CN + r[:, None], mask=(r[:, None] < CN) & (c[None, :] < R) & on, other=0.0)
    else:
        x = tl.load(base + r[:, None] * CN + c[None, :], mask=(r[:, None] < R) & (c[None, :] < CN) & on, other=0.0)
    return x.to(tl.float32)  # the backward reads the bf16 copies


@triton.jit
def left_tile(nodes, trans, init, left, doc, h, height, H, NI, K, V, r, c, OF_TRANS: tl.constexpr,
              TRANS: tl.constexpr, HAS_INIT: tl.constexpr):
    """Rows r, columns c of op(X): X the left child's node [K, V] or, OF_TRANS, its transition
    [K, K]; before the document (left < 0) the initial node, or the identity."""
    inside = left >= 0
    row = (tl.maximum(left, 0) * H + h).to(tl.int64)
    if OF_TRANS:
        x = tl.where(inside, tile_of(trans, row, K, K, r, c, TRANS, inside), (r[:, None] == c[None, :]).to(tl.float32))
    else:
        x = tile_of(nodes, row, K, V, r, c, TRANS, inside)
        if HAS_INIT:
            start = ((doc * H + h) * NI + height).to(tl.int64)
            x += tile_of(init, start, K, V, r, c, TRANS, (left < 0) & (height < NI))
    return x


@triton.jit
def up_kernel(nodes, node_copy, trans_ops, init, left_idx, doc_idx, trans_out, trans_copy, H, K, V, NI, height,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_INIT: tl.constexpr, FILLED: tl.constexpr,
              PREC: tl.constexpr):
    """Parent p's node T_r @ X + N_r (a [BM, BN] tile of V columns) or transition T_r @ T_l (of K
    columns), X the left child (left_tile), stored in the copies' dtype and, FILLED, in float32;
    one program per (parent, head, tile), tiles adjacent. The products read the copies (T_r from
    trans_ops, this height's transitions; X from node_copy, and the initial node), in their
    dtype, half the bytes of the float32 tree's. The node goes over its right child N_r, the
    same slot's row of the nodes (by slot), which only this program reads (from the float32
    nodes where FILLED, else from the copy); no parent of the launch is a left child of it (those
    have exactly ``height`` ones)."""
    DT: tl.constexpr = node_copy.dtype.element_ty  # the products' operands: the copies' dtype
    node_cols = tl.cdiv(V, BN)
    cols = node_cols + tl.cdiv(K, BN)
    p, h, t = tiles_adjacent(H, tl.cdiv(K, BM) * cols)
    rm = t // cols * BM + tl.arange(0, BM)
    j = t % cols
    left, doc = tl.load(left_idx + p), tl.load(doc_idx + p)
    right = (p * H + h).to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if j < node_cols:
        rn = j * BN + tl.arange(0, BN)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = left_tile(node_copy, trans_ops, init, left, doc, h, height, H, NI, K, V, rk, rn, False, False, HAS_INIT)
            acc = tl.dot(tile_of(trans_ops, right, K, K, rm, rk, False).to(DT), x.to(DT), acc, input_precision=PREC)
        if FILLED:
            acc += tile_of(nodes, right, K, V, rm, rn, False)
            store_tile(nodes, right, K, V, rm, rn, acc)
        else:
            acc += tile_of(node_copy, right, K, V, rm, rn, False)
        store_tile(node_copy, right, K, V, rm, rn, acc)
    else:
        rn = (j - node_cols) * BN + tl.arange(0, BN)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = left_tile(node_copy, trans_ops, init, left, doc, h, height, H, NI, K, V, rk, rn, True, False, HAS_INIT)
            acc = tl.dot(tile_of(trans_ops, right, K, K, rm, rk, False).to(DT), x.to(DT), acc, input_precision=PREC)
        if FILLED:
            store_tile(trans_out, right, K, K, rm, rn, acc)
        store_tile(trans_copy, right, K, K, rm, rn, acc)


@triton.jit
def add_tile(ptr, item, R, CN, r, c, x, on):
    """ptr's [items, R, CN] entry ``item`` += x at rows r, columns c, where ``on``."""
    at = ptr + item.to(tl.int64) * R * CN + r[:, None] * CN + c[None, :]
    mask = (r[:, None] < R) & (c[None, :] < CN) & on
    tl.store(at, tl.load(at, mask=mask, other=0.0) + x, mask=mask)


@triton.jit
def up_grad_kernel(nodes, trans, init, left_idx, doc_idx, d_nodes, d_parent_m, d_trans, d_init, H, K, V, NI, height,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HAS_INIT: tl.constexpr, PREC: tl.constexpr):
    """The gradients of parent p's children, one [BM, BN] tile per program, by kind: the right
    transition dT_r = dP X^T + dPm T_l^T (stored: nothing else reads a right child,
    TreePlan.right_children); the left node (or initial node) += T_r^T dP; the left transition
    += T_r^T dPm. The node gradients are by slot (d_nodes): the parent's dP is its slot's row,
    which is its right child's too, and the left child's row has exactly ``height`` ones, so no
    program of the launch reads it. Rows written once per launch: a left child has one parent, and
    no right child is a left one."""
    DT: tl.constexpr = nodes.dtype.element_ty  # the products' operands: the copies' dtype
    kv = tl.cdiv(K, BM) * tl.cdiv(V, BN)
    kk = tl.cdiv(K, BM) * tl.cdiv(K, BN)
    p, h, t = tiles_adjacent(H, kv + 2 * kk)
    left, doc = tl.load(left_idx + p), tl.load(doc_idx + p)
    right = (p * H + h).to(tl.int64)
    lrow = (tl.maximum(left, 0) * H + h).to(tl.int64)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    if t < kk:  # right transition
        rm, rn = t // tl.cdiv(K, BN) * BM + tl.arange(0, BM), t % tl.cdiv(K, BN) * BN + tl.arange(0, BN)
        for v0 in range(0, V, BK):
            rv = v0 + tl.arange(0, BK)
            x = left_tile(nodes, trans, init, left, doc, h, height, H, NI, K, V, rv, rn, False, True, HAS_INIT)
            acc = tl.dot(tile_of(d_nodes, right, K, V, rm, rv, False).to(DT), x.to(DT), acc, input_precision=PREC)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = left_tile(nodes, trans, init, left, doc, h, height, H, NI, K, V, rk, rn, True, True, HAS_INIT)
            acc = tl.dot(tile_of(d_parent_m, right, K, K, rm, rk, False).to(DT), x.to(DT), acc, input_precision=PREC)
        store_tile(d_trans, right, K, K, rm, rn, acc)
    elif t < kv + kk:  # left node, or the initial node
        t2 = t - kk
        rm, rn = t2 // tl.cdiv(V, BN) * BM + tl.arange(0, BM), t2 % tl.cdiv(V, BN) * BN + tl.arange(0, BN)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            acc = tl.dot(tile_of(trans, right, K, K, rm, rk, True).to(DT),
                         tile_of(d_nodes, right, K, V, rk, rn, False).to(DT), acc, input_precision=PREC)
        add_tile(d_nodes, lrow, K, V, rm, rn, acc, left >= 0)
        if HAS_INIT:
            add_tile(d_init, ((doc * H + h) * NI + height), K, V, rm, rn, acc, (left < 0) & (height < NI))
    else:  # left transition
        t2 = t - kv - kk
        rm, rn = t2 // tl.cdiv(K, BN) * BM + tl.arange(0, BM), t2 % tl.cdiv(K, BN) * BN + tl.arange(0, BN)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            acc = tl.dot(tile_of(trans, right, K, K, rm, rk, True).to(DT),
                         tile_of(d_parent_m, right, K, K, rk, rn, False).to(DT), acc, input_precision=PREC)
        add_tile(d_trans, lrow, K, K, rm, rn, acc, left >= 0)


# The configuration of the gathered products these kernels replaced (gdn_bmm), taken over without
# a sweep of its own: on an H200 at 128K tokens (H=16, K=V=128, the up-sweep and reads, fwd+bwd;
# benchmarks/results/2026-11-30-h200-sweep_gdn_bmm.json) 128 x 128 tiles with 32-wide steps and
# 8 warps 184.3 ms, 64 x 64 215.9, 128 x 64 194.3, 64-wide steps 215.7 / 251.5.
TILE, STEP, NUM_WARPS = 128, 32, 8
# The up-sweep kernels' pipeline stages, Triton's default. Swept on an H200 at 8K tokens x 4 (bf16): 2 took
# the op from 9.68 to 10.09 ms at H=16, K=V=128 and 4 to 9.61 (H=6, K=192, V=384: 11.14 -> 11.90,
# 11.00; results/2026-12-02-h200-gdn-session26.json, one median each, before the bf16 tree gradients); 4 is not
# merged: not repeated, nor run through the GPU tests.
STAGES = 3


def _tiles(K, V):
    """(rows of a tile, its columns, the reduction step, warps). A K past 128 and not a multiple of
    it (192) takes 64 x 64 tiles and 4 warps, which do not pad it: the op at 128K tokens (H=6, K=192,
    V=384, an H200) 159.4 -> 152.7 ms; at K = V = 128 the same tiles took 91.1 -> 94.0
    (results/2026-12-01-h200-gdn-session18-configs.json)."""
    p2 = triton.next_power_of_2
    tile, warps = (TILE, NUM_WARPS) if K <= TILE or K % TILE == 0 else (TILE // 2, NUM_WARPS // 2)
    return min(tile, p2(K)), min(tile, p2(max(K, V))), min(STEP, p2(min(K, V))), warps


def _register_cap(dtype, warps):
    """maxnreg of the up-sweep's kernels: at 8 warps (128 x 128 tiles) ptxas gives them 186-206
    registers a thread, one program an SM; capped at 128 two fit (sm_90, Triton 3.6, K = V = 128: up
    spills 264 bytes a thread, up_grad 200); the op at 128K tokens on an H200 78.2 -> 76.6 ms
    (bf16, H=16; 2026-12-01-h200-gdn-session19-ab2.json), with tf32 products then. Half-precision
    inputs only (bf16 copies: the kernels are the same for bf16 and fp16). With bf16 products the
    cap spills more (up 296, up_grad 184 bytes; uncapped 210 and 186 registers, none); capped, bf16
    products took the op 56.08 -> 51.85 ms, and uncapped it went 48.83 -> 49.29 ms (H=6, K=192,
    V=384: 60.68 -> 60.67; both 2026-12-02-h200-gdn-session22.json)."""
    return register_cap(dtype, 2, warps) if warps == NUM_WARPS else None


class UpSweep(torch.autograd.Function):
    """parent = M_right @ left + right, M_parent = M_right @ M_left, one launch per height (bf16
    tensor cores for half-precision inputs); the backward walks the heights top down, one launch
    each. The nodes are by slot: u is overwritten, height by height, with each slot's top node
    (marked dirty; unless ``filled`` a stand-in, and the copies alone hold the nodes), and its
    gradient is every node of the slot's (see the module docstring).
    Completes the tree's copies (tree_copies: the chunk stage stored height 0) and returns them
    too, for the reads (no gradients). The backward needs only the tree, and reads it from those
    copies, so nothing keeps the float32 tree (34 GB at 512K tokens, H=16, K=V=128, when every
    height's nodes were kept; the bf16 copies are half that)."""

    @staticmethod
    def forward(ctx, u, m, init, plan, prec, filled, node_ops, trans_ops):
        trans = [m]
        H, K, V = u.shape[1], u.shape[2], u.shape[3]
        BM, BN, BK, warps = _tiles(K, V)
        NI = 1 if init is None else init.shape[2]
        init = None if init is None else init.contiguous()  # the kernels index it as [N, H, NI, K, V]
        has_init = init is not None and NI > 0  # a document starting inside its first chunk has none
        trans_copies = trans_ops.split(plan.sizes)
        for h, up in enumerate(plan.up):
            tr = float_tree((up.count, H, K, K), filled, m.dtype, m.device)
            grid = (up.count * H * triton.cdiv(K, BM) * (triton.cdiv(V, BN) + triton.cdiv(K, BN)),)
            up_kernel[grid](u, node_ops, trans_copies[h], u if init is None else init, up.left, up.doc, tr,
                            trans_copies[h + 1], H, K, V, NI, h, BM=BM, BN=BN, BK=BK, HAS_INIT=has_init,
                            FILLED=filled, PREC=prec, num_warps=warps, num_stages=STAGES,
                            maxnreg=_register_cap(node_ops.dtype, warps))
            trans.append(tr)
        if filled:
            ctx.mark_dirty(u)  # else a stand-in, returned as it came
        ctx.mark_non_differentiable(node_ops, trans_ops)
        ctx.set_materialize_grads(False)  # the copies' gradients: None, not tree-sized zeros
        ctx.save_for_backward(init, node_ops, trans_ops)
        ctx.plan, ctx.prec = plan, prec
        return (u, *trans, node_ops, trans_ops)

    @staticmethod
    def backward(ctx, d_nodes, *grads):
        init, node_ops, trans_ops = ctx.saved_tensors
        plan, prec = ctx.plan, ctx.prec
        trans = trans_ops.split(plan.sizes)
        H, K, V = node_ops.shape[1], node_ops.shape[2], node_ops.shape[3]
        BM, BN, BK, warps = _tiles(K, V)
        NI = 1 if init is None else init.shape[2]
        # The incoming gradients are this node's own buffers: accumulated into in place, but for
        # the right children's transitions, which nothing else writes (TreePlan.right_children):
        # stored. The nodes' need nothing stored: a slot's row is all its nodes' gradient.
        d_nodes, d_trans = d_nodes.contiguous(), [g.contiguous() for g in grads[: len(plan.sizes)]]
        d_init = None if init is None else torch.zeros_like(init)
        has_init = init is not None and NI > 0
        kv, kk = triton.cdiv(K, BM) * triton.cdiv(V, BN), triton.cdiv(K, BM) * triton.cdiv(K, BN)
        for h in reversed(range(len(plan.up))):
            up = plan.up[h]
            up_grad_kernel[(up.count * H * (kv + 2 * kk),)](
                node_ops, trans[h], node_ops if init is None else init, up.left, up.doc, d_nodes, d_trans[h + 1],
                d_trans[h], node_ops if d_init is None else d_init, H, K, V, NI, h, BM=BM, BN=BN, BK=BK,
                HAS_INIT=has_init, PREC=prec, num_warps=warps, num_stages=STAGES,
                maxnreg=_register_cap(node_ops.dtype, warps))
        return d_nodes, d_trans[0], d_init, None, None, None, None, None


def carried_node(nodes, trans, init, plan, n, ce, h):
    """[H, K, V]: document n's node ((ce >> h) - 1, h) carried to the start of chunk ce (nodes by
    slot: it is its slot's top node, as every node a chunk reads)."""
    a = (ce >> h) << h
    c0 = plan.layout.c0[n]
    x = nodes[plan.slot_rank(n, a - 1)] if a - 1 >= c0 else initial_node(init, h, nodes, plan.num_docs)[n]
    for low in reversed(range(h)):
        end = ((ce >> low) << low) - 1
        if (ce >> low) & 1 and end >= c0:
            x = trans[low][plan.slot_rank(n, end)] @ x
    return x
