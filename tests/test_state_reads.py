"""The Triton reads of a Fenwick state (context parallelism's one extra op) against torch_reads in
float64: the output and the gradients of o, q, the weights and the state; several live buckets,
q/k groups, token counts that are not a multiple of the block, several sequences."""

import pytest
import torch

from ctxpar.kernels.state_reads import torch_reads
from ctxpar.kernels.triton import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# tol: o and dq (in the inputs' dtype); tol32: dw and dS (float32), which keep the precision of
# the state's products: bf16 for bf16 queries, tf32 for fp16 ones (exact on the interpreter).
@pytest.mark.parametrize("R, n, H, HQ, K, V, NB, dtype, tol, tol32", [
    (1, 150, 4, 1, 32, 16, 2, torch.float32, 1e-5, 1e-5),
    (2, 70, 4, 2, 16, 32, 3, torch.float32, 1e-5, 1e-5),
    (1, 4200, 2, 2, 16, 16, 1, torch.float32, 1e-5, 1e-5),  # more blocks than one dS run (4096 tokens)
    (1, 90, 4, 2, 32, 16, 2, torch.float16, 2e-3, 1e-3),
    (1, 70, 2, 1, 256, 48, 2, torch.float32, 1e-5, 1e-5),  # V split into tiles (common.v_tile)
    # bf16 on the device only: the Triton interpreter does not emulate bf16 dots
    pytest.param(1, 3000, 32, 1, 128, 64, 2, torch.bfloat16, 4e-3, 4e-3, marks=pytest.mark.gpu),
], ids=["hq1-two-buckets", "batch-hq-divisor", "long-run", "fp16", "wide-k-split-v",
    "bf16-benchmark-heads"])
def test_fused_reads_match_torch(R, n, H, HQ, K, V, NB, dtype, tol, tol32):
    check(R, n, H, HQ, K, V, NB, dtype, tol, tol32)


def test_fp16_reads_of_a_state_past_fp16_range():
    """A long fp16 sequence sums a state past 65504, fp16's largest value: its hi part in fp16
    was inf there, and every read NaN. Queries and output gradients are small enough that the
    outputs and dq stay in range."""
    check(1, 90, 4, 2, 32, 16, 2, torch.float16, 2e-3, 1e-3, state=3e4, inputs=1e-3)


def check(R, n, H, HQ, K, V, NB, dtype, tol, tol32, state=1.0, inputs=1.0):
    from ctxpar.kernels.triton.state_read import add_state_reads

    o = torch.randn(R, n, H, V, device=DEVICE).to(dtype).requires_grad_()
    q = (torch.randn(R, n, HQ, K, device=DEVICE) * inputs).to(dtype).requires_grad_()
    w = torch.rand(R, n, H, NB, device=DEVICE).requires_grad_()
    s = (torch.randn(R, H, NB, K, V, device=DEVICE) * state).requires_grad_()
    out = add_state_reads(o, q, w, s)
    d_out = torch.randn_like(out) * inputs
    grads = torch.autograd.grad(out, (o, q, w, s), d_out)

    leaves = [x.detach().double().requires_grad_() for x in (o, q, w, s)]
    ref = leaves[0] + torch_reads(*leaves[1:])
    ref_grads = torch.autograd.grad(ref, leaves, d_out.double())
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert rel(out, ref) <= tol
    for name, a, b, limit in zip("o q w s".split(), grads, ref_grads, (tol, 2 * tol, tol32, tol32)):
        assert a.shape == b.shape and rel(a, b) <= limit, (name, rel(a, b))
