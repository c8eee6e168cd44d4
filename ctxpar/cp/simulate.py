"""P virtual ranks in one process, for debugging and testing the exchange math without
torch.distributed: each rank runs on its own thread, summaries travel through in-memory mailboxes
(``transport.SimGroup``), and received tensors stay on the autograd graph, so one backward over
every rank's result differentiates the whole context-parallel computation."""

from __future__ import annotations

import threading

from ctxpar.cp.context import CPContext
from ctxpar.cp.transport import SimGroup


def contexts(world_size: int, **kwargs) -> list[CPContext]:
    """One CPContext per virtual rank of a fresh SimGroup (kwargs as for CPContext)."""
    sim = SimGroup(world_size)
    return [CPContext.simulated(sim, rank, **kwargs) for rank in range(world_size)]


def run(ctxs: list[CPContext], fn) -> list:
    """``[fn(ctx) for ctx in ctxs]``, each on its own thread (collectives need every rank at once).
    The first exception of any rank is raised here after every thread has ended."""
    results, errors = [None] * len(ctxs), []
    sim = ctxs[0].transport.sim

    def target(i):
        try:
            results[i] = fn(ctxs[i])
        except BaseException as e:  # noqa: BLE001  re-raised below, in the caller's thread
            errors.append(e)
            sim.failed.set()

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(ctxs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def simulate(world_size: int, fn, **kwargs) -> list:
    """Run ``fn(ctx)`` on every rank of a simulated group of ``world_size``; returns the results."""
    return run(contexts(world_size, **kwargs), fn)
