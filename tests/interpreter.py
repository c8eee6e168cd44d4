"""What every test process sets up when the Triton kernels run under the interpreter (CPU,
TRITON_INTERPRET=1): autotuned kernels take their first config, since autotuning with several
configs fails there ("0 active drivers"), and every memory access a kernel makes is
bounds-checked (tests/memcheck.py). The conftest calls it in the test process and
tests/distributed.py in each rank it spawns."""

import os


def prepare() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    _first_config_autotuner()
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
