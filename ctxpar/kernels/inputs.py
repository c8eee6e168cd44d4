"""Validation and canonical form of the public ops' inputs, shared by every backend.

Canonical form: the queries are q times ``scale``; ``spans`` lists the sequences as ``(batch,
start, end)`` - one per batch row, or one per packed document when ``cu_seqlens`` is given. The
PyTorch backends take q, k expanded to all H heads, q multiplied out (``scale`` 1), and a compute
dtype of float32 for half-precision inputs (float64 stays float64); the Triton kernels take q, k
with their Hk heads, every tensor in its input dtype and the scale apart (``native=True``), since
they index the group, accumulate in float32 and multiply by the scale themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxpar.kernels.levels import num_levels
from ctxpar.kernels.state import FenwickState

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class Canonical:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor
    beta: torch.Tensor | None
    lam: torch.Tensor
    spans: list[tuple[int, int, int]]
    initial_state: FenwickState | None
    out_dtype: torch.dtype
    scale: float = 1.0  # the queries are q * scale


def scaled(q, scale):
    """The queries q * scale; q itself where scale is 1 (no copy)."""
    return q if scale == 1.0 else q * scale


def canonicalize(q, k, v, g, beta, level_scales, scale, initial_state, cu_seqlens, *, default_scale, native=False):
    """Check every input (clear errors, one rule each) and return the canonical form."""
    if initial_state is not None and not isinstance(initial_state, FenwickState):
        raise TypeError(f"initial_state must be a FenwickState, got {type(initial_state).__name__}")
    _check_shapes(q, k, v, g, beta, level_scales)
    _check_dtypes(q, k, v, g, beta, level_scales)
    _check_devices(q, k, v, g, beta, level_scales, initial_state, cu_seqlens)
    spans = _spans(q.shape[0], q.shape[1], cu_seqlens)
    _check_state(initial_state, spans, v.shape[2], q.shape[3], v.shape[3])
    _check_levels(level_scales.shape[-1], spans, initial_state)
    _check_values(q, k, v, g, beta, level_scales, initial_state)

    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    if native:
        return Canonical(q, k, v, g, beta, level_scales, spans, initial_state, v.dtype, scale)
    compute = torch.float64 if v.dtype == torch.float64 else torch.float32
    groups = v.shape[2] // q.shape[2]
    q = (q.to(compute) * scale).repeat_interleave(groups, dim=2)
    k = k.to(compute).repeat_interleave(groups, dim=2)
    state = None if initial_state is None else initial_state.to(compute)
    return Canonical(
        q, k, v.to(compute), g.to(compute), None if beta is None else beta.to(compute),
        level_scales.to(compute), spans, state, v.dtype,
    )


def l2norm(x, eps=1e-6):
    """x / sqrt(sum(x^2) + eps) over the last dim (the keys and queries of ``use_qk_l2norm``),
    summed in float32 (float64 stays float64) and returned in x's dtype; autograd differentiates it."""
    y = x if x.dtype == torch.float64 else x.float()
    return (y * torch.rsqrt(y.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def _check_shapes(q, k, v, g, beta, lam):
    for name, x, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("g", g, 3), ("level_scales", lam, 4)):
        if x.dim() != dims:
            raise ValueError(f"{name} must have {dims} dims, got shape {tuple(x.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q and k must have the same shape [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, _ = v.shape
    if q.shape[:2] != (B, T):
        raise ValueError(f"q is [B, T] = {tuple(q.shape[:2])} but v is {(B, T)}")
    if T == 0:
        raise ValueError("the sequence is empty (T = 0)")
    if H % q.shape[2]:
        raise ValueError(f"q/k heads ({q.shape[2]}) must divide v heads ({H}): head h reads group h // (H // Hk)")
    if g.shape != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if lam.shape[:3] != (B, T, H):
        raise ValueError(f"level_scales must be [B, T, H, L] with [B, T, H] = {(B, T, H)}, got {tuple(lam.shape)}")


def _check_dtypes(q, k, v, g, beta, lam):
    if q.dtype not in FLOAT_DTYPES or q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if g.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"g must be float32 (float64 for testing), got {g.dtype}")
    for name, x in (("beta", beta), ("level_scales", lam)):
        if x is not None and x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be floating point, got {x.dtype}")


def _check_devices(q, k, v, g, beta, lam, state, cu_seqlens):
    tensors = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "level_scales": lam, "cu_seqlens": cu_seqlens}
    if state is not None:
        tensors["initial_state"] = state.buckets
    devices = {name: x.device for name, x in tensors.items() if isinstance(x, torch.Tensor)}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}")


def _spans(batch, length, cu_seqlens):
    if cu_seqlens is None:
        return [(b, 0, length) for b in range(batch)]
    if batch != 1:
        raise ValueError(f"cu_seqlens packs documents into one row: B must be 1, got {batch}")
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.tolist()
    cu = [int(x) for x in cu_seqlens]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != length:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {length}, got {cu}")
    if any(b <= a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {cu}")
    return [(0, a, b) for a, b in zip(cu, cu[1:])]


def _check_state(state, spans, heads, k_dim, v_dim):
    if state is None:
        return
    n, h, _, kd, vd = state.buckets.shape
    if n != len(spans):
        raise ValueError(f"initial_state holds {n} sequences but the input has {len(spans)}")
    if (h, kd, vd) != (heads, k_dim, v_dim):
        raise ValueError(f"initial_state buckets are [H, K, V] = {(h, kd, vd)}, expected {(heads, k_dim, v_dim)}")


def _check_levels(have, spans, state):
    starts = state.positions if state is not None else [0] * len(spans)
    longest = max(p + end - start for p, (_, start, end) in zip(starts, spans))
    need = num_levels(longest)
    if have < need:
        raise ValueError(
            f"level_scales has {have} levels but a document of {longest} tokens needs {need} "
            f"(num_levels(T) = 1 + ceil(log2 T))"
        )


def _check_values(q, k, v, g, beta, lam, state):
    """NaN never passes silently. Skipped on CUDA, where the check would synchronise the host."""
    if q.is_cuda:
        return
    named = {"q": q, "k": k, "v": v, "g": g, "beta": beta, "level_scales": lam}
    if state is not None:
        named["initial_state"] = state.buckets
    for name, x in named.items():
        if x is not None and torch.isnan(x).any():
            raise ValueError(f"{name} contains NaN")
    if (g > 0).any():
        raise ValueError("g must be <= 0 (log decay); got positive entries")
