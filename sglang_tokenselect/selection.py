"""Per-request Selection Cache and the per-layer selection step.

The step is written once, in device-side torch ops, around three kernels (vote scores,
top-k, index assembly) supplied by an ``ops`` object: the PyTorch references on CPU, the
Triton kernels on CUDA. Nothing here reads device values on the host, so a decode step
adds no host synchronisation.

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
    """The three selection kernels and their scratch; signatures follow ``kernels/triton_select.py``."""

    def alloc_workspace(self, max_batch, max_candidates, num_q_heads, device): ...

    def vote_scores(self, q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, out, *,
                    n_init, n_local, scale, vote, workspace=None) -> None: ...

    def topk_positions(self, votes, seq_lens, active, out, *, n_init, n_local, topk,
                       workspace=None) -> None: ...

    def assemble_kv_indices(self, positions, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                            kv_indices, *, n_init, n_local, topk) -> None: ...


class TorchSelectionOps:
    """The PyTorch references behind the ``SelectionOps`` interface (any device, slow)."""

    def alloc_workspace(self, max_batch, max_candidates, num_q_heads, device):
        return None  # the references allocate what they need

    def vote_scores(self, q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, out, *,
                    n_init, n_local, scale, vote, workspace=None) -> None:
        votes = ref.vote_scores_reference(
            q, k_buffer, req_to_token, req_pool_indices, seq_lens,
            n_init=n_init, n_local=n_local, scale=scale, vote=vote, max_candidates=out.shape[1],
        )
        out.copy_(torch.where(active[:, None], votes, out))

    def topk_positions(self, votes, seq_lens, active, out, *, n_init, n_local, topk,
                       workspace=None) -> None:
        positions = ref.topk_positions_reference(
            votes, seq_lens, n_init=n_init, n_local=n_local, topk=topk
        )
        chosen = active & ref.is_sparse(seq_lens, n_init, n_local, topk)
        out.copy_(torch.where(chosen[:, None], positions, out))

    def assemble_kv_indices(self, positions, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                            kv_indices, *, n_init, n_local, topk) -> None:
        ref.assemble_kv_indices_reference(
            positions, req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
            n_init=n_init, n_local=n_local, topk=topk,
        )


def default_ops(device: torch.device) -> SelectionOps:
    """Triton kernels on CUDA, PyTorch references elsewhere."""
    if device.type == "cuda":
        from sglang_tokenselect.kernels import triton_select

        return triton_select  # its module-level launchers are the SelectionOps
    return TorchSelectionOps()


@dataclass
class SelectionCache:
    """Selection Cache of every layer and pool row.

    Shapes (Y = layers, R = pool rows, F = H_q * D):
        query      [Y, R, F]     query that triggered the cached selection
        positions  [Y, R, topk]  its top-k logical positions (int32)
        valid      [Y, R]        a selection is cached for this row
        hits, misses, dense  [Y] int64 counters (dense = steps that attended everything)
    """

    query: torch.Tensor
    positions: torch.Tensor
    valid: torch.Tensor
    hits: torch.Tensor
    misses: torch.Tensor
    dense: torch.Tensor

    @classmethod
    def allocate(cls, *, num_layers: int, num_rows: int, query_width: int, topk: int,
                 dtype: torch.dtype, device: torch.device | str) -> "SelectionCache":
        def counter():
            return torch.zeros(num_layers, dtype=torch.int64, device=device)

        return cls(
            query=torch.zeros(num_layers, num_rows, query_width, dtype=dtype, device=device),
            positions=torch.full((num_layers, num_rows, topk), -1, dtype=torch.int32, device=device),
            valid=torch.zeros(num_layers, num_rows, dtype=torch.bool, device=device),
            hits=counter(),
            misses=counter(),
            dense=counter(),
        )

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.query, self.positions, self.valid))

    def invalidate_rows(self, rows: torch.Tensor) -> None:
        """Forget the selections of ``rows`` (a new owner, or new tokens from an extend)."""
        self.valid[:, rows.long()] = False

    def counts(self) -> dict[str, int]:
        """Totals over layers. Reads device memory: call off the hot path."""
        hits, misses, dense = (int(t.sum()) for t in (self.hits, self.misses, self.dense))
        return {"hits": hits, "misses": misses, "dense": dense}


class Selector:
    """Computes each layer's attended KV slots for a decode batch."""

    def __init__(self, config: TokenSelectConfig, cache: SelectionCache, ops: SelectionOps):
        self.config = config
        self.cache = cache
        self.ops = ops

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
        votes: torch.Tensor,
        scale: float,
        workspace=None,
    ) -> None:
        """Write the slots each request attends at ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]``.

        Args:
            q: [B, H_q, D] decode queries of this layer.
            k_buffer: [S, H_kv, D] this layer's keys (the current token already written).
            kv_indptr: [B + 1] int32, cumsum of ``min(L, budget)``.
            kv_indices: [kv_indptr[-1]] int32, overwritten.
            votes: [B, C] float32 scratch, C >= the largest candidate count of the batch.
            workspace: the ops' scratch for [B, C] (``ops.alloc_workspace``), shared by layers.
        """
        cfg, cache = self.config, self.cache
        rows = req_pool_indices.long()
        sparse = ref.is_sparse(seq_lens, cfg.n_init, cfg.n_local, cfg.topk)
        q_flat = q.reshape(q.shape[0], -1)
        cached_q = cache.query[layer_id, rows]
        hit = self._cache_hits(q_flat, cached_q, cache.valid[layer_id, rows]) & sparse
        active = sparse & ~hit

        fresh = torch.empty(q.shape[0], cfg.topk, dtype=torch.int32, device=q.device)
        self.ops.vote_scores(
            q, k_buffer, req_to_token, req_pool_indices, seq_lens, active, votes,
            n_init=cfg.n_init, n_local=cfg.n_local, scale=scale, vote=cfg.vote, workspace=workspace,
        )
        self.ops.topk_positions(
            votes, seq_lens, active, fresh, n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk,
            workspace=workspace,
        )
        positions = torch.where(active[:, None], fresh, cache.positions[layer_id, rows])
        cache.positions[layer_id, rows] = positions
        cache.query[layer_id, rows] = torch.where(active[:, None], q_flat.to(cached_q.dtype), cached_q)
        cache.valid[layer_id, rows] = cache.valid[layer_id, rows] | active
        cache.hits[layer_id] += hit.sum()
        cache.misses[layer_id] += active.sum()
        cache.dense[layer_id] += (~sparse).sum()

        self.ops.assemble_kv_indices(
            positions, req_to_token, req_pool_indices, seq_lens, kv_indptr, kv_indices,
            n_init=cfg.n_init, n_local=cfg.n_local, topk=cfg.topk,
        )

    def _cache_hits(self, q_flat, cached_q, valid) -> torch.Tensor:
        if not self.config.cache_enabled:
            return torch.zeros_like(valid)
        return ref.selection_cache_hits_reference(q_flat, cached_q, valid, self.config.cache_threshold)
