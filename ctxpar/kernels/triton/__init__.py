"""Triton kernels for log-linear Mamba-2 (chunkwise, segment tree over chunks).

Stages, one file each: chunk_state (each chunk's end state), tree (up-sweep into a Fenwick array
of nodes; down-sweep of their gradients), output (intra-chunk block + node reads), node_grad (the
read nodes' gradients), query_grad (dq; the node reads' dlambda), source_grad (dk, dv; the
intra-chunk block's dlambda), rows_first (dlambda into lambda's layout); function.py ties
them into one autograd Function and handles the Fenwick states. state_read: context
parallelism's reads of an arriving Fenwick state, fused into the output (reference:
ctxpar.kernels.state_reads).

Log-linear Gated DeltaNet (``beta`` given): gdn_chunk (the UT transform and everything else
inside a chunk) and gdn_chunk_grad (its backward), gdn_grid (token rows -> the slot grid),
gdn_tree (the up-sweep over chunks, one launch per height), gdn_carry (the node reads, each
chunk's queries carried down its bits) and gdn_function (the op); gdn_function.py says why it is
split so.
"""

from __future__ import annotations

import os


def unavailable_reason() -> str | None:
    """None when the kernels can run here (CUDA, or the Triton interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    import torch

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter)"


def chunked(q, k, v, g, beta, lam, spans, initial_state=None, output_final_state=False, scale=1.0, **kwargs):
    """``torch_chunked.chunked``'s contract for the queries q * scale; q, k may keep their Hk <= H
    heads (not expanded). The GDN kernels take the scale in (no scaled copy of q, nor a rounding of
    it); Mamba-2's take q scaled."""
    if beta is not None:
        from ctxpar.kernels.triton.gdn_function import chunked as run

        return run(q, k, v, g, beta, lam, spans, initial_state, output_final_state, scale=scale, **kwargs)
    from ctxpar.kernels.inputs import scaled
    from ctxpar.kernels.triton.function import chunked as run

    return run(scaled(q, scale), k, v, g, beta, lam, spans, initial_state, output_final_state, **kwargs)
