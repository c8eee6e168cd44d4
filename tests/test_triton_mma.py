"""common.mma_f32 and mma_split, the products that build and read tree states, against float64: a
float32 operand times one exact in the inputs' half dtype keeps every product to the float32
operand rounded once to bf16 (bf16 inputs; mma_split: to bf16 hi + lo parts) or to tf32 (fp16
inputs), over ranges that fp16 cannot hold (a state passes 65504 in a long fp16 sequence). fp16
on the interpreter (CPU) or a GPU; bf16 on a GPU only, since the interpreter multiplies bf16
operands as their raw 16-bit integers."""

import pytest
import torch
import triton
import triton.language as tl

from ctxpar.kernels.triton import unavailable_reason
from ctxpar.kernels.triton.common import mma_f32, mma_split

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
M, KD, N = 16, 32, 16


@triton.jit
def product_kernel(a, b, out, HALF_LEFT: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr, M: tl.constexpr,
                   KD: tl.constexpr, N: tl.constexpr):
    # Operands arrive as float32 and the half one is rounded here: the interpreter misreads bf16
    # tensors loaded from memory.
    rm, rk, rn = tl.arange(0, M), tl.arange(0, KD), tl.arange(0, N)
    x = tl.load(a + rm[:, None] * KD + rk[None, :])
    y = tl.load(b + rk[:, None] * N + rn[None, :])
    if HALF_LEFT:
        x = x.to(DT)
    else:
        y = y.to(DT)
    if SPLIT:  # mma_split splits its right operand, so only the half-left case calls it
        z = mma_split(x, y, DT, "tf32")
    else:
        z = mma_f32(x, y, DT, "tf32")
    tl.store(out + rm[:, None] * N + rn[None, :], z)


def _spread(rows, cols, axis):
    """Normal values whose magnitude varies by up to 2^+-40 along ``axis``: far outside fp16's
    range (about 6e-5 to 65504)."""
    x = torch.randn(rows, cols, dtype=torch.float64)
    size = rows if axis == 0 else cols
    scale = 2.0 ** torch.randint(-40, 41, (size,), dtype=torch.float64)
    return x * (scale[:, None] if axis == 0 else scale[None, :])


GPU_ONLY = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("half", [pytest.param("bfloat16", marks=GPU_ONLY), "float16"])
@pytest.mark.parametrize("half_left, split", [(True, False), (False, False), (True, True)],
                         ids=["mma_f32-half-left", "mma_f32-half-right", "mma_split"])
def test_state_products_round_the_float32_operand_once_over_any_range(half, half_left, split):
    dtype = getattr(torch, half)
    # Rows of the left operand and columns of the right one vary in scale: the product's own axes.
    a, b = _spread(M, KD, 0), _spread(KD, N, 1)
    if half == "float16":  # an fp16 tensor holds fp16 values: keep the half operand in its range
        (a if half_left else b).clamp_(-6e4, 6e4)
    half_op = (a if half_left else b).to(dtype).double()  # exact in the half dtype, as the kernels' inputs
    a, b = (half_op, b) if half_left else (a, half_op)
    out = torch.empty(M, N, dtype=torch.float32, device=DEVICE)
    product_kernel[(1,)](a.float().to(DEVICE), b.float().to(DEVICE), out, HALF_LEFT=half_left, SPLIT=split,
                         DT=getattr(tl, half), M=M, KD=KD, N=N)
    a32, b32 = a.float().double(), b.float().double()  # the float32 operand as the kernel sees it
    exact = a32 @ b32
    bound = a32.abs() @ b32.abs()
    err = (out.double().cpu() - exact).abs()
    assert torch.isfinite(out).all()
    # Each product off by one rounding of the float32 operand at most, plus float32 sums: 2^-9 of
    # itself to bf16 (to nearest), 2^-10 to tf32 (which may truncate). mma_split's bf16 hi + lo
    # parts keep about 2^-17 (lo rounds what hi left, at most 2^-9 of it); 2^-14 leaves the
    # tensor cores' float32 sums room and still fails a single bf16 product by 32x. fp16 parts
    # (inf, then NaN here) or a coarser rounding break this.
    unit = 2.0**-10 if half == "float16" else 2.0**-14 if split else 2.0**-9
    assert (err <= (unit + 2.0**-18) * bound).all(), (err / bound).max().item()
