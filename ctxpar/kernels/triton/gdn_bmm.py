"""Batched products of gathered tree states: out[o_i] (+)= op(a[a_i]) @ op(b[b_i]) per head.

The up-sweep (gdn_tree.py) multiplies K x K transitions and K x V states picked by index lists.
torch would gather copies of both operands first and, for float32 states, run SGEMM; here the
gathers are addresses and the products run on tensor cores as tf32 when the op's inputs are half
precision (10 mantissa bits, more than bf16 inputs carry; emulated on a 4K-token bf16 run it
changed no error digit), as ieee float32 for float32 inputs.

Every tensor is [items, H, rows, cols], contiguous; op(x) is x or its transpose. ``mode``:
"store" writes, "add" adds (each output item at most once per call).
"""

import triton
import triton.language as tl

MODES = {"store": 0, "add": 1}
# The largest output tile and reduction step. Swept on an H200 at 128K tokens (H=16, K=V=128, the
# up-sweep and reads, fwd+bwd; 2026-11-30-h200-sweep_gdn_bmm.json): 64 x 64 tiles 215.9 ms, 128 x 128
# with 8 warps 184.3 (4 warps 178.2, but ptxas spills 1.5 KB per thread there, 104 B with 8), 128 x 64
# 194.3, a 64-wide reduction step 215.7 / 251.5.
TILE_M, TILE_N, TILE_K, NUM_WARPS = 128, 128, 32, 8


@triton.jit
def op_tile(base, r, c, R, CN, TRANS: tl.constexpr):
    """Rows r, columns c of op(x), the R x CN matrix that x (row-major, CN x R when TRANS) gives."""
    if TRANS:
        ptr = base + c[None, :] * R + r[:, None]
    else:
        ptr = base + r[:, None] * CN + c[None, :]
    return tl.load(ptr, mask=(r[:, None] < R) & (c[None, :] < CN), other=0.0)


@triton.jit
def gather_bmm_kernel(a, a_idx, b, b_idx, out, out_idx, H, M, N, KD, TRANS_A: tl.constexpr, TRANS_B: tl.constexpr,
                      MODE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    i, h, tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = tile // tl.cdiv(N, BN) * BM + tl.arange(0, BM)
    rn = tile % tl.cdiv(N, BN) * BN + tl.arange(0, BN)
    a_base = a + (tl.load(a_idx + i) * H + h) * M * KD
    b_base = b + (tl.load(b_idx + i) * H + h) * KD * N
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, KD, BK):
        rk = k0 + tl.arange(0, BK)
        acc = tl.dot(op_tile(a_base, rm, rk, M, KD, TRANS_A), op_tile(b_base, rk, rn, KD, N, TRANS_B), acc,
                     input_precision=PREC)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    ptr = out + (tl.load(out_idx + i) * H + h) * M * N + rm[:, None] * N + rn[None, :]
    if MODE == 1:
        tl.store(ptr, tl.load(ptr, mask=mask) + acc, mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)


def gather_bmm(a, a_idx, b, b_idx, out, out_idx, *, prec, trans_a=False, trans_b=False, mode="store"):
    """out[out_idx[i]] (+)= op(a[a_idx[i]]) @ op(b[b_idx[i]]) for every i and head (float32)."""
    n, H = a_idx.numel(), a.shape[1]
    if n == 0:
        return
    M, KD = (a.shape[3], a.shape[2]) if trans_a else (a.shape[2], a.shape[3])
    N = b.shape[2] if trans_b else b.shape[3]
    BM, BN = min(TILE_M, triton.next_power_of_2(M)), min(TILE_N, triton.next_power_of_2(N))
    BK = min(TILE_K, triton.next_power_of_2(KD))
    grid = (n, H, triton.cdiv(M, BM) * triton.cdiv(N, BN))
    gather_bmm_kernel[grid](a, a_idx, b, b_idx, out, out_idx, H, M, N, KD, TRANS_A=trans_a, TRANS_B=trans_b,
                            MODE=MODES[mode], BM=BM, BN=BN, BK=BK, PREC=prec, num_warps=NUM_WARPS)
