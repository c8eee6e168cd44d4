"""Host-side index tables shared by every kernel stage.

Chunks of C tokens are aligned to absolute positions (a document's first token sits at position
t0, its initial-state length), so every document owns chunks c0 = t0 // C .. c_last. All chunks of
all documents are laid out flat ("slots"); slot ``off[n] + (c - c0[n])`` is chunk c of document n.

The segment tree lives in those slots as a Fenwick array: after the up-sweep, slot c holds the
node of height ``ones(c)`` (trailing one bits of c) that ends at chunk c. Those are exactly the
left children of the tree, i.e. every node a query ever reads, so the tree needs no memory beyond
one K x V state per chunk. Sweeps over height h touch the slots with ``ones(c) >= h + 1`` (up) or
``== h`` (down): with the slots sorted by ``ones`` descending, each is a contiguous range.

Document table columns (int64): token start in the flattened [B * T] rows, t0, length, c0, c_last,
first slot. Host copies of those columns spare the kernels' callers device syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

DOC_FIELDS = 6


@dataclass
class Layout:
    chunk: int
    docs: torch.Tensor  # [N, DOC_FIELDS] int64
    slot_doc: torch.Tensor  # [S] int32: document of each slot
    slot_chunk: torch.Tensor  # [S] int64: absolute chunk index of each slot
    by_height: torch.Tensor  # [S] int32: slots sorted by ones(chunk), descending
    at_least: list[int]  # at_least[h] = number of slots with ones(chunk) >= h
    segment: int  # chunks per node-gradient segment at most
    heights: int  # bit_length of the largest chunk index: heights a read can reach
    starts: list[int]  # per document t0 (host ints)
    c0: list[int]
    c_last: list[int]
    token_start: list[int]
    lengths: list[int]
    first_slot: list[int]
    host: dict  # CPU int64 copies of slot_doc, slot_chunk, by_height for host-built index tables

    @property
    def num_slots(self) -> int:
        return self.slot_doc.shape[0]

    @property
    def num_docs(self) -> int:
        return self.docs.shape[0]

    @cached_property
    def _segment_table(self) -> tuple[torch.Tensor, int]:
        """Built on first use, by a backward: both variants' node gradients read the segments
        (node_grad.py, gdn_carry.py)."""
        slot_doc, slot_chunk = self.host["slot_doc"], self.host["slot_chunk"]
        return node_segments(slot_doc, slot_chunk, torch.tensor(self.c0), self.heights, self.segment)

    @cached_property
    def first_odd_slots(self) -> torch.Tensor:
        """[D] int32: the first slot of each document whose first chunk is odd: its height-1 node's
        left child is the initial state's node (tree.up_sweep)."""
        odd = [slot for slot, c in zip(self.first_slot, self.c0) if c & 1]
        return torch.tensor(odd, dtype=torch.int32).to(self.docs.device)

    @cached_property
    def segments(self) -> torch.Tensor:
        """[G, 4] int64: (document, height, first chunk, chunks) of the node-gradient segments."""
        return self._segment_table[0].to(self.docs.device)

    @property
    def segments_in_slots(self) -> int:
        """The first segments, whose node is a slot (the rest read initial-state nodes)."""
        return self._segment_table[1]

    @cached_property
    def sole_writers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(height, slot), host int64: the nodes in slots whose node gradient comes from one
        segment alone (node_grad stores it); every other node's gradient needs zeros first."""
        segments, in_slots = self._segment_table
        doc, h, c, _ = segments[:in_slots].unbind(1)
        sole = (1 << h) <= self.segment  # else its readers span several segments: atomic adds
        slot = torch.tensor(self.first_slot)[doc] + ((c >> h) << h) - 1 - torch.tensor(self.c0)[doc]
        return h[sole], slot[sole]

    @cached_property
    def shared_slots(self) -> torch.Tensor:
        """[Z] int64: slots without a single node-gradient writer (see node_grad.py; Mamba-2's,
        whose slot holds one node): nodes read by several segments and nodes no chunk reads."""
        single = torch.zeros(self.num_slots, dtype=torch.bool)
        single[self.sole_writers[1]] = True
        return torch.nonzero(~single)[:, 0].to(self.docs.device)

    def slots_up(self, h: int) -> torch.Tensor:
        """Parents built at height h -> h + 1: slots with ones >= h + 1."""
        return self.by_height[: self.at_least[h + 1]]

    def slots_down(self, h: int) -> torch.Tensor:
        """Left nodes of height exactly h, which receive their parent's gradient."""
        return self.by_height[self.at_least[h + 1] : self.at_least[h]]


def trailing_ones(c: torch.Tensor) -> torch.Tensor:
    lowest_zero = (c + 1) & -(c + 1)  # 2 ** ones(c)
    return torch.log2(lowest_zero.double()).round().long()


def node_segments(slot_doc, slot_chunk, c0, heights, segment):
    """The readers of every tree node, cut into runs of at most ``segment`` chunks: rows
    (document, height, first chunk, chunks), those whose node is a slot first, then by length
    (long loops start first). The node ((c >> h) - 1, h) is read by the chunks of its right
    sibling, which are consecutive, so a run is one uniform loop for node_grad.py."""
    rows = []
    for h in range(heights):
        reads = ((slot_chunk >> h) & 1) == 1
        if not reads.any():
            continue
        doc, c = slot_doc[reads], slot_chunk[reads]
        key = torch.stack([doc, c >> h, (c & ((1 << h) - 1)) // segment], dim=1)
        _, counts = torch.unique_consecutive(key, dim=0, return_counts=True)
        start = torch.cumsum(counts, 0) - counts
        rows.append(torch.stack([doc[start], torch.full_like(counts, h), c[start], counts], dim=1))
    table = torch.cat(rows) if rows else torch.zeros(0, 4, dtype=torch.int64)
    in_slots = ((table[:, 2] >> table[:, 1]) << table[:, 1]) - 1 >= c0[table[:, 0]]
    order = torch.argsort(-(in_slots.long() * (1 << 32) + table[:, 3]), stable=True)
    return table[order], int(in_slots.sum())


def build_layout(spans, starts, row_length, chunk, segment, device) -> Layout:
    """spans: [(batch, start, end)]; starts: t0 per span (0 without an initial state).

    Cached: every layer of a model calls with the same structure, and copying the tables to the
    GPU is a blocking copy that would drain the launch queue once per call."""
    return _build(tuple(map(tuple, spans)), tuple(starts), row_length, chunk, segment, torch.device(device))


def clear_layout_cache() -> None:
    """Forget the cached layouts (to time building one, or to free their device tables)."""
    _build.cache_clear()


@lru_cache(maxsize=64)
def _build(spans, starts, row_length, chunk, segment, device) -> Layout:
    b, s, e = (torch.tensor([x[i] for x in spans], dtype=torch.int64) for i in range(3))
    t0 = torch.tensor(starts, dtype=torch.int64)
    length = e - s
    c0 = t0 // chunk
    c_last = (t0 + length - 1) // chunk
    count = c_last - c0 + 1
    off = torch.cumsum(count, 0) - count
    docs = torch.stack([b * row_length + s, t0, length, c0, c_last, off], dim=1)

    slot_doc = torch.repeat_interleave(torch.arange(len(spans)), count)
    slot_chunk = c0[slot_doc] + torch.arange(int(count.sum())) - off[slot_doc]
    ones = trailing_ones(slot_chunk)
    by_height = torch.argsort(ones, descending=True, stable=True)
    heights = int(c_last.max()).bit_length()
    at_least = [int((ones >= h).sum()) for h in range(heights + 2)]

    to = lambda x, dt: x.to(device=device, dtype=dt)  # noqa: E731
    return Layout(
        chunk=chunk,
        docs=to(docs, torch.int64),
        slot_doc=to(slot_doc, torch.int32),
        slot_chunk=to(slot_chunk, torch.int64),
        by_height=to(by_height, torch.int32),
        at_least=at_least,
        segment=segment,
        heights=heights,
        starts=[int(x) for x in t0],
        c0=[int(x) for x in c0],
        c_last=[int(x) for x in c_last],
        token_start=[int(x) for x in docs[:, 0]],
        lengths=[int(x) for x in length],
        first_slot=[int(x) for x in off],
        host=dict(slot_doc=slot_doc, slot_chunk=slot_chunk, by_height=by_height),
    )
