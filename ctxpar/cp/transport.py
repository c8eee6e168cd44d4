"""Where summaries travel: a torch.distributed group (through ``ctxpar.comm``'s autograd-aware
collectives) or a simulated group of P virtual ranks that live as threads of one process.

Both offer the same three calls. In the simulation a received tensor *is* the sender's tensor, so
one backward over every rank's loss differentiates through the exchange exactly as the collectives'
own backward would; byte counters follow ``ctxpar.comm``'s convention (ring volume for all_gather)
but count the forward only.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import torch

from ctxpar.comm import collectives


class DistTransport:
    def __init__(self, group):
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def start_all_gather(self, x):
        return collectives.start_all_gather(x, self.group)

    def exchange(self, send, recv_shapes):
        return collectives.exchange(send, recv_shapes, self.group)

    def bytes_sent(self) -> int:
        return collectives.comm_stats(self.group)


class SimGroup:
    """P virtual ranks in one process: one mailbox per (sender, receiver) pair."""

    def __init__(self, size: int):
        self.size = size
        self._boxes = defaultdict(queue.Queue)
        self._sent = [0] * size
        self.failed = threading.Event()

    def post(self, src: int, dst: int, x: torch.Tensor) -> None:
        self._sent[src] += x.numel() * x.element_size()
        self._boxes[(src, dst)].put(x)

    def take(self, src: int, dst: int) -> torch.Tensor:
        while True:  # poll, so one failed rank ends the others instead of hanging them
            try:
                return self._boxes[(src, dst)].get(timeout=0.05)
            except queue.Empty:
                if self.failed.is_set():
                    raise RuntimeError("another simulated rank failed") from None

    def bytes_sent(self, rank: int) -> int:
        return self._sent[rank]

    def reset(self) -> None:
        self._sent = [0] * self.size


class _SimPendingGather:
    def __init__(self, sim: SimGroup, rank: int, x: torch.Tensor):
        self.sim, self.rank, self.x = sim, rank, x
        for dst in range(sim.size):
            if dst != rank:
                sim.post(rank, dst, x)

    def wait(self) -> torch.Tensor:
        got = [self.x if src == self.rank else self.sim.take(src, self.rank) for src in range(self.sim.size)]
        return torch.stack(got)


class SimTransport:
    def __init__(self, sim: SimGroup, rank: int):
        self.sim, self.rank, self.size = sim, rank, sim.size

    def start_all_gather(self, x):
        return _SimPendingGather(self.sim, self.rank, x)

    def exchange(self, send, recv_shapes):
        for dst, x in send.items():
            self.sim.post(self.rank, dst, x)
        return {src: self.sim.take(src, self.rank) for src in recv_shapes}

    def bytes_sent(self) -> int:
        return self.sim.bytes_sent(self.rank)
