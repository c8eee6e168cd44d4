"""A candidate design for log-linear GDN's tree reads (issue #4), forward only, against TreeReads.

Today (gdn_read.py) every chunk reads, at each set bit of its index, the node carried forward to
its start: a K x K x V product per carried node, gathered into per-height pools over hundreds of
launches (reads fwd 29.8 ms, fwd+bwd 152.5 ms of a 260 ms step at 128K tokens, H=16, K=V=128,
on an H200). Here the chunk's queries are carried instead, down its set bits in one program per
(slot, head): read o += lambda * (Q @ N_j), then Q <- Q @ T_j (the K x K transition of the block
just read), a C x K x K product per bit. Per read that is C K (K + V) multiply-adds against
K K V + C K V: 2 / 3 of today's at K = V = 128 and 7.1M / 18.9M at the paper's K = 192, V = 384,
with no pools, gathers or per-height launches. A backward would mirror it (dQ down the bits,
node and transition gradients reduced over their readers like node_grad.py's segments).

Status (2026-11-30): equal to TreeReads on the interpreter (float32, T = 1000: relative error
8e-9); compiled for sm_90, K = V = 128 fits (128 KiB shared, 592 B spills per thread) and
K = 192, V = 384 does not (640 KiB: it needs V tiles). Not yet timed on a GPU.

    python benchmarks/exp_gdn_query_carry.py   # GPU: 128K tokens, H=16, K=V=128, bf16; CPU: a check
"""
import json
import os

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton import gdn_function as F
from ctxpar.kernels.triton.common import dot_precision
from ctxpar.kernels.triton.gdn_read import TreeReads


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
        e = ((c >> height) << height) - 1
        if (((c >> height) & 1) == 1) & (e >= c0):
            item = (tl.load(offsets + height) + tl.load(rank + first + e - c0)) * H + h
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


def setup(B, T, H, K, V, dtype, device):
    torch.manual_seed(0)
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
    o, qt, u, m = F.ChunkStage.apply(q, k, v, g, beta, lam, layout, prec)
    lam_slots = grid.tokens(torch.nn.functional.pad(lam.float(), (0, max(0, log_c + 1 + layout.heights - L))))
    nodes, trans = F.up_sweep(u, m, None, plan, prec)
    return qt, lam_slots, nodes, trans, layout, plan, log_c, prec


def main():
    """Writes $OUT/exp_gdn_query_carry.json: the relative difference from TreeReads, and on a GPU
    both forward times."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = [(1, 131072, 16, 128, 128, torch.bfloat16)] if dev == "cuda" else [(1, 1000, 2, 32, 16, torch.float32)]
    rows = []
    for B, T, H, K, V, dt in shape:
        qt, lam_slots, nodes, trans, layout, plan, log_c, prec = setup(B, T, H, K, V, dt, dev)
        with torch.no_grad():
            ref = TreeReads.apply(qt, lam_slots, None, plan, log_c, prec, *nodes, *trans)
            out, run = qcarry_reads(qt, lam_slots, nodes, trans, layout, plan, log_c, prec)
            run()
        err = ((out - ref).norm() / ref.norm()).item()
        row = dict(T=T, H=H, K=K, V=V, rel_err=err)
        if dev == "cuda":
            ms = lambda f: triton.testing.do_bench(f, warmup=3, rep=20, return_mode="median")  # noqa: E731
            with torch.no_grad():
                row["tree_reads_fwd_ms"] = ms(lambda: TreeReads.apply(qt, lam_slots, None, plan, log_c, prec, *nodes,
                                                                      *trans))
                row["qcarry_fwd_ms"] = ms(run)
        rows.append(row)
        print(row, flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_gdn_query_carry.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
