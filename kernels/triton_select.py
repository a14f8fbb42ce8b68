"""Triton kernels of TokenSelect's selection: paged scoring + head vote, top-k, index assembly.

The PyTorch specification of every launcher lives in ``kernels/reference.py``
(``vote_scores_reference``, ``topk_positions_reference``, ``assemble_kv_indices_reference``).
All launchers take SGLang's own tensors (no copies), write into caller-preallocated
outputs, never synchronise with the host and size their grids from static shapes only,
so they can be captured in a CUDA graph.

Shapes (B = requests, S = KV slots, R = request-pool rows, M = max context,
C = ``out.shape[1]`` = candidate columns, at least ``max_b(L_b) - n_init - n_local``):
    q                 [B, H_q, D]   bf16/fp16, one query per request; for a prefill chunk
                                    pass the chunk's mean query, nothing else changes
    k_buffer          [S, H_kv, D]  bf16/fp16, one layer's key cache, last dim contiguous
    req_to_token      [R, M]        int32, logical position -> physical slot
    req_pool_indices  [B]           int32/int64
    seq_lens          [B]           int32/int64, L_b (current token included)
    active            [B]           bool/int8/int32; rows with 0 are not written at all
    votes (out)       [B, C]        float32, column j = position n_init + j
    positions         [B, topk]     int32 logical positions of the selected candidates
    kv_indptr         [B + 1]       int32, cumsum of min(L_b, budget)
    kv_indices        [>= kv_indptr[B]] int32 physical slots (page size 1)

``D`` must be a power of two >= 16 (64 and 128 are the tested ones); any GQA group
``H_q / H_kv`` works (non-powers of two are padded and masked).

Soft vote, three launches (K is read exactly once):
    1. ``_soft_score_kernel``  grid (H_kv, C / BLOCK_N, B): gathers a K tile through
       ``req_to_token``, scores it against the GQA group's heads with one ``tl.dot``,
       stores ``p = exp(s - m_block)`` in fp16 plus the block max / sum-exp per head.
    2. ``_lse_kernel``         grid (H_q, B): combines the block statistics into each
       head's log-sum-exp over all candidates.
    3. ``_soft_vote_kernel``   grid (C / VOTE_BLOCK, B): ``v_j = sum_h p_hj exp(m_blk - lse_h)``.
   The workspace these need comes from :func:`alloc_workspace`, called once by the caller.
Sum vote: one launch, ``sum_h q_h . k = (sum_{h in g} q_h) . k_g``, no workspace.

Top-k, six launches: a memset of the row histograms, four 8-bit radix passes over the
votes that pin down the exact k-th largest value (histograms merged with atomics so many
programs share a row), and a compaction that writes every vote above that value plus
exactly as many ties as needed (one atomic counter per row and class). The order of the
written positions depends on program scheduling unless ``sort=True``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

SCORE_BLOCK_N = 64  # candidates per scoring program (one K tile)
VOTE_BLOCK = 256  # candidates per vote-combine program (whole scoring blocks)
VOTE_HEAD_CHUNK = 16  # query heads combined per loop step of the vote pass
LSE_BLOCK_S = 256  # block statistics combined per loop step
TOPK_BLOCK = 2048  # votes per radix program
ASSEMBLE_BLOCK = 256  # output indices per assembly program
RADIX_BITS = 8  # default digit width of the top-k radix select (8: 4 passes, 11: 3 passes)
RADIX_PASSES = 32 // RADIX_BITS
RADIX_BINS = 1 << RADIX_BITS
_RADIX_CHOICES = (8, 11)
# Largest radix scratch row of any supported digit width (workspaces fit every choice).
RADIX_SCRATCH = max(-(-32 // bits) * (1 << bits) for bits in _RADIX_CHOICES) + 2

# Scoring pass 1 variants (``vote_scores(score_variant=...)``; the benchmark's --sweep times them):
#   "grid": one K tile per program, grid (H_kv, C / block_n, B); programs past a row's
#           candidates exit at once (a static C far above the real lengths launches many).
#   "flat": a persistent grid of SCORE_PROGRAMS_PER_SM x SMs programs walks the list of real
#           (row, block, kv head) tiles, kv head fastest (programs running together read whole
#           slot rows); a software-pipelined loop keeps SCORE_STAGES - 1 tiles in flight per
#           program. Cost independent of the static C; inactive rows contribute no work.
SCORE_VARIANT = "flat"
SCORE_STAGES = 3
SCORE_PROGRAMS_PER_SM = 4
SCORE_WARPS = None  # None: 4 for block_n * D <= 8192, else 8
_DEFAULT_NUM_SMS = 132  # H100 SXM; the launcher asks the device when it is a GPU
_LOG2E = 1.4426950408889634
# Triton's CPU interpreter (used by the tests) cannot tl.dot bf16 blocks: upcast there only.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- workspace


@dataclass
class VoteWorkspace:
    """Scratch of :func:`vote_scores` and :func:`topk_positions`, reusable across layers.

    Attributes:
        probs:     [max_batch, H_q, n_blocks * block_n] fp16, ``exp2(s2 - m_block)`` (soft vote).
        block_max: [max_batch, H_q, n_blocks] fp32, per-block max of ``s2 = s * log2(e)``.
        block_sum: [max_batch, H_q, n_blocks] fp32, per-block sum of ``exp2(s2 - max)``.
        lse:       [max_batch, H_q] fp32, per-head ``log2(sum_j exp2(s2_j))``.
        radix:     [max_batch, RADIX_SCRATCH] int32, top-k histograms + counters.
        block_n:   candidates per scoring block (``n_blocks = cdiv(max_candidates, block_n)``).
        radix_bits: digit width of the top-k radix passes run with this workspace (8 or 11).
    """

    probs: torch.Tensor
    block_max: torch.Tensor
    block_sum: torch.Tensor
    lse: torch.Tensor
    radix: torch.Tensor
    block_n: int
    radix_bits: int = RADIX_BITS

    @property
    def max_batch(self) -> int:
        return self.probs.shape[0]

    @property
    def max_candidates(self) -> int:
        return self.probs.shape[2]

    def check(self, batch: int, candidates: int, num_q_heads: int) -> None:
        if batch > self.max_batch or candidates > self.max_candidates:
            raise ValueError(
                f"workspace holds {self.max_batch} x {self.max_candidates} candidates, "
                f"asked for {batch} x {candidates}"
            )
        if num_q_heads != self.probs.shape[1]:
            raise ValueError(f"workspace built for H_q={self.probs.shape[1]}, got {num_q_heads}")


def alloc_workspace(
    max_batch: int,
    max_candidates: int,
    num_q_heads: int,
    device: torch.device | str,
    *,
    block_n: int = SCORE_BLOCK_N,
    radix_bits: int | None = None,
) -> VoteWorkspace:
    """Allocate the scratch of the soft vote and the top-k once (before graph capture).

    ``max_candidates`` must be at least every ``out.shape[1]`` later passed to
    :func:`vote_scores` (passing the max context length is always enough). Bytes:
    ``max_batch * H_q * max_candidates * 2`` (fp16 probabilities) plus ~``8 / block_n`` of
    that for block statistics; e.g. 16 x 32 heads x 128K = 128 MiB. One workspace serves
    every layer, since layers run one after another on one stream.
    """
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    radix_bits = RADIX_BITS if radix_bits is None else radix_bits
    if radix_bits not in _RADIX_CHOICES:
        raise ValueError(f"radix_bits must be one of {_RADIX_CHOICES}, got {radix_bits}")
    n_blocks = triton.cdiv(max(max_candidates, 1), block_n)
    shape = (max_batch, num_q_heads)
    ws = VoteWorkspace(
        # whole blocks: the kernels read and write probs unmasked along the candidates
        probs=torch.empty(*shape, n_blocks * block_n, dtype=torch.float16, device=device),
        block_max=torch.empty(*shape, n_blocks, dtype=torch.float32, device=device),
        block_sum=torch.empty(*shape, n_blocks, dtype=torch.float32, device=device),
        lse=torch.empty(*shape, dtype=torch.float32, device=device),
        radix=torch.zeros(max_batch, RADIX_SCRATCH, dtype=torch.int32, device=device),
        block_n=block_n,
        radix_bits=radix_bits,
    )
    logger.debug(
        "TokenSelect vote workspace: %d x %d heads x %d candidates, %.1f MiB",
        max_batch, num_q_heads, max_candidates, ws.probs.numel() * 2 / 2**20,
    )
    return ws


def _radix_scratch(workspace: VoteWorkspace | None, batch: int, device, zero: bool = True) -> torch.Tensor:
    if workspace is None:
        return torch.zeros(batch, RADIX_SCRATCH, dtype=torch.int32, device=device)
    if batch > workspace.max_batch:
        raise ValueError(f"workspace holds {workspace.max_batch} rows, asked for {batch}")
    scratch = workspace.radix[:batch]
    if zero:
        scratch.zero_()
    return scratch


def _radix_passes(bits: int) -> int:
    return -(-32 // bits)


_NUM_SMS: dict = {}


def _num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return _DEFAULT_NUM_SMS
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


# ----------------------------------------------------------------------------- scoring + vote
# Reference: kernels.reference.vote_scores_reference


@triton.jit
def _candidate_count(seq_ptr, b, n_init, n_local, c_max):
    """Candidates of row ``b``, clipped to the ``c_max`` columns (memory safety only:
    callers size C for their longest request)."""
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    return tl.minimum(tl.maximum(seq_len - n_init - n_local, 0), c_max)


@triton.jit
def _gather_k_tile(k_ptr, r2t_ptr, row, offs_n, mask_n, kv_head, n_init,
                   stride_ks, stride_kh, stride_r2t, HEAD_DIM: tl.constexpr):
    """[BLOCK_N, D] keys of candidates ``offs_n`` of one KV head (0 where masked)."""
    slots = tl.load(r2t_ptr + row * stride_r2t + n_init + offs_n, mask=mask_n, other=0)
    offs_d = tl.arange(0, HEAD_DIM)
    ptrs = k_ptr + slots.to(tl.int64)[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :]
    return tl.load(ptrs, mask=mask_n[:, None], other=0.0)


@triton.jit
def _score_tile(
    q_ptr, k_ptr, r2t_ptr, p_ptr, bmax_ptr, bsum_ptr,
    b, row, kv_head, blk, count,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t,
    stride_pb, stride_ph, stride_sb, stride_sh,
    n_init, scale_log2,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Scores of block ``blk`` of row ``b`` against the GQA group of ``kv_head``; stores the
    fp16 ``exp2(s - m_block)`` and the block max / sum-exp of each head of the group."""
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < count
    k = _gather_k_tile(k_ptr, r2t_ptr, row, offs_n, mask_n, kv_head, n_init,
                       stride_ks, stride_kh, stride_r2t, HEAD_DIM)
    offs_g = tl.arange(0, G_PAD)
    mask_g = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None], other=0.0)
    # G_PAD >= 16 so that tl.dot maps onto tensor cores; padded heads are masked below.
    # K is the A operand ([BLOCK_N, D] x [D, G_PAD]): it goes from global memory to the MMA
    # without a transpose, which lets Triton's pipeliner stage it (cp.async) in a loop.
    if DOT_F32:
        s = tl.dot(k.to(tl.float32), tl.trans(q.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(k, tl.trans(q.to(k.dtype)))
    s = s * scale_log2  # [BLOCK_N, G_PAD], log2 domain
    s = tl.where(mask_n[:, None], s, float("-inf"))
    m = tl.max(s, axis=0)
    p = tl.exp2(s - m[None, :])
    l = tl.sum(p, axis=0)
    # Whole-block rows (zeros past `count`) so that the store vectorises.
    p_ptrs = p_ptr + b.to(tl.int64) * stride_pb + heads[None, :].to(tl.int64) * stride_ph + offs_n[:, None]
    tl.store(p_ptrs, p.to(tl.float16), mask=mask_g[None, :])
    s_off = b.to(tl.int64) * stride_sb + heads * stride_sh + blk
    tl.store(bmax_ptr + s_off, m, mask=mask_g)
    tl.store(bsum_ptr + s_off, l, mask=mask_g)


@triton.jit
def _soft_score_kernel(
    q_ptr, k_ptr, r2t_ptr, rpi_ptr, seq_ptr, act_ptr,
    p_ptr, bmax_ptr, bsum_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t,
    stride_pb, stride_ph, stride_sb, stride_sh,
    c_max, n_init, n_local, scale_log2,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """Variant "grid": one tile per program, grid (H_kv, n_blocks, B)."""
    kv_head = tl.program_id(0)
    blk = tl.program_id(1)
    b = tl.program_id(2)
    if tl.load(act_ptr + b).to(tl.int32) == 0:
        return
    count = _candidate_count(seq_ptr, b, n_init, n_local, c_max)
    if blk * BLOCK_N >= count:
        return
    row = tl.load(rpi_ptr + b).to(tl.int64)
    _score_tile(q_ptr, k_ptr, r2t_ptr, p_ptr, bmax_ptr, bsum_ptr,
                b, row, kv_head, blk, count,
                stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t,
                stride_pb, stride_ph, stride_sb, stride_sh, n_init, scale_log2,
                GROUP, G_PAD, HEAD_DIM, BLOCK_N, DOT_F32)


@triton.jit
def _soft_score_flat_kernel(
    q_ptr, k_ptr, r2t_ptr, rpi_ptr, seq_ptr, act_ptr,
    p_ptr, bmax_ptr, bsum_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t,
    stride_pb, stride_ph, stride_sb, stride_sh,
    batch, c_max, n_init, n_local, scale_log2,
    NUM_KV: tl.constexpr, GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, B_PAD: tl.constexpr, STAGES: tl.constexpr, DOT_F32: tl.constexpr,
):
    """Variant "flat": a persistent grid walks the work list of all real tiles.

    Work item ``t`` = (tile ``t // NUM_KV`` of the concatenated rows, kv head ``t % NUM_KV``);
    program ``i`` takes items ``i, i + P, i + 2P, ...``. Only active rows' real blocks are in
    the list, so a static C far above the real lengths costs nothing.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rows = tl.arange(0, B_PAD)
    in_batch = rows < batch
    seq = tl.load(seq_ptr + rows, mask=in_batch, other=0).to(tl.int32)
    act = tl.load(act_ptr + rows, mask=in_batch, other=0).to(tl.int32)
    cnt = tl.minimum(tl.maximum(seq - n_init - n_local, 0), c_max)
    tiles = tl.where(act != 0, tl.cdiv(cnt, BLOCK_N), 0)
    ends = tl.cumsum(tiles, axis=0)  # tile index where each row's tiles end
    firsts = ends - tiles
    total = tl.sum(tiles, axis=0) * NUM_KV
    for t in tl.range(pid, total, nprog, num_stages=STAGES):
        tile = t // NUM_KV
        kv_head = t % NUM_KV
        b = tl.sum((ends <= tile).to(tl.int32), axis=0)  # the row holding this tile
        sel = rows == b
        blk = tile - tl.sum(tl.where(sel, firsts, 0), axis=0)
        count = tl.sum(tl.where(sel, cnt, 0), axis=0)
        row = tl.load(rpi_ptr + b).to(tl.int64)
        _score_tile(q_ptr, k_ptr, r2t_ptr, p_ptr, bmax_ptr, bsum_ptr,
                    b, row, kv_head, blk, count,
                    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t,
                    stride_pb, stride_ph, stride_sb, stride_sh, n_init, scale_log2,
                    GROUP, G_PAD, HEAD_DIM, BLOCK_N, DOT_F32)


@triton.jit
def _lse_kernel(
    bmax_ptr, bsum_ptr, lse_ptr, seq_ptr, act_ptr, radix_ptr,
    stride_sb, stride_sh, stride_lb, stride_rb,
    c_max, n_init, n_local,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ZERO_WORDS: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(act_ptr + b).to(tl.int32) == 0:
        return
    if ZERO_WORDS > 0:  # fused top-k: clear the row's radix scratch before the vote pass fills it
        if h == 0:
            ZB: tl.constexpr = 1024
            for z0 in tl.static_range(0, ZERO_WORDS, ZB):
                offs_z = z0 + tl.arange(0, ZB)
                tl.store(radix_ptr + b.to(tl.int64) * stride_rb + offs_z,
                         tl.zeros((ZB,), tl.int32), mask=offs_z < ZERO_WORDS)
    count = _candidate_count(seq_ptr, b, n_init, n_local, c_max)
    if count == 0:
        return
    n_blocks = tl.cdiv(count, BLOCK_N)
    base = b.to(tl.int64) * stride_sb + h * stride_sh
    run_max = -1.0e30  # finite, so that the first rescale is exp2(-huge) = 0, not NaN
    run_sum = 0.0
    for s0 in range(0, n_blocks, BLOCK_S):
        offs = s0 + tl.arange(0, BLOCK_S)
        mask = offs < n_blocks
        bm = tl.load(bmax_ptr + base + offs, mask=mask, other=float("-inf"))
        bs = tl.load(bsum_ptr + base + offs, mask=mask, other=0.0)
        new_max = tl.maximum(run_max, tl.max(bm, axis=0))
        run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(bs * tl.exp2(bm - new_max), axis=0)
        run_max = new_max
    tl.store(lse_ptr + b.to(tl.int64) * stride_lb + h, run_max + tl.log2(run_sum))


@triton.jit
def _soft_vote_kernel(
    p_ptr, bmax_ptr, lse_ptr, seq_ptr, act_ptr, out_ptr,
    stride_pb, stride_ph, stride_sb, stride_sh, stride_lb, stride_ob,
    num_heads, c_max, n_init, n_local,
    radix_ptr, stride_rb, topk,
    BLOCK_N: tl.constexpr, NSUB: tl.constexpr, H_CHUNK: tl.constexpr,
    HIST_BITS: tl.constexpr, HIST_SHIFT: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(act_ptr + b).to(tl.int32) == 0:
        return
    count = _candidate_count(seq_ptr, b, n_init, n_local, c_max)
    sub = blk * NSUB + tl.arange(0, NSUB)  # scoring blocks covered by this program
    offs_j = sub[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [NSUB, BLOCK_N]
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + offs_j
    if blk * NSUB * BLOCK_N >= count:
        tl.store(out_ptrs, tl.full((NSUB, BLOCK_N), float("-inf"), tl.float32), mask=offs_j < c_max)
        return
    mask_s = sub < tl.cdiv(count, BLOCK_N)
    vote = tl.zeros((NSUB, BLOCK_N), tl.float32)
    for h0 in range(0, num_heads, H_CHUNK):
        heads = h0 + tl.arange(0, H_CHUNK)
        mask_h = heads < num_heads
        mask_hs = mask_h[:, None] & mask_s[None, :]
        # Masked per block, not per column: workspace rows span whole blocks, and the
        # columns past `count` of the last block (zeros) are replaced by -inf below.
        p = tl.load(p_ptr + b.to(tl.int64) * stride_pb + heads[:, None, None].to(tl.int64) * stride_ph
                    + offs_j[None, :, :], mask=mask_hs[:, :, None], other=0.0)
        bm = tl.load(bmax_ptr + b.to(tl.int64) * stride_sb + heads[:, None] * stride_sh + sub[None, :],
                     mask=mask_hs, other=0.0)
        lse = tl.load(lse_ptr + b.to(tl.int64) * stride_lb + heads, mask=mask_h, other=0.0)
        factor = tl.where(mask_hs, tl.exp2(bm - lse[:, None]), 0.0)  # [H_CHUNK, NSUB]
        vote += tl.sum(p.to(tl.float32) * factor[:, :, None], axis=0)
    vote = tl.where(offs_j < count, vote, float("-inf"))
    tl.store(out_ptrs, vote, mask=offs_j < c_max)
    if HIST_BITS > 0:  # fused top-k: the first radix histogram of sparse rows
        seq_len = tl.load(seq_ptr + b).to(tl.int32)
        if seq_len > n_init + topk + n_local:
            BINS: tl.constexpr = 1 << HIST_BITS
            key = _order_key(tl.reshape(vote, (NSUB * BLOCK_N,)))
            valid = tl.reshape(offs_j < count, (NSUB * BLOCK_N,))
            digit = ((key >> HIST_SHIFT) & (BINS - 1)).to(tl.int32)
            h = tl.histogram(digit, BINS, mask=valid)
            tl.atomic_add(radix_ptr + b.to(tl.int64) * stride_rb + tl.arange(0, BINS), h,
                          mask=h > 0, sem="relaxed")


@triton.jit
def _sum_vote_kernel(
    q_ptr, k_ptr, r2t_ptr, rpi_ptr, seq_ptr, act_ptr, out_ptr,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_r2t, stride_ob,
    num_kv_heads, c_max, n_init, n_local, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    if tl.load(act_ptr + b).to(tl.int32) == 0:
        return
    count = _candidate_count(seq_ptr, b, n_init, n_local, c_max)
    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ob + offs_n
    if blk * BLOCK_N >= count:
        tl.store(out_ptrs, tl.full((BLOCK_N,), float("-inf"), tl.float32), mask=offs_n < c_max)
        return
    mask_n = offs_n < count
    row = tl.load(rpi_ptr + b).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for g in range(num_kv_heads):
        heads = g * GROUP + offs_g
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=(offs_g < GROUP)[:, None], other=0.0)
        q_sum = tl.sum(q.to(tl.float32), axis=0)  # sum_h q_h . k == (sum_h q_h) . k
        k = _gather_k_tile(k_ptr, r2t_ptr, row, offs_n, mask_n, g, n_init,
                           stride_ks, stride_kh, stride_r2t, HEAD_DIM)
        acc += tl.sum(k.to(tl.float32) * q_sum[None, :], axis=1)
    tl.store(out_ptrs, tl.where(mask_n, acc * scale, float("-inf")), mask=offs_n < c_max)


def _check_vote_inputs(q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, out):
    if q.dim() != 3 or k_buffer.dim() != 3:
        raise ValueError(f"q must be [B, H_q, D] and k_buffer [S, H_kv, D], got {tuple(q.shape)}, "
                         f"{tuple(k_buffer.shape)}")
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if k_buffer.shape[2] != head_dim:
        raise ValueError(f"head_dim mismatch: q {head_dim}, k_buffer {k_buffer.shape[2]}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    if q.stride(-1) != 1 or k_buffer.stride(-1) != 1 or req_to_token.stride(-1) != 1:
        raise ValueError("q, k_buffer and req_to_token need a contiguous last dimension")
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != batch or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 [B={batch}, C] with contiguous rows")
    for name, t in (("req_pool_indices", req_pool_indices), ("seq_lens", seq_lens), ("active", active)):
        if t.shape != (batch,):
            raise ValueError(f"{name} must have shape [{batch}], got {tuple(t.shape)}")
    return batch, num_q_heads, num_kv_heads, head_dim


def vote_scores(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    active: torch.Tensor,
    out: torch.Tensor,
    *,
    n_init: int,
    n_local: int,
    scale: float,
    vote: str = "soft",
    workspace: VoteWorkspace | None = None,
    topk: int | None = None,
    score_variant: str | None = None,
    score_stages: int | None = None,
    score_programs_per_sm: int | None = None,
    score_warps: int | None = None,
) -> None:
    """Head vote of every candidate of every active request, written into ``out``.

    Serves decode (q = the new token's query) and prefill chunks alike (q = the chunk's
    mean query over its tokens, [B, H_q, D] as well).

    Args:
        q: [B, H_q, D]; k_buffer: [S, H_kv, D]; req_to_token: [R, M] int32;
        req_pool_indices, seq_lens, active: [B].
        out: [B, C] float32 with C >= every ``L_b - n_init - n_local`` (a narrower C
            clips the candidates). For active rows, ``out[b, j]`` = vote of position
            ``n_init + j`` for ``j < max(L_b - n_init - n_local, 0)``, -inf up to C.
            Inactive rows are not touched (their programs exit at once).
        vote: ``"soft"`` (sum over heads of the per-head softmax over the candidates) or
            ``"sum"`` (sum over heads of the scaled raw scores).
        workspace: from :func:`alloc_workspace`; needed by the soft vote. ``None``
            allocates a temporary one per call (fine for tests, wasteful in serving).
        topk: optional, soft vote with a workspace only: also build the first radix
            histogram of the top-k in ``workspace.radix`` (no extra launch), so that the
            next ``topk_positions(..., workspace=workspace, fused_hist=True)`` with the same
            ``n_init / n_local / topk`` skips its memset and first pass.
        score_variant, score_stages, score_programs_per_sm, score_warps: tuning of the
            scoring pass (module defaults ``SCORE_*``); see ``SCORE_VARIANT``.
    """
    batch, num_q_heads, num_kv_heads, head_dim = _check_vote_inputs(
        q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, out
    )
    c_max = out.shape[1]
    if batch == 0 or c_max == 0:
        return
    group = num_q_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    if vote == "sum":
        if topk is not None:
            raise ValueError("the fused top-k histogram (topk=...) needs the soft vote")
        grid = (triton.cdiv(c_max, SCORE_BLOCK_N), batch)
        _sum_vote_kernel[grid](
            q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, out,
            q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1),
            req_to_token.stride(0), out.stride(0),
            num_kv_heads, c_max, n_init, n_local, float(scale),
            GROUP=group, G_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
            BLOCK_N=SCORE_BLOCK_N, num_warps=4,
        )
        return
    if vote != "soft":
        raise ValueError(f"unknown vote {vote!r}")

    if topk is not None and workspace is None:
        raise ValueError("the fused top-k histogram (topk=...) needs a workspace")
    ws = workspace if workspace is not None else alloc_workspace(batch, c_max, num_q_heads, q.device)
    ws.check(batch, c_max, num_q_heads)
    _soft_pass1(q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, c_max, ws,
                n_init=n_init, n_local=n_local, scale=scale, variant=score_variant,
                stages=score_stages, programs_per_sm=score_programs_per_sm, warps=score_warps)
    _soft_combine(seq_lens, active, out, ws, n_init=n_init, n_local=n_local, topk=topk)


def _soft_pass1(q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, c_max, ws, *,
                n_init, n_local, scale, variant=None, stages=None, programs_per_sm=None, warps=None):
    """Scoring pass 1 of the soft vote (the K read); the benchmark times it alone."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    g_pad = max(16, triton.next_power_of_2(group))
    p, bmax, bsum = ws.probs, ws.block_max, ws.block_sum
    n_blocks = triton.cdiv(c_max, ws.block_n)
    variant = SCORE_VARIANT if variant is None else variant
    warps = warps or SCORE_WARPS or (4 if ws.block_n * head_dim <= 8192 else 8)
    score_args = (
        q, k_buffer, req_to_token, req_pool_indices, seq_lens, active,
        p, bmax, bsum,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), req_to_token.stride(0),
        p.stride(0), p.stride(1), bmax.stride(0), bmax.stride(1),
    )
    if variant == "grid":
        if n_blocks > 65535:  # CUDA's grid.y limit
            raise ValueError(f"{c_max} candidates need a workspace block_n > {ws.block_n}")
        # KV head fastest: the programs running together read whole slot rows (all heads).
        _soft_score_kernel[(num_kv_heads, n_blocks, batch)](
            *score_args, c_max, n_init, n_local, float(scale) * _LOG2E,
            GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_N=ws.block_n,
            DOT_F32=_INTERPRETED, num_warps=warps,
        )
    elif variant == "flat":
        per_sm = programs_per_sm or SCORE_PROGRAMS_PER_SM
        # Static grid: from the device and the static shapes only, never from seq_lens.
        programs = min(per_sm * _num_sms(q.device), num_kv_heads * n_blocks * batch)
        _soft_score_flat_kernel[(programs,)](
            *score_args, batch, c_max, n_init, n_local, float(scale) * _LOG2E,
            NUM_KV=num_kv_heads, GROUP=group, G_PAD=g_pad, HEAD_DIM=head_dim, BLOCK_N=ws.block_n,
            B_PAD=max(2, triton.next_power_of_2(batch)),
            STAGES=stages or SCORE_STAGES, DOT_F32=_INTERPRETED, num_warps=warps,
        )
    else:
        raise ValueError(f"unknown score_variant {variant!r}")


def _soft_combine(seq_lens, active, out, ws, *, n_init, n_local, topk=None):
    """Passes 2 and 3 of the soft vote (and the fused first radix histogram)."""
    batch, c_max = out.shape
    num_q_heads = ws.probs.shape[1]
    p, bmax, bsum, lse = ws.probs, ws.block_max, ws.block_sum, ws.lse
    bits = ws.radix_bits
    radix = ws.radix
    fused = topk is not None
    _lse_kernel[(num_q_heads, batch)](
        bmax, bsum, lse, seq_lens, active, radix,
        bmax.stride(0), bmax.stride(1), lse.stride(0), radix.stride(0),
        c_max, n_init, n_local,
        BLOCK_N=ws.block_n, BLOCK_S=LSE_BLOCK_S,
        ZERO_WORDS=_radix_passes(bits) * (1 << bits) + 2 if fused else 0, num_warps=4,
    )
    nsub = max(1, VOTE_BLOCK // ws.block_n)
    _soft_vote_kernel[(triton.cdiv(c_max, nsub * ws.block_n), batch)](
        p, bmax, lse, seq_lens, active, out,
        p.stride(0), p.stride(1), bmax.stride(0), bmax.stride(1), lse.stride(0), out.stride(0),
        num_q_heads, c_max, n_init, n_local,
        radix, radix.stride(0), topk if fused else 0,
        BLOCK_N=ws.block_n, NSUB=nsub,
        H_CHUNK=min(VOTE_HEAD_CHUNK, triton.next_power_of_2(num_q_heads)),
        HIST_BITS=bits if fused else 0, HIST_SHIFT=max(32 - bits, 0), num_warps=8,
    )


# ----------------------------------------------------------------------------- top-k
# Reference: kernels.reference.topk_positions_reference


@triton.jit
def _sparse_count(seq_ptr, act_ptr, b, n_init, n_local, topk, c_max):
    """Candidate count of row ``b`` (clipped to ``c_max``), or 0 when it is inactive or
    not sparse."""
    act = tl.load(act_ptr + b).to(tl.int32)
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    sparse = (act != 0) & (seq_len > n_init + topk + n_local)
    return tl.where(sparse, tl.minimum(seq_len - n_init - n_local, c_max), 0)


@triton.jit
def _order_key(v):
    """Float32 -> uint32 whose unsigned order is the float order."""
    bits = v.to(tl.uint32, bitcast=True)
    return bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000).to(tl.uint32)


@triton.jit
def _radix_prefix(hist_ptr, k, NUM_PASSES: tl.constexpr, BINS: tl.constexpr, BITS: tl.constexpr):
    """Key prefix of the k-th largest value after ``NUM_PASSES`` digits, and how many of
    the values sharing that prefix are still to be taken."""
    bins = tl.arange(0, BINS)
    prefix = tl.full((), 0, tl.uint32)
    k_rem = k
    for p in tl.static_range(NUM_PASSES):
        h = tl.load(hist_ptr + p * BINS + bins)
        at_least = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # values with digit >= bin
        digit = tl.max(tl.where(at_least >= k_rem, bins, -1), axis=0)
        k_rem -= tl.sum(tl.where(bins > digit, h, 0), axis=0)
        # The last digit of a width that does not divide 32 starts at bit 0 and overlaps the
        # previous digit's low bits; those are fixed by the prefix already, so OR is exact.
        shift = tl.maximum(tl.full((), 32 - BITS * (p + 1), tl.int32), 0).to(tl.uint32)
        prefix = prefix | (digit.to(tl.uint32) << shift)
    return prefix, k_rem


@triton.jit
def _radix_hist_kernel(
    votes_ptr, seq_ptr, act_ptr, radix_ptr,
    stride_vb, stride_rb,
    c_max, n_init, n_local, topk,
    PASS: tl.constexpr, BITS: tl.constexpr, SHIFT: tl.constexpr, BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    count = _sparse_count(seq_ptr, act_ptr, b, n_init, n_local, topk, c_max)
    if blk * BLOCK >= count:
        return
    BINS: tl.constexpr = 1 << BITS
    hist_ptr = radix_ptr + b.to(tl.int64) * stride_rb
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < count
    key = _order_key(tl.load(votes_ptr + b.to(tl.int64) * stride_vb + offs, mask=valid, other=0.0))
    digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
    if PASS > 0:
        prefix, _ = _radix_prefix(hist_ptr, topk, PASS, BINS, BITS)
        high = 32 - BITS * PASS
        valid = valid & ((key >> high) == (prefix >> high))
    h = tl.histogram(digit, BINS, mask=valid)
    bins = tl.arange(0, BINS)
    tl.atomic_add(hist_ptr + PASS * BINS + bins, h, mask=h > 0, sem="relaxed")


@triton.jit
def _radix_compact_kernel(
    votes_ptr, seq_ptr, act_ptr, radix_ptr, out_ptr,
    stride_vb, stride_rb, stride_ob,
    c_max, n_init, n_local, topk,
    PASSES: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    count = _sparse_count(seq_ptr, act_ptr, b, n_init, n_local, topk, c_max)
    if blk * BLOCK >= count:
        return
    BINS: tl.constexpr = 1 << BITS
    hist_ptr = radix_ptr + b.to(tl.int64) * stride_rb
    counter_ptr = hist_ptr + PASSES * BINS
    kth, ties = _radix_prefix(hist_ptr, topk, PASSES, BINS, BITS)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    valid = offs < count
    key = _order_key(tl.load(votes_ptr + b.to(tl.int64) * stride_vb + offs, mask=valid, other=0.0))
    out_row = out_ptr + b.to(tl.int64) * stride_ob
    position = n_init + offs

    above = (valid & (key > kth)).to(tl.int32)
    base = tl.atomic_add(counter_ptr, tl.sum(above, axis=0))
    slot = base + tl.cumsum(above, axis=0) - 1
    tl.store(out_row + slot, position, mask=above != 0)

    equal = (valid & (key == kth)).to(tl.int32)
    base = tl.atomic_add(counter_ptr + 1, tl.sum(equal, axis=0))
    rank = base + tl.cumsum(equal, axis=0) - 1
    tl.store(out_row + (topk - ties) + rank, position, mask=(equal != 0) & (rank < ties))


@triton.jit
def _sort_rows_kernel(out_ptr, seq_ptr, act_ptr, stride_ob, c_max, n_init, n_local, topk,
                      K_PAD: tl.constexpr):
    b = tl.program_id(0)
    if _sparse_count(seq_ptr, act_ptr, b, n_init, n_local, topk, c_max) == 0:
        return
    offs = tl.arange(0, K_PAD)
    ptrs = out_ptr + b.to(tl.int64) * stride_ob + offs
    vals = tl.load(ptrs, mask=offs < topk, other=2147483647)
    tl.store(ptrs, tl.sort(vals), mask=offs < topk)


def topk_positions(
    votes: torch.Tensor,
    seq_lens: torch.Tensor,
    active: torch.Tensor,
    out: torch.Tensor,
    *,
    n_init: int,
    n_local: int,
    topk: int,
    workspace: VoteWorkspace | None = None,
    sort: bool = False,
    fused_hist: bool = False,
) -> None:
    """Positions of the ``topk`` largest votes of every active sparse request.

    Args:
        votes: [B, C] float32 from :func:`vote_scores`; only columns
            ``j < L_b - n_init - n_local`` are read.
        seq_lens, active: [B].
        out: [B, topk] int32. Rows with ``active`` and ``L_b > n_init + topk + n_local``
            get the logical positions ``n_init + j`` of their ``topk`` largest votes
            (exactly ``topk`` of them, ties broken arbitrarily, in no particular order
            unless ``sort``); other rows are not touched.
        workspace: its ``radix`` scratch is used (and zeroed by a memset each call);
            ``None`` allocates a small temporary.
        sort: sort each written row ascending (one extra launch; makes the output
            deterministic, as the compaction's order depends on scheduling).
        fused_hist: the soft ``vote_scores`` that wrote ``votes`` got the same
            ``workspace`` and ``topk=topk``, so its first radix histogram is ready in the
            workspace: skip the memset and the first pass (needs ``workspace``).
    Digit width: ``workspace.radix_bits`` (module ``RADIX_BITS`` without a workspace).
    """
    if votes.dtype != torch.float32 or votes.dim() != 2 or votes.stride(-1) != 1:
        raise ValueError("votes must be float32 [B, C] with contiguous rows")
    batch, c_max = votes.shape
    if out.shape != (batch, topk) or out.dtype != torch.int32 or out.stride(-1) != 1:
        raise ValueError(f"out must be int32 [{batch}, {topk}] with contiguous rows")
    if batch == 0 or c_max == 0:
        return
    if fused_hist and workspace is None:
        raise ValueError("fused_hist needs the workspace given to vote_scores(topk=...)")
    bits = workspace.radix_bits if workspace is not None else RADIX_BITS
    passes = _radix_passes(bits)
    radix = _radix_scratch(workspace, batch, votes.device, zero=not fused_hist)
    grid = (triton.cdiv(c_max, TOPK_BLOCK), batch)
    args = (c_max, n_init, n_local, topk)
    for pass_idx in range(1 if fused_hist else 0, passes):
        _radix_hist_kernel[grid](
            votes, seq_lens, active, radix, votes.stride(0), radix.stride(0), *args,
            PASS=pass_idx, BITS=bits, SHIFT=max(32 - bits * (pass_idx + 1), 0),
            BLOCK=TOPK_BLOCK, num_warps=8,
        )
    _radix_compact_kernel[grid](
        votes, seq_lens, active, radix, out, votes.stride(0), radix.stride(0), out.stride(0), *args,
        PASSES=passes, BITS=bits, BLOCK=TOPK_BLOCK, num_warps=8,
    )
    if sort:
        _sort_rows_kernel[(batch,)](
            out, seq_lens, active, out.stride(0), *args,
            K_PAD=triton.next_power_of_2(topk), num_warps=8,
        )


# ----------------------------------------------------------------------------- assembly
# Reference: kernels.reference.assemble_kv_indices_reference


@triton.jit
def _assemble_kernel(
    pos_ptr, r2t_ptr, rpi_ptr, seq_ptr, indptr_ptr, kv_ptr,
    stride_pos, stride_r2t,
    n_init, n_local, topk,
    BLOCK: tl.constexpr,
):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    # Independent loads first, so that they overlap: the chain is then
    # seq_lens -> positions -> req_to_token -> store (L2 is cold in a decode step).
    seq_len = tl.load(seq_ptr + b).to(tl.int32)
    row = tl.load(rpi_ptr + b).to(tl.int64)
    start = tl.load(indptr_ptr + b).to(tl.int64)
    budget = n_init + topk + n_local
    n_out = tl.minimum(seq_len, budget)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    if blk * BLOCK >= n_out:
        return
    mask = offs < n_out
    sparse = seq_len > budget
    in_topk = (offs >= n_init) & (offs < n_init + topk)
    chosen = tl.load(pos_ptr + b.to(tl.int64) * stride_pos + (offs - n_init),
                     mask=mask & in_topk & sparse, other=0)
    local = seq_len - n_local + (offs - n_init - topk)
    pos = tl.where(sparse, tl.where(offs < n_init, offs, tl.where(in_topk, chosen, local)), offs)
    slots = tl.load(r2t_ptr + row * stride_r2t + pos, mask=mask, other=0)
    tl.store(kv_ptr + start + offs, slots, mask=mask)


def assemble_kv_indices(
    positions: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    *,
    n_init: int,
    n_local: int,
    topk: int,
) -> None:
    """Physical slots each request attends, written at ``kv_indices[kv_indptr[b]:]``.

    Args:
        positions: [B, topk] int32 logical positions (read only for rows with
            ``L_b > budget``, e.g. Selection Cache rows gathered for this batch).
        req_to_token: [R, M] int32; req_pool_indices, seq_lens: [B];
        kv_indptr: [B + 1] int32 = cumsum of ``min(L_b, budget)``.
        kv_indices: [>= kv_indptr[B]] int32. For ``L_b <= budget`` the slots of
            positions ``0..L_b-1``, else of ``[0, n_init) + positions[b] + [L_b - n_local, L_b)``.
    """
    batch = seq_lens.shape[0]
    if positions.shape != (batch, topk) or positions.stride(-1) != 1:
        raise ValueError(f"positions must be [{batch}, {topk}] with contiguous rows")
    if kv_indptr.shape[0] != batch + 1 or req_to_token.stride(-1) != 1:
        raise ValueError("kv_indptr must be [B + 1]; req_to_token needs contiguous rows")
    if batch == 0:
        return
    budget = n_init + topk + n_local
    _assemble_kernel[(triton.cdiv(budget, ASSEMBLE_BLOCK), batch)](
        positions, req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
        positions.stride(0), req_to_token.stride(0),
        n_init, n_local, topk,
        BLOCK=ASSEMBLE_BLOCK, num_warps=4,
    )
