"""Bounds checking for Triton kernels run by the interpreter (CPU).

The interpreter loads and stores through raw host addresses, so an access past a tensor reads
or corrupts whatever lies there: query_grad once stored dlambda past the end of its buffer and a
later stage computed dg from the damage (or the process died with a heap error). Installed, every
load, store and atomic a kernel makes on an active lane must fall inside the storage of one of
its tensor arguments; one that does not fails the launch with the kernel's name and the address.
"""

import numpy as np
import torch
from triton.runtime import interpreter

_spans = None  # (starts, ends) of the running launch's argument storages, sorted by start


class OutOfBounds(AssertionError):
    pass


def _storages(args):
    """(start, end) byte ranges of the tensors among a launch's arguments (tuples searched too)."""
    found = {}
    for arg in args:
        if isinstance(arg, tuple):
            found.update((s, e) for s, e in _storages(arg))
        elif isinstance(arg, torch.Tensor) and arg.device.type == "cpu":
            storage = arg.untyped_storage()
            found[storage.data_ptr()] = storage.data_ptr() + storage.nbytes()
    return sorted(found.items())


def _check(kind, ptrs, mask):
    if _spans is None:
        return
    addresses = ptrs.data.astype(np.uint64).ravel()
    if mask is not None:
        addresses = addresses[np.broadcast_to(mask.data.astype(bool), ptrs.data.shape).ravel()]
    if addresses.size == 0:
        return
    width = ptrs.get_element_ty().primitive_bitwidth // 8
    starts, ends = _spans
    at = np.searchsorted(starts, addresses, side="right") - 1
    inside = (at >= 0) & (addresses + np.uint64(width) <= ends[np.maximum(at, 0)])
    if not inside.all():
        bad = addresses[~inside]
        raise OutOfBounds(f"{kind} of {bad.size} element(s) outside every tensor argument, first at {hex(int(bad[0]))}")


def install():
    """Check every interpreted launch from now on (idempotent)."""
    executor, builder = interpreter.GridExecutor, interpreter.InterpreterBuilder
    if getattr(executor, "_bounds_checked", False):
        return
    run = executor.__call__

    def checked_run(self, *args, **kwargs):
        global _spans
        spans = _storages(list(args) + list(kwargs.values()))
        _spans = (np.array([s for s, _ in spans], dtype=np.uint64), np.array([e for _, e in spans], dtype=np.uint64))
        try:
            return run(self, *args, **kwargs)
        except interpreter.InterpreterError as e:
            if "OutOfBounds" in str(e):
                raise OutOfBounds(f"{self.fn.__name__}: {e}") from e
            raise
        finally:
            _spans = None

    load, store = builder.create_masked_load, builder.create_masked_store
    rmw, cas = builder.create_atomic_rmw, builder.create_atomic_cas

    def checked_load(self, ptrs, mask, *rest):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    def checked_rmw(self, op, ptr, val, mask, *rest):
        _check("atomic", ptr, mask)
        return rmw(self, op, ptr, val, mask, *rest)

    def checked_cas(self, ptr, *rest):
        _check("atomic", ptr, None)
        return cas(self, ptr, *rest)

    executor.__call__ = checked_run
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    builder.create_atomic_rmw, builder.create_atomic_cas = checked_rmw, checked_cas
    executor._bounds_checked = True
