"""A candidate design for log-linear GDN's tree (issue #4), forward: one scan per Fenwick height
instead of the up-sweep and the tree reads, against both on the same tree.

The height-h bucket of chunk c (read when bit h of c is set) is the chunks of c's 2^(h+1)-block
with bit h clear, carried to c's start. So one accumulator per height follows the linear
delta-rule recurrence A <- M_c A + U_c, taking U_c only while bit h of c is clear, reset to zero
where a block begins, and read (o += lambda_h * Qt_c @ A) while bit h is set. Heights never
mix: each is linear GDN's state pass with a masked input, and the grid is (head, V tile,
height), so the GPU has heights x more programs than linear GDN's one state per head. Each step
loads only the chunk's own M_c, U_c (from L2: every height and V tile of a head reads the same
ones); no carried node is ever written, gathered or multiplied K x K x K. Today's tree streams
a float32 K x K transition and K x V node from memory for each of ~log2(S) / 2 reads per
chunk, and its products stay memory-bound (gdn_bmm: 117 of 187 ms at 128K tokens, H=16).

Status (2026-12-01, H200, bf16, H=16, K=V=128; results/2026-12-01-h200-exp-gdn-height-scan.json):
equal to TreeReads on the interpreter (float32, 4e-8 relative) and within 3.2e-5 on the GPU
(both tf32). Forward: 21.2 ms at 128K tokens against 7.55 (up-sweep) + 29.27 (reads) = 36.8;
2.96 against 1.94 + 4.92 = 6.86 at 8K x 4. At 128K that is 10 us of wall time for each of
the 2048 chunk steps, and fewer bytes or products did not move it. Tried, slower or no faster:
M in bf16 (22.3 against 23.0 ms), a hand-prefetched next M (26.4 against 21.3), a branch-free
loop for the pipeliner (48-51 against 42 at BV 32), 1-16 heights side by side in one
[K, G * BV] state (37.8-42.5 against 30.4), tf32x3 products (2-4x slower). The scan does
heights x linear GDN's state pass: its 352 programs (16 heads x 2 V tiles x 11 heights) take
~2.7 waves of 132 SMs if one fits per SM (M's tile alone is 64 KiB a pipeline stage), ~3.8 us
a program step; flash-linear-attention's whole forward at 128K (5.7 ms,
results/2026-11-30-h200-bench_ops-gdn-session8.json) holds its own 2048-step state pass, one
wave of 32 programs, under 2.8 us a step. So the step is near linear
GDN's already: the gain left is in keeping more programs resident per SM, not in the step.

Not here yet: documents that start mid-tree with an initial state, the final state, and the
backward, whose crux is not the reverse scan (dA_c = Qt_c^T (lambda dO_c) where read +
M_c^T dA_{c+1}, A recomputed forward from checkpoints) but its sums over heights: dM_c sums
dA_h(c+1) A_h(c)^T over every height and V tile, and dU_c sums dA_h(c+1) over the heights taking
c in. Added by each (head, V tile, height) program, dM alone is a 64 KiB float32 atomic add per
chunk, head, height and V tile: 46 GB at 128K tokens (H=16, K=V=128, 11 heights, 2 tiles),
about 10 ms at the H200's 4.8 TB/s even if atomics ran at memory speed. A backward for this
design needs the heights of a chunk reduced on chip (several heights per program, or stored
states per window of chunks and one [K, heights * V] @ [heights * V, K] product per chunk).

    python benchmarks/exp_gdn_height_scan.py   # GPU: 8K x 4 and 128K tokens, H=16, K=V=128, bf16; CPU: the check
"""

import json
import os

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import reads_at
from ctxpar.kernels.triton.gdn_read import TreeReads
from ctxpar.kernels.triton.gdn_tree import up_sweep
from exp_gdn_query_carry import CPU_SHAPES, GPU_SHAPES, rel, setup


@triton.jit
def height_scan_kernel(qt, lam, lam_s0, lam_s1, lam_s2, u, m, docs, out, num_docs, H, K, V, LEVEL0,
                       C: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """One program per (head, V tile, height); u, m in slot order."""
    h, vt, height = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rc, rk, rv = tl.arange(0, C), tl.arange(0, KP), vt * BV + tl.arange(0, BV)
    kk_mask = (rk[:, None] < K) & (rk[None, :] < K)
    kv_mask = (rk[:, None] < K) & (rv[None, :] < V)
    for n in range(0, num_docs):
        c0, c_last, first = tl.load(docs + n * 6 + 3), tl.load(docs + n * 6 + 4), tl.load(docs + n * 6 + 5)
        a = tl.zeros([KP, BV], dtype=tl.float32)
        for c in range(c0, c_last + 1):
            item = (first + c - c0).to(tl.int64) * H + h
            if reads_at(c, height, c0, False):
                q = tl.load(qt + (item * C + rc[:, None]) * K + rk[None, :], mask=rk[None, :] < K, other=0.0)
                w = tl.load(lam + (first + c - c0) * lam_s0 + h * lam_s1 + rc * lam_s2 + LEVEL0 + height)
                tl.atomic_add(out + (item * C + rc[:, None]) * V + rv[None, :],
                              w[:, None] * tl.dot(q, a, input_precision=PREC), mask=rv[None, :] < V, sem="relaxed")
            mt = tl.load(m + (item * K + rk[:, None]) * K + rk[None, :], mask=kk_mask, other=0.0)
            a = tl.dot(mt, a, input_precision=PREC)
            if ((c >> height) & 1) == 0:  # the height takes chunks in
                a += tl.load(u + (item * K + rk[:, None]) * V + rv[None, :], mask=kv_mask, other=0.0)
            if (((c + 1) >> (height + 1)) << (height + 1)) == c + 1:  # a block begins
                a = tl.zeros([KP, BV], dtype=tl.float32)


def height_scan(qt, lam_slots, u, m, layout, plan, log_c, prec, bv, warps, stages):
    """(the reads' output buffer [S, H, C, V], a function that fills it from zeros). u, m come in
    the up-sweep's order and are put in slot order here, untimed, as a chunk stage made for this
    design would write them."""
    S, H, C, K = qt.shape
    V = u.shape[-1]
    out = torch.empty(S, H, C, V, device=qt.device)
    u, m = u[plan.rank].contiguous(), m[plan.rank].contiguous()
    grid = (H, triton.cdiv(V, bv), layout.heights)

    def run():
        out.zero_()
        height_scan_kernel[grid](qt, lam_slots, *lam_slots.stride()[:3], u, m, layout.docs, out, layout.num_docs,
                                 H, K, V, log_c + 1, C=C, KP=triton.next_power_of_2(K), BV=bv, PREC=prec,
                                 num_warps=warps, num_stages=stages)

    return out, run


def main():
    """Writes $OUT/exp_gdn_height_scan.json: each variant's relative difference from TreeReads'
    output, and on a GPU the times of the up-sweep, the tree reads and each variant."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gpu_variants = [(64, 8, 2), (64, 8, 1), (64, 4, 1), (128, 8, 1), (32, 4, 1)]  # (V tile, warps, stages)
    rows = []
    for B, T, H, K, V, dt in GPU_SHAPES if dev == "cuda" else CPU_SHAPES:
        qt, lam_slots, nodes, trans, layout, plan, log_c, prec = setup(B, T, H, K, V, dt, dev)
        u, m = nodes[0], trans[0]
        with torch.no_grad():
            ref = TreeReads.apply(qt, lam_slots, None, plan, log_c, prec, *nodes, *trans)
        row = dict(T=T, B=B, H=H, K=K, V=V, heights=layout.heights)
        if dev == "cuda":
            ms = lambda f: triton.testing.do_bench(f, warmup=3, rep=20, return_mode="median")  # noqa: E731
            with torch.no_grad():
                row["up_sweep_fwd_ms"] = ms(lambda: up_sweep(u, m, None, plan, prec))
                row["tree_reads_fwd_ms"] = ms(lambda: TreeReads.apply(qt, lam_slots, None, plan, log_c, prec,
                                                                      *nodes, *trans))
        for bv, warps, stages in gpu_variants if dev == "cuda" else [(16, 4, 1), (8, 4, 1)]:
            out, run = height_scan(qt, lam_slots, u, m, layout, plan, log_c, prec, bv, warps, stages)
            key = f"scan_bv{bv}_w{warps}_s{stages}"
            try:
                run()
            except triton.runtime.errors.OutOfResources as e:  # a launch config too large for the GPU
                row[key] = str(e)[:80]
                continue
            row[key + "_rel_err"] = rel(out, ref)
            if dev == "cuda":
                row[key + "_ms"] = ms(run)
        rows.append(row)
        print(row, flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp"), "exp_gdn_height_scan.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
