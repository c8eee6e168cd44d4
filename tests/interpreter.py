"""What every test process sets up when the Triton kernels run under the interpreter (CPU,
TRITON_INTERPRET=1): autotuned kernels take their first config, since autotuning with several
configs fails there ("0 active drivers"), tl.dot takes bf16 operands as the numbers they hold
(the interpreter keeps bf16 as uint16 bits and multiplied those: 2e10 off on a 16 x 16 product,
Triton 3.7.1), and every memory access a kernel makes is bounds-checked (tests/memcheck.py). The conftest calls it in the test process and
tests/distributed.py in each rank it spawns."""

import os


def prepare() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    _first_config_autotuner()
    _bf16_dot()
    from tests import memcheck

    memcheck.install()  # every interpreted kernel's loads, stores and atomics stay inside its tensors


def _first_config_autotuner() -> None:
    from triton.runtime import autotuner

    if getattr(autotuner.Autotuner, "_first_config_only", False):
        return
    original = autotuner.Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = init
    autotuner.Autotuner._first_config_only = True


def _bf16_dot() -> None:
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_bf16_dot", False):
        return
    original = builder.create_dot

    def as_float32(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        bits = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(bits.view(interpreter._get_np_dtype(tl.float32)), tl.float32)

    def create_dot(self, a, b, d, *args):
        return original(self, as_float32(a), as_float32(b), d, *args)

    builder.create_dot = create_dot
    builder._bf16_dot = True
