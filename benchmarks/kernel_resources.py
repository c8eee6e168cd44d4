"""Shared memory, registers and spills of every Triton kernel an op launches, compiled for an H200
(sm_90) on a machine without a GPU, at no device time.

The op runs forward and backward on CPU tensors with each kernel launch recorded instead of
executed; every distinct launch (kernel, argument types, constexprs, warps, stages) is compiled
ahead of time for the GPU target, and cuobjdump reads the cubin's resource usage. A kernel whose
shared memory exceeds what one block may take would fail to launch on the device; a non-zero
stack means register spills. Each launch is specialised as Triton's launcher specialises it on
the device (compile_as_launched). The installed Triton compiles, with the ptxas its wheel ships;
for the device's registers and spills, run it under the device's Triton (3.6.0; 3.7.1's counts
differ):

    pip download --no-deps triton==3.6.0 -d /tmp/whl && pip install --no-deps --target /tmp/t36 /tmp/whl/*.whl
    PYTHONPATH=/tmp/t36 python benchmarks/kernel_resources.py --variant mamba2 --cp

    python benchmarks/kernel_resources.py --variant gdn --heads 16 --groups 16 --k 128 --v 128
    python benchmarks/kernel_resources.py --variant mamba2 --heads 32 --groups 1 --k 128 --v 64
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 / H200
TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=("mamba2", "gdn"), default="mamba2")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--groups", type=int, default=1, help="q/k heads Hk")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--v", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--cp", action="store_true", help="also the kernels context parallelism adds (the state reads)")
    p.add_argument("--tokens", type=int, default=512, help="enough chunks for every tree height a kernel specialises on")
    return p.parse_args()


def recorded_launches(fn) -> list[tuple[JITFunction, tuple, dict]]:
    """Run ``fn()`` with every Triton launch recorded, not executed (outputs stay uninitialised)."""
    launches, run = [], JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        fn()
    finally:
        JITFunction.run = run
    return launches


def compile_as_launched(kernel: JITFunction, args: tuple, kwargs: dict):
    """One launch specialised as Triton's own launcher specialises it on the device (ints equal to
    1 become constants; pointers and ints divisible by 16 say so, which lets loads vectorise):
    (a key for the distinct launches, its constexprs by name, a function that compiles it).
    Without those hints, as this script compiled before, query_grad spilled 1656 bytes a thread
    under Triton 3.6 (scalar loads, a pointer per element); with them, 32."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, types, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.__name__, repr(specialization), repr(sorted(options.__dict__.items())))
    named = {kernel.params[i].name: v for (i,), v in constexprs.items() if kernel.params[i].is_constexpr}
    return key, named, lambda: triton.compile(ASTSource(kernel, types, constexprs, attrs), target=TARGET,
                                              options=options.__dict__)


def resources(compiled) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    shared = compiled.metadata.shared
    return dict(shared=shared, fits=shared <= SHARED_LIMIT, registers=field("REG"), spill_stack=field("STACK"))


def op_call(args):
    """Forward and backward of the chosen op's Triton path on small CPU tensors."""
    from ctxpar.kernels.levels import num_levels
    from ctxpar.kernels.triton import chunked

    dt, T, H, Hk = DTYPES[args.dtype], args.tokens, args.heads, args.groups
    leaf = lambda *shape, dtype=dt: torch.randn(*shape, dtype=dtype).requires_grad_()  # noqa: E731
    q, k, v = leaf(1, T, Hk, args.k), leaf(1, T, Hk, args.k), leaf(1, T, H, args.v)
    g, lam = leaf(1, T, H, dtype=torch.float32), leaf(1, T, H, num_levels(T))
    beta = leaf(1, T, H) if args.variant == "gdn" else None

    def call():
        o, _ = chunked(q, k, v, g, beta, lam, [(0, 0, T)])
        if args.cp:
            from ctxpar.kernels.triton.state_read import add_state_reads

            w, state = leaf(1, T, H, 2, dtype=torch.float32), leaf(1, H, 2, args.k, args.v, dtype=torch.float32)
            o = add_state_reads(o, q, w, state)
        o.float().sum().backward()

    return call


def main():
    args = parse()
    rows, seen = [], set()
    for kernel, a, kw in recorded_launches(op_call(args)):
        key, constexprs, build = compile_as_launched(kernel, a, dict(kw))
        if key in seen:
            continue
        seen.add(key)
        row = dict(kernel=kernel.__name__, constexprs=constexprs, **{k: v for k, v in kw.items() if k in OPTIONS})
        try:
            row.update(resources(build()))
        except Exception as e:  # noqa: BLE001  a kernel that does not compile is a finding, not a crash
            row["error"] = repr(e)[:300]
        rows.append(row)
        print(json.dumps(row), flush=True)
    if os.environ.get("OUT"):
        name = f"kernel_resources-{args.variant}-{args.heads}x{args.k}x{args.v}-{args.dtype}.json"
        with open(os.path.join(os.environ["OUT"], name), "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
