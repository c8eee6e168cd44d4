"""A candidate design for log-linear GDN's tree reads (issue #4), forward and backward, against
TreeReads (gdn_read.py) on the same tree.

Today every chunk reads, at each set bit of its index, the node carried forward to its start: a
K x K x V product per carried node, gathered into per-height pools over hundreds of launches, and
the backward rebuilds the pools (reads fwd 29.8 ms, fwd+bwd 152.5 ms of a 260 ms step at 128K
tokens, H=16, K=V=128, on an H200). Here the chunk's queries are carried instead, down its set
bits, in one program per (slot, head): read o += lambda * (Q_j @ N_j), then Q_{j+1} = Q_j @ T_j
(the K x K transition of the block just read): C K (K + V) multiply-adds per read against
K K V + C K V (2/3 at K = V = 128; 7.1M against 18.9M at the paper's K = 192, V = 384), with no
pools, gathers or per-height launches. Backward, three kernels:
- chain_grad, per (slot, head): Q_j up the bits, kept per (slot, height); then
  dQ_j = lambda_j dO N_j^T + dQ_{j+1} T_j^T down them, dQ_{j+1} kept; dQt = dQ_0;
- lam_grad, per (slot, head): lambda's gradient rowsum(dO * (Q_j @ N_j)) at each read level;
- node_grad, per (run of <= 32 of a node's readers, head): dN += Q_j^T (lambda_j dO) and
  dT += Q_j^T dQ_{j+1}, added atomically across runs.
The kept Q_j and dQ_{j+1} are [S, heights, H, C, K] float32 each (11.8 GB at 128K, H=16): fine
for this measurement, not for 1M tokens. Its fwd+bwd time also counts joining the per-height
node and transition lists into one buffer each, which an op built this way would not need.

Status: equal to TreeReads on the interpreter (float32: output 8e-9, every gradient <= 2.4e-7
relative; unread heights' gradients zero in both). Compiled for sm_90 at K = V = 128 every kernel
fits in shared memory (forward 128 KiB, chain_grad 192 KiB, node_grad 193 KiB, lam_grad 96 KiB);
at K = 192, V = 384 none does (576-960 KiB: they need K / V tiles). Timed on an H200 (2026-12-01,
bf16, H=16, K=V=128; results/2026-12-01-h200-exp-gdn-query-carry.json): forward 19.6 ms against
29.1 at 128K tokens and 3.3 against 4.9 at 8K x 4; fwd+bwd 81.2 against 105.8 and 14.5 against
17.5 -- a quarter off the reads, not the several-fold the op's targets need.

    python benchmarks/exp_gdn_query_carry.py   # GPU: 128K tokens, H=16, K=V=128, bf16; CPU: the check
"""

import json
import os

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton import gdn_function as F
from ctxpar.kernels.triton.common import dot_precision, node_at, reads_at
from ctxpar.kernels.triton.layout import node_segments
from ctxpar.kernels.triton.gdn_read import TreeReads

# (B, T, H, K, V, dtype) this script and exp_gdn_height_scan.py run: timed on a GPU, checked on the interpreter
GPU_SHAPES = [(4, 8192, 16, 128, 128, torch.bfloat16), (1, 131072, 16, 128, 128, torch.bfloat16)]
CPU_SHAPES = [(1, 1000, 2, 32, 16, torch.float32), (2, 700, 2, 32, 16, torch.float32)]


@triton.jit
def node_item(offsets, rank, c, height, c0, first, H, h):
    """Row of the node chunk c reads at ``height`` (and of its transition) in the per-height
    lists joined into one buffer (nodes[height][rank[slot]]), times H plus the head."""
    _, slot = node_at(c, height, c0, first)
    return (tl.load(offsets + height) + tl.load(rank + slot)) * H + h


@triton.jit
def qcarry_kernel(qt, lam, lam_s0, lam_s1, lam_s2, nodes, trans, offsets, rank, docs, slot_doc, slot_chunk, out,
                  H, K, V, heights, LEVEL0, C: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, PREC: tl.constexpr):
    i, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_doc + i).to(tl.int64)
    c = tl.load(slot_chunk + i)
    c0, first = tl.load(docs + n * 6 + 3), tl.load(docs + n * 6 + 5)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, KP), tl.arange(0, VP)
    q = tl.load(qt + ((i * H + h).to(tl.int64) * C + rc[:, None]) * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
    acc = tl.zeros([C, VP], dtype=tl.float32)
    for height in range(0, heights):
        if reads_at(c, height, c0, False):
            item = node_item(offsets, rank, c, height, c0, first, H, h)
            node_mask = (rk[:, None] < K) & (rv[None, :] < V)
            node = tl.load(nodes + (item * K + rk[:, None]) * V + rv[None, :], mask=node_mask, other=0.0)
            w = tl.load(lam + i * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
            acc += w[:, None] * tl.dot(q, node, input_precision=PREC)
            trans_mask = (rk[:, None] < K) & (rk[None, :] < K)
            t = tl.load(trans + (item * K + rk[:, None]) * K + rk[None, :], mask=trans_mask, other=0.0)
            q = tl.dot(q, t, input_precision=PREC)
    tl.store(out + ((i * H + h).to(tl.int64) * C + rc[:, None]) * V + rv[None, :], acc, mask=rv[None, :] < V)


def qcarry_reads(qt, lam_slots, nodes, trans, layout, plan, log_c, prec):
    """(the reads' output buffer [S, H, C, V], a function that fills it)."""
    S, H, C, K = qt.shape
    V = nodes[0].shape[-1]
    sizes = [x.shape[0] for x in nodes]
    offsets = torch.tensor([0] + sizes[:-1], device=qt.device).cumsum(0)
    nodes_cat, trans_cat = torch.cat(nodes), torch.cat(trans)
    out = torch.empty(S, H, C, V, device=qt.device)

    def run():
        qcarry_kernel[(S, H)](qt, lam_slots, *lam_slots.stride()[:3], nodes_cat, trans_cat, offsets, plan.rank,
                              layout.docs, layout.slot_doc, layout.slot_chunk, out, H, K, V, len(nodes), log_c + 1,
                              C=C, KP=triton.next_power_of_2(K), VP=triton.next_power_of_2(V), PREC=prec, num_warps=8)

    return out, run


@triton.jit
def chain_grad_kernel(qt, d_out, lam, lam_s0, lam_s1, lam_s2, nodes, trans, offsets, rank, docs, slot_doc, slot_chunk,
                      qs, dqs, d_qt, H, K, V, heights, LEVEL0, C: tl.constexpr,
                      KP: tl.constexpr, VP: tl.constexpr, PREC: tl.constexpr):
    """Per (slot, head): Q_j up the bits (kept in qs[slot, height]), then dQ down them (dQ_{j+1}
    kept in dqs[slot, height]), and dQt."""
    i, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_doc + i).to(tl.int64)
    c = tl.load(slot_chunk + i)
    c0, first = tl.load(docs + n * 6 + 3), tl.load(docs + n * 6 + 5)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, KP), tl.arange(0, VP)
    ck_mask = rk[None, :] < K
    q = tl.load(qt + ((i * H + h).to(tl.int64) * C + rc[:, None]) * K + rk[None, :], mask=ck_mask, other=0.0)
    do = tl.load(d_out + ((i * H + h).to(tl.int64) * C + rc[:, None]) * V + rv[None, :], mask=rv[None, :] < V,
                 other=0.0)
    kk_mask = (rk[:, None] < K) & (rk[None, :] < K)
    kv_mask = (rk[:, None] < K) & (rv[None, :] < V)
    for height in range(0, heights):
        if reads_at(c, height, c0, False):
            s_item = ((i * heights + height) * H + h).to(tl.int64) * C
            tl.store(qs + (s_item + rc[:, None]) * K + rk[None, :], q, mask=ck_mask)
            item = node_item(offsets, rank, c, height, c0, first, H, h)
            t = tl.load(trans + (item * K + rk[:, None]) * K + rk[None, :], mask=kk_mask, other=0.0)
            q = tl.dot(q, t, input_precision=PREC)
    dq = tl.zeros([C, KP], dtype=tl.float32)
    for step in range(0, heights):
        height = heights - 1 - step
        if reads_at(c, height, c0, False):
            s_item = ((i * heights + height) * H + h).to(tl.int64) * C
            tl.store(dqs + (s_item + rc[:, None]) * K + rk[None, :], dq, mask=ck_mask)
            item = node_item(offsets, rank, c, height, c0, first, H, h)
            node = tl.load(nodes + (item * K + rk[:, None]) * V + rv[None, :], mask=kv_mask, other=0.0)
            t = tl.load(trans + (item * K + rk[:, None]) * K + rk[None, :], mask=kk_mask, other=0.0)
            w = tl.load(lam + i * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
            dq = tl.dot(w[:, None] * do, tl.trans(node), input_precision=PREC) + \
                tl.dot(dq, tl.trans(t), input_precision=PREC)
    tl.store(d_qt + ((i * H + h).to(tl.int64) * C + rc[:, None]) * K + rk[None, :], dq, mask=ck_mask)


@triton.jit
def lam_grad_kernel(d_out, qs, nodes, offsets, rank, docs, slot_doc, slot_chunk, d_lam, dl_s0, dl_s1, dl_s2, H, K, V,
                    heights, LEVEL0, C: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, PREC: tl.constexpr):
    """Per (slot, head): lambda's gradient at each read level, rowsum(dO * (Q_j @ N_j))."""
    i, h = tl.program_id(0), tl.program_id(1)
    n = tl.load(slot_doc + i).to(tl.int64)
    c = tl.load(slot_chunk + i)
    c0, first = tl.load(docs + n * 6 + 3), tl.load(docs + n * 6 + 5)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, KP), tl.arange(0, VP)
    do = tl.load(d_out + ((i * H + h).to(tl.int64) * C + rc[:, None]) * V + rv[None, :], mask=rv[None, :] < V,
                 other=0.0)
    for height in range(0, heights):
        if reads_at(c, height, c0, False):
            s_item = ((i * heights + height) * H + h).to(tl.int64) * C
            qj = tl.load(qs + (s_item + rc[:, None]) * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
            item = node_item(offsets, rank, c, height, c0, first, H, h)
            kv_mask = (rk[:, None] < K) & (rv[None, :] < V)
            node = tl.load(nodes + (item * K + rk[:, None]) * V + rv[None, :], mask=kv_mask, other=0.0)
            read = tl.dot(qj, node, input_precision=PREC)
            tl.store(d_lam + i * dl_s0 + h * dl_s1 + rc * dl_s2 + LEVEL0 + height, tl.sum(do * read, 1))


@triton.jit
def node_grad_kernel(d_out, lam, lam_s0, lam_s1, lam_s2, qs, dqs, segments, docs, offsets, rank, d_nodes, d_trans, H, K,
                     V, heights, LEVEL0, C: tl.constexpr, KP: tl.constexpr, VP: tl.constexpr, PREC: tl.constexpr):
    """Per (segment of a node's readers, head, which): dN += Q_j^T (w dO) or dT += Q_j^T dQ_{j+1}."""
    s, h, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seg = segments + s * 4
    n, height, c_first, count = tl.load(seg), tl.load(seg + 1), tl.load(seg + 2), tl.load(seg + 3)
    c0, first = tl.load(docs + n * 6 + 3), tl.load(docs + n * 6 + 5)
    r0 = first + c_first - c0
    rc, rk, rv = tl.arange(0, C), tl.arange(0, KP), tl.arange(0, VP)
    ck_mask = rk[None, :] < K
    item = node_item(offsets, rank, c_first, height, c0, first, H, h)
    if which == 0:
        acc_n = tl.zeros([KP, VP], dtype=tl.float32)
        for j in range(0, count):
            r = r0 + j
            s_item = ((r * heights + height) * H + h).to(tl.int64) * C
            qj = tl.load(qs + (s_item + rc[:, None]) * K + rk[None, :], mask=ck_mask, other=0.0)
            do = tl.load(d_out + ((r * H + h).to(tl.int64) * C + rc[:, None]) * V + rv[None, :], mask=rv[None, :] < V,
                         other=0.0)
            w = tl.load(lam + r * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
            acc_n += tl.dot(tl.trans(qj), w[:, None] * do, input_precision=PREC)
        kv_mask = (rk[:, None] < K) & (rv[None, :] < V)
        tl.atomic_add(d_nodes + (item * K + rk[:, None]) * V + rv[None, :], acc_n, mask=kv_mask, sem="relaxed")
    else:
        acc_t = tl.zeros([KP, KP], dtype=tl.float32)
        for j in range(0, count):
            r = r0 + j
            s_item = ((r * heights + height) * H + h).to(tl.int64) * C
            qj = tl.load(qs + (s_item + rc[:, None]) * K + rk[None, :], mask=ck_mask, other=0.0)
            dqn = tl.load(dqs + (s_item + rc[:, None]) * K + rk[None, :], mask=ck_mask, other=0.0)
            acc_t += tl.dot(tl.trans(qj), dqn, input_precision=PREC)
        kk_mask = (rk[:, None] < K) & (rk[None, :] < K)
        tl.atomic_add(d_trans + (item * K + rk[:, None]) * K + rk[None, :], acc_t, mask=kk_mask, sem="relaxed")


def reader_runs(layout, segment):
    """layout.node_segments' runs of at most ``segment`` readers per node, those whose node is a
    slot (no initial state here), on the layout's device; built once per layout."""
    c0 = torch.tensor(layout.c0)
    runs, in_slots = node_segments(layout.host["slot_doc"], layout.host["slot_chunk"], c0, layout.heights, segment)
    return runs[:in_slots].to(layout.docs.device)


def qcarry_backward(qt, lam_slots, nodes, trans, d_out, layout, plan, log_c, prec, segs):
    """(d_qt, d_lam_slots, d_nodes per height, d_trans per height) for the reads' output gradient
    d_out; segs: the node-gradient segments whose node is a slot (``reader_runs``)."""
    S, H, C, K = qt.shape
    V = nodes[0].shape[-1]
    heights = len(nodes)
    sizes = [x.shape[0] for x in nodes]
    offsets = torch.tensor([0] + sizes[:-1], device=qt.device).cumsum(0)
    nodes_cat, trans_cat = torch.cat(nodes), torch.cat(trans)
    qs = torch.empty(S, heights, H, C, K, device=qt.device)
    dqs = torch.empty_like(qs)
    d_qt = torch.empty_like(qt)
    d_lam = torch.zeros(lam_slots.shape, device=qt.device)
    KP, VP = triton.next_power_of_2(K), triton.next_power_of_2(V)
    chain_grad_kernel[(S, H)](qt, d_out, lam_slots, *lam_slots.stride()[:3], nodes_cat, trans_cat, offsets, plan.rank,
                              layout.docs, layout.slot_doc, layout.slot_chunk, qs, dqs, d_qt, H, K, V, heights,
                              log_c + 1, C=C, KP=KP, VP=VP, PREC=prec, num_warps=8)
    lam_grad_kernel[(S, H)](d_out, qs, nodes_cat, offsets, plan.rank, layout.docs, layout.slot_doc, layout.slot_chunk,
                            d_lam, *d_lam.stride()[:3], H, K, V, heights, log_c + 1, C=C, KP=KP, VP=VP, PREC=prec,
                            num_warps=8)
    d_nodes, d_trans = torch.zeros_like(nodes_cat), torch.zeros_like(trans_cat)
    node_grad_kernel[(segs.shape[0], H, 2)](d_out, lam_slots, *lam_slots.stride()[:3], qs, dqs, segs, layout.docs,
                                            offsets, plan.rank, d_nodes, d_trans, H, K, V, heights, log_c + 1, C=C,
                                            KP=KP, VP=VP, PREC=prec, num_warps=8)
    return d_qt, d_lam, list(d_nodes.split(sizes)), list(d_trans.split(sizes))


def setup(B, T, H, K, V, dtype, device):
    """A fresh random GDN tree: the chunk stage's carried queries, the slot grid's lambda and the
    up-sweep's nodes and transitions, as gdn_function.chunked builds them."""
    L = (T).bit_length() + 1
    q = (torch.randn(B * T, H, K, device=device) * K**-0.5).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(B * T, H, K, device=device), dim=-1).to(dtype)
    v = torch.randn(B * T, H, V, device=device).to(dtype)
    g = -torch.rand(B * T, H, device=device) * 0.1
    beta = torch.rand(B * T, H, device=device).to(dtype)
    lam = (torch.rand(B * T, H, L, device=device) + 0.5).to(dtype)
    spans = [(b, 0, T) for b in range(B)]
    C, log_c = F.DEFAULT_CHUNK, F.DEFAULT_CHUNK.bit_length() - 1
    layout, grid, plan = F._tables(tuple(spans), tuple([0] * B), B * T, T, C, H, H, device)
    prec = dot_precision(dtype)
    o, qt, u, m = F.ChunkStage.apply(q, k, v, g, beta, lam, layout, prec, plan.rank)
    lam_slots = grid.tokens(torch.nn.functional.pad(lam.float(), (0, max(0, log_c + 1 + layout.heights - L))))
    nodes, trans = F.up_sweep(u, m, None, plan, prec)
    return qt, lam_slots, nodes, trans, layout, plan, log_c, prec


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    """Writes $OUT/exp_gdn_query_carry.json: relative differences from TreeReads (output and every
    gradient), and on a GPU both designs' forward and forward+backward times."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for B, T, H, K, V, dt in GPU_SHAPES if dev == "cuda" else CPU_SHAPES:
        qt, lam_slots, nodes, trans, layout, plan, log_c, prec = setup(B, T, H, K, V, dt, dev)
        leaves = [x.detach().clone().requires_grad_() for x in (qt, lam_slots, *nodes, *trans)]

        def tree_reads():
            return TreeReads.apply(leaves[0], leaves[1], None, plan, log_c, prec, *leaves[2:])

        with torch.no_grad():
            out, run = qcarry_reads(qt, lam_slots, nodes, trans, layout, plan, log_c, prec)
            run()
        ref = tree_reads()
        d_out = torch.randn_like(ref)
        ref_grads = torch.autograd.grad(ref, leaves, d_out)
        segment = 32 if dev == "cuda" else 2  # on the CPU, several runs per node: their atomic adds
        segs = reader_runs(layout, segment)
        d_qt, d_lam, d_nodes, d_trans = qcarry_backward(qt, lam_slots, nodes, trans, d_out, layout, plan, log_c, prec,
                                                        segs)
        grads = [d_qt, d_lam, *d_nodes, *d_trans]
        read = [i for i, g in enumerate(ref_grads) if g.norm() > 0]  # heights no chunk reads have no gradient
        row = dict(T=T, B=B, H=H, K=K, V=V, out_rel_err=rel(out, ref.detach()),
                   grad_rel_err=max(rel(grads[i], ref_grads[i]) for i in read),
                   unread_grads_zero=all(grads[i].norm() == 0 for i in range(len(grads)) if i not in read))
        if dev == "cuda":
            ms = lambda f: triton.testing.do_bench(f, warmup=3, rep=20, return_mode="median")  # noqa: E731
            with torch.no_grad():
                row["tree_reads_fwd_ms"] = ms(tree_reads)
                row["qcarry_fwd_ms"] = ms(run)
            row["tree_reads_fwdbwd_ms"] = ms(lambda: torch.autograd.grad(tree_reads(), leaves, d_out))
            row["qcarry_fwdbwd_ms"] = ms(lambda: (run(), qcarry_backward(qt, lam_slots, nodes, trans, d_out, layout,
                                                                          plan, log_c, prec, segs)))
        rows.append(row)
        print(row, flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_gdn_query_carry.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
