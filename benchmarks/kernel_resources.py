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
    python benchmarks/kernel_resources.py --variant mamba2 --sass   # also SASS instruction counts
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
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
    p.add_argument("--sass", action="store_true", help="also count SASS instructions (all, and some opcodes: "
                   "FAMILIES) to compare variants of a kernel")
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


def resources(compiled, sass: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = cuobjdump("-res-usage", f.name)
        listing = cuobjdump("-sass", f.name) if sass else None
    field = lambda name: int(re.search(rf"{name}:(\d+)", usage).group(1))  # noqa: E731
    shared = compiled.metadata.shared
    row = dict(shared=shared, fits=shared <= SHARED_LIMIT, registers=field("REG"), spill_stack=field("STACK"))
    if sass:
        row.update(instruction_counts(listing, compiled.asm["cubin"], compiled.metadata.name))
    return row


def cuobjdump(flag: str, path: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, flag, path], capture_output=True, text=True, check=True).stdout


# Opcodes worth watching when two variants of a kernel are compared (sm_90 names): tensor-core
# products, barriers (a reduction over a whole program: query_grad's one per height cost it 0.04
# ms at 8K x 4), shuffles (reductions and layout changes inside a warp), shared-memory traffic,
# local memory (spills), global atomics.
FAMILIES = ("HGMMA", "BAR", "SHFL", "LDS", "STS", "LDL", "STL", "REDG", "ATOMG")


def instruction_counts(listing: str, cubin: bytes, name: str) -> dict:
    """SASS instructions of the kernel (all, and per opcode in FAMILIES). Every sm_90 instruction
    is 16 bytes, so the count must fill the kernel's .text section exactly: a parse that missed
    instructions (a first version matched 4-digit offsets only and stopped at 4096) fails here."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", listing)
    if 16 * len(ops) != text_size(cubin, name):
        raise RuntimeError(f"parsed {len(ops)} instructions, the .text section holds {text_size(cubin, name) // 16}")
    return dict(instructions=len(ops), **{fam: sum(op.split(".")[0] == fam for op in ops) for fam in FAMILIES})


def text_size(cubin: bytes, name: str) -> int:
    """Bytes of section .text.<name> of an ELF64 cubin."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    entsize, count, names = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * entsize) for i in range(count)]
    strings = headers[names][4]
    for sh_name, _, _, _, _, size in headers:
        end = cubin.index(b"\0", strings + sh_name)
        if cubin[strings + sh_name:end] == f".text.{name}".encode():
            return size
    raise KeyError(name)


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
            row.update(resources(build(), args.sass))
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
