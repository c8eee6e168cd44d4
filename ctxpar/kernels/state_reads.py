"""o plus what a run of queries reads from a Fenwick state: the one op context parallelism adds
on the rank where a document crosses in (ctxpar.cp.local computes the weights).

    out[t, h] = o[t, h] + sum_b w[t, h, b] * (q[t, h // (H // Hq)] @ S[h, b])

w holds, per token, head and live bucket b of the state, lambda at the bucket's level times the
decay from the state's position to t; S the buckets, float32. ``add_state_reads`` runs the Triton
kernels (kernels/triton/state_read.py) for half-precision queries on a GPU, ``torch_reads`` (the
reference and the CPU path) otherwise.
"""

from __future__ import annotations

import torch


def add_state_reads(o: torch.Tensor, q: torch.Tensor, w: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """o [R, n, H, V], q [R, n, Hq, K], w [R, n, H, nb] float32, states [R, H, nb, K, V] float32
    -> o + reads, in o's dtype."""
    if o.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from ctxpar.kernels.triton.state_read import add_state_reads as fused

        return fused(o, q, w, states)
    return o + torch_reads(q, w, states).to(o.dtype)


def torch_reads(q: torch.Tensor, w: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The reads alone, [R, n, H, V] in q's dtype (float32 queries: float32)."""
    out = None
    for b in range(states.shape[2]):
        read = _grouped(q, states[:, :, b])
        term = w[..., b, None].to(read.dtype) * read
        out = term if out is None else out + term
    return out


def _grouped(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[R, n, Hq, K] x [R, H, K, V] -> [R, n, H, V], head h reading group h // (H // Hq): one GEMM
    per group, N = (H // Hq) * V wide. bf16 q meets the float32 state rounded to bf16, as the
    kernels' mma_f32 does; other dtypes meet it in float32. The result comes out in q's dtype."""
    s = s.unflatten(1, (q.shape[2], -1))
    left, s = (q, s.to(q.dtype)) if q.dtype == torch.bfloat16 else (q.to(s.dtype), s)
    return torch.einsum("rnqk,rqgkv->rnqgv", left, s).to(q.dtype).flatten(2, 3)
