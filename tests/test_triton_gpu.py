"""The Triton kernels (log-linear Mamba-2 and Gated DeltaNet) on a CUDA GPU, checked against references
in the same run.

float32 against float64 (relative RMSE <= 1e-4), bf16 against float64 on the bf16-rounded inputs
(outputs <= 4e-3, gradients <= 1e-2), and one million (Mamba-2) / half a million (GDN) tokens
against the torch backend on the GPU.
The caching allocator is filled with NaN before every kernel run, so an unwritten element shows.
Run on the device: python -m pytest tests/test_triton_gpu.py -m gpu -x -q
"""

import pytest
import torch

from ctxpar.kernels import reference, torch_chunked
from ctxpar.kernels.state import FenwickState

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = "cuda"
NAMES = ["q", "k", "v", "g", "beta", "level_scales"]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def poison_allocator(gib=4.0):
    """Fill the allocator's cached blocks with NaN so that later allocations start poisoned."""
    blocks = [torch.full((1 << 26,), float("nan"), device=DEV) for _ in range(int(gib * 4))]
    del blocks


def inputs(B, T, H, HK, K, V, L, dtype, gdn=False):
    """[q, k, v, g, beta, lam]; beta is None for Mamba-2. GDN keys are unit vectors (contractive
    transitions) and beta lies in (0, 1)."""
    q = torch.randn(B, T, HK, K, device=DEV) * K**-0.5
    k = torch.randn(B, T, HK, K, device=DEV)
    k = torch.nn.functional.normalize(k, dim=-1) if gdn else k
    v = torch.randn(B, T, H, V, device=DEV)
    g = -torch.nn.functional.softplus(torch.randn(B, T, H, device=DEV) - 4) * torch.rand(H, device=DEV)
    beta = torch.rand(B, T, H, device=DEV).to(dtype) if gdn else None
    lam = torch.rand(B, T, H, L, device=DEV) + 0.5
    return [x.to(dtype) for x in (q, k, v)] + [g, beta, lam.to(dtype)]


def leaves_of(args, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in args]


def grads_of(leaves, init_leaf):
    return [x.grad for x in leaves if x is not None] + ([init_leaf.buckets.grad] if init_leaf is not None else [])


def run_triton(args, spans, init, final, do, d_state):
    from ctxpar.kernels.triton import chunked

    leaves = leaves_of(args)
    init_leaf = None if init is None else FenwickState(init.buckets.detach().requires_grad_(), init.positions)
    poison_allocator()
    o, state = chunked(*leaves, spans, init_leaf, final)
    loss = (o.float() * do).sum() + ((state.buckets * d_state).sum() if final else 0)
    poison_allocator()
    loss.backward()
    return o, state, grads_of(leaves, init_leaf)


def run_torch(args, spans, init, final, do, d_state, dtype):
    groups = args[2].shape[2] // args[0].shape[2]
    leaves = leaves_of(args, dtype)
    init_leaf = None if init is None else FenwickState(init.buckets.detach().to(dtype).requires_grad_(), init.positions)
    q, k = (x.repeat_interleave(groups, 2) for x in leaves[:2])
    o, state = torch_chunked.chunked(q, k, *leaves[2:], spans, init_leaf, final)
    loss = (o * do).sum() + ((state.buckets * d_state).sum() if final else 0)
    loss.backward()
    return o, state, grads_of(leaves, init_leaf)


def check(args, spans, init, final, tol_o, tol_grad, ref_dtype=torch.float64):
    do = torch.randn(*args[2].shape, device=DEV)
    starts = init.positions if init else [0] * len(spans)
    nbits = max((p + e - s).bit_length() for p, (_, s, e) in zip(starts, spans))
    d_state = torch.randn(len(spans), args[2].shape[2], nbits, args[0].shape[3], args[2].shape[3], device=DEV)
    o, state, grads = run_triton(args, spans, init, final, do, d_state)
    ref_o, ref_state, ref_grads = run_torch(args, spans, init, final, do.to(ref_dtype), d_state.to(ref_dtype), ref_dtype)
    assert not torch.isnan(o).any(), "output has unwritten (NaN) elements"
    assert rel(o, ref_o) <= tol_o, rel(o, ref_o)
    if final:
        assert not torch.isnan(state.buckets).any(), "final state has NaN"
        assert rel(state.buckets, ref_state.buckets) <= tol_o
    names = [name for name, x in zip(NAMES, args) if x is not None] + ["initial_state"]
    errors = {name: rel(a, b) for name, a, b in zip(names, grads, ref_grads)}
    print("relative errors", dict(errors, o=rel(o, ref_o)))
    for name, a in zip(names, grads):
        assert not torch.isnan(a).any(), name
        assert errors[name] <= tol_grad, (name, errors[name])


def test_float32_small_against_materialized_oracle():
    from ctxpar.kernels.triton import chunked

    q, k, v, g, _, lam = inputs(1, 300, 2, 1, 32, 32, 10, torch.float64)
    spans = [(0, 0, 300)]
    ref = reference.materialized(q.repeat_interleave(2, 2), k.repeat_interleave(2, 2), v, g, None, lam, spans)
    poison_allocator()
    o, _ = chunked(q.float(), k.float(), v.float(), g.float(), None, lam.float(), spans)
    assert rel(o, ref) <= 1e-4


@pytest.mark.parametrize("hk", [1, 2, 8])
def test_float32_packed_with_states(hk):
    args = inputs(1, 5000, 8, hk, 128, 64, 14, torch.float32)
    spans = [(0, 0, 1234), (0, 1234, 1300), (0, 1300, 5000)]
    init = FenwickState(torch.randn(3, 8, 12, 128, 64, device=DEV) * 0.1, (1000, 77, 3000))
    check(args, spans, init, True, 1e-4, 1e-4)


def test_bfloat16_benchmark_shape():
    args = inputs(2, 4096, 32, 1, 128, 64, 13, torch.bfloat16)
    check(args, [(0, 0, 4096), (1, 0, 4096)], None, False, 4e-3, 1e-2)


def test_bfloat16_state_in_and_out():
    args = inputs(1, 3000, 4, 1, 64, 128, 14, torch.bfloat16)
    init = FenwickState(torch.randn(1, 4, 12, 64, 128, device=DEV) * 0.1, (2085,))
    check(args, [(0, 0, 3000)], init, True, 4e-3, 1e-2)


def test_bfloat16_widest_k_v_with_states():
    """K = V = 256: the backward stages split V into tiles (common.v_tile) that add their shares."""
    args = inputs(1, 3000, 4, 2, 256, 256, 14, torch.bfloat16)  # ends at 4500: 14 levels
    init = FenwickState(torch.randn(1, 4, 12, 256, 256, device=DEV) * 0.05, (1500,))
    check(args, [(0, 0, 3000)], init, True, 4e-3, 1e-2)


def test_one_million_tokens_against_torch_backend():
    """Every gradient, g included: dg is summed from straddling pairs (kernels/triton/dg.py), so
    it no longer random-walks over the million tokens."""
    T = 1 << 20
    args = inputs(1, T, 2, 1, 128, 64, 21, torch.bfloat16)
    check(args, [(0, 0, T)], None, False, 4e-3, 1e-2, ref_dtype=torch.float32)


# --- log-linear Gated DeltaNet ------------------------------------------------------------------


def test_gdn_float32_small_against_materialized_oracle():
    from ctxpar.kernels.triton import chunked

    q, k, v, g, beta, lam = inputs(1, 300, 2, 1, 32, 32, 10, torch.float64, gdn=True)
    spans = [(0, 0, 300)]
    ref = reference.materialized(q.repeat_interleave(2, 2), k.repeat_interleave(2, 2), v, g, beta, lam, spans)
    poison_allocator()
    o, _ = chunked(q.float(), k.float(), v.float(), g.float(), beta.float(), lam.float(), spans)
    assert not torch.isnan(o).any()
    assert rel(o, ref) <= 1e-4


@pytest.mark.parametrize("hk", [1, 2, 8])
def test_gdn_float32_packed_with_states(hk):
    args = inputs(1, 5000, 8, hk, 128, 64, 14, torch.float32, gdn=True)
    spans = [(0, 0, 1234), (0, 1234, 1300), (0, 1300, 5000)]
    init = FenwickState(torch.randn(3, 8, 12, 128, 64, device=DEV) * 0.1, (1000, 77, 3000))
    check(args, spans, init, True, 1e-4, 1e-4)


def test_gdn_bfloat16_benchmark_shape():
    args = inputs(2, 4096, 16, 16, 128, 128, 13, torch.bfloat16, gdn=True)
    check(args, [(0, 0, 4096), (1, 0, 4096)], None, False, 4e-3, 1e-2)


def test_gdn_bfloat16_wide_heads_state_in_and_out():
    """K = 192, V = 384: several K and V tiles, K not a power of two."""
    args = inputs(1, 3000, 6, 6, 192, 384, 14, torch.bfloat16, gdn=True)
    init = FenwickState(torch.randn(1, 6, 12, 192, 384, device=DEV) * 0.1, (2085,))
    check(args, [(0, 0, 3000)], init, True, 4e-3, 1e-2)


def test_gdn_float16_packed():
    args = inputs(1, 2000, 4, 2, 64, 64, 12, torch.float16, gdn=True)
    check(args, [(0, 0, 700), (0, 700, 2000)], None, True, 4e-3, 1e-2)


def test_gdn_half_million_tokens_against_torch_backend():
    T = 1 << 19
    args = inputs(1, T, 2, 1, 128, 128, 20, torch.bfloat16, gdn=True)
    check(args, [(0, 0, T)], None, False, 4e-3, 1e-2, ref_dtype=torch.float32)
