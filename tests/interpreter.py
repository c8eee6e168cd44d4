"""What every test process sets up when the Triton kernels run under the interpreter (CPU,
TRITON_INTERPRET=1): autotuned kernels take their first config, since autotuning with several
configs fails there ("0 active drivers"); bf16 behaves as on the GPU (_bf16); every memory
access a kernel makes is bounds-checked (tests/memcheck.py); and launches from several threads
(cp.simulate's virtual ranks) run one at a time. The conftest calls it in the test process and
tests/distributed.py in each rank it spawns."""

import os


def prepare() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    _first_config_autotuner()
    _bf16()
    from tests import memcheck

    memcheck.install()  # every interpreted kernel's loads, stores and atomics stay inside its tensors
    _one_launch_at_a_time()


def _first_config_autotuner() -> None:
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "_first_config_only", False):
        return
    original = autotuner.Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = init
    autotuner.Autotuner._first_config_only = True


def _bf16() -> None:
    """The interpreter (Triton 3.7.1) keeps bf16 values as their uint16 bits, and tl.dot and the
    elementwise ops computed on those bits (2e10 off on a 16 x 16 product): here they take bf16
    operands as float32 numbers, and elementwise results go back to bf16 as on the GPU. float32
    -> bf16 casts truncated where the GPU rounds to nearest even (and the interpreter's own
    round-to-nearest-even mode loses the carry into the exponent: 0.5 off), and integer or bool
    -> bf16 casts kept the integer as the bits (True became 1e-40, not 1): every cast to bf16
    goes through float32 and rounds to nearest even here, and casts from bf16 start from float32.
    bf16 atomic adds, which it refuses, are emulated."""
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_bf16_as_on_gpu", False):
        return
    dot, cast, binary = builder.create_dot, builder.cast_impl, builder.binary_op
    arithmetic = (np.add, np.subtract, np.multiply, np.divide, np.fmod, np.minimum, np.maximum)

    def as_float32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(bits.view(interpreter._get_np_dtype(tl.float32)), tl.float32)

    def create_dot(self, a, b, d, *args):
        return dot(self, as_float32(a), as_float32(b), d, *args)

    def cast_impl(self, src, dst_type):
        if dst_type.scalar != tl.bfloat16:
            return cast(self, as_float32(src), dst_type)
        if src.dtype.scalar == tl.bfloat16:
            return src
        bits = np.asarray(src.data).astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # to nearest, ties to even
        return interpreter.TensorHandle(rounded.astype(np.uint16), tl.bfloat16)

    def binary_op(self, lhs, rhs, op):
        if tl.bfloat16 not in (lhs.dtype.scalar, rhs.dtype.scalar):
            return binary(self, lhs, rhs, op)
        out = binary(self, as_float32(lhs), as_float32(rhs), op)
        return cast_impl(self, out, tl.bfloat16) if op in arithmetic else out

    def in_float32(method):
        def run(self, input):
            if input.dtype.scalar != tl.bfloat16:
                return method(self, input)
            out = method(self, tl.core.tensor(as_float32(input.handle), input.type.with_element_ty(tl.float32)))
            results = out if isinstance(out, list) else [out]
            rounded = [tl.core.tensor(cast_impl(None, x.handle, tl.bfloat16), x.type.with_element_ty(tl.bfloat16))
                       for x in results]
            return rounded if isinstance(out, list) else rounded[0]

        return run

    def create_atomic_rmw(self, op, ptr, val, mask, *rest):
        """bf16 atomic adds, which the interpreter refuses ("Unsupported data type"): a load, an add
        in float32 and a store, atomic here since the interpreter runs one program at a time (a
        block must not hold one address twice: it never does in ctxpar's kernels)."""
        if val.dtype.scalar != tl.bfloat16:
            return rmw(self, op, ptr, val, mask, *rest)
        if op != ir.ATOMIC_OP.FADD:
            raise ValueError(f"bf16 atomic {op} in the interpreter: only adds are emulated")
        old = self.create_masked_load(ptr, mask, None, None, None, False)
        self.create_masked_store(ptr, binary_op(self, old, val, np.add), mask, None, None)
        return old

    rmw = builder.create_atomic_rmw
    builder.create_dot, builder.cast_impl, builder.binary_op = create_dot, cast_impl, binary_op
    builder.create_atomic_rmw = create_atomic_rmw
    interpreter.ReduceOps.sum = in_float32(interpreter.ReduceOps.sum)
    interpreter.ScanOps.cumsum = in_float32(interpreter.ScanOps.cumsum)
    builder._bf16_as_on_gpu = True


def _one_launch_at_a_time() -> None:
    """An interpreted launch patches triton.language for its run and restores it after: a launch
    on another thread meanwhile lost the patch ("Did you forget to add @triton.jit"), and
    memcheck's spans are one global. A lock around each launch (kernels never wait on another
    thread, so it cannot deadlock)."""
    import threading

    from triton.runtime import interpreter

    executor = interpreter.GridExecutor
    if getattr(executor, "_one_at_a_time", False):
        return
    run, lock = executor.__call__, threading.RLock()

    def locked(self, *args, **kwargs):
        with lock:
            return run(self, *args, **kwargs)

    executor.__call__ = locked
    executor._one_at_a_time = True
