"""Run a function in N processes (gloo on the CPU, or NCCL) from a test.

Spawned processes find their target by module name, so ``fn`` must be a module-level function of
an importable module: a test module (pytest puts ``tests/`` on ``sys.path`` and children inherit
it) or this one, which tests import as ``tests.distributed`` (run pytest from the repository root:
``python -m pytest``).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ctxpar.comm.launch import destroy_process_group
from tests import interpreter

# Read by the children at startup: gloo over loopback, one thread per rank (the CPU has 2 cores).
_CHILD_ENV = {"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
# A deadlocked collective fails the test after this long instead of hanging it (gloo's default
# is 30 minutes).
TIMEOUT = timedelta(seconds=60)


def run_distributed(fn, world_size: int, *args, backend: str = "gloo") -> None:
    """Call ``fn(*args)`` on each of ``world_size`` fresh processes with the default process group
    initialized (gloo; with "nccl", rank r uses GPU r). An exception in any rank raises here (a
    ``torch.multiprocessing.ProcessRaisedException`` carrying that rank's traceback)."""
    with mock.patch.dict(os.environ, _CHILD_ENV):
        mp.spawn(_run_rank, args=(world_size, _free_port(), backend, fn, args), nprocs=world_size)


def _run_rank(rank: int, world_size: int, port: int, backend: str, fn, args: tuple) -> None:
    interpreter.prepare()  # as the conftest does in the test process
    if backend == "nccl":
        torch.cuda.set_device(rank)
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(
        backend, init_method=address, rank=rank, world_size=world_size, timeout=TIMEOUT
    )
    try:
        fn(*args)
    finally:
        destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
