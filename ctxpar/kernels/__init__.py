"""Log-linear attention on one device: the public ops and the dispatch between backends.

Backends: ``"reference"`` (the materialized O(T^2) oracle; the token recurrence when a state goes
in or out), ``"torch"`` (chunkwise PyTorch, the CPU path), ``"triton"`` (CUDA kernels, both
variants). ``"auto"`` picks triton for CUDA Mamba-2 when it can run, torch otherwise (see _pick).
"""

from __future__ import annotations

from ctxpar.kernels import reference, torch_chunked
from ctxpar.kernels import triton as triton_kernels
from ctxpar.kernels.inputs import canonicalize, l2norm
from ctxpar.kernels.levels import num_levels
from ctxpar.kernels.state import FenwickState

BACKENDS = ("auto", "torch", "reference", "triton")
# The Triton GDN kernels are built and GPU-tested up to these head sizes; wider ones do not fit
# an H200's shared memory (kernel_resources, Triton 3.6: the chunk backward takes 384 KiB at K = 320).
GDN_TRITON_MAX_K, GDN_TRITON_MAX_V = 256, 512

__all__ = [
    "BACKENDS",
    "FenwickState",
    "available_backends",
    "log_linear_gdn",
    "log_linear_gdn_step",
    "log_linear_mamba2",
    "log_linear_mamba2_step",
    "num_levels",
]


def _mamba2_scale(k_dim):
    return 1.0


def _gdn_scale(k_dim):
    return k_dim**-0.5


def log_linear_mamba2(q, k, v, g, level_scales, *, scale=None, initial_state=None, output_final_state=False,
                      cu_seqlens=None, cp=None, backend="auto"):
    """o_t = scale sum_{s<=t} lambda_t[level(t,s)] exp(G_t - G_s) (q_t . k_s) v_s.

    q, k: [B, T, Hk, K]; v: [B, T, H, V]; g: [B, T, H] float32, <= 0; level_scales: [B, T, H, L].
    Returns (o [B, T, H, V], FenwickState or None).
    """
    args = (q, k, v, g, None, level_scales)
    return _dispatch(args, scale, initial_state, output_final_state, cu_seqlens, cp, backend, _mamba2_scale)


def log_linear_gdn(q, k, v, g, beta, level_scales, *, scale=None, initial_state=None, output_final_state=False,
                   cu_seqlens=None, cp=None, backend="auto", use_qk_l2norm=False):
    """o_t = scale sum_{s<=t} lambda_t[level(t,s)] (q_t^T A_t ... A_{s+1} k_s) beta_s v_s,
    A_r = exp(g_r) (I - beta_r k_r k_r^T). beta: [B, T, H]; scale defaults to K ** -0.5.
    ``use_qk_l2norm``: q and k are L2-normalised over K first (inside the op, differentiated)."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    args = (q, k, v, g, beta, level_scales)
    return _dispatch(args, scale, initial_state, output_final_state, cu_seqlens, cp, backend, _gdn_scale)


def log_linear_mamba2_step(q, k, v, g, level_scales, state=None, *, scale=None):
    """One decoding token: q, k [B, Hk, K]; v [B, H, V]; g [B, H]; level_scales [B, H, L]."""
    return _step((q, k, v, g, None, level_scales), state, scale, _mamba2_scale)


def log_linear_gdn_step(q, k, v, g, beta, level_scales, state=None, *, scale=None, use_qk_l2norm=False):
    """One decoding token of the log-linear gated delta rule (shapes as log_linear_mamba2_step)."""
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    return _step((q, k, v, g, beta, level_scales), state, scale, _gdn_scale)


def available_backends() -> dict[str, str | None]:
    """{backend: None if it can run here, else why not}."""
    return {"torch": None, "reference": None, "triton": triton_kernels.unavailable_reason()}


def _pick(backend, q, v, beta):
    if backend != "auto":
        return backend
    if not q.is_cuda or triton_kernels.unavailable_reason() is not None:
        return "torch"
    # GDN on an H200 (2026-11-30, bench_ops' ctxpar_{triton,torch}_gdn rows, bf16): the Triton
    # kernels ran fwd+bwd 2.4-3.9x faster than the torch backend at 8K x 4 and 128K, at H=16,
    # K=V=128 and H=6, K=192, V=384, in 50-74% of its peak memory; wider GDN heads stay on torch.
    return "torch" if beta is not None and not _gdn_fits_triton(q, v) else "triton"


def _gdn_fits_triton(q, v):
    return q.shape[-1] <= GDN_TRITON_MAX_K and v.shape[-1] <= GDN_TRITON_MAX_V


def _dispatch(args, scale, initial_state, output_final_state, cu_seqlens, cp, backend, default_scale):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cp is not None:
        return cp.attention(*args, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                            cu_seqlens=cu_seqlens, backend=backend, default_scale=default_scale)
    backend = _pick(backend, args[0], args[2], args[4])
    if backend == "triton" and args[4] is not None and not _gdn_fits_triton(args[0], args[2]):
        raise ValueError(f"the Triton GDN kernels take K <= {GDN_TRITON_MAX_K} and V <= {GDN_TRITON_MAX_V}, got "
                         f"K = {args[0].shape[-1]}, V = {args[2].shape[-1]}: use backend='torch' (or 'auto', "
                         f"which picks it for such heads)")
    reason = available_backends()[backend]
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run here: {reason}")
    c = canonicalize(*args, scale, initial_state, cu_seqlens, default_scale=default_scale,
                     native=backend == "triton")
    inputs = (c.q, c.k, c.v, c.g, c.beta, c.lam, c.spans)
    if backend == "triton":
        o, state = triton_kernels.chunked(*inputs, c.initial_state, output_final_state, scale=c.scale)
    elif backend == "torch":
        o, state = torch_chunked.chunked(*inputs, c.initial_state, output_final_state)
    elif c.initial_state is None and not output_final_state:
        o, state = reference.materialized(*inputs), None
    else:
        o, state = reference.recurrent(*inputs, c.initial_state, output_final_state)
    return o.to(c.out_dtype), state


def _step(args, state, scale, default_scale):
    one_token = [None if x is None else x.unsqueeze(1) for x in args]
    c = canonicalize(*one_token, scale, state, None, default_scale=default_scale)
    o, state = reference.recurrent(c.q, c.k, c.v, c.g, c.beta, c.lam, c.spans, c.initial_state, True)
    return o[:, 0].to(c.out_dtype), state
