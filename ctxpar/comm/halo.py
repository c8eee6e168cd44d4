"""Halo exchange along a sequence split in order across a process group, and the short causal
depthwise convolution it serves (the conv in front of Mamba-2 / Gated DeltaNet mixers)."""

from __future__ import annotations

import torch
from torch.distributed import ProcessGroup

from ctxpar.comm.collectives import shift


def halo_exchange(x: torch.Tensor, width: int, group: ProcessGroup | None = None) -> torch.Tensor:
    """The last ``width`` tokens of the previous rank's slice, ``[B, width, ...]`` (zeros on group
    rank 0), where ``x`` is this rank's slice ``[B, T_local, ...]`` of a sequence split in order.

    Differentiable: the halo's gradient goes back to the previous rank and adds to its ``x``'s
    gradient. Every rank needs ``T_local >= width``; each checks only its own slice, so a split
    that is short on some ranks only raises there and leaves the others waiting.
    """
    if not 0 <= width <= x.shape[1]:
        raise ValueError(
            f"halo_exchange: a halo of width {width} needs 0 <= width <= T_local on every rank; "
            f"this rank holds {x.shape[1]} tokens"
        )
    if width == 0:  # nothing to send; skipping keeps zero-size messages off the wire
        return x.new_zeros((x.shape[0], 0, *x.shape[2:]))
    return shift(x[:, x.shape[1] - width :], 1, group)


def causal_conv1d_cp(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    group: ProcessGroup | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution of this rank's slice ``x: [B, T_local, C]`` of a sequence
    split in order across ``group``, equal to the unsplit convolution's rows for this slice:

        y[b, t, c] = bias[c] + sum_k weight[c, k] * x[b, t - (W - 1) + k, c]

    with ``weight: [C, W]`` (``weight[:, -1]`` multiplies the current token), ``bias: [C]`` or
    None, and zeros before the sequence start. Needs ``T_local >= W - 1`` on every rank. The
    gradients of ``weight`` and ``bias`` are this rank's share: sum them over the group (as data
    parallelism does for replicated parameters) to get the full-sequence gradient.
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(
            f"causal_conv1d_cp: expected x [B, T, C] and weight [C, W], got {tuple(x.shape)} "
            f"and {tuple(weight.shape)}"
        )
    return valid_conv1d(halo_exchange(x, weight.shape[1] - 1, group), x, weight, bias)


def valid_conv1d(halo: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """The depthwise conv of ``x: [B, T, C]`` behind ``halo: [B, W - 1, C]`` (the W - 1 tokens
    before it), ``weight: [C, W]``: [B, T, C] in x's dtype, summed in float32 (float64 stays).

    W shifted products in the [B, T, C] layout, not F.conv1d, which wants [B, C, T] (a transposed
    copy each way) and whose depthwise kernel took 12.7 ms a call at 512K tokens and 2304 channels
    on an H200 (1M-token training step, bf16); under torch.compile the products fuse into one pass.
    """
    wide = torch.promote_types(x.dtype, torch.float32)
    # The products promote to float32 one slice at a time: autograd keeps x's dtype for backward.
    padded, w, T = torch.cat([halo, x], dim=1), weight.to(wide), x.shape[1]
    y = sum(padded[:, k : k + T] * w[:, k] for k in range(w.shape[1]))
    return (y if bias is None else y + bias.to(wide)).to(x.dtype)
