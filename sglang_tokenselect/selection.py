"""Per-request Selection Cache and the per-layer selection step.

The step is one call into an ``ops`` object: the fused Triton kernels on CUDA
(``kernels/triton_select.py``), their PyTorch specification elsewhere. Both read and write
the same ``SelectionCache`` tensors. Nothing here reads device values on the host, so a
decode step adds no host synchronisation.

State is indexed by SGLang's ``req_pool_idx`` (the row of ``ReqToTokenPool``); it holds
logical positions, never physical KV slots, which are looked up through ``req_to_token``
at every step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels import reference as ref

logger = logging.getLogger(__name__)


class SelectionOps(Protocol):
    """One layer's decode selection and its scratch; see ``kernels/triton_select.py``."""

    def alloc_scratch(self, max_batch: int, capacity: int, num_q_heads: int, device): ...

    def decode_select(self, q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                      kv_indices, cache_query, cache_positions, cache_valid, counters, scratch, *,
                      n_init, n_local, topk, threshold, scale, vote) -> None: ...


@dataclass(frozen=True)
class ReferenceScratch:
    """The reference needs no scratch, only the capacity it must respect (None: unbounded)."""

    capacity: int | None
    max_batch: int
    nbytes: int = 0


class TorchSelectionOps:
    """The PyTorch reference behind the ``SelectionOps`` interface (any device, slow).
    Takes ``group=`` (tensor parallelism: ``reference.decode_select_reference``)."""

    SUPPORTS_TP_GROUP = True

    def alloc_scratch(self, max_batch, capacity, num_q_heads, device) -> ReferenceScratch:
        return ReferenceScratch(capacity=capacity, max_batch=max_batch)

    def decode_select(self, q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                      kv_indices, cache_query, cache_positions, cache_valid, counters, scratch, **kw) -> None:
        ref.decode_select_reference(q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                                    kv_indices, cache_query, cache_positions, cache_valid, counters,
                                    capacity=scratch.capacity, **kw)


def supports_tp_group(ops: SelectionOps) -> bool:
    """Whether ``ops.decode_select`` takes ``group=`` (the Triton kernels do not yet: docs in README)."""
    return bool(getattr(ops, "SUPPORTS_TP_GROUP", False))


def group_kwargs(group) -> dict:
    """``{"group": group}``, or nothing for None (ops without TP support never see the key)."""
    return {} if group is None else {"group": group}


def default_ops(device: torch.device) -> SelectionOps:
    """Triton kernels on CUDA, the PyTorch reference elsewhere."""
    if device.type == "cuda":
        from sglang_tokenselect.kernels import triton_select

        return triton_select  # its module-level functions are the SelectionOps
    return TorchSelectionOps()


@dataclass
class SelectionCache:
    """Selection Cache of every layer and pool row.

    Shapes (Y = layers, R = pool rows, F = H_q * D):
        query      [Y, R, F]     query that triggered the cached selection
        positions  [Y, R, topk]  its top-k logical positions (int32)
        valid      [Y, R]        a selection is cached for this row
        counters   [Y, 4] int64  hits, misses, dense, overflow (``reference.COUNTERS``)
    """

    query: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, *, num_layers: int, num_rows: int, query_width: int, topk: int,
                 dtype: torch.dtype, device: torch.device | str) -> "SelectionCache":
        return cls(
            query=torch.zeros(num_layers, num_rows, query_width, dtype=dtype, device=device),
            positions=torch.full((num_layers, num_rows, topk), -1, dtype=torch.int32, device=device),
            valid=torch.zeros(num_layers, num_rows, dtype=torch.bool, device=device),
            counters=torch.zeros(num_layers, len(ref.COUNTERS), dtype=torch.int64, device=device),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.positions, self.valid))

    def invalidate_rows(self, rows: torch.Tensor) -> None:
        """Forget the selections of ``rows`` (a new owner, or new tokens from an extend)."""
        self.valid[:, rows.long()] = False

    def counts(self) -> dict[str, int]:
        """Totals over layers. Reads device memory: call off the hot path."""
        return dict(zip(ref.COUNTERS, self.counters.sum(0).tolist()))


class Selector:
    """Computes each layer's attended KV slots for a decode batch."""

    def __init__(self, config: TokenSelectConfig, cache: SelectionCache, ops: SelectionOps, group=None):
        """group: the attention TP group whose ranks vote together (None: this rank alone)."""
        if group is not None and not supports_tp_group(ops):
            raise ValueError(f"{ops!r} cannot all-reduce the vote over a TP group")
        self.config = config
        self.cache = cache
        self.ops = ops
        self.group = group

    def select(
        self,
        layer_id: int,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        scale: float,
        scratch,
    ) -> None:
        """Write the slots each request attends at ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``.

        Args:
            q: [B, H_q, D] decode queries of this layer.
            k_buffer: [S, H_kv, D] this layer's keys.
            kv_indptr: [B + 1] int32, cumsum of ``min(L, budget)``.
            kv_indices: [kv_indptr[-1]] int32, overwritten.
            scratch: ``ops.alloc_scratch(...)``, shared by every layer.
        """
        cfg, cache = self.config, self.cache
        self.ops.decode_select(
            q, k_buffer, req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
            cache.query[layer_id], cache.positions[layer_id], cache.valid[layer_id],
            cache.counters[layer_id], scratch,
            n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk,
            threshold=cfg.cache_threshold, scale=scale, vote=cfg.vote, **group_kwargs(self.group),
        )
