"""Reads of a Fenwick state by a run of queries, fused into the output (counterpart:
``ctxpar.kernels.state_reads.torch_reads``).

    out[t, h] = o[t, h] + sum_b w[t, h, b] * (q[t, h // (H // Hq)] @ S[h, b])

Forward: one program per (block of BT tokens, q group, V tile) loads the block's queries once
and adds the reads of each head of the group to o in one pass. Backward: dq and dw per (token
block, q group, V tile), looping over the group's heads (atomics only when V is split,
common.v_tile); dS per (run of token blocks, bucket, head, V tile), an atomic add per run. For
bf16 queries the float32 state is rounded to bf16 once, on the host, as common.mma_f32 rounds
it in registers.
Rows are the flattened [R * n] tokens; a token block never straddles two sequences.

In torch the same op took 18 ms of a 512K-token context-parallel step on an H200 (separate
passes over [n, H, V] for the weights, the sum and the add, and their backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton.common import dot_precision, mma_f32, num_warps, put, row_tile, tile_of_v, v_tile

# Swept on an H200 at the 1M-token CP shape (512K tokens read one bucket, H=32, Hk=1, K=128,
# V=64, bf16; 2026-11-30-h200-sweep_reads.json): forward 3.47 -> 2.02 ms (a copy of o, the floor
# of its read and write, takes 1.00), dq/dw 2.97 -> 1.69, dS 2.15 -> 1.80.
BLOCK_ELEMENTS = 16384  # a block's [BT, K] query tile: BT = 128 at K = 128
READ_STAGES = 2  # forward pipeline stages (2.02 ms; 3 stages 2.85)
GRAD_WARPS = 8  # the dq/dw kernel's [BT, K] float32 accumulator (4 warps: 4.9-5.5 ms)
STATE_BT = 64  # tokens per block of the dS reduction
RUN = 64  # token blocks per program of the dS reduction


@triton.jit
def block_rows(pid, n, BT: tl.constexpr):
    """(sequence r, rows of the block, which are real) of token block pid."""
    blocks = tl.cdiv(n, BT)
    r = pid // blocks
    t = (pid % blocks) * BT + tl.arange(0, BT)
    return r, r.to(tl.int64) * n + t, t < n


@triton.jit
def bucket_tile(s, r, h, b, H, NB, K, V, rk, rv):
    ptr = s + (((r * H + h) * NB + b).to(tl.int64) * K + rk[:, None]) * V + rv[None, :]
    return tl.load(ptr, mask=(rk[:, None] < K) & (rv[None, :] < V), other=0.0)


@triton.jit
def reads_kernel(o, q, w, s, out, n, H, HQ, K, V, NB, BT: tl.constexpr, KP: tl.constexpr, BV: tl.constexpr,
                 PREC: tl.constexpr):
    pid, group, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, rows, valid = block_rows(pid, n, BT)
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
    mask = valid[:, None] & (rv[None, :] < V)
    per = H // HQ
    for j in range(per):
        h = group * per + j
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for b in range(NB):
            wb = tl.load(w + (rows * H + h) * NB + b, mask=valid, other=0.0)
            acc += wb[:, None] * mma_f32(qt, bucket_tile(s, r, h, b, H, NB, K, V, rk, rv), q.dtype.element_ty, PREC)
        x = tl.load(row_tile(o, rows, H, h, V, rv), mask=mask, other=0.0).to(tl.float32) + acc
        tl.store(row_tile(out, rows, H, h, V, rv), x.to(out.dtype.element_ty), mask=mask)


@triton.jit
def reads_grad_kernel(do, q, w, s, dq, dw, n, H, HQ, K, V, NB, BT: tl.constexpr, KP: tl.constexpr,
                      BV: tl.constexpr, SHARED: tl.constexpr, PREC: tl.constexpr):
    pid, group = tl.program_id(0), tl.program_id(1)
    r, rows, valid = block_rows(pid, n, BT)
    rk, rv = tl.arange(0, KP), tile_of_v(SHARED) * BV + tl.arange(0, BV)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=qk_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BT, KP], dtype=tl.float32)
    per = H // HQ
    for j in range(per):
        h = group * per + j
        dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
        dot_ = dot_.to(q.dtype.element_ty)
        for b in range(NB):
            y = mma_f32(dot_, tl.trans(bucket_tile(s, r, h, b, H, NB, K, V, rk, rv)), q.dtype.element_ty, PREC)
            wb = tl.load(w + (rows * H + h) * NB + b, mask=valid, other=0.0)
            acc += wb[:, None] * y
            put(dw + (rows * H + h) * NB + b, tl.sum(qt * y, 1), valid, SHARED)
    put(row_tile(dq, rows, HQ, group, K, rk), acc, qk_mask, SHARED)


@triton.jit
def state_grad_kernel(do, q, w, ds, n, H, HQ, K, V, NB, RUN: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr,
                      BV: tl.constexpr, PREC: tl.constexpr):
    # The bucket varies fastest over the grid: the NB programs of one run read the same q and dO
    # tiles at about the same time, from L2 after the first.
    pid, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, pid = pid % NB, pid // NB
    runs = tl.cdiv(tl.cdiv(n, BT), RUN)
    r, first = pid // runs, pid % runs * RUN
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    group = h // (H // HQ)
    acc = tl.zeros([KP, BV], dtype=tl.float32)
    for j in range(RUN):
        _, rows, valid = block_rows(r * tl.cdiv(n, BT) + first + j, n, BT)
        valid = valid & (first + j < tl.cdiv(n, BT))
        qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
        dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
        wb = tl.load(w + (rows * H + h) * NB + b, mask=valid, other=0.0)
        acc += mma_f32(tl.trans(qt), dot_ * wb[:, None], q.dtype.element_ty, PREC)
    ptr = ds + (((r * H + h) * NB + b).to(tl.int64) * K + rk[:, None]) * V + rv[None, :]
    tl.atomic_add(ptr, acc, mask=(rk[:, None] < K) & (rv[None, :] < V), sem="relaxed")


class StateReads(torch.autograd.Function):
    """Flattened rows: o [R n, H, V], q [R n, Hq, K], w [R n, H, nb] float32, s [R, H, nb, K, V] float32."""

    @staticmethod
    def forward(ctx, o, q, w, s, n):
        H, V, HQ, K, NB = o.shape[1], o.shape[2], q.shape[1], q.shape[2], s.shape[2]
        out = torch.empty_like(o)
        operand = _state_operand(s, q)
        BV, BT = min(64, triton.next_power_of_2(V)), _block_tokens(K)
        grid = (s.shape[0] * triton.cdiv(n, BT), HQ, triton.cdiv(V, BV))
        reads_kernel[grid](o, q, w, operand, out, n, H, HQ, K, V, NB, BT=BT, KP=triton.next_power_of_2(K), BV=BV,
                           PREC=dot_precision(q.dtype), num_warps=num_warps(q.dtype), num_stages=READ_STAGES)
        ctx.save_for_backward(q, w, s, operand)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, w, s, operand = ctx.saved_tensors
        n, d_out = ctx.n, d_out.contiguous()
        H, V, HQ, K, NB = d_out.shape[1], d_out.shape[2], q.shape[1], q.shape[2], s.shape[2]
        R, KP, BT = s.shape[0], triton.next_power_of_2(K), _block_tokens(K)
        BV = v_tile(K, V, q.dtype)
        shared = BV < V  # V tiles add their shares of dq and dw
        dq = (torch.zeros if shared else torch.empty)(q.shape, device=q.device, dtype=torch.float32)
        dw = (torch.zeros_like if shared else torch.empty_like)(w)
        reads_grad_kernel[(R * triton.cdiv(n, BT), HQ, triton.cdiv(V, BV))](
            d_out, q, w, operand, dq, dw, n, H, HQ, K, V, NB, BT=BT, KP=KP, BV=BV, SHARED=shared,
            PREC=dot_precision(q.dtype), num_warps=GRAD_WARPS)
        ds = torch.zeros_like(s)
        BV = min(64, triton.next_power_of_2(V))
        grid = (R * triton.cdiv(triton.cdiv(n, STATE_BT), RUN) * NB, H, triton.cdiv(V, BV))
        state_grad_kernel[grid](d_out, q, w, ds, n, H, HQ, K, V, NB, RUN=RUN, BT=STATE_BT, KP=KP, BV=BV,
                                PREC=dot_precision(q.dtype), num_warps=num_warps(q.dtype))
        return d_out, dq.to(q.dtype), dw, ds, None


def _block_tokens(k_dim):
    return max(16, min(128, BLOCK_ELEMENTS // triton.next_power_of_2(k_dim)))


def _state_operand(s, q):
    """The state as the products take it: rounded to bf16 for bf16 queries (once here, not in
    every program), else float32 (common.mma_f32)."""
    return s.to(q.dtype) if q.dtype == torch.bfloat16 else s


def add_state_reads(o, q, w, states):
    """``ctxpar.kernels.state_reads.add_state_reads`` on the kernels: [R, n, ...] tensors."""
    R, n = o.shape[:2]
    flat = lambda x: x.reshape(R * n, *x.shape[2:]).contiguous()  # noqa: E731
    out = StateReads.apply(flat(o), flat(q), flat(w.float()), states.float().contiguous(), n)
    return out.view(o.shape)
