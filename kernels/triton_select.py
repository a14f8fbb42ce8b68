"""Triton kernels of one TokenSelect decode layer: gate, score, log-sum-exp, vote, select.

The PyTorch specification is ``kernels/reference.py:decode_select_reference``; this module's
:func:`decode_select` computes the same thing in five launches, with no host syncs and grids
sized from static shapes only (CUDA-graph capturable):

1. ``_gate_kernel``    per request, dense / Selection Cache hit / miss. Dense rows write
   their whole KV index list; sparse rows write their ``n_init`` and ``n_local`` slots, hit
   rows also the cached top-k slots. Miss rows clear their radix scratch and set their flag
   in the work list (``scratch.miss``). Counters. Grid (GATE_SPLIT, B): each program of a row
   recomputes the cosine and copies a share.
2. ``_score_kernel``   persistent: walks the (tile of 64 candidates, kv head) items of the
   miss rows only, reads each candidate key once, stores ``exp2(s - m_tile)`` in bf16 plus
   the tile max / min / sum-exp per head (soft vote), or the head-summed score (sum vote).
3. ``_lse_kernel``     grid (H_q, B): each head's log-sum-exp over its row's candidates, and
   the bounds of the head's vote terms (the smallest term the vote kernel forms, with its
   bf16 rounding, and ``exp2(max - lse)``).
4. ``_vote_kernel``    persistent: ``v_j = sum_h p_hj exp2(m_tile,h - lse_h)`` and the
   histogram of the votes' first-level buckets: linear in key space between the row's vote
   bounds (the sums of the heads' bounds), so a row of near-equal votes gets buckets a few
   ulps wide and a peaked row buckets of an octave or two (sum vote: the key's top 8 bits).
5. ``_select_kernel``  grid (SPLIT, B): the exact top-k. The SPLIT programs of a row share
   the first level: buckets above the k-th vote's are chosen outright; when that bucket is a
   single key its members are exact ties and the first k' by atomic rank are taken; otherwise
   they go to a tie list, which the row's last program finishes (four 8-bit radix levels in
   registers, after in-memory passes that narrow the list's key range 128x each while it is
   longer than ``SELECT_LIST_MAX``). The last program writes the top-k slots into the KV
   indices and marks the selection valid; another program of the row caches the query.

Hit and dense layers cost launch 1 plus four launches that find no work. The scratch is
sized by the work: the candidates of the miss rows are laid end to end in tiles of 64,
bounded by ``capacity`` (SGLang's token pool); a miss row that does not fit falls back to the
``topk`` candidates just before its local window, is not cached, and counts as overflow.

Shapes (B = requests, S = KV slots, R = request-pool rows, M = max context, F = H_q * D):
    q                 [B, H_q, D]  bf16/fp16 (last dim contiguous)
    k_buffer          [S, H_kv, D] bf16/fp16
    req_to_token      [R, M] int32; req_pool_indices, seq_lens [B] int32/int64
    kv_indptr         [B + 1] int32 = cumsum of min(L, budget); kv_indices [>= kv_indptr[B]] int32
    cache_query       [R, F] (model dtype); cache_positions [R, topk] int32; cache_valid [R] bool
    counters          [4] int64: hits, misses, dense, overflow (reference.COUNTERS)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from sglang_tokenselect.kernels.reference import COUNTERS, check_threshold

BLOCK_N = 64  # candidates per scoring tile
VOTE_TILES = 8  # tiles per vote work item
VOTE_HEAD_CHUNK = 4  # query heads per step of the vote loop
LSE_HEADS = 1  # query heads per log-sum-exp program (more programs: its loop is latency bound)
LSE_TILES = 2048  # tile statistics per step of the log-sum-exp loop
SELECT_BLOCK = 2048  # votes per step of the select loops
SELECT_LIST_MAX = 4096  # tie lists up to this length are finished in registers by one program
GATE_BLOCK = 512  # slots per step of the gate's copies
GATE_SPLIT = 4  # gate programs per request (each recomputes the cosine, copies a share)
RADIX_BITS = 8  # the top-k's radix digits: key bits [31:24], [23:16], [15:8], [7:0]
HIST_BINS = 1 << RADIX_BITS
# Radix scratch row: the first-level histogram, then words at RADIX_COUNTERS + i:
# 0 chosen, 1 tie-list length, 2 programs done, 3 klo and 4 shift of the row's buckets,
# 5 / 6 the tie list's min / max key (sign-flipped int32), 7 exact ties taken.
RADIX_COUNTERS = HIST_BINS
RADIX_WORDS = RADIX_COUNTERS + 8
_INT32_MAX = tl.constexpr(2**31 - 1)
_INT32_MIN = tl.constexpr(-(2**31))
SCORE_PROGRAMS_PER_SM = 4
SCORE_STAGES = 3
SCORE_WARPS = None  # None: 4 for BLOCK_N * D <= 8192, else 8
SELECT_MAX_SPLIT = 64
VOTE_PROGRAMS_PER_SM = 4
# Measurement knobs for benchmarks/bench_select.py --phases only (wrong selections otherwise):
# SCORE_TILE_MIN False skips the score pass's tile minimum (prices it); SELECT_UNTIL < 4 ends
# the select launch early: 1 after the row's first-level bucket, 2 after the split, 3 after
# the last program's tie-list finish (4: the whole launch).
SCORE_TILE_MIN = True
SELECT_UNTIL = 4
# Programmatic dependent launch of the five kernels on Hopper and later (launch latencies
# overlap; see _after_previous_kernel). Off until a GPU run prices it (bench_select --phases).
USE_PDL = False
# Persistent grids capped at the programs an SM holds at once (see _launch_persistent).
CAP_PERSISTENT_GRIDS = True
_DEFAULT_NUM_SMS = 132  # H100/H200 SXM; the launcher asks the device when it is a GPU
# Triton's CPU interpreter (used by the tests) cannot tl.dot bf16 blocks: upcast there only.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The kernels address the counters by these literal indices.
assert COUNTERS == ("hits", "misses", "dense", "overflow")


# ----------------------------------------------------------------------------- scratch


@dataclass
class DecodeScratch:
    """Scratch of :func:`decode_select`, shared by every layer (layers run in order on one stream).

    T = capacity / BLOCK_N tiles, Bm = max batch.
        miss       [Bm] int32        1 where the row selects afresh in the current layer
        probs      [T, H_q, BLOCK_N] bf16, ``exp2(s2 - m_tile)`` (s2 = scaled score in log2 units)
        tile_max, tile_min, tile_sum  [H_q, T] fp32 (head-major: the log-sum-exp reads rows)
        lse        [Bm, H_q] fp32, ``log2 sum_j exp2(s2_j)`` per head
        bounds     [Bm, 2, H_q] fp32, min_j bf16(exp2(s2_j - m_tile)) exp2(m_tile - lse) and
                   ``exp2(max_j s2_j - lse)``
                   per head: their sums over heads bound every soft vote of the row
        votes      [T * BLOCK_N] fp32, the miss rows' votes end to end
        tie_key, tie_pos, tie_key2, tie_pos2  [T * BLOCK_N] int32, the select kernel's tie
                   lists (ping-pong)
        radix      [Bm, RADIX_WORDS] int32
    """

    miss: torch.Tensor
    probs: torch.Tensor
    tile_max: torch.Tensor
    tile_min: torch.Tensor
    tile_sum: torch.Tensor
    lse: torch.Tensor
    bounds: torch.Tensor
    votes: torch.Tensor
    tie_key: torch.Tensor
    tie_pos: torch.Tensor
    tie_key2: torch.Tensor
    tie_pos2: torch.Tensor
    radix: torch.Tensor

    @property
    def max_batch(self) -> int:
        return self.miss.shape[0]

    @property
    def capacity(self) -> int:
        """Candidates of the miss rows one layer can score (whole tiles per row)."""
        return self.votes.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))


def alloc_scratch(max_batch: int, capacity: int, num_q_heads: int, device) -> DecodeScratch:
    """Scratch for batches of up to ``max_batch`` requests whose miss rows hold up to
    ``capacity`` candidates in all (each row rounded up to whole tiles of ``BLOCK_N``).

    Bytes per candidate of capacity: ``2 * H_q`` (probs) + ``12 * H_q / 64`` (tile stats) + 20.
    """
    tiles = triton.cdiv(max(capacity, 1), BLOCK_N) + max_batch  # one partial tile per row
    n = tiles * BLOCK_N
    f32, i32 = torch.float32, torch.int32
    return DecodeScratch(
        miss=torch.zeros(max_batch, dtype=i32, device=device),
        probs=torch.empty(tiles, num_q_heads, BLOCK_N, dtype=torch.bfloat16, device=device),
        tile_max=torch.empty(num_q_heads, tiles, dtype=f32, device=device),
        tile_min=torch.empty(num_q_heads, tiles, dtype=f32, device=device),
        tile_sum=torch.empty(num_q_heads, tiles, dtype=f32, device=device),
        lse=torch.empty(max_batch, num_q_heads, dtype=f32, device=device),
        bounds=torch.empty(max_batch, 2, num_q_heads, dtype=f32, device=device),
        votes=torch.empty(n, dtype=f32, device=device),
        tie_key=torch.empty(n, dtype=i32, device=device),
        tie_pos=torch.empty(n, dtype=i32, device=device),
        tie_key2=torch.empty(n, dtype=i32, device=device),
        tie_pos2=torch.empty(n, dtype=i32, device=device),
        radix=torch.zeros(max_batch, RADIX_WORDS, dtype=i32, device=device),
    )


_NUM_SMS: dict = {}


def _num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


# Programs of a compiled kernel that fit on one SM at once, by (kernel, constexprs, device):
# learnt from its first launch (ptxas's register count), used to cap later persistent grids.
_RESIDENT: dict = {}


def _resident_per_sm(n_regs: int, shared: int, num_warps: int, props) -> int:
    """How many programs of a kernel (``n_regs`` registers per thread, ``shared`` bytes of
    shared memory) one SM of a device with properties ``props`` holds at once."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256  # allocated per warp, in units of 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps)
    by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // (32 * num_warps)
    by_shared = getattr(props, "shared_memory_per_multiprocessor", 233472) // shared if shared else by_threads
    return max(1, min(by_regs, by_threads, by_shared))


_PDL: dict = {}


def _uses_pdl(device) -> bool:
    """Whether the kernels launch with programmatic dependent launch on ``device`` (sm_90+)."""
    device = torch.device(device)
    if not USE_PDL or _INTERPRETED or device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _PDL:
        _PDL[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return _PDL[idx]


def _pdl_options(pdl: bool) -> dict:
    """Launch options of a kernel call (the interpreter takes none)."""
    return {"launch_pdl": True} if pdl else {}


def _launch_persistent(kernel, wanted_per_sm: int, work: int, device, num_warps: int, args, consts) -> None:
    """Launch a persistent kernel (any grid computes the same result) on at most
    ``wanted_per_sm`` programs per SM, and never more than fit at once: a program that does not
    fit would start its share only after the first wave ends, at a fraction of the bandwidth."""
    device = torch.device(device)
    key = (kernel.fn.__name__, tuple(sorted(consts.items())), device.index)
    per_sm = min(wanted_per_sm, _RESIDENT.get(key, wanted_per_sm)) if CAP_PERSISTENT_GRIDS else wanted_per_sm
    compiled = kernel[(max(1, min(per_sm * _num_sms(device), work)),)](
        *args, num_warps=num_warps, **_pdl_options(consts.get("PDL", False)), **consts)
    if key not in _RESIDENT and device.type == "cuda" and hasattr(compiled, "n_regs"):
        props = torch.cuda.get_device_properties(device if device.index is not None else torch.cuda.current_device())
        _RESIDENT[key] = _resident_per_sm(int(compiled.n_regs), int(compiled.metadata.shared), num_warps, props)


# ----------------------------------------------------------------------------- shared helpers


@triton.jit
def _work_layout(seq_ptr, miss_ptr, batch, n_init, n_local, cap_tiles,
                 BLOCK_N: tl.constexpr, B_PAD: tl.constexpr):
    """The miss rows' candidates end to end in tiles. Returns, per batch row ([B_PAD]):
    candidate count, tiles (0 unless a fitting miss row), first tile, and overflow flag."""
    rows = tl.arange(0, B_PAD)
    in_batch = rows < batch
    seq = tl.load(seq_ptr + rows, mask=in_batch, other=0).to(tl.int32)
    miss = tl.load(miss_ptr + rows, mask=in_batch, other=0)
    cnt = tl.maximum(seq - n_init - n_local, 0)
    tiles = tl.where(miss != 0, tl.cdiv(cnt, BLOCK_N), 0)
    fits = tl.cumsum(tiles, axis=0) <= cap_tiles  # monotone: once a row overflows, all later do
    overflow = (tiles > 0) & (fits == 0)
    tiles = tl.where(fits, tiles, 0)
    firsts = tl.cumsum(tiles, axis=0) - tiles
    return rows, cnt, tiles, firsts, overflow


@triton.jit
def _after_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch (Hopper+), a kernel's programs may start while the
    previous kernel of the stream finishes: wait here, before any memory access, until it has
    completed and its writes are visible, then let the next kernel start the same way. Each
    kernel of the pipeline calls this first, so the order of all their memory accesses is
    that of plain launches; only the launch latencies overlap."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _pick(rows, b, values):
    """``values[b]`` of a [B_PAD] vector."""
    return tl.sum(tl.where(rows == b, values, 0), axis=0)


@triton.jit
def _order_key(v):
    """Float32 -> uint32 whose unsigned order is the float order."""
    bits = v.to(tl.uint32, bitcast=True)
    return bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def _kth_digit(hist, k, BINS: tl.constexpr):
    """Digit of the k-th largest key given a histogram of one digit, and how many keys
    with that digit are still to be taken."""
    bins = tl.arange(0, BINS)
    at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with digit >= bin
    digit = tl.max(tl.where(at_least >= k, bins, -1), axis=0)
    return digit, k - tl.sum(tl.where(bins > digit, hist, 0), axis=0)


@triton.jit
def _query_flat(q_ptr, b, stride_qb, stride_qh, flat_dim, HEAD_DIM: tl.constexpr, FLAT_PAD: tl.constexpr):
    """Request b's query, heads flattened ([FLAT_PAD], 0 past ``flat_dim``), with its offsets
    and mask."""
    offs = tl.arange(0, FLAT_PAD)
    m = offs < flat_dim
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + (offs // HEAD_DIM) * stride_qh + offs % HEAD_DIM,
                mask=m, other=0.0)
    return offs, m, q


@triton.jit
def _copy_slots(out_ptr, r2t_row, first_pos, n, BLOCK: tl.constexpr, part=0, PARTS: tl.constexpr = 1):
    """``out[i] = req_to_token[row, first_pos + i]`` for ``i < n`` (blocks ``part``,
    ``part + PARTS``, ... of them)."""
    for i0 in range(part * BLOCK, n, PARTS * BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < n
        tl.store(out_ptr + offs, tl.load(r2t_row + first_pos + offs, mask=m), mask=m)


@triton.jit
def _gather_slots(out_ptr, r2t_row, pos_ptr, n, BLOCK: tl.constexpr, part=0, PARTS: tl.constexpr = 1):
    """``out[i] = req_to_token[row, positions[i]]`` for ``i < n`` (positions read from L2;
    blocks ``part``, ``part + PARTS``, ... of them)."""
    for i0 in range(part * BLOCK, n, PARTS * BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        m = offs < n
        pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
        tl.store(out_ptr + offs, tl.load(r2t_row + pos, mask=m), mask=m)


# ----------------------------------------------------------------------------- 1. gate


@triton.jit
def _gate_kernel(
    q_ptr, r2t_ptr, rpi_ptr, seq_ptr, indptr_ptr, kv_ptr,
    cq_ptr, cpos_ptr, cvalid_ptr, counter_ptr, miss_ptr, radix_ptr,
    stride_qb, stride_qh, stride_r2t, stride_cq, stride_cpos, stride_rb,
    n_init, n_local, topk, threshold, flat_dim,
    HEAD_DIM: tl.constexpr, FLAT_PAD: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr,
    RADIX_WORDS: tl.constexpr, CTR: tl.constexpr, PDL: tl.constexpr = False,
):
    _after_previous_kernel(PDL)
    s = tl.program_id(0)
    b = tl.program_id(1)
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    out = kv_ptr + tl.load(indptr_ptr + b).to(tl.int64)
    r2t_row = r2t_ptr + row * stride_r2t
    if seq_len <= n_init + topk + n_local:  # dense: every position
        _copy_slots(out, r2t_row, 0, seq_len, BLOCK, s, SPLIT)
        if s == 0:
            tl.store(miss_ptr + b, 0)
            if seq_len > 1:  # CUDA-graph padding rows have length 1
                tl.atomic_add(counter_ptr + 2, 1, sem="relaxed")
        return
    offs, m, a = _query_flat(q_ptr, b, stride_qb, stride_qh, flat_dim, HEAD_DIM, FLAT_PAD)
    a = a.to(tl.float32)
    c = tl.load(cq_ptr + row * stride_cq + offs, mask=m, other=0.0).to(tl.float32)
    _copy_slots(out, r2t_row, 0, n_init, BLOCK, s, SPLIT)
    _copy_slots(out + n_init + topk, r2t_row, seq_len - n_local, n_local, BLOCK, s, SPLIT)
    cos = tl.sum(a * c, axis=0) / tl.maximum(tl.sqrt(tl.sum(a * a, axis=0) * tl.sum(c * c, axis=0)), 1e-6)
    valid = tl.load(cvalid_ptr + row).to(tl.int32) != 0
    hit = valid & (threshold < 1.0) & ((threshold <= -1.0) | (cos >= threshold))
    if hit:
        _gather_slots(out + n_init, r2t_row, cpos_ptr + row * stride_cpos, topk, BLOCK, s, SPLIT)
        if s == 0:
            tl.store(miss_ptr + b, 0)
            tl.atomic_add(counter_ptr + 0, 1, sem="relaxed")
    elif s == 0:
        # The query is cached by the select kernel: the row's other gate programs read it.
        for z0 in tl.static_range(0, RADIX_WORDS, 1024):
            offs_z = z0 + tl.arange(0, 1024)
            init = tl.where(offs_z == CTR + 5, _INT32_MAX, tl.where(offs_z == CTR + 6, _INT32_MIN, 0))
            tl.store(radix_ptr + b.to(tl.int64) * stride_rb + offs_z, init.to(tl.int32), mask=offs_z < RADIX_WORDS)
        tl.store(miss_ptr + b, 1)
        tl.atomic_add(counter_ptr + 1, 1, sem="relaxed")


# ----------------------------------------------------------------------------- 2. score


@triton.jit
def _score_kernel(
    q_ptr, k_ptr, r2t_ptr, rpi_ptr, seq_ptr, miss_ptr,
    p_ptr, tmax_ptr, tmin_ptr, tsum_ptr, vote_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t, stride_th,
    batch, n_init, n_local, cap_tiles, scale,
    NUM_KV: tl.constexpr, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, STAGES: tl.constexpr,
    SUM_VOTE: tl.constexpr, DOT_F32: tl.constexpr, TILE_MIN: tl.constexpr = True,
    PDL: tl.constexpr = False,
):
    """Work item = (tile, kv head), kv head fastest (programs running together read whole
    slot rows); program i takes items i, i + P, ... For the sum vote, item = tile."""
    _after_previous_kernel(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rows, cnt, tiles, firsts, _ = _work_layout(seq_ptr, miss_ptr, batch, n_init, n_local, cap_tiles,
                                               BLOCK_N, B_PAD)
    ends = firsts + tiles
    per_tile: tl.constexpr = 1 if SUM_VOTE else NUM_KV
    total = tl.sum(tiles, axis=0) * per_tile
    offs_g = tl.arange(0, G_PAD)
    mask_g = offs_g < GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    for t in tl.range(pid, total, nprog, num_stages=STAGES):
        tile = t // per_tile
        b = tl.sum((ends <= tile).to(tl.int32), axis=0)  # the row holding this tile
        blk = tile - _pick(rows, b, firsts)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < _pick(rows, b, cnt)
        row = tl.load(rpi_ptr + b).to(tl.int64)
        slots = tl.load(r2t_ptr + row * stride_r2t + n_init + offs_n, mask=mask_n, other=0).to(tl.int64)
        q_row = q_ptr + b.to(tl.int64) * stride_qb
        if SUM_VOTE:  # sum_h q_h . k_g(h) == sum_g (sum_{h in g} q_h) . k_g
            acc = tl.zeros((BLOCK_N,), tl.float32)
            for g in range(NUM_KV):
                heads = g * GROUP + offs_g
                q = tl.load(q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
                k = tl.load(k_ptr + slots[:, None] * stride_ks + g * stride_kh + offs_d[None, :],
                            mask=mask_n[:, None], other=0.0)
                acc += tl.sum(k.to(tl.float32) * tl.sum(q.to(tl.float32), axis=0)[None, :], axis=1)
            tl.store(vote_ptr + tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N),
                     tl.where(mask_n, acc * scale, float("-inf")))
        else:
            kv_head = t % NUM_KV
            k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                        mask=mask_n[:, None], other=0.0)
            heads = kv_head * GROUP + offs_g
            q = tl.load(q_row + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_g[:, None], other=0.0)
            # K as the A operand ([BLOCK_N, D] x [D, G_PAD], G_PAD >= 16 for the tensor cores):
            # it goes from global memory to the MMA without a transpose, so the loop pipelines.
            if DOT_F32:
                s = tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
            else:
                s = tl.dot(k, tl.trans(q.to(k.dtype)))
            s = tl.where(mask_n[:, None], s * (scale * 1.4426950408889634), float("-inf"))  # log2(e)
            m = tl.max(s, axis=0)
            p = tl.exp2(s - m[None, :])
            base = tile.to(tl.int64) * NUM_HEADS + heads
            tl.store(p_ptr + base[None, :] * BLOCK_N + tl.arange(0, BLOCK_N)[:, None],
                     p.to(tl.bfloat16), mask=mask_g[None, :])
            stat = heads.to(tl.int64) * stride_th + tile
            tl.store(tmax_ptr + stat, m, mask=mask_g)
            if TILE_MIN:
                tl.store(tmin_ptr + stat, tl.min(tl.where(mask_n[:, None], s, float("inf")), axis=0), mask=mask_g)
            tl.store(tsum_ptr + stat, tl.sum(p, axis=0), mask=mask_g)


# ----------------------------------------------------------------------------- 3. log-sum-exp


@triton.jit
def _lse_kernel(
    tmax_ptr, tmin_ptr, tsum_ptr, lse_ptr, bounds_ptr, seq_ptr, miss_ptr, stride_lb, stride_bb, stride_th,
    batch, n_init, n_local, cap_tiles,
    NUM_HEADS: tl.constexpr, HEADS: tl.constexpr, TILES: tl.constexpr,
    BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, PDL: tl.constexpr = False,
):
    """Each head's log-sum-exp over its row's candidates, and the bounds of the head's vote
    terms: the smallest term the vote kernel forms and ``exp2(max - lse)`` (``bounds[b, 0 / 1, h]``)."""
    _after_previous_kernel(PDL)
    hc = tl.program_id(0)
    b = tl.program_id(1)
    rows, _, tiles, firsts, _ = _work_layout(seq_ptr, miss_ptr, batch, n_init, n_local, cap_tiles,
                                             BLOCK_N, B_PAD)
    n_tiles = _pick(rows, b, tiles)
    if n_tiles == 0:
        return
    first = _pick(rows, b, firsts).to(tl.int64)
    heads = hc * HEADS + tl.arange(0, HEADS)
    mask_h = heads < NUM_HEADS
    run_max = tl.full((HEADS,), -1.0e30, tl.float32)  # finite: the first rescale is 0, not NaN
    run_sum = tl.zeros((HEADS,), tl.float32)
    for t0 in range(0, n_tiles, TILES):
        offs_t = t0 + tl.arange(0, TILES)
        m = mask_h[:, None] & (offs_t < n_tiles)[None, :]
        off = heads.to(tl.int64)[:, None] * stride_th + (first + offs_t)[None, :]
        tm = tl.load(tmax_ptr + off, mask=m, other=float("-inf"))
        ts = tl.load(tsum_ptr + off, mask=m, other=0.0)
        new_max = tl.maximum(run_max, tl.max(tm, axis=1))
        run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(ts * tl.exp2(tm - new_max[:, None]), axis=1)
        run_max = new_max
    run_sum = tl.where(mask_h, run_sum, 1.0)  # padded heads: no log2(0)
    lse = run_max + tl.log2(run_sum)
    tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads, lse, mask=mask_h)
    # The lower bound is the smallest vote term the vote kernel can form, bit for bit: a tile's
    # smallest stored probability (bf16-rounded exactly as the score kernel rounded it) times
    # the tile's factor. exp2(min - lse) alone can exceed it by bf16's rounding (2^-9).
    run_lo = tl.full((HEADS,), float("inf"), tl.float32)
    for t0 in range(0, n_tiles, TILES):
        offs_t = t0 + tl.arange(0, TILES)
        m = mask_h[:, None] & (offs_t < n_tiles)[None, :]
        off = heads.to(tl.int64)[:, None] * stride_th + (first + offs_t)[None, :]
        tm = tl.load(tmax_ptr + off, mask=m, other=0.0)
        p_min = tl.exp2(tl.load(tmin_ptr + off, mask=m, other=0.0) - tm).to(tl.bfloat16).to(tl.float32)
        term = p_min * tl.exp2(tm - lse[:, None])
        run_lo = tl.minimum(run_lo, tl.min(tl.where(m, term, float("inf")), axis=1))
    bounds_row = bounds_ptr + b.to(tl.int64) * stride_bb + heads
    tl.store(bounds_row, run_lo, mask=mask_h)
    tl.store(bounds_row + NUM_HEADS, tl.exp2(run_max - lse), mask=mask_h)


# ----------------------------------------------------------------------------- 4. vote


@triton.jit
def _digit(key, level, BITS: tl.constexpr):
    """Radix digit ``level`` (0 = most significant) of uint32 keys."""
    return ((key >> (32 - BITS * (level + 1))) & ((1 << BITS) - 1)).to(tl.int32)


@triton.jit
def _range_shift(width):
    """Smallest-ish shift with ``width >> shift < 128`` for a uint32 key range (from the float
    exponent of ``width``; never too small)."""
    e = ((width.to(tl.float32).to(tl.uint32, bitcast=True) >> 23) & 255).to(tl.int32) - 126  # bit length
    return tl.where(width > 0, tl.maximum(e - 7, 0), 0).to(tl.uint32)


@triton.jit
def _row_buckets(bounds_row, NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, SOFT: tl.constexpr):
    """``(klo, shift)`` of a row's first-level buckets. Soft vote: linear in key space between
    the key of the lower vote bound and that of the upper one. Sum vote: the key's top 8 bits."""
    if SOFT:
        heads = tl.arange(0, H_PAD)
        lo = tl.sum(tl.load(bounds_row + heads, mask=heads < NUM_HEADS, other=0.0), axis=0)
        hi = tl.sum(tl.load(bounds_row + NUM_HEADS + heads, mask=heads < NUM_HEADS, other=0.0), axis=0)
        # 31 keys of slack on each side absorb the heads' summation order (a few ulps): a row
        # of equal votes still gets shift 0, i.e. buckets of one key.
        klo = _order_key(lo) - 31
        khi = tl.maximum(_order_key(hi) + 31, klo)
        return klo, _range_shift(khi - klo)
    else:
        return tl.full((), 0, tl.uint32), tl.full((), 24, tl.uint32)


@triton.jit
def _bucket(key, klo, shift, SOFT: tl.constexpr):
    """First-level bucket of uint32 keys, monotone in the key. Soft vote: 0 below ``klo``, else
    ``1 + (key - klo) >> shift`` clamped to 255 (bucket d in 1..254 with shift 0 is the single
    key ``klo + d - 1``). Sum vote: the top 8 bits."""
    if SOFT:
        rel = tl.minimum((key - klo) >> shift, 254).to(tl.int32) + 1
        return tl.where(key < klo, 0, rel)
    else:
        return (key >> 24).to(tl.int32)


@triton.jit
def _vote_kernel(
    p_ptr, tmax_ptr, lse_ptr, bounds_ptr, vote_ptr, seq_ptr, miss_ptr, radix_ptr,
    stride_lb, stride_bb, stride_th, stride_rb,
    batch, n_init, n_local, cap_tiles,
    NUM_HEADS: tl.constexpr, H_PAD: tl.constexpr, H_CHUNK: tl.constexpr, VT: tl.constexpr,
    BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, BITS: tl.constexpr, SOFT: tl.constexpr, CTR: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Work item = VT consecutive tiles of one row: their votes (soft vote; the sum vote's
    were written by the score kernel) and the histogram of their first-level buckets."""
    _after_previous_kernel(PDL)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rows, cnt, tiles, firsts, _ = _work_layout(seq_ptr, miss_ptr, batch, n_init, n_local, cap_tiles,
                                               BLOCK_N, B_PAD)
    items = tl.cdiv(tiles, VT)
    item_ends = tl.cumsum(items, axis=0)
    total = tl.sum(items, axis=0)
    sub = tl.arange(0, VT)
    lane = tl.arange(0, BLOCK_N)
    BINS: tl.constexpr = 1 << BITS
    for it in range(pid, total, nprog):
        b = tl.sum((item_ends <= it).to(tl.int32), axis=0)
        local_tile = (it - _pick(rows, b, item_ends - items)) * VT + sub  # [VT] tiles of the row
        mask_t = local_tile < _pick(rows, b, tiles)
        tile = _pick(rows, b, firsts) + local_tile
        valid = (local_tile[:, None] * BLOCK_N + lane[None, :]) < _pick(rows, b, cnt)
        vote_ptrs = vote_ptr + tile.to(tl.int64)[:, None] * BLOCK_N + lane[None, :]
        if SOFT:
            vote = tl.zeros((VT, BLOCK_N), tl.float32)
            for h0 in tl.static_range(0, NUM_HEADS, H_CHUNK):
                heads = h0 + tl.arange(0, H_CHUNK)
                mask_h = heads < NUM_HEADS
                m2 = mask_h[:, None] & mask_t[None, :]
                base = tile.to(tl.int64)[None, :] * NUM_HEADS + heads[:, None]  # [H_CHUNK, VT]
                p = tl.load(p_ptr + base[:, :, None] * BLOCK_N + lane[None, None, :],
                            mask=m2[:, :, None], other=0.0)
                tm = tl.load(tmax_ptr + heads.to(tl.int64)[:, None] * stride_th + tile[None, :],
                             mask=m2, other=0.0)
                lse = tl.load(lse_ptr + b.to(tl.int64) * stride_lb + heads, mask=mask_h, other=0.0)
                factor = tl.where(m2, tl.exp2(tm - lse[:, None]), 0.0)
                vote += tl.sum(p.to(tl.float32) * factor[:, :, None], axis=0)
            tl.store(vote_ptrs, tl.where(valid, vote, float("-inf")), mask=mask_t[:, None])
        else:
            vote = tl.load(vote_ptrs, mask=valid, other=float("-inf"))
        key = _order_key(tl.reshape(vote, (VT * BLOCK_N,)))
        klo, shift = _row_buckets(bounds_ptr + b.to(tl.int64) * stride_bb, NUM_HEADS, H_PAD, SOFT)
        radix_row = radix_ptr + b.to(tl.int64) * stride_rb
        if it == _pick(rows, b, item_ends - items):  # the row's first item tells the select kernel
            tl.store(radix_row + CTR + 3, klo.to(tl.int32, bitcast=True))
            tl.store(radix_row + CTR + 4, shift.to(tl.int32, bitcast=True))
        h = tl.histogram(_bucket(key, klo, shift, SOFT), BINS, mask=tl.reshape(valid, (VT * BLOCK_N,)))
        tl.atomic_add(radix_row + tl.arange(0, BINS), h,
                      mask=h > 0, sem="relaxed")


# ----------------------------------------------------------------------------- 5. select


@triton.jit
def _cache_query(q_ptr, cq_ptr, b, row, stride_qb, stride_qh, stride_cq, flat_dim,
                 HEAD_DIM: tl.constexpr, FLAT_PAD: tl.constexpr):
    offs, m, a = _query_flat(q_ptr, b, stride_qb, stride_qh, flat_dim, HEAD_DIM, FLAT_PAD)
    tl.store(cq_ptr + row * stride_cq + offs, a.to(cq_ptr.dtype.element_ty), mask=m)


@triton.jit
def _flip(key):
    """uint32 key -> int32 of the same order (for atomic min / max)."""
    return (key ^ 0x80000000).to(tl.int32, bitcast=True)


@triton.jit
def _unflip(v):
    return v.to(tl.uint32, bitcast=True) ^ 0x80000000


@triton.jit
def _split_first_level(vote_row, n_src, key_dst, pos_dst, ctr, cpos_row, d, k, klo, shift, exact, s, n_init,
                       topk, SPLIT: tl.constexpr, BLOCK: tl.constexpr, SOFT: tl.constexpr):
    """This program's share (blocks s, s + SPLIT, ...) of the row's votes: buckets above ``d``
    are chosen (appended to the cache row); bucket ``d``'s members are either exact ties, of
    which the first k by atomic rank are chosen, or go to the tie list (with its key range)."""
    for blk in range(s, tl.cdiv(n_src, BLOCK), SPLIT):
        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_src
        key = _order_key(tl.load(vote_row + offs, mask=valid, other=0.0))
        bkt = _bucket(key, klo, shift, SOFT)
        above = (valid & (bkt > d)).to(tl.int32)
        at = tl.atomic_add(ctr, tl.sum(above, axis=0), sem="relaxed")
        tl.store(cpos_row + at + tl.cumsum(above, axis=0) - 1, n_init + offs, mask=above != 0)
        equal = (valid & (bkt == d)).to(tl.int32)
        n_eq = tl.sum(equal, axis=0)
        if n_eq > 0:
            if exact:
                rank = tl.atomic_add(ctr + 7, n_eq, sem="relaxed") + tl.cumsum(equal, axis=0) - 1
                take = (equal != 0) & (rank < k)
                tl.store(cpos_row + (topk - k) + rank, n_init + offs, mask=take)
            else:
                slot = tl.atomic_add(ctr + 1, n_eq, sem="relaxed") + tl.cumsum(equal, axis=0) - 1
                tl.store(key_dst + slot, key.to(tl.int32, bitcast=True), mask=equal != 0)
                tl.store(pos_dst + slot, n_init + offs, mask=equal != 0)
                flipped = _flip(key)
                tl.atomic_min(ctr + 5, tl.min(tl.where(equal != 0, flipped, _INT32_MAX), axis=0), sem="relaxed")
                tl.atomic_max(ctr + 6, tl.max(tl.where(equal != 0, flipped, _INT32_MIN), axis=0), sem="relaxed")


@triton.jit
def _load_list(key_ptr, pos_ptr, offs, m):
    key = tl.load(key_ptr + offs, mask=m, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    return key, tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")


@triton.jit
def _narrow_list(src_key, src_pos, n, dst_key, dst_pos, cpos_out, lmin, shift, k,
                 BLOCK: tl.constexpr, BITS: tl.constexpr):
    """One program, one pass over a tie list in memory whose keys lie in ``[lmin, lmin +
    (128 << shift))``: buckets ``(key - lmin) >> shift`` above the k-th key's are chosen
    (written from ``cpos_out``), the k-th key's bucket goes to the next list.
    Returns (chosen, length of the next list, k left, the k-th key's bucket)."""
    hist = tl.zeros((1 << BITS,), tl.int32)
    for t0 in range(0, n, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        key, _ = _load_list(src_key, src_pos, offs, offs < n)
        hist += tl.histogram(((key - lmin) >> shift).to(tl.int32), 1 << BITS, mask=offs < n)
    d, k_left = _kth_digit(hist, k, 1 << BITS)
    chosen = tl.full((), 0, tl.int32)
    kept = tl.full((), 0, tl.int32)
    for t0 in range(0, n, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < n
        key, pos = _load_list(src_key, src_pos, offs, m)
        dig = ((key - lmin) >> shift).to(tl.int32)
        above = (m & (dig > d)).to(tl.int32)
        tl.store(cpos_out + chosen + tl.cumsum(above, axis=0) - 1, pos, mask=above != 0)
        equal = (m & (dig == d)).to(tl.int32)
        slot = kept + tl.cumsum(equal, axis=0) - 1
        tl.store(dst_key + slot, key.to(tl.int32, bitcast=True), mask=equal != 0)
        tl.store(dst_pos + slot, pos, mask=equal != 0)
        chosen += tl.sum(above, axis=0)
        kept += tl.sum(equal, axis=0)
    return chosen, kept, k_left, d


@triton.jit
def _finish_in_registers(key_ptr, pos_ptr, n, cpos_out, k, LIST_MAX: tl.constexpr, BITS: tl.constexpr):
    """The k largest keys of a list of at most LIST_MAX, all four 8-bit radix levels in
    registers; exact ties of the k-th key are taken in list order."""
    offs = tl.arange(0, LIST_MAX)
    key, pos = _load_list(key_ptr, pos_ptr, offs, offs < n)
    alive = offs < n  # still tied with the k-th key on every digit so far
    take = offs < 0
    for level in tl.static_range(4):
        dig = _digit(key, level, BITS)
        d, k = _kth_digit(tl.histogram(dig, 1 << BITS, mask=alive), k, 1 << BITS)
        take = take | (alive & (dig > d))
        alive = alive & (dig == d)
    take = take | (alive & (tl.cumsum(alive.to(tl.int32), axis=0) <= k))
    take = take.to(tl.int32)
    tl.store(cpos_out + tl.cumsum(take, axis=0) - 1, pos, mask=take != 0)


@triton.jit
def _first_k(key_ptr, pos_ptr, cpos_out, k, BLOCK: tl.constexpr):
    """The first k entries of a list (exact ties)."""
    for t0 in range(0, k, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        _, pos = _load_list(key_ptr, pos_ptr, offs, offs < k)
        tl.store(cpos_out + offs, pos, mask=offs < k)


@triton.jit
def _finish_tie_list(key_a, pos_a, key_b, pos_b, n, lmin, lmax, cpos_out, k,
                     LIST_MAX: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr):
    """The k largest keys of the tie list (key_a, pos_a)[:n], whose keys lie in [lmin, lmax],
    written from ``cpos_out``. Lists longer than LIST_MAX are narrowed in memory, each pass
    to a key range 128x narrower (ping-pong with key_b, pos_b), until they fit the registers
    or hold one key (exact ties: the first k)."""
    while (n > LIST_MAX) & (lmax > lmin):
        shift = _range_shift(lmax - lmin)
        chosen, n, k, d = _narrow_list(key_a, pos_a, n, key_b, pos_b, cpos_out, lmin, shift, k, BLOCK, BITS)
        cpos_out += chosen
        lmin = lmin + (d.to(tl.uint32) << shift)
        lmax = tl.minimum(lmax, lmin + ((tl.full((), 1, tl.uint32) << shift) - 1))
        key_a, pos_a, key_b, pos_b = key_b, pos_b, key_a, pos_a
        tl.debug_barrier()
    if n <= LIST_MAX:
        _finish_in_registers(key_a, pos_a, n, cpos_out, k, LIST_MAX, BITS)
    else:  # one key: exact ties
        _first_k(key_a, pos_a, cpos_out, k, BLOCK)


@triton.jit
def _select_kernel(
    vote_ptr, key_a, pos_a, key_b, pos_b, radix_ptr, seq_ptr, miss_ptr, rpi_ptr, r2t_ptr,
    indptr_ptr, kv_ptr, cpos_ptr, cvalid_ptr, counter_ptr, q_ptr, cq_ptr,
    stride_rb, stride_r2t, stride_cpos, stride_qb, stride_qh, stride_cq,
    batch, n_init, n_local, topk, cap_tiles, flat_dim,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, B_PAD: tl.constexpr,
    BLOCK: tl.constexpr, LIST_MAX: tl.constexpr, BITS: tl.constexpr,
    SOFT: tl.constexpr, CTR: tl.constexpr, GATE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
    FLAT_PAD: tl.constexpr, UNTIL: tl.constexpr = 4, PDL: tl.constexpr = False,
):
    _after_previous_kernel(PDL)
    s = tl.program_id(0)
    b = tl.program_id(1)
    rows, cnt, tiles, firsts, overflow = _work_layout(seq_ptr, miss_ptr, batch, n_init, n_local,
                                                      cap_tiles, BLOCK_N, B_PAD)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    cpos_row = cpos_ptr + row * stride_cpos
    if _pick(rows, b, tiles) == 0:
        if (_pick(rows, b, overflow.to(tl.int32)) != 0) & (s == 0):
            _cache_query(q_ptr, cq_ptr, b, row, stride_qb, stride_qh, stride_cq, flat_dim, HEAD_DIM, FLAT_PAD)
            # No room in the scratch: the topk candidates just before the local window.
            seq_len = tl.load(seq_ptr + b).to(tl.int32)
            first_pos = seq_len - n_local - topk
            for i0 in range(0, topk, GATE_BLOCK):
                offs = i0 + tl.arange(0, GATE_BLOCK)
                tl.store(cpos_row + offs, first_pos + offs, mask=offs < topk)
            out = kv_ptr + tl.load(indptr_ptr + b).to(tl.int64) + n_init
            _copy_slots(out, r2t_ptr + row * stride_r2t, first_pos, topk, GATE_BLOCK)
            tl.store(cvalid_ptr + row, 0)
            tl.atomic_add(counter_ptr + 3, 1, sem="relaxed")
        return
    if s == SPLIT - 1:  # off the last program's serial tail
        _cache_query(q_ptr, cq_ptr, b, row, stride_qb, stride_qh, stride_cq, flat_dim, HEAD_DIM, FLAT_PAD)
    row_off = _pick(rows, b, firsts).to(tl.int64) * BLOCK_N
    key_a, pos_a, key_b, pos_b = key_a + row_off, pos_a + row_off, key_b + row_off, pos_b + row_off
    radix_row = radix_ptr + b.to(tl.int64) * stride_rb
    ctr = radix_row + CTR
    d, k = _kth_digit(tl.load(radix_row + tl.arange(0, 1 << BITS), cache_modifier=".cg"), topk, 1 << BITS)
    klo = tl.load(ctr + 3, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    shift = tl.load(ctr + 4, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    exact = SOFT & (shift == 0) & (d >= 1) & (d <= 254)
    if UNTIL == 1:
        return
    _split_first_level(vote_ptr + row_off, _pick(rows, b, cnt), key_a, pos_a, ctr, cpos_row, d, k, klo, shift,
                       exact, s, n_init, topk, SPLIT, BLOCK, SOFT)
    if UNTIL == 2:
        return
    tl.debug_barrier()
    if tl.atomic_add(ctr + 2, 1, sem="acq_rel") != SPLIT - 1:
        return
    # The row's last program: the exact k left among the tie list.
    if exact == 0:
        _finish_tie_list(key_a, pos_a, key_b, pos_b, tl.load(ctr + 1, cache_modifier=".cg"),
                         _unflip(tl.load(ctr + 5, cache_modifier=".cg")),
                         _unflip(tl.load(ctr + 6, cache_modifier=".cg")), cpos_row + (topk - k), k,
                         LIST_MAX, BLOCK, BITS)
    if UNTIL == 3:
        return
    tl.debug_barrier()
    out = kv_ptr + tl.load(indptr_ptr + b).to(tl.int64) + n_init
    _gather_slots(out, r2t_ptr + row * stride_r2t, cpos_row, topk, BLOCK)
    tl.store(cvalid_ptr + row, 1)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                  cache_query, cache_positions, cache_valid, counters, scratch, topk):
    if q.dim() != 3 or k_buffer.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D] and k_buffer [S, H_kv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_buffer.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if k_buffer.shape[2] != head_dim or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must match and be a power of two >= 16: q {head_dim}, "
                         f"k_buffer {k_buffer.shape[2]}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or req_to_token.stride(-1) != 1:
        raise ValueError("q, k_buffer and req_to_token need a contiguous last dimension")
    for name, t in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(t.shape)}")
    if kv_indptr.shape[0] < batch + 1:
        raise ValueError(f"kv_indptr needs {batch + 1} entries, got {kv_indptr.shape[0]}")
    if cache_query.shape[-1] != num_q_heads * head_dim or cache_query.stride(-1) != 1:
        raise ValueError(f"cache_query must be [R, {num_q_heads * head_dim}] with contiguous rows")
    if cache_positions.shape[-1] != topk or cache_positions.dtype != torch.int32:
        raise ValueError(f"cache_positions must be int32 [R, {topk}]")
    if counters.shape != (4,) or counters.dtype != torch.int64:
        raise ValueError("counters must be int64 [4]")
    if batch > scratch.max_batch or scratch.probs.shape[1] != num_q_heads:
        raise ValueError(f"scratch holds {scratch.max_batch} rows x {scratch.probs.shape[1]} heads, "
                         f"asked for {batch} x {num_q_heads}")
    return batch, num_q_heads, num_kv_heads, head_dim


def decode_select(*args, **kwargs) -> None:
    """One layer's selection for a decode batch: writes each request's attended KV slots at
    ``kv_indices[kv_indptr[b]:]`` and updates that layer's Selection Cache rows and counters.

    Arguments: those of :func:`decode_select_stages`. Semantics:
    ``reference.decode_select_reference`` (positions within a row in no particular order).
    """
    for _, launch in decode_select_stages(*args, **kwargs):
        launch()


def decode_select_stages(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    cache_query: torch.Tensor,
    cache_positions: torch.Tensor,
    cache_valid: torch.Tensor,
    counters: torch.Tensor,
    scratch: DecodeScratch,
    *,
    n_init: int,
    n_local: int,
    topk: int,
    threshold: float,
    scale: float,
    vote: str = "soft",
) -> list[tuple[str, Callable[[], None]]]:
    """The launches of :func:`decode_select`, in order, as (stage name, launch) pairs; the
    benchmark times their prefixes. ``threshold`` in [-1, 1]: -1 reuses a valid cached
    selection always (static selection), 1 never (every step selects)."""
    check_threshold(threshold)
    if vote not in ("soft", "sum"):
        raise ValueError(f"unknown vote {vote!r}")
    batch, num_q_heads, num_kv_heads, head_dim = _check_inputs(
        q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr,
        cache_query, cache_positions, cache_valid, counters, scratch, topk)
    if batch == 0:
        return []
    sc = scratch
    group = num_q_heads // num_kv_heads
    cap_tiles = sc.capacity // BLOCK_N
    b_pad = max(2, triton.next_power_of_2(batch))
    flat_dim = num_q_heads * head_dim
    flat_pad = triton.next_power_of_2(flat_dim)
    sms = _num_sms(q.device)
    layout = (batch, n_init, n_local, cap_tiles)
    sum_vote = vote == "sum"
    per_tile = 1 if sum_vote else num_kv_heads
    split = max(1, min(SELECT_MAX_SPLIT, (2 * sms) // batch))
    pdl = _uses_pdl(q.device)

    def gate():
        _gate_kernel[(GATE_SPLIT, batch)](
            q, req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
            cache_query, cache_positions, cache_valid, counters, sc.miss, sc.radix,
            q.stride(0), q.stride(1), req_to_token.stride(0), cache_query.stride(0),
            cache_positions.stride(0), sc.radix.stride(0),
            n_init, n_local, topk, float(threshold), flat_dim,
            HEAD_DIM=head_dim, FLAT_PAD=flat_pad, BLOCK=GATE_BLOCK, SPLIT=GATE_SPLIT,
            RADIX_WORDS=RADIX_WORDS, CTR=RADIX_COUNTERS, PDL=pdl, **_pdl_options(pdl), num_warps=4,
        )

    def score():
        _launch_persistent(
            _score_kernel, SCORE_PROGRAMS_PER_SM, cap_tiles * per_tile, q.device,
            SCORE_WARPS or (4 if BLOCK_N * head_dim <= 8192 else 8),
            (q, k_buffer, req_to_token, req_pool_indices, seq_lens, sc.miss,
             sc.probs, sc.tile_max, sc.tile_min, sc.tile_sum, sc.votes,
             q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0),
             sc.tile_max.stride(0), *layout, float(scale)),
            dict(NUM_KV=num_kv_heads, NUM_HEADS=num_q_heads, GROUP=group,
                 G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_N=BLOCK_N,
                 B_PAD=b_pad, STAGES=SCORE_STAGES, SUM_VOTE=sum_vote, DOT_F32=_INTERPRETED,
                 TILE_MIN=SCORE_TILE_MIN, PDL=pdl),
        )

    def lse():
        _lse_kernel[(triton.cdiv(num_q_heads, LSE_HEADS), batch)](
            sc.tile_max, sc.tile_min, sc.tile_sum, sc.lse, sc.bounds, seq_lens, sc.miss, sc.lse.stride(0),
            sc.bounds.stride(0), sc.tile_max.stride(0),
            *layout, NUM_HEADS=num_q_heads, HEADS=LSE_HEADS, TILES=LSE_TILES, BLOCK_N=BLOCK_N,
            B_PAD=b_pad, PDL=pdl, **_pdl_options(pdl), num_warps=4,
        )

    def vote_pass():
        _launch_persistent(
            _vote_kernel, VOTE_PROGRAMS_PER_SM, triton.cdiv(cap_tiles, VOTE_TILES), q.device, 4,
            (sc.probs, sc.tile_max, sc.lse, sc.bounds, sc.votes, seq_lens, sc.miss, sc.radix,
             sc.lse.stride(0), sc.bounds.stride(0), sc.tile_max.stride(0), sc.radix.stride(0), *layout),
            dict(NUM_HEADS=num_q_heads, H_CHUNK=min(VOTE_HEAD_CHUNK, triton.next_power_of_2(num_q_heads)),
                 VT=VOTE_TILES, BLOCK_N=BLOCK_N, B_PAD=b_pad, BITS=RADIX_BITS, SOFT=not sum_vote,
                 CTR=RADIX_COUNTERS, H_PAD=triton.next_power_of_2(num_q_heads), PDL=pdl),
        )

    def select():
        _select_kernel[(split, batch)](
            sc.votes, sc.tie_key, sc.tie_pos, sc.tie_key2, sc.tie_pos2, sc.radix, seq_lens, sc.miss,
            req_pool_indices, req_to_token,
            kv_indptr, kv_indices, cache_positions, cache_valid, counters, q, cache_query,
            sc.radix.stride(0), req_to_token.stride(0), cache_positions.stride(0),
            q.stride(0), q.stride(1), cache_query.stride(0),
            batch, n_init, n_local, topk, cap_tiles, flat_dim,
            SPLIT=split, BLOCK_N=BLOCK_N, B_PAD=b_pad, BLOCK=SELECT_BLOCK,
            LIST_MAX=SELECT_LIST_MAX, BITS=RADIX_BITS, SOFT=not sum_vote, CTR=RADIX_COUNTERS,
            GATE_BLOCK=GATE_BLOCK, HEAD_DIM=head_dim, FLAT_PAD=flat_pad, UNTIL=SELECT_UNTIL,
            PDL=pdl, **_pdl_options(pdl), num_warps=8,
        )

    stages = [("gate", gate), ("score", score)] + ([] if sum_vote else [("lse", lse)])
    return stages + [("vote", vote_pass), ("select", select)]
