"""Fresh random inputs for the attention ops (a new draw on every call: tests never reuse data)."""

import torch

from ctxpar.kernels.levels import num_levels


def attention_inputs(B, T, H, K, V, *, Hk=None, gdn=False, levels=None, dtype=torch.float64, device="cpu",
                     extra_levels=0, generator=None):
    """q, k, v, g, beta (None for Mamba-2), level_scales in the public layout.

    Keys are L2-normalised for Gated DeltaNet so the delta-rule transitions stay contractive,
    decays are mild so long sequences keep signal, and lambda is positive and away from 1 so a
    wrong level index shows.
    """
    Hk = H if Hk is None else Hk
    L = (levels or num_levels(T)) + extra_levels
    rand = lambda *shape: torch.randn(*shape, dtype=dtype, device=device, generator=generator)  # noqa: E731
    q, k = rand(B, T, Hk, K), rand(B, T, Hk, K)
    if gdn:
        k = k / k.norm(dim=-1, keepdim=True)
    v = rand(B, T, H, V)
    g_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = -torch.rand(B, T, H, dtype=g_dtype, device=device, generator=generator) * 0.3
    beta = torch.rand(B, T, H, dtype=dtype, device=device, generator=generator) if gdn else None
    lam = torch.rand(B, T, H, L, dtype=dtype, device=device, generator=generator) * 1.5 + 0.25
    return q, k, v, g, beta, lam


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def random_documents(seed: int | None = None):
    """(T, spans, initial positions, levels L) of one random packed row: 20-119 tokens cut into
    documents (a single last token among them), each continuing from a random position (0, around
    a chunk edge of 16, or anywhere below 200); L covers the longest document's end. Without a
    seed, a fresh one, printed so that a failing test shows it."""
    import random

    if seed is None:
        seed = random.randrange(2**31)
        print(f"seed={seed}")
    rng = random.Random(seed)
    T = rng.randrange(20, 120)
    cuts = sorted({0, T, *rng.sample(range(1, T), rng.randrange(1, 6)), T - 1})
    spans = [(0, a, b) for a, b in zip(cuts, cuts[1:])]
    positions = [rng.choice([0, 1, 15, 16, 17, rng.randrange(200)]) for _ in spans]
    L = max(p + b - a for p, (_, a, b) in zip(positions, spans)).bit_length() + 1
    return T, spans, positions, L
