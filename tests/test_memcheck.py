"""tests/memcheck.py (installed by the conftest on the interpreter) stops a kernel that touches
memory outside its tensors, and lets one that stays inside run."""

import os

import pytest
import torch
import triton
import triton.language as tl

from tests.memcheck import OutOfBounds

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="checks the interpreter's accesses")


@triton.jit
def shift_kernel(x, y, n, shift, BLOCK: tl.constexpr, ATOMIC: tl.constexpr):
    i = tl.arange(0, BLOCK)
    value = tl.load(x + i, mask=i < n)
    if ATOMIC:
        tl.atomic_add(y + i + shift, value, mask=i < n)
    else:
        tl.store(y + i + shift, value, mask=i < n)


@pytest.mark.parametrize("atomic", [False, True], ids=["store", "atomic"])
def test_in_bounds_runs_and_one_past_the_end_fails(atomic):
    n = int(torch.randint(3, 30, ()).item())
    x = torch.randn(n)
    y = torch.zeros(n)
    shift_kernel[(1,)](x, y, n, 0, BLOCK=32, ATOMIC=atomic)  # masked-off lanes past n are not accesses
    assert torch.equal(y, x)
    with pytest.raises(OutOfBounds, match="shift_kernel"):
        shift_kernel[(1,)](x, y, n, 1, BLOCK=32, ATOMIC=atomic)
