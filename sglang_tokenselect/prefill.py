"""Chunk-wise sparse prefill: the sub-chunk plan of an extend batch and its per-layer selection.

The specification is in ``kernels/reference.py`` (``prefill_subchunks_reference``,
``sparse_prefill_select_reference``, ``paged_prefill_attention_reference``). The extend of a
request over positions ``[P, P + E)`` is cut on the absolute grid of ``chunk`` positions; each
piece (a *sub-chunk*, ending at ``e``) becomes one row of the decode selection
(``SelectionOps.decode_select``): its mean query, length ``e``. The rows' attended slots form
the index lists of one paged prefill with page size 1 (``qo_indptr``, ``kv_indptr``,
``kv_indices``), planned once per forward; each layer rewrites ``kv_indices``.

Sub-chunk rows of one request would share its pool row, and the selection kernels keep a row's
top-k in the Selection Cache row of its pool row while they build it. So every sub-chunk gets a
private row: a copy of its request's ``req_to_token`` row (up to the batch's largest ``e``) and
private cache tensors. The threshold is 1 (never a hit): the decode Selection Cache and its
counters are untouched; the extend itself invalidates the request's cached selections.

Everything in :func:`plan_subchunks` runs on the host from SGLang's host copies of the extend
lengths: planning adds no device-to-host synchronisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.selection import group_kwargs

logger = logging.getLogger(__name__)

# Candidates per scoring tile of the selection: the scratch holds each miss row's candidates
# rounded up to whole tiles (reference.fitting_misses' block_n, triton_select.BLOCK_N).
TILE = 64


@dataclass(frozen=True)
class SubchunkPlan:
    """Host-side layout of an extend batch's sub-chunks (N sub-chunks, B requests, T queries).

    req        [N] int64   request of each sub-chunk (batch index), in query order
    start, end [N] int64   absolute positions ``[start, end)`` of its queries
    qo_indptr  [N + 1] int32  its queries are ``q[qo_indptr[i]:qo_indptr[i + 1]]``
    kv_indptr  [N + 1] int32  cumsum of ``min(end, budget)``: its attended slots
    groups     ``(lo, hi)`` ranges of rows selected by one ``decode_select`` call: each
               group's sparse rows fit the selection scratch and it has at most ``max_rows`` rows
    sparse     some sub-chunk ends past the budget (else the extend is dense)
    """

    req: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    groups: tuple[tuple[int, int], ...]
    sparse: bool

    @property
    def num_rows(self) -> int:
        return int(self.req.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.qo_indptr[-1])

    @property
    def num_kv(self) -> int:
        return int(self.kv_indptr[-1])


def _indptr(lengths: torch.Tensor) -> torch.Tensor:
    """[N] -> [N + 1] int32 exclusive prefix sums."""
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(lengths, 0)
    return out


def subchunk_bounds(prefix_lens: Sequence[int], extend_lens: Sequence[int], chunk: int):
    """Sub-chunks of every request on the absolute grid of ``chunk`` positions.

    Returns (req, start, end), each [N] int64 on the host, requests in batch order and each
    request's sub-chunks in position order (the order of the extend's queries).
    """
    prefix = torch.as_tensor(list(prefix_lens), dtype=torch.long)
    extend = torch.as_tensor(list(extend_lens), dtype=torch.long)
    stop = prefix + extend
    first = prefix // chunk
    counts = torch.where(extend > 0, (stop - 1) // chunk - first + 1, 0)
    req = torch.repeat_interleave(torch.arange(prefix.numel()), counts)
    offsets = torch.cumsum(counts, 0) - counts
    grid = first[req] + torch.arange(req.numel()) - offsets[req]  # grid cell of each sub-chunk
    start = torch.maximum(grid * chunk, prefix[req])
    end = torch.minimum((grid + 1) * chunk, stop[req])
    return req, start, end


def selection_groups(end: torch.Tensor, *, n_init: int, n_local: int, budget: int,
                     capacity: Optional[int], max_rows: int) -> tuple[tuple[int, int], ...]:
    """Split the rows into consecutive groups whose sparse rows' candidates, each rounded up to
    whole tiles, fit ``capacity`` (None: unbounded) and that have at most ``max_rows`` rows.
    A row that alone exceeds the capacity gets a group of its own (its selection overflows:
    the ``topk`` candidates before its local window)."""
    need = torch.where(end > budget, -(-(end - n_init - n_local) // TILE) * TILE, 0).tolist()
    groups, lo, used = [], 0, 0
    for i, n in enumerate(need):
        if i > lo and (i - lo >= max_rows or (capacity is not None and used + n > capacity)):
            groups.append((lo, i))
            lo, used = i, 0
        used += n
        if capacity is not None and n > capacity:
            logger.warning("TokenSelect sparse prefill: a sub-chunk ending at %d has more candidates than "
                           "the selection scratch (%d): it takes the top-k before its local window", int(end[i]),
                           capacity)
    if lo < len(need):
        groups.append((lo, len(need)))
    return tuple(groups)


def plan_subchunks(prefix_lens: Sequence[int], extend_lens: Sequence[int], config: TokenSelectConfig, *,
                   capacity: Optional[int], max_rows: int) -> SubchunkPlan:
    """The sub-chunk layout of an extend batch, from host lengths (no device access)."""
    req, start, end = subchunk_bounds(prefix_lens, extend_lens, config.prefill_chunk)
    budget = config.budget
    return SubchunkPlan(
        req=req, start=start, end=end,
        qo_indptr=_indptr(end - start),
        kv_indptr=_indptr(end.clamp(max=budget)),
        groups=selection_groups(end, n_init=config.n_init, n_local=config.n_local, budget=budget,
                                capacity=capacity, max_rows=max(1, max_rows)),
        sparse=bool((end > budget).any()),
    )


@dataclass
class SparsePrefillStep:
    """Device buffers of one sparse extend, shared by every layer (N sub-chunks, T queries,
    W = largest ``end``, F = H_q * D).

    plan          the host layout
    rows          [N] int32   private pool row of each sub-chunk: 0..N-1
    ends          [N] int32   its length ``e`` for the selection
    req_to_token  [N, W] int32  row i: its request's ``req_to_token`` row
    token_rows    [T] int64   sub-chunk of each query
    inv_counts    [N, 1, 1] float32  1 / queries of each sub-chunk
    kv_indptr     [N + 1] int32; kv_indices [num_kv] int32 (rewritten by every layer)
    cache_query [N, F], cache_positions [N, topk] int32, cache_valid [N] bool,
    counters [4] int64: the selection's private Selection Cache (never hit)
    """

    plan: SubchunkPlan
    rows: torch.Tensor
    ends: torch.Tensor
    req_to_token: torch.Tensor
    token_rows: torch.Tensor
    inv_counts: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    cache_query: torch.Tensor
    cache_positions: torch.Tensor
    cache_valid: torch.Tensor
    counters: torch.Tensor


def build_step(plan: SubchunkPlan, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, *,
               query_width: int, topk: int, dtype: torch.dtype,
               kv_indptr: Optional[torch.Tensor] = None,
               kv_indices: Optional[torch.Tensor] = None) -> SparsePrefillStep:
    """Copy the plan to the device and gather each sub-chunk's ``req_to_token`` row.

    Args:
        req_to_token: [R, M] SGLang's pool; req_pool_indices: [B] the batch's pool rows.
        kv_indptr, kv_indices: device buffers to use (FlashInfer's planned ones), else new.
    Host-to-device copies only; no synchronisation.
    """
    device = req_pool_indices.device
    n = plan.num_rows
    lengths = plan.end - plan.start
    pool_rows = req_pool_indices.long()[plan.req.to(device, non_blocking=True)]
    width = int(plan.end.max()) if n else 0
    return SparsePrefillStep(
        plan=plan,
        rows=torch.arange(n, dtype=torch.int32, device=device),
        ends=plan.end.to(device=device, dtype=torch.int32, non_blocking=True),
        req_to_token=req_to_token[pool_rows, :width].contiguous(),
        token_rows=torch.repeat_interleave(torch.arange(n), lengths).to(device, non_blocking=True),
        inv_counts=(1.0 / lengths.clamp(min=1).float()).view(n, 1, 1).to(device, non_blocking=True),
        kv_indptr=plan.kv_indptr.to(device, non_blocking=True) if kv_indptr is None else kv_indptr,
        kv_indices=(torch.empty(plan.num_kv, dtype=torch.int32, device=device)
                    if kv_indices is None else kv_indices),
        cache_query=torch.empty(n, query_width, dtype=dtype, device=device),
        cache_positions=torch.empty(n, topk, dtype=torch.int32, device=device),
        cache_valid=torch.zeros(n, dtype=torch.bool, device=device),
        counters=torch.zeros(4, dtype=torch.int64, device=device),
    )


def mean_queries(q: torch.Tensor, step: SparsePrefillStep) -> torch.Tensor:
    """[T, H_q, D] the extend's queries -> [N, H_q, D] each sub-chunk's mean, summed in float32
    and rounded to q's dtype (reference.subchunk_mean_queries_reference)."""
    sums = torch.zeros((step.plan.num_rows,) + tuple(q.shape[1:]), dtype=torch.float32, device=q.device)
    sums.index_add_(0, step.token_rows, q.float())
    return (sums * step.inv_counts).to(q.dtype)


def select_subchunks(ops, step: SparsePrefillStep, q: torch.Tensor, k_buffer: torch.Tensor, scratch,
                     config: TokenSelectConfig, scale: float, group=None) -> None:
    """One layer's selection of every sub-chunk: writes ``step.kv_indices``.

    Args:
        ops: ``SelectionOps`` (Triton kernels or the PyTorch reference); q: [T, H_q, D] the
        extend's queries (T = plan.num_tokens); k_buffer: [S, H_kv, D] this layer's keys, the
        extend's own keys already written; scratch: ``ops.alloc_scratch(...)``; group: the
        attention TP group voting together (None: this rank alone; see ``Selector``).
    """
    means = mean_queries(q, step)
    for lo, hi in step.plan.groups:
        ops.decode_select(
            means[lo:hi], k_buffer, step.req_to_token, step.rows[lo:hi], step.ends[lo:hi],
            step.kv_indptr[lo : hi + 1], step.kv_indices,
            step.cache_query, step.cache_positions, step.cache_valid, step.counters, scratch,
            n_init=config.n_init, n_local=config.n_local, topk=config.topk,
            threshold=1.0, scale=scale, vote=config.vote, **group_kwargs(group),
        )
