"""The oracles: the materialized O(T^2) form and the token-by-token Fenwick recurrence.

Written for clarity, not speed; float64 in, float64 out. Every other backend is tested against
these. Both variants share the code: log-linear Mamba-2 is the Gated DeltaNet form with the
delta-rule correction switched off (``beta is None``), i.e. ``A_t = exp(g_t) I`` and ``beta = 1``.

Inputs are canonical (see ``ctxpar.kernels.inputs``): q, k ``[B, T, H, K]`` already expanded to
H heads and already multiplied by ``scale``; v ``[B, T, H, V]``; g, beta ``[B, T, H]``; level
scales ``[B, T, H, L]``; ``spans`` lists the sequences as ``(batch, start, end)``.
"""

from __future__ import annotations

import torch

from ctxpar.kernels.levels import level_matrix
from ctxpar.kernels.state import FenwickState


def _transition(x, g_t, k_t, beta_t):
    """Apply A_t = exp(g_t) (I - beta_t k_t k_t^T) (or exp(g_t) I for Mamba-2) to x: [H, K, ...]."""
    decay = g_t.exp().view(-1, *([1] * (x.dim() - 1)))
    if beta_t is None:
        return decay * x
    kx = torch.einsum("hk,hk...->h...", k_t, x)
    return decay * (x - beta_t.view(-1, *([1] * (x.dim() - 1))) * torch.einsum("hk,h...->hk...", k_t, kx))


def materialized(q, k, v, g, beta, lam, spans):
    """o[t] = sum_{s<=t in the same sequence} lam_t[level(t,s)] (q_t^T A_t ... A_{s+1} k_s) w_s v_s."""
    o = torch.zeros_like(v)
    for b, start, end in spans:
        qs, ks, vs, gs, ls = (x[b, start:end] for x in (q, k, v, g, lam))
        bs = None if beta is None else beta[b, start:end]
        pair = _pair_weights(qs, ks, gs, bs)  # [H, T, T]
        levels = level_matrix(torch.arange(end - start, device=q.device))
        scales = ls.permute(1, 0, 2).gather(2, levels.expand(ls.shape[1], -1, -1))  # [H, T, T]
        o[b, start:end] = torch.einsum("hts,shv->thv", pair * scales, vs)
    return o


def _pair_weights(q, k, g, beta):
    """[H, T, T] with entry (t, s) = q_t^T A_t ... A_{s+1} k_s w_s for s <= t, else 0.

    Carries every source forward at once: column s of ``carried`` is A_t ... A_{s+1} k_s w_s.
    """
    length = q.shape[0]
    rows = []
    carried = q.new_zeros(q.shape[1], q.shape[2], 0)  # [H, K, sources so far]
    for t in range(length):
        carried = _transition(carried, g[t], k[t], None if beta is None else beta[t])
        own = k[t] if beta is None else k[t] * beta[t][:, None]
        carried = torch.cat([carried, own[:, :, None]], dim=2)
        row = torch.einsum("hk,hks->hs", q[t], carried)
        rows.append(torch.nn.functional.pad(row, (0, length - t - 1)))
    return torch.stack(rows, dim=1)


def recurrent(q, k, v, g, beta, lam, spans, initial_state=None, output_final_state=False):
    """The token-by-token recurrence over a real Fenwick state (insert, carry/merge, read)."""
    o = torch.zeros_like(v)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        state = initial_state.select(n) if initial_state is not None else None
        buckets, position = _unpack(state, q, v)
        for t in range(start, end):
            o[b, t], buckets, position = step(
                q[b, t], k[b, t], v[b, t], g[b, t], None if beta is None else beta[b, t], lam[b, t], buckets, position
            )
        finals.append(_pack(buckets, position, q, v))
    return o, (FenwickState.stack(finals) if output_final_state else None)


def step(q, k, v, g, beta, lam, buckets, position):
    """One token at ``position``: transport every bucket by A_t, read, then insert with carries.

    ``buckets`` maps bit -> [H, K, V] for the set bits of ``position``. Returns (o [H, V], buckets,
    position + 1).
    """
    buckets = {bit: _transition(s, g, k, beta) for bit, s in buckets.items()}
    own = k[:, :, None] * (v if beta is None else v * beta[:, None])[:, None, :]  # [H, K, V]
    o = lam[:, 0, None] * torch.einsum("hk,hkv->hv", q, own)
    for bit, s in buckets.items():
        o = o + lam[:, bit + 1, None] * torch.einsum("hk,hkv->hv", q, s)
    # position+1 sets bit z = trailing ones of position, clearing every bit below: those buckets
    # and the new token merge into the one bucket of bit z.
    carry = ((position + 1) & -(position + 1)).bit_length() - 1
    merged = own
    for bit in range(carry):
        merged = merged + buckets.pop(bit)
    buckets[carry] = merged
    return o, buckets, position + 1


def _unpack(state, q, v):
    if state is None:
        return {}, 0
    position = state.positions[0]
    return {bit: state.buckets[0, :, bit] for bit in range(position.bit_length()) if (position >> bit) & 1}, position


def _pack(buckets, position, q, v):
    heads, k_dim, v_dim = q.shape[-2], q.shape[-1], v.shape[-1]
    nbits = position.bit_length()
    dense = [buckets.get(bit, q.new_zeros(heads, k_dim, v_dim)) for bit in range(nbits)]
    stacked = torch.stack(dense, dim=1) if dense else q.new_zeros(heads, 0, k_dim, v_dim)
    return FenwickState(stacked[None], (position,))
