"""tests/interpreter.py makes bf16 under the interpreter compute as the GPU does: products and
elementwise ops on the numbers bf16 holds (not on its uint16 bits), sums in float32 rounded to
bf16, float32 -> bf16 casts rounded to nearest even (torch's rounding, bit for bit), and bools
made bf16 as 0 and 1."""

import os

import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's bf16")


@triton.jit
def bf16_kernel(a, b, x, dot_out, mul_out, add_out, sum_out, cast_out, mask_out, N: tl.constexpr):
    r = tl.arange(0, N)
    tile = r[:, None] * N + r[None, :]
    ta, tb = tl.load(a + tile), tl.load(b + tile)
    tl.store(dot_out + tile, tl.dot(ta, tb))
    tl.store(mul_out + tile, (ta * tb).to(tl.float32))
    tl.store(add_out + tile, (ta + tb).to(tl.float32))
    tl.store(sum_out + r, tl.sum(ta, 1).to(tl.float32))
    tl.store(cast_out + tile, tl.load(x + tile).to(tl.bfloat16))
    tl.store(mask_out + tile, (r[:, None] > r[None, :]).to(tl.bfloat16).to(tl.float32))


def test_bf16_products_elementwise_sums_and_casts_as_on_the_gpu():
    N = 16
    a, b = (torch.randn(N, N).bfloat16() for _ in range(2))
    x = torch.randn(N, N) * torch.logspace(-3, 3, N)  # magnitudes whose rounding carries into the exponent
    x[0, :4] = torch.tensor([1.00390625, 1.01171875, -1.00390625, 255.5])  # ties, to even
    outs = [torch.empty(N, N) for _ in range(3)] + [torch.empty(N), torch.empty(N, N, dtype=torch.bfloat16)]
    outs.append(torch.empty(N, N))
    bf16_kernel[(1,)](a, b, x, *outs, N=N)
    dot, mul, add, row_sum, cast, mask = outs
    torch.testing.assert_close(dot, a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(mul, (a.float() * b.float()).bfloat16().float())
    assert torch.equal(add, (a.float() + b.float()).bfloat16().float())
    torch.testing.assert_close(row_sum, a.float().sum(1).bfloat16().float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(cast.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(mask, torch.ones(N, N).tril(-1))  # a bool made bf16 is 1, not the bits of 1
