"""The Triton reads of a Fenwick state (context parallelism's one extra op) against torch_reads
of read_weights in float64: the output and the gradients of o, q, lam, the decay and the state;
several live buckets (read at random levels, some at the same one), q/k groups, no decay (GDN),
token counts that are not a multiple of the block, several sequences."""

import pytest
import torch

from ctxpar.kernels.state_reads import read_weights, torch_reads
from ctxpar.kernels.triton import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
L = 6  # lambda levels


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# tol: o, dq and dlam (in the inputs' dtype); tol32: the decay's gradient and dS (float32). fp16's
# decay gradient is 1e-7 off with the state's hi + lo parts and 2e-4 with hi alone, so tol32
# checks the split.
@pytest.mark.parametrize("R, n, H, HQ, K, V, NB, decay, dtype, tol, tol32", [
    (1, 150, 4, 1, 32, 16, 2, True, torch.float32, 1e-5, 1e-5),
    (2, 70, 4, 2, 16, 32, 3, False, torch.float32, 1e-5, 1e-5),
    (1, 4200, 2, 2, 16, 16, 1, True, torch.float32, 1e-5, 1e-5),  # more blocks than one dS run (4096 tokens)
    (1, 90, 4, 2, 32, 16, 2, True, torch.float16, 2e-3, 1e-5),  # the hi + lo split of the state
    (1, 70, 2, 1, 256, 48, 2, True, torch.float32, 1e-5, 1e-5),  # V split into tiles (common.v_tile)
    # bf16 on the device only: the Triton interpreter does not emulate bf16 dots
    pytest.param(1, 3000, 32, 1, 128, 64, 2, True, torch.bfloat16, 4e-3, 1e-4, marks=pytest.mark.gpu),
], ids=["hq1-two-buckets", "batch-hq-divisor-no-decay", "long-run", "fp16-split-state", "wide-k-split-v",
    "bf16-benchmark-heads"])
def test_fused_reads_match_torch(R, n, H, HQ, K, V, NB, decay, dtype, tol, tol32):
    from ctxpar.kernels.triton.state_read import add_state_reads

    o = torch.randn(R, n, H, V, device=DEVICE).to(dtype).requires_grad_()
    q = torch.randn(R, n, HQ, K, device=DEVICE).to(dtype).requires_grad_()
    lam = (torch.rand(R, n, H, L, device=DEVICE) + 0.5).to(dtype).requires_grad_()
    d = torch.rand(R, n, H, device=DEVICE).requires_grad_() if decay else None
    s = torch.randn(R, H, NB, K, V, device=DEVICE).requires_grad_()
    levels = torch.randint(0, L, (n, NB), device=DEVICE)
    leaves = [x for x in (o, q, lam, d, s) if x is not None]
    out = add_state_reads(o, q, lam, levels, d, s)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)

    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    o64, q64, lam64, *rest = ref_leaves
    d64, s64 = rest if decay else (None, rest[0])
    ref = o64 + torch_reads(q64, read_weights(lam64, levels, d64, torch.float64), s64)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert rel(out, ref) <= tol
    names = ["o", "q", "lam"] + (["decay"] if decay else []) + ["s"]
    limits = {"o": tol, "q": 2 * tol, "lam": tol, "decay": tol32, "s": tol32}
    for name, a, b, x in zip(names, grads, ref_grads, leaves):
        assert a.shape == b.shape and a.dtype == x.dtype and rel(a, b) <= limits[name], (name, rel(a, b))
