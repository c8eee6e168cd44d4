"""Python's cyclic garbage collection at step boundaries only.

Left automatic, a collection starts wherever the count of allocations says: in the middle of a
step, at another moment on each rank, and long: up to 0.59 s of a 256K-token step of the 1M
recipe's model on an H200 (0.04 s collected between steps; the step 4.79 -> 4.63 s). One rank's
pause under context parallelism also stops the others at the next collective. Here automatic
collection is off while training, and the young generations are collected before every
``every``-th step, on all ranks at the same point; every step by default, so cyclic garbage that
holds device memory lives at most one step. (torchtitan schedules its collections the same way.)
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def collect_between_steps(every: int) -> Iterator[Callable[[int], None]]:
    """Yields ``boundary(step)``, to call before each step; ``every`` = 0 leaves Python's
    automatic collection as it was."""
    if not every:
        yield lambda step: None
        return
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield lambda step: gc.collect(1) if step % every == 0 else None
    finally:
        gc.collect()
        if was_enabled:
            gc.enable()
