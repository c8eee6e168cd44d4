"""Test setup shared by every test module.

Without a GPU the Triton kernels run under the interpreter, which must be switched on before any
module that defines a kernel is imported; under it, autotuning with several configs fails
("0 active drivers"), so autotuned kernels take their first config, and every memory access a
kernel makes is bounds-checked (tests/memcheck.py).
"""

import os

import torch

os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _first_config_autotuner():
    try:
        from triton.runtime import autotuner
    except ImportError:
        return
    original = autotuner.Autotuner.__init__

    def init(self, fn, arg_names, configs, *args, **kwargs):
        original(self, fn, arg_names, configs[:1], *args, **kwargs)

    autotuner.Autotuner.__init__ = init


if os.environ.get("TRITON_INTERPRET") == "1":
    _first_config_autotuner()
    from tests import memcheck

    memcheck.install()  # every interpreted kernel's loads, stores and atomics stay inside its tensors
