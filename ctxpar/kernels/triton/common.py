"""Device helpers shared by the kernel stages (see layout.py for the tables they read).

Conventions: tokens are rows of the flattened [B * T] axis; q, k are [rows, Hk, K] (head h reads
group h // (H // Hk)), v [rows, H, V], g [rows, H], lam [rows, H, L]. Chunk states, tree nodes and
their gradients are float32 [slots, H, K, V]; initial-state nodes [N, H, NI, K, V]; chunk-level
cumulative decays ``gc`` float64 [slots, H] (sum of g from the document's first token to the end of
the slot's chunk: float64 keeps differences exact at a million tokens). Padded positions of a chunk
(before t0 or past the end) load as zero tokens with g = 0.
"""

import torch
import triton
import triton.language as tl


def v_tile(k_dim: int, v_dim: int, dtype: torch.dtype) -> int:
    """V tile of the per-chunk backward stages (query_grad, source_grad, the CP state reads): all
    of V while the [K, V] state tiles fit beside the [C, K] operands in shared memory, else a
    split over V tiles whose programs add their shares. Compiled for sm_90 (kernel_resources),
    whole tiles overflowed the 227 KiB a block may take at K x V = 32768 in bf16 (source_grad:
    240 KiB at K = 128, V = 256) and in float32 (320 KiB); float32 at 16384 left 2 KiB
    (K = 64, V = 256), so its budget is half. With these, K x V from 16 x 256 to 256 x 256
    fit in bf16, fp16 and float32 (the shapes tried)."""
    budget = 8192 if dtype == torch.float32 else 16384
    return min(triton.next_power_of_2(v_dim), max(16, budget // triton.next_power_of_2(k_dim)))


@triton.jit
def tile_of_v(SHARED: tl.constexpr):
    """This program's V tile: grid axis 2 when V is split (v_tile), else the constant 0, which
    keeps the whole-V kernels' addresses compile-time."""
    vb = 0
    if SHARED:
        vb = tl.program_id(2)
    return vb


@triton.jit
def put(ptr, x, mask, SHARED: tl.constexpr):
    """Store x, or add it atomically into a zeroed buffer where several programs each bring a share
    (the V tiles of a split, v_tile; the heads of a q/k group, GDN's chunk-stage backward)."""
    if SHARED:
        tl.atomic_add(ptr, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, x, mask=mask)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for the float32 operands of an op with inputs of ``dtype``:
    exact for float32 inputs, tf32 where half-precision inputs carry fewer digits anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def num_warps(dtype: torch.dtype) -> int:
    """Warps per program of the per-chunk stages (output, node_grad, query_grad, source_grad;
    GDN's chunk stage and its backward). Half-precision inputs: 4, swept on an H200 at 128K
    tokens (H=32, K=128, V=64), 1.7-2x faster than 8 and far faster than 2, although ptxas spills
    more (more programs per SM hide the latency of the per-height loads); GDN's chunk stage
    13.5 -> 7.7 ms (H=16, K=V=128) and 14.3 -> 10.2 ms (H=6, K=192, V=384) with 4 (its backward
    44.2 -> 42.6 and 50.4 -> 48.4 at equal tiles). float32 inputs run their dots on CUDA cores and
    need the registers of 8: at 4 warps source_grad spills 35 KB per thread (18 KB at 8) and ptxas takes
    three times as long."""
    return 8 if dtype == torch.float32 else 4


GROUP_HEADS = 4  # most heads of one q/k group per query_grad program


def group_heads(heads: int, groups: int) -> int:
    """Heads of one q/k group that a query_grad program takes in turn: they share its q, k tiles
    and sum their dq shares in registers, so the group's float32 dq gets one atomic add per GH
    heads. The largest power of two dividing heads // groups, at most GROUP_HEADS. On an H200
    (bf16, H=32, K=128, Hk=1, V=64) 4 took query_grad 1.378 -> 1.293 ms at 8K x 4 and 6.75 ->
    6.41 at 128K (8: 1.323, 6.34; 2: 1.355, 6.71). source_grad's dk, summed the same way, spilled
    1.2-1.4 KB a thread (ptxas, sm_90) and ran 1.61 -> 2.43 ms at 8K x 4 with 4 heads (2.61 with
    2): its dk is still one atomic add per head."""
    per_group = heads // groups
    return min(GROUP_HEADS, per_group & -per_group)


SCAN_BLOCK = 1024  # slots per step of the float64 scans over slots (chunk_state's cumulative decay, dg's suffix sums)

REGISTERS_PER_SM = 65536  # 32-bit registers of one SM (sm_80 to sm_90)


def register_cap(dtype: torch.dtype, programs_per_sm: int, warps: int = 4):
    """``maxnreg`` that lets ``programs_per_sm`` programs of ``warps`` warps share an SM's registers,
    for bf16 inputs (fp16 and float32 inputs take other products, mma_f32, and were not measured
    capped: None leaves ptxas its choice).

    ptxas gives some stages a few registers too many for one more resident program: on an H200
    (Triton 3.6, bf16, H=32, K=128, V=64) the output kernel took 183 registers, two programs per
    SM; capped at 168 (three) it ran 0.856 -> 0.694 ms at 8K x 4 and 4.21 -> 3.63 at 128K (176 and
    184 were no faster than none; at 168 ptxas spills 32 bytes a thread), and chunk_state at 128
    (four, no spills) 0.384 -> 0.342 and 1.85 -> 1.64, and node_grad at 168 (three; 218
    uncapped) 0.643 -> 0.585 and 3.95 -> 3.52.
    query_grad and source_grad (255 registers) only slowed when capped: their spills cost more
    than the extra program gained (2026-12-01-h200-sweep-register-caps.json)."""
    if dtype != torch.bfloat16:
        return None
    return REGISTERS_PER_SM // (programs_per_sm * warps * 32) // 8 * 8


@triton.jit
def doc_info(docs, n):
    """(first token row, t0, length, c0, c_last, first slot) of document n."""
    row = docs + n * 6
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5)


@triton.jit
def store_tile(ptr, item, R, CN, r, c, x, on=True):
    """ptr's [items, R, CN] entry ``item`` = x at rows r, columns c (in ptr's dtype), where ``on``."""
    at = ptr + item.to(tl.int64) * R * CN + r[:, None] * CN + c[None, :]
    tl.store(at, x.to(ptr.dtype.element_ty), mask=(r[:, None] < R) & (c[None, :] < CN) & on)


@triton.jit
def slot_info(docs, slot_doc, slot_chunk, i):
    """(document, chunk index, first token row, t0, length, c0, c_last, first slot) of slot i."""
    n = tl.load(slot_doc + i).to(tl.int64)
    c = tl.load(slot_chunk + i)
    token_start, t0, length, c0, c_last, first = doc_info(docs, n)
    return n, c, token_start, t0, length, c0, c_last, first


@triton.jit
def chunk_rows(c, token_start, t0, length, C: tl.constexpr):
    """Token rows of chunk c and which of its C positions hold real tokens."""
    pos = c * C + tl.arange(0, C)
    valid = (pos >= t0) & (pos < t0 + length)
    return token_start + pos - t0, valid


@triton.jit
def local_decay(g, rows, valid, H, h):
    """Cumulative log decay from the chunk start (inclusive), [C] float32."""
    return tl.cumsum(tl.load(g + rows * H + h, mask=valid, other=0.0), 0)


@triton.jit
def local_levels(C: tl.constexpr, LOG_C: tl.constexpr):
    """[C, C] level of each (query, source) offset pair inside one aligned chunk."""
    r = tl.arange(0, C)
    x = r[:, None] ^ r[None, :]
    lev = tl.zeros([C, C], dtype=tl.int32)
    for b in tl.static_range(LOG_C):
        lev += ((x >> b) > 0).to(tl.int32)
    return lev


@triton.jit
def intra_scales(lam, rows, valid, lev, H, h, L, C: tl.constexpr, LOG_C: tl.constexpr):
    """[C, C] lam_t[level(t, s)] for the pairs of one chunk."""
    scale = tl.zeros([C, C], dtype=tl.float32)
    for j in tl.static_range(LOG_C + 1):
        lam_j = tl.load(lam + (rows * H + h) * L + j, mask=valid & (j < L), other=0.0).to(tl.float32)
        scale = tl.where(lev == j, lam_j[:, None], scale)
    return scale


@triton.jit
def intra_decay(gl, valid, C: tl.constexpr):
    """[C, C] exp(G_t - G_s) for s <= t (both real), else 0."""
    r = tl.arange(0, C)
    keep = (r[:, None] >= r[None, :]) & valid[:, None] & valid[None, :]
    return tl.where(keep, tl.exp(tl.where(keep, gl[:, None] - gl[None, :], 0.0)), 0.0)


@triton.jit
def level_scale(lam, rows, valid, H, h, L, level):
    """[C] lam_t[level] of the chunk's tokens; a level past L weighs zero, as in the torch backend
    (unmasked, a call with too few levels read the next token's scales: a 2026-11-30 GPU test did)."""
    return tl.load(lam + (rows * H + h) * L + level, mask=valid & (level < L), other=0.0).to(tl.float32)


@triton.jit
def level_grads(dlam, rows, h, L, R):
    """Pointers to level 0 of head h's dlambda for the chunk's rows (level l: + l * R), in the
    backward's float32 [H, L, rows] buffer: each level of a chunk is one coalesced store. Against
    [rows, H, L] (rows H * L apart) on an H200 (bf16, H=32, K=128, Hk=1, V=64, 8K x 4, two runs):
    query_grad 1.255 -> 1.227 ms, source_grad 1.354 -> 1.338; the op 4.751 -> 4.726 ms at 4K x 8."""
    return dlam + (h * L).to(tl.int64) * R + rows


@triton.jit
def gc_before(gc, i, c, c0, H, h):
    """Cumulative decay up to the end of the chunk before slot i's (0 for a document's first chunk)."""
    return tl.load(gc + (i - 1) * H + h, mask=c > c0, other=0.0)


@triton.jit
def node_at(c, height, c0, first_slot):
    """The node a chunk with bit ``height`` set reads: it ends at chunk e = (c >> height << height) - 1.

    Returns (e is a slot of this document, slot index); otherwise it is the initial state's node.
    """
    e = ((c >> height) << height) - 1
    in_slots = e >= c0
    return in_slots, tl.where(in_slots, first_slot + e - c0, 0)


@triton.jit
def reads_at(c, height, c0, HAS_INIT: tl.constexpr):
    """Chunk c reads a node at this height: bit ``height`` of c is set, and the node is a slot
    or an initial-state node that holds something. A context-parallel rank runs its crossing-in
    piece at its true position from an empty state: every chunk's top bit reads nothing there,
    and reading zeros made that rank's node_grad, query_grad and output kernels 12.6, 5.3 and
    3.7 ms slower than its neighbour's (512K tokens per H200, profile_step.py)."""
    return (((c >> height) & 1) == 1) & (HAS_INIT | (((c >> height) << height) - 1 >= c0))


@triton.jit
def state_offsets(slot, n, h, height, H, NI, K, V, rk, rv):
    """Element offsets of a [BK, BV] tile of slot ``slot`` and of initial node (n, height)."""
    tile = rk[:, None] * V + rv[None, :]
    in_slot = (slot * H + h).to(tl.int64) * K * V + tile
    in_init = ((n * H + h) * NI + height).to(tl.int64) * K * V + tile
    return in_slot, in_init


@triton.jit
def load_node(states, init, in_slots, slot, n, h, height, H, NI, K, V, rk, rv, mask, HAS_INIT: tl.constexpr):
    """[BK, BV] tile of a tree node: a slot of this document, or an initial-state node (zero if none)."""
    o_slot, o_init = state_offsets(slot, n, h, height, H, NI, K, V, rk, rv)
    x = tl.load(states + o_slot, mask=mask & in_slots, other=0.0)
    if HAS_INIT:
        x += tl.load(init + o_init, mask=mask & (in_slots == 0), other=0.0)
    return x


@triton.jit
def node_carry(gc, gl, before, c, height, c0, first, H, h):
    """Where chunk c's node ((c >> height) - 1, height) lives (in_slots, slot), and its carry
    exp(G_t - G_node_end) to each query row t of the chunk."""
    in_slots, slot = node_at(c, height, c0, first)
    gc_node = tl.load(gc + slot * H + h, mask=in_slots, other=0.0)
    return in_slots, slot, tl.exp(gl + (before - gc_node).to(tl.float32))


@triton.jit
def tiles_adjacent(H, tiles):
    """(item, head, tile) of a program in a 1D grid of items x H heads x ``tiles``, tiles fastest:
    the programs of one (item, head), which load the same operands, run side by side and find them
    in L2 (in a (items, H, tiles) grid they ran items x H programs apart)."""
    pid = tl.program_id(0)
    rest = pid // tiles
    return rest // H, rest % H, pid % tiles


@triton.jit
def row_tile(ptr, rows, heads, head, width, cols):
    """Pointers to the [rows, cols] tile of one head of a [tokens, heads, width] tensor."""
    return ptr + (rows[:, None] * heads + head) * width + cols[None, :]


@triton.jit
def token_tile(x, rows, valid, H, h, N, cols):
    """Columns cols of head h of x [rows, H, N] at a chunk's token rows (chunk_rows), in x's
    dtype; zeros at padded rows and columns."""
    return tl.load(row_tile(x, rows, H, h, N, cols), mask=valid[:, None] & (cols[None, :] < N), other=0.0)


@triton.jit
def group_tiles(q, k, rows, qk_mask, HK, group, K, rk):
    """The chunk's q, k tiles [C, KP] of its q/k group, as the backward stages read them; padded
    rows and columns load as zero."""
    qt = tl.load(row_tile(q, rows, HK, group, K, rk), mask=qk_mask, other=0.0)
    kt = tl.load(row_tile(k, rows, HK, group, K, rk), mask=qk_mask, other=0.0)
    return qt, kt


@triton.jit
def head_tiles(v, do, rows, v_mask, H, h, V, rv):
    """The chunk's v, dO tiles [C, BV] of head h, as group_tiles."""
    vt = tl.load(row_tile(v, rows, H, h, V, rv), mask=v_mask, other=0.0)
    dot_ = tl.load(row_tile(do, rows, H, h, V, rv), mask=v_mask, other=0.0)
    return vt, dot_


@triton.jit
def mma(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b for the products inside one chunk: operands in the inputs' dtype DT, float32 sums.
    bf16 inputs get bf16 tensor-core products (half the registers and twice the rate of tf32);
    float32 inputs stay float32 (PREC 'ieee')."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC, out_dtype=tl.float32)


@triton.jit
def mma_f32(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b of float32 operands (tree states and their gradients, inputs times decays, a chunk's
    intermediates), the inputs' dtype DT saying how to multiply them.

    bf16 inputs meet the float32 operand rounded to bf16, one tensor-core product, as
    flash-linear-attention's and mamba_ssm's chunked kernels read their states. Splitting it into
    bf16 hi + lo parts (two products, about 16 bits; now only mma_split) was the rule until
    2026-12-01. On an H200 (bf16, H=32, K=128, Hk=1, V=64, one lease) one product took the op from
    4.90 to 4.27 ms at 8K x 4 and from 23.2 to 19.8 ms at 128K, and moved the bf16 GPU tests'
    relative errors against float64 from 1.8e-3 to 2.7e-3 (o) and from 2.5e-3 to 3.2e-3 (q, k,
    v, lambda), against bounds of 4e-3 and 1e-2.
    In the GDN chunk stage's backward (tf32 before) bf16 took the gradients' errors from 2.4e-3 to
    3.5e-3 (interpreter, T = 256, chunk 64, against float64 on the rounded inputs).
    fp16 would overflow where a state passes 65504 (inf, then NaN), so fp16 inputs take tf32,
    which holds them exactly (fp16 scaled per row and column by powers of two instead made the op
    37% slower at 128K). float32 inputs stay float32 (PREC 'ieee').
    """
    if DT == tl.float16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32", out_dtype=tl.float32)
    return mma(a, b, DT, PREC)


@triton.jit
def mma_split(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """mma_f32 with the float32 operand b split into bf16 hi + lo parts for bf16 inputs (two
    products, about 16 bits): for sums by product whose terms cancel, such as dg's straddling
    pairs, where one rounding of every term would show in the difference."""
    if DT == tl.bfloat16:  # an else, not an early return: Triton also compiles what follows a constexpr return
        hi = b.to(DT)
        out = tl.dot(a.to(DT), (b - hi.to(tl.float32)).to(DT), acc=tl.dot(a.to(DT), hi, out_dtype=tl.float32))
    else:
        out = mma_f32(a, b, DT, PREC)
    return out
