"""Chunkwise O(T log T) log-linear attention in PyTorch: the CPU training backend.

The sequence is cut into chunks of C tokens aligned to absolute positions, so a pair inside one
chunk has level <= log2(C) and a pair across chunks has level ``log2(C) + bit_length(c XOR c')``
(c, c' chunk indices). Three stages, each a function below:

1. ``chunk_stage``: per chunk, the pair weights P (C x C, no lambda), the queries transported to
   the chunk start (Q~), the chunk's own end state U, its transition M and the per-source state
   columns E. For Gated DeltaNet this is the WY / UT form of the delta rule.
2. ``build_tree``: a segment tree over chunks. Node (h, n) covers chunks [n 2^h, (n+1) 2^h) and
   holds their state at its end and their transition; parent = M_right(left) + right.
3. ``read_tree``: chunk c reads, for every set bit h of c, node ((c >> h) - 1, height h) carried
   to the chunk start through the nodes of the lower set bits of c, with lambda level
   ``log2(C) + 1 + h``.

An initial Fenwick state enters the tree as nodes that lie before the first chunk (its buckets of
bits >= log2 C are exactly such nodes) and, for its sub-chunk buckets, through the first chunk.
Memory is O(T): each height's read is recomputed in backward (activation checkpointing), so
nothing of size T x log T is kept; no T x T tensor exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctxpar.kernels.levels import bucket_range, level_matrix, level_of, live_bits
from ctxpar.kernels.state import FenwickState

DEFAULT_CHUNK = 64


def transport(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a transition to states x [..., K, V]: m is a scalar decay [..., 1, 1] or [..., K, K]."""
    return m * x if m.shape[-1] == 1 else m @ x


def chunked(q, k, v, g, beta, lam, spans, initial_state=None, output_final_state=False, chunk_size=DEFAULT_CHUNK):
    """Canonical inputs (see ``ctxpar.kernels.inputs``) -> (o, final FenwickState or None)."""
    groups = _group_spans(spans, initial_state)
    outputs, finals = {}, {}
    for (position, start, end), members in groups.items():
        idx = [b for b, _ in members]
        sl = lambda x: None if x is None else x[idx, start:end].transpose(1, 2)  # noqa: E731  [B', H, T, ...]
        f0 = None
        if initial_state is not None and not initial_state.holds_nothing:
            f0 = initial_state.buckets[[n for _, n in members]]
        o, final = chunked_sequences(
            sl(q), sl(k), sl(v), sl(g), sl(beta), sl(lam), position, f0, output_final_state, chunk_size
        )
        for j, (_, n) in enumerate(members):
            outputs[n] = o[j].transpose(0, 1)
            if output_final_state:
                finals[n] = FenwickState(final[j : j + 1], (position + end - start,))
    o = _assemble(outputs, spans, v)
    state = FenwickState.stack([finals[n] for n in range(len(spans))]) if output_final_state else None
    return o, state


def _group_spans(spans, initial_state):
    """Spans that share (start position, token range) run as one batch: {key: [(batch, span index)]}."""
    groups = {}
    for n, (b, start, end) in enumerate(spans):
        position = initial_state.positions[n] if initial_state is not None else 0
        groups.setdefault((position, start, end), []).append((b, n))
    return groups


def _assemble(outputs, spans, v):
    if len({b for b, _, _ in spans}) == len(spans):  # one span per batch row
        return torch.stack([outputs[n] for n in range(len(spans))])
    return torch.cat([outputs[n] for n in range(len(spans))])[None]  # packed documents, B == 1


def chunked_sequences(q, k, v, g, beta, lam, t0, f0, output_final_state, chunk_size):
    """One batch of sequences [B, H, T, ...] that all start at absolute position t0.

    ``f0``: [B, H, nbits, K, V] buckets of the state after t0 tokens, or None. Returns o [B, H, T, V]
    and the final buckets [B, H, bit_length(t0 + T), K, V] (or None).
    """
    C = chunk_size
    log_c = C.bit_length() - 1
    length = q.shape[2]
    front = t0 % C
    back = -(front + length) % C
    pad = lambda x: F.pad(x, (0, 0, front, back))  # noqa: E731  zero tokens: identity transitions
    chunks = lambda x: x.unflatten(2, (-1, C))  # noqa: E731
    # Padded positions reach levels up to bit_length of the padded end; those levels weigh no real
    # pair, so zero scales for them are harmless and keep every gather in range.
    grid_levels = (t0 + length + back - 1).bit_length() + 1
    lam = F.pad(lam, (0, max(0, grid_levels - lam.shape[-1])))
    qc, kc, vc, lamc = (chunks(pad(x)) for x in (q, k, v, lam))
    gc = chunks(F.pad(g, (front, back)))
    bc = None if beta is None else chunks(F.pad(beta, (front, back)))
    c0 = t0 // C
    stage = chunk_stage(qc, kc, vc, gc, bc)

    o = intra_output(stage["P"], lamc, vc)
    leaves = stage["U"]
    if f0 is not None:
        sub = [b for b in live_bits(t0) if b < log_c]
        if sub:
            o = o + _first_chunk_reads(stage["Qt"][:, :, 0], lamc[:, :, 0], f0, t0, sub, c0 * C, o.shape)
            head = transport(stage["M"][:, :, 0], f0[:, :, sub].sum(2))
            leaves = torch.cat([leaves[:, :, :1] + head[:, :, None], leaves[:, :, 1:]], dim=2)

    num_chunks = qc.shape[2]
    t_end = t0 + length
    last = max(c0 + num_chunks - 1, t_end // C)
    tree = build_tree(leaves, stage["M"], c0, last.bit_length(), f0, log_c)
    for h in range(tree.heights):
        o = o + read_tree(tree, stage["Qt"], lamc, c0, h, log_c)
    o = o.flatten(2, 3)[:, :, front : front + length]

    final = None
    if output_final_state:
        final = final_buckets(tree, stage, vc, t0, t_end, c0, f0, C)
    return o, final


def chunk_stage(q, k, v, g, beta):
    """Per-chunk quantities, all [B, H, NC, ...]: P, Qt, U, M, E (see the module docstring).

    Mamba-2 when ``beta is None``. For Gated DeltaNet, with Gam[t,s] = exp(G_t - G_s):
    T = (I + diag(beta) strictly_lower(K K^T * Gam))^-1 diag(beta) turns values into the
    pseudo-values of the UT transform; then P = (Q K^T * Gam) T, W = T (exp(G) K),
    Qt = exp(G) Q - (Q K^T * Gam) W, E = Kt^T T with Kt = exp(G_C - G) K, U = E V and
    M = exp(G_C) I - Kt^T W.
    """
    C = q.shape[-2]
    G = g.cumsum(-1)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    gam = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()
    scores = (q @ k.transpose(-1, -2)) * gam
    decay_in = G.exp()[..., None]
    k_out = k * (G[..., -1:] - G).exp()[..., None]
    if beta is None:
        P, Qt, E = scores, q * decay_in, k_out.transpose(-1, -2)
        M = G[..., -1].exp()[..., None, None]
    else:
        strict = (k @ k.transpose(-1, -2)) * gam.tril(-1)
        lower = torch.eye(C, dtype=q.dtype, device=q.device) + beta[..., :, None] * strict
        T = torch.linalg.solve_triangular(lower, torch.diag_embed(beta), upper=False, unitriangular=True)
        W = T @ (k * decay_in)
        P, Qt, E = scores @ T, q * decay_in - scores @ W, k_out.transpose(-1, -2) @ T
        eye = torch.eye(k.shape[-1], dtype=q.dtype, device=q.device)
        M = G[..., -1].exp()[..., None, None] * eye - k_out.transpose(-1, -2) @ W
    return {"P": P, "Qt": Qt, "U": E @ v, "M": M, "E": E}


def intra_output(P, lam, v):
    """Within-chunk part: sum_s P[t,s] lam_t[level(t,s)] v_s (chunks are aligned, so levels are local)."""
    C = P.shape[-1]
    levels = level_matrix(torch.arange(C, device=P.device))
    scales = lam.gather(-1, levels.expand(*lam.shape[:-2], C, C))
    return (P * scales) @ v


def _first_chunk_reads(qt, lam, f0, t0, bits, chunk_start, shape):
    """The first chunk's queries read the initial state's sub-chunk buckets at token-level levels."""
    C = qt.shape[-2]
    positions = chunk_start + torch.arange(C, device=qt.device)
    out = 0
    for b in bits:
        level = level_of(positions, bucket_range(t0, b)[0])  # [C]
        weight = lam.gather(-1, level.expand(*lam.shape[:-1])[..., None])  # [B, H, C, 1]
        out = out + weight * (qt @ f0[:, :, b])
    # Positions before t0 (front padding) have zero queries, so they read nothing.
    return F.pad(out[:, :, None], (0, 0, 0, 0, 0, shape[2] - 1))


class Tree:
    """Node arrays per height: states [B, H, n, K, V], transitions [B, H, n, *, *], first index."""

    def __init__(self):
        self.states, self.trans, self.start = [], [], []

    @property
    def heights(self) -> int:
        return len(self.states)

    def node(self, h: int, index: torch.Tensor):
        return self.states[h][:, :, index - self.start[h]]

    def transition(self, h: int, index: torch.Tensor):
        return self.trans[h][:, :, index - self.start[h]]


def build_tree(leaves, trans, c0, heights, f0, log_c):
    """Bottom-up node sums over chunks c0.. with the initial state's chunk-level buckets injected.

    Bit h of c0 set means the initial state holds the node ((c0 >> h) - 1, h): it goes in front of
    the height-h array, with an identity transition because its content is already carried to t0.
    After that injection every array starts at an even index, so pairs line up.
    """
    tree = Tree()
    states, start = leaves, c0
    identity = _identity_like(trans)
    for h in range(heights):
        if start % 2:  # bit h of c0: the node in front belongs to the initial state (zero if none)
            front = f0[:, :, h + log_c, None] if f0 is not None else torch.zeros_like(states[:, :, :1])
            states = torch.cat([front, states], dim=2)
            trans = torch.cat([identity, trans], dim=2)
            start -= 1
        if states.shape[2] % 2:
            states = torch.cat([states, torch.zeros_like(states[:, :, :1])], dim=2)
            trans = torch.cat([trans, identity], dim=2)
        tree.states.append(states)
        tree.trans.append(trans)
        tree.start.append(start)
        left, right = states[:, :, 0::2], states[:, :, 1::2]
        m_left, m_right = trans[:, :, 0::2], trans[:, :, 1::2]
        states = transport(m_right, left) + right
        trans = transport(m_right, m_left)
        start //= 2
    return tree


def _identity_like(trans):
    shape = (*trans.shape[:2], 1, *trans.shape[3:])
    if trans.shape[-1] == 1:
        return trans.new_ones(shape)
    return torch.eye(trans.shape[-1], dtype=trans.dtype, device=trans.device).expand(shape)


def carried_nodes(tree, chunks: torch.Tensor, h: int) -> torch.Tensor:
    """For each chunk c (bit h set), node ((c >> h) - 1, h) carried to the start of c.

    The tokens between that node and c are the nodes of the lower set bits of c, highest first.
    """
    x = tree.node(h, (chunks >> h) - 1)
    for lower in reversed(range(h)):
        sel = ((chunks >> lower) & 1).nonzero().flatten()
        if sel.numel():
            m = tree.transition(lower, (chunks[sel] >> lower) - 1)
            x = x.index_copy(2, sel, transport(m, x[:, :, sel]))
    return x


def read_tree(tree, qt, lam, c0, h, log_c):
    """Height h's contribution to every chunk's output, recomputed in backward to keep memory O(T)."""
    num_chunks = qt.shape[2]
    chunks = torch.arange(c0, c0 + num_chunks, device=qt.device)
    sel = ((chunks >> h) & 1).nonzero().flatten()
    if sel.numel() == 0:
        return 0

    def read(qt, lam):
        nodes = carried_nodes(tree, chunks[sel], h)
        weight = lam[:, :, sel, :, log_c + 1 + h, None]
        part = weight * (qt[:, :, sel] @ nodes)
        full = part.new_zeros(*part.shape[:2], num_chunks, *part.shape[3:])
        return full.index_copy(2, sel, part)

    if torch.is_grad_enabled():
        return checkpoint(read, qt, lam, use_reentrant=False)
    return read(qt, lam)


def final_buckets(tree, stage, vc, t0, t_end, c0, f0, C):
    """The Fenwick state after t_end tokens: chunk-level bits from the tree, sub-chunk bits directly."""
    log_c = C.bit_length() - 1
    last_chunk = t_end // C
    local = last_chunk - c0
    has_partial = local < vc.shape[2]
    m_last = stage["M"][:, :, local] if has_partial else None
    buckets = {}
    for h in [b - log_c for b in live_bits(t_end) if b >= log_c]:
        node = carried_nodes(tree, torch.tensor([last_chunk], device=vc.device), h)[:, :, 0]
        buckets[h + log_c] = transport(m_last, node) if has_partial else node
    for b in [b for b in live_bits(t_end) if b < log_c]:
        lo, hi = bucket_range(t_end, b)
        rows = slice(lo - last_chunk * C, hi - last_chunk * C)
        state = stage["E"][:, :, local, :, rows] @ vc[:, :, local, rows]
        if f0 is not None:
            nested = [
                b0 for b0 in live_bits(t0) if lo <= bucket_range(t0, b0)[0] and bucket_range(t0, b0)[1] <= hi
            ]
            if nested:
                state = state + transport(m_last, f0[:, :, nested].sum(2))
        buckets[b] = state
    nbits = t_end.bit_length()
    zero = torch.zeros_like(next(iter(buckets.values())))
    return torch.stack([buckets.get(b, zero) for b in range(nbits)], dim=2)
