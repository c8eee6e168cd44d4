"""Checkpointed block inputs parked in host memory, copied on a stream of their own.

torch's ``save_on_cpu`` copies on the compute stream, so the kernels wait for every copy (~1.9 s of
a 1M-token step of the 1M recipe on 2 H200s). Here each copy to the host runs on a side stream
while the next block computes, and in backward, handing out block j's input starts the copy back
of block j - 1's, which is then on the device before that block's recomputation asks for it: one
more block input on the device (2 GiB there), and the step went from 13.3-14.2 s to 11.3-12.7 s
(11.1 s with no offload, at 90.5 GiB instead of 48). The copy to the host may run alongside later
kernels: nothing writes a block's input in place once the block has read it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.autograd.graph import saved_tensors_hooks


class HostOffload:
    """One per forward: the saved-tensor hooks of its checkpointed blocks (``hooks()``), and the
    host copies they park, in the order the blocks ran."""

    def __init__(self):
        self.parked: list[_Parked] = []

    def hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor):
        self.parked.append(_Parked(tensor))
        return self, len(self.parked) - 1  # the graph owns the offload; nothing points back: no cycle

    @staticmethod
    def _unpack(packed):
        offload, j = packed
        if j > 0:
            offload.parked[j - 1].fetch()  # backward runs the blocks in reverse: the next to ask
        return offload.parked[j].hand_out()


class _Parked:
    """One saved tensor's host copy, and while it is on its way back, its device copy."""

    def __init__(self, tensor):
        self.device = tensor.device
        self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        self.back = self.ready = None
        with _side_stream(self.device, after_compute=True):
            self.host.copy_(tensor, non_blocking=tensor.is_cuda)
        if tensor.is_cuda:
            # The allocator may hand the tensor's memory to the compute stream once it is freed;
            # this keeps it until the side stream has copied it.
            tensor.record_stream(_stream(self.device))

    def fetch(self):
        """Start the copy back to the device (once, until it is handed out)."""
        if self.back is not None:
            return
        with _side_stream(self.device, after_compute=False):
            self.back = self.host.to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                self.ready = torch.cuda.Event()
                self.ready.record()

    def hand_out(self):
        self.fetch()
        back, ready, self.back, self.ready = self.back, self.ready, None, None
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            back.record_stream(compute)  # made on the side stream, used and freed on this one
        return back


@contextlib.contextmanager
def _side_stream(device, after_compute):
    """Copies between the host and ``device`` go on the side stream (on the CPU: in place).
    ``after_compute``: the copy reads what the compute stream's work so far writes."""
    if device.type != "cuda":
        yield
        return
    stream = _stream(device)
    if after_compute:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield


@functools.cache
def _stream(device):
    return torch.cuda.Stream(device)
