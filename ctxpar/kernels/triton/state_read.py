"""Reads of a Fenwick state by a run of queries, fused into the output (counterpart:
``ctxpar.kernels.state_reads.torch_reads`` with ``read_weights``).

    out[t, h] = o[t, h] + sum_b w[t, h, b] * (q[t, h // (H // Hq)] @ S[h, b]),
    w[t, h, b] = lam[t, h, levels[t, b]] * decay[t, h]

The weights are formed in the kernels, and the backward writes every level of dlam (zeros where
no bucket is read): in torch, the gather, the zero fill and scatter of its gradient and the
products around it took about 1 ms of a 512K-token CP step on an H200.

Forward: one program per (block of BT tokens, q group, V tile) loads the block's queries once
and adds the reads of each head of the group to o in one pass. Backward: dq, dlam and the decay's
gradient per (token block, q group, V tile), looping over the group's heads (atomics only when V is split,
common.v_tile); dS per (run of token blocks, head, V tile), an atomic add per run. For
half-precision queries the float32 state is split into hi + lo parts in q's dtype once, on the
host (common.mma_parts). Rows are the flattened [R * n] tokens; a token block never straddles
two sequences.

In torch the same op took 18 ms of a 512K-token context-parallel step on an H200 (separate
passes over [n, H, V] for the weights, the sum and the add, and their backward).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxpar.kernels.state_reads import hi_lo
from ctxpar.kernels.triton.common import (dot_precision, mma_f32, mma_parts, num_warps, put, row_tile, tile_of_v,
                                          v_tile)

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
def bucket_scale(lam, levels, r, rows, valid, n, H, h, L, NB, b):
    """([BT] float32 lam at the level each token reads bucket b at, for head h; [BT] that level)."""
    level = tl.load(levels + (rows - r * n) * NB + b, mask=valid, other=0)
    return tl.load(lam + (rows * H + h) * L + level, mask=valid, other=0.0).to(tl.float32), level


@triton.jit
def head_decay(decay, rows, valid, H, h, HAS_DECAY: tl.constexpr):
    """[BT] decay of head h from the state's position (ones without one: GDN carries its queries)."""
    d = tl.where(valid, 1.0, 0.0)
    if HAS_DECAY:
        d = tl.load(decay + rows * H + h, mask=valid, other=0.0)
    return d


@triton.jit
def reads_kernel(o, q, lam, levels, decay, s_hi, s_lo, out, n, H, HQ, K, V, L, NB, BT: tl.constexpr,
                 KP: tl.constexpr, BV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                 HAS_DECAY: tl.constexpr):
    pid, group, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r, rows, valid = block_rows(pid, n, BT)
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
    mask = valid[:, None] & (rv[None, :] < V)
    per = H // HQ
    for j in range(per):
        h = group * per + j
        d = head_decay(decay, rows, valid, H, h, HAS_DECAY)
        acc = tl.zeros([BT, BV], dtype=tl.float32)
        for b in range(NB):
            lam_b, _ = bucket_scale(lam, levels, r, rows, valid, n, H, h, L, NB, b)
            hi = bucket_tile(s_hi, r, h, b, H, NB, K, V, rk, rv)
            acc += (lam_b * d)[:, None] * mma_parts(qt, hi, bucket_tile(s_lo, r, h, b, H, NB, K, V, rk, rv), SPLIT, PREC)
        x = tl.load(row_tile(o, rows, H, h, V, rv), mask=mask, other=0.0).to(tl.float32) + acc
        tl.store(row_tile(out, rows, H, h, V, rv), x.to(out.dtype.element_ty), mask=mask)


@triton.jit
def reads_grad_kernel(do, q, lam, levels, decay, s_hi, s_lo, dq, dlam, d_decay, n, H, HQ, K, V, L, NB,
                      BT: tl.constexpr, KP: tl.constexpr, LP: tl.constexpr, BV: tl.constexpr,
                      SHARED: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr):
    pid, group = tl.program_id(0), tl.program_id(1)
    r, rows, valid = block_rows(pid, n, BT)
    rk, rv = tl.arange(0, KP), tile_of_v(SHARED) * BV + tl.arange(0, BV)
    lr = tl.arange(0, LP)
    qk_mask = valid[:, None] & (rk[None, :] < K)
    qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=qk_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BT, KP], dtype=tl.float32)
    per = H // HQ
    for j in range(per):
        h = group * per + j
        d = head_decay(decay, rows, valid, H, h, HAS_DECAY)
        dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
        dot_ = dot_.to(q.dtype.element_ty)
        d_lam = tl.zeros([BT, LP], dtype=tl.float32)  # every level of the row: dlam needs no zeros before
        d_d = tl.zeros([BT], dtype=tl.float32)
        for b in range(NB):
            hi = tl.trans(bucket_tile(s_hi, r, h, b, H, NB, K, V, rk, rv))
            y = mma_parts(dot_, hi, tl.trans(bucket_tile(s_lo, r, h, b, H, NB, K, V, rk, rv)), SPLIT, PREC)
            lam_b, level = bucket_scale(lam, levels, r, rows, valid, n, H, h, L, NB, b)
            acc += (lam_b * d)[:, None] * y
            dw = tl.sum(qt * y, 1)  # the weight's gradient
            d_lam += tl.where(lr[None, :] == level[:, None], (dw * d)[:, None], 0.0)
            d_d += dw * lam_b
        put(dlam + (rows[:, None] * H + h) * L + lr[None, :], d_lam, valid[:, None] & (lr[None, :] < L), SHARED)
        if HAS_DECAY:
            put(d_decay + rows * H + h, d_d, valid, SHARED)
    put(row_tile(dq, rows, HQ, group, K, rk), acc, qk_mask, SHARED)


@triton.jit
def state_grad_kernel(do, q, lam, levels, decay, ds, n, H, HQ, K, V, L, NB, RUN: tl.constexpr, BT: tl.constexpr,
                      KP: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr, HAS_DECAY: tl.constexpr):
    pid, h, vb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    runs = tl.cdiv(tl.cdiv(n, BT), RUN)
    r, first = pid // runs, pid % runs * RUN
    rk, rv = tl.arange(0, KP), vb * BV + tl.arange(0, BV)
    group = h // (H // HQ)
    for b in range(NB):
        acc = tl.zeros([KP, BV], dtype=tl.float32)
        for j in range(RUN):
            _, rows, valid = block_rows(r * tl.cdiv(n, BT) + first + j, n, BT)
            valid = valid & (first + j < tl.cdiv(n, BT))
            qt = tl.load(row_tile(q, rows, HQ, group, K, rk), mask=valid[:, None] & (rk[None, :] < K), other=0.0)
            dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=valid[:, None] & (rv[None, :] < V), other=0.0)
            d = head_decay(decay, rows, valid, H, h, HAS_DECAY)
            lam_b, _ = bucket_scale(lam, levels, r, rows, valid, n, H, h, L, NB, b)
            acc += mma_f32(tl.trans(qt), dot_ * (lam_b * d)[:, None], q.dtype.element_ty, PREC)
        ptr = ds + (((r * H + h) * NB + b).to(tl.int64) * K + rk[:, None]) * V + rv[None, :]
        tl.atomic_add(ptr, acc, mask=(rk[:, None] < K) & (rv[None, :] < V), sem="relaxed")


class StateReads(torch.autograd.Function):
    """Flattened rows: o [R n, H, V], q [R n, Hq, K], lam [R n, H, L], decay [R n, H] float32 or None,
    s [R, H, nb, K, V] float32, levels [n, nb] int32."""

    @staticmethod
    def forward(ctx, o, q, lam, decay, s, levels, n):
        H, V, HQ, K, L, NB = o.shape[1], o.shape[2], q.shape[1], q.shape[2], lam.shape[2], s.shape[2]
        out = torch.empty_like(o)
        hi, lo = _parts(s, q)
        BV, BT = min(64, triton.next_power_of_2(V)), _block_tokens(K)
        grid = (s.shape[0] * triton.cdiv(n, BT), HQ, triton.cdiv(V, BV))
        reads_kernel[grid](o, q, lam, levels, _or(decay, lam), hi, lo, out, n, H, HQ, K, V, L, NB, BT=BT,
                           KP=triton.next_power_of_2(K), BV=BV, SPLIT=_split(q), PREC=dot_precision(q.dtype),
                           HAS_DECAY=decay is not None, num_warps=num_warps(q.dtype), num_stages=READ_STAGES)
        ctx.save_for_backward(q, lam, decay, s, hi, lo, levels)
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, lam, decay, s, hi, lo, levels = ctx.saved_tensors
        n, d_out = ctx.n, d_out.contiguous()
        H, V, HQ, K, L, NB = d_out.shape[1], d_out.shape[2], q.shape[1], q.shape[2], lam.shape[2], s.shape[2]
        R, KP, BT = s.shape[0], triton.next_power_of_2(K), _block_tokens(K)
        BV = v_tile(K, V, q.dtype)
        shared = BV < V  # V tiles add their shares of dq, dlam and the decay's gradient (float32 atomics)
        fresh = lambda x, dt=torch.float32: torch.zeros_like(x, dtype=dt) if shared else torch.empty_like(x, dtype=dt)  # noqa: E731
        dq, dlam = fresh(q), fresh(lam, torch.float32 if shared else lam.dtype)
        d_decay = None if decay is None else fresh(decay)
        reads_grad_kernel[(R * triton.cdiv(n, BT), HQ, triton.cdiv(V, BV))](
            d_out, q, lam, levels, _or(decay, lam), hi, lo, dq, dlam, _or(d_decay, dq), n, H, HQ, K, V, L, NB, BT=BT,
            KP=KP, LP=triton.next_power_of_2(L), BV=BV, SHARED=shared, SPLIT=_split(q), PREC=dot_precision(q.dtype),
            HAS_DECAY=decay is not None, num_warps=GRAD_WARPS)
        ds = torch.zeros_like(s)
        BV = min(64, triton.next_power_of_2(V))
        grid = (R * triton.cdiv(triton.cdiv(n, STATE_BT), RUN), H, triton.cdiv(V, BV))
        state_grad_kernel[grid](d_out, q, lam, levels, _or(decay, lam), ds, n, H, HQ, K, V, L, NB, RUN=RUN,
                                BT=STATE_BT, KP=KP, BV=BV, PREC=dot_precision(q.dtype), HAS_DECAY=decay is not None,
                                num_warps=num_warps(q.dtype))
        return d_out, dq.to(q.dtype), dlam.to(lam.dtype), d_decay, ds, None, None


def _block_tokens(k_dim):
    return max(16, min(128, BLOCK_ELEMENTS // triton.next_power_of_2(k_dim)))


def _split(q):
    return q.dtype != torch.float32


def _parts(s, q):
    """The state's hi and lo parts in the queries' dtype (float32 queries: the state itself, twice)."""
    return hi_lo(s, q.dtype) if _split(q) else (s, s)


def _or(x, other):
    """A tensor for a pointer argument the kernel does not read (its HAS_ flag is off)."""
    return other if x is None else x


def add_state_reads(o, q, lam, levels, decay, states):
    """``ctxpar.kernels.state_reads.add_state_reads`` on the kernels: [R, n, ...] tensors."""
    R, n = o.shape[:2]
    flat = lambda x: None if x is None else x.reshape(R * n, *x.shape[2:]).contiguous()  # noqa: E731
    decay = None if decay is None else decay.float()
    out = StateReads.apply(flat(o), flat(q), flat(lam), flat(decay), states.float().contiguous(),
                           levels.to(torch.int32).contiguous(), n)
    return out.view(o.shape)
