"""Every Triton kernel of both ops, compiled for an H200 (sm_90) on this GPU-less machine, fits in
the shared memory one block may take, at the benchmark shapes: a kernel that does not would only
fail at launch on the device (benchmarks/kernel_resources.py; the H200 refused GDN's chunk-stage
backward at 240 KiB before its tiles were narrowed, and at 352 KiB at the paper's K = 192, V = 384)."""

import json
import os
import subprocess
import sys

import pytest


def kernel_rows(*args: str) -> list[dict]:
    # A fresh process: the conftest's TRITON_INTERPRET turns kernels into interpreted functions,
    # which do not compile for a GPU target.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "benchmarks/kernel_resources.py", *args], env=env, capture_output=True,
                         text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("shape", [
    ("--variant", "mamba2", "--heads", "32", "--groups", "1", "--k", "128", "--v", "64", "--cp"),
    ("--variant", "mamba2", "--heads", "4", "--groups", "2", "--k", "256", "--v", "256", "--cp"),
    ("--variant", "gdn", "--heads", "16", "--groups", "16", "--k", "128", "--v", "128"),
    ("--variant", "gdn", "--heads", "6", "--groups", "6", "--k", "192", "--v", "384"),
], ids=["mamba2-H32-K128-V64-with-cp-reads", "mamba2-K256-V256-split-v", "gdn-H16-K128-V128", "gdn-H6-K192-V384"])
def test_every_kernel_compiles_within_shared_memory(shape):
    rows = kernel_rows(*shape, "--dtype", "bf16", "--sass")
    assert len({r["kernel"] for r in rows}) >= 4, rows  # the forward and backward stages were all reached
    assert not [r for r in rows if "error" in r], [r["error"] for r in rows if "error" in r]
    assert [(r["kernel"], r["shared"]) for r in rows if not r["fits"]] == []
    # --sass: every count filled its kernel's .text section (checked in the script), and the
    # Mamba-2 stages built on tl.dot run bf16 products on the tensor cores
    assert all(r["instructions"] > 0 for r in rows)
    dots = {"chunk_state_kernel", "output_kernel", "node_grad_kernel", "query_grad_kernel", "source_grad_kernel"}
    assert [r["kernel"] for r in rows if r["kernel"] in dots and r["HGMMA"] == 0] == []
