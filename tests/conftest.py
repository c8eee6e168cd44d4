"""Test setup shared by every test module.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before any
module that defines a kernel is imported; tests/interpreter.py then sets it up (the first config
of autotuned kernels, bf16 as on the GPU, bounds-checked memory accesses, one launch at a time).
"""

import os

import torch

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import interpreter  # noqa: E402  (after TRITON_INTERPRET is set)

interpreter.prepare()
