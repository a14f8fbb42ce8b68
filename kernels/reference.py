"""Plain PyTorch reference of TokenSelect's selection, the project's specification.

Every fast kernel in this package is tested against these functions. They run on any
device, loop over requests in Python, and favour clarity over speed.

Shapes (B = requests in the batch, S = KV slots, R = request-pool rows, M = max context):
    q                 [B, H_q, D]   one query per request (decode token, or a chunk's mean)
    k_buffer          [S, H_kv, D]  one layer's key cache, SGLang's layout
    req_to_token      [R, M]        logical position -> physical KV slot, per pool row
    req_pool_indices  [B]           pool row of each request
    seq_lens          [B]           context length L, the current token included

Candidates of a request are the logical positions ``[n_init, L - n_local)``; candidate
index ``j`` is position ``n_init + j``. Query head ``h`` reads KV head ``h // (H_q / H_kv)``.

Tensor parallelism: ``group`` (a ``torch.distributed`` process group, or SGLang's
``GroupCoordinator`` of the attention TP group; None = one process) makes the selection
global. Each rank holds whole KV-head groups and their query heads; a head's softmax is local
to its rank, so the ranks' partial votes sum exactly to the vote over all heads: they are
all-reduced (SUM) before the top-k. The Selection Cache decides from the all-reduced
``(q.c, |q|^2, |c|^2)`` partials, so every rank hits or misses alike and selects the same
positions. Every rank must call with the same batch (SGLang's TP ranks do).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def candidate_counts(seq_lens: torch.Tensor, n_init: int, n_local: int) -> torch.Tensor:
    """[B] number of candidate positions, clamped at 0."""
    return (seq_lens.long() - n_init - n_local).clamp_min(0)


def selected_lens(seq_lens: torch.Tensor, n_init: int, n_local: int, topk: int) -> torch.Tensor:
    """[B] tokens attended: all of them up to the budget, else exactly the budget."""
    return seq_lens.long().clamp_max(n_init + topk + n_local)


def is_sparse(seq_lens: torch.Tensor, n_init: int, n_local: int, topk: int) -> torch.Tensor:
    """[B] bool, True where the request attends a selection rather than everything."""
    return seq_lens.long() > n_init + topk + n_local


def kv_head_of(num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[H_q] KV head read by each query head: ``h // group`` (GQA groups are contiguous)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"H_q={num_q_heads} is not a multiple of H_kv={num_kv_heads}")
    return torch.arange(num_q_heads) // (num_q_heads // num_kv_heads)


def head_scores_reference(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled per-head scores of one request.

    Args:
        q: [H_q, D]; keys: [N, H_kv, D].
    Returns:
        [H_q, N] float32, ``scale * q_h . K[j, h // group]``.
    """
    heads = kv_head_of(q.shape[0], keys.shape[1]).to(keys.device)
    k_per_q = keys.float()[:, heads, :]  # [N, H_q, D]
    return torch.einsum("hd,nhd->hn", q.float(), k_per_q) * scale


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (None: ``t`` itself). ``group`` is a process group
    or an object with SGLang's ``all_reduce(t) -> t`` (``GroupCoordinator``, maybe out of place)."""
    if group is None:
        return t
    if hasattr(group, "all_reduce"):
        return group.all_reduce(t)
    torch.distributed.all_reduce(t, group=group)
    return t


def vote_from_scores(scores: torch.Tensor, vote: str) -> torch.Tensor:
    """[H_q, N] scores -> [N] votes: head soft vote, or the plain sum over heads."""
    if vote == "soft":
        return torch.softmax(scores, dim=-1).sum(dim=0)
    if vote == "sum":
        return scores.sum(dim=0)
    raise ValueError(f"unknown vote {vote!r}")


def vote_scores_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    n_init: int,
    n_local: int,
    scale: float,
    vote: str = "soft",
    max_candidates: int | None = None,
    group=None,
) -> torch.Tensor:
    """Votes of every candidate of every request (with ``group``: summed over its ranks' heads).

    Returns:
        [B, max_candidates] float32; column ``j`` is position ``n_init + j``; columns at
        or past a request's candidate count hold -inf.
    """
    counts = candidate_counts(seq_lens, n_init, n_local).tolist()
    width = max(counts + [0]) if max_candidates is None else max_candidates
    out = torch.full((q.shape[0], width), NEG_INF, dtype=torch.float32, device=q.device)
    for b, count in enumerate(counts):
        if count == 0:
            continue
        row = int(req_pool_indices[b])
        slots = req_to_token[row, n_init : n_init + count].long()
        scores = head_scores_reference(q[b], k_buffer[slots], scale)
        out[b, :count] = vote_from_scores(scores, vote)
    return all_reduce_sum(out, group)


def topk_positions_reference(
    votes: torch.Tensor, seq_lens: torch.Tensor, *, n_init: int, n_local: int, topk: int
) -> torch.Tensor:
    """Logical positions of the ``topk`` best candidates, ascending.

    Returns:
        [B, topk] int32; rows that are not sparse (L <= budget) hold -1.
    """
    out = torch.full((votes.shape[0], topk), -1, dtype=torch.int32, device=votes.device)
    sparse = is_sparse(seq_lens, n_init, n_local, topk).tolist()
    for b, is_sp in enumerate(sparse):
        if is_sp:
            best = torch.topk(votes[b], topk).indices
            out[b] = (torch.sort(best).values + n_init).to(torch.int32)
    return out


def selection_positions(
    topk_positions: torch.Tensor, seq_len: int, *, n_init: int, n_local: int, topk: int
) -> torch.Tensor:
    """[n] int64 logical positions attended by one request (dense or init+topk+local)."""
    if seq_len <= n_init + topk + n_local:
        return torch.arange(seq_len, device=topk_positions.device)
    dev = topk_positions.device
    return torch.cat(
        [
            torch.arange(n_init, device=dev),
            topk_positions.long(),
            torch.arange(seq_len - n_local, seq_len, device=dev),
        ]
    )


def kv_indptr_reference(seq_lens: torch.Tensor, *, n_init: int, n_local: int, topk: int) -> torch.Tensor:
    """[B + 1] int32 offsets of each request's selection in ``kv_indices``."""
    lens = selected_lens(seq_lens, n_init, n_local, topk)
    indptr = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
    indptr[1:] = torch.cumsum(lens, 0).to(torch.int32)
    return indptr


def assemble_kv_indices_reference(
    topk_positions: torch.Tensor,
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
    """Write each request's selected physical slots at ``kv_indices[kv_indptr[b]:]``."""
    for b, seq_len in enumerate(seq_lens.tolist()):
        pos = selection_positions(topk_positions[b], seq_len, n_init=n_init, n_local=n_local, topk=topk)
        start = int(kv_indptr[b])
        row = int(req_pool_indices[b])
        kv_indices[start : start + pos.numel()] = req_to_token[row, pos].to(kv_indices.dtype)


COUNTERS = ("hits", "misses", "dense", "overflow")  # Selection Cache counters, in this order


def check_threshold(threshold: float) -> None:
    """Selection Cache thresholds live in [-1, 1]: -1 always reuses, 1 never does."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"cache threshold must be in [-1, 1], got {threshold!r}")


def cosine_partials(q_flat: torch.Tensor, cached_q: torch.Tensor) -> torch.Tensor:
    """[B, F] x 2 -> [B, 3] float32 ``(q.c, |q|^2, |c|^2)``: additive over a split of F."""
    a, c = q_flat.float(), cached_q.float()
    return torch.stack([(a * c).sum(-1), (a * a).sum(-1), (c * c).sum(-1)], dim=-1)


def selection_cache_hits_reference(
    q_flat: torch.Tensor, cached_q: torch.Tensor, cached_valid: torch.Tensor, threshold: float, group=None
) -> torch.Tensor:
    """[B] bool: the cached selection is valid and ``cos(q, cached_q) >= threshold``.

    Args:
        q_flat, cached_q: [B, H_q * D] (with ``group``: this rank's heads); cached_valid: [B] bool.
    A threshold of 1 never hits (every step selects); -1 always hits a valid selection (a
    request selects once, then reuses: static selection). Neither communicates.
    """
    check_threshold(threshold)
    if threshold >= 1.0:
        return torch.zeros_like(cached_valid, dtype=torch.bool)
    if threshold <= -1.0:
        return cached_valid.clone()
    dot, qq, cc = all_reduce_sum(cosine_partials(q_flat, cached_q), group).unbind(-1)
    cos = dot / (qq * cc).sqrt().clamp_min(1e-6)
    return cached_valid & (cos >= threshold)


def fitting_misses(seq_lens: torch.Tensor, miss: torch.Tensor, *, n_init: int, n_local: int,
                   capacity: int | None, block_n: int = 64) -> torch.Tensor:
    """[B] bool: miss rows whose candidates fit the scratch when the miss rows' candidates are
    laid end to end in batch order, each rounded up to whole blocks of ``block_n``."""
    if capacity is None:
        return miss.clone()
    need = torch.where(miss, -(-candidate_counts(seq_lens, n_init, n_local) // block_n) * block_n, 0)
    return miss & (torch.cumsum(need, 0) <= capacity)


def decode_select_reference(
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
    *,
    n_init: int,
    n_local: int,
    topk: int,
    threshold: float,
    scale: float,
    vote: str = "soft",
    capacity: int | None = None,
    block_n: int = 64,
    group=None,
) -> None:
    """One layer's TokenSelect decode step, the specification of ``triton_select.decode_select``.

    Per request (L = its length, budget = n_init + topk + n_local):
    - L <= budget, *dense*: attends positions 0..L-1; counted as dense unless L <= 1 (CUDA
      graph padding). The cache row is not touched.
    - a valid cached selection with ``cos(q, cached q) >= threshold`` is a *hit*: attends
      ``[0, n_init) + cached positions + [L - n_local, L)``.
    - otherwise a *miss*: the query is cached, the ``topk`` best-voted candidates
      (``[n_init, L - n_local)``) are selected, cached and marked valid. A miss row whose
      candidates do not fit ``capacity`` (``fitting_misses``) takes the ``topk`` candidates just
      before its local window instead, is left invalid and counts as overflow.
    Args:
        cache_query [R, H_q * D], cache_positions [R, topk] int32, cache_valid [R] bool: one
        layer's Selection Cache, updated in place. counters [4] int64 (``COUNTERS``), added to.
        Other shapes: see the module docstring and ``assemble_kv_indices_reference``.
    """
    rows = req_pool_indices.long()
    sparse = is_sparse(seq_lens, n_init, n_local, topk)
    hit = selection_cache_hits_reference(q.flatten(1), cache_query[rows], cache_valid[rows], threshold,
                                         group) & sparse
    miss = sparse & ~hit
    fits = fitting_misses(seq_lens, miss, n_init=n_init, n_local=n_local, capacity=capacity, block_n=block_n)
    positions = torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=q.device)
    for b in range(q.shape[0]):
        row, length = int(rows[b]), int(seq_lens[b])
        one = slice(b, b + 1)
        if hit[b]:
            positions[b] = cache_positions[row]
        elif fits[b]:
            votes = vote_scores_reference(q[one], k_buffer, req_to_token, req_pool_indices[one],
                                          seq_lens[one], n_init=n_init, n_local=n_local, scale=scale, vote=vote,
                                          group=group)
            positions[b] = topk_positions_reference(votes, seq_lens[one], n_init=n_init, n_local=n_local, topk=topk)[0]
        elif miss[b]:  # no room in the scratch
            positions[b] = torch.arange(length - n_local - topk, length - n_local, dtype=torch.int32)
        if miss[b]:
            cache_query[row] = q[b].flatten().to(cache_query.dtype)
            cache_positions[row] = positions[b]
            cache_valid[row] = bool(fits[b])
    tally = [hit.sum(), miss.sum(), (~sparse & (seq_lens > 1)).sum(), (miss & ~fits).sum()]
    counters += torch.stack(tally).to(counters)
    assemble_kv_indices_reference(positions, req_to_token, req_pool_indices, seq_lens, kv_indptr,
                                  kv_indices, n_init=n_init, n_local=n_local, topk=topk)


def paged_decode_attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    logit_cap: float = 0.0,
    rope: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Decode attention of each request over the slots listed for it: the paged prefill below
    with one query per request (its last position sees every listed slot).

    Args:
        q: [B, H_q, D]; k_buffer: [S, H_kv, D]; v_buffer: [S, H_kv, Dv].
        rope: ``(theta, scale)``: FlashInfer's ``ROPE_LLAMA`` over the attended list (length
            extrapolation; q and the cached keys are pre-RoPE): the key listed ``j``-th is rotated
            to position ``j`` and the query to ``n - 1`` (n = keys listed: the current token's key,
            listed last, shares the query's position). None: q and keys are used as stored.
    Returns:
        [B, H_q, Dv] in q's dtype, accumulated in float32.
    """
    one_query_each = torch.arange(q.shape[0] + 1, device=kv_indptr.device)
    return paged_prefill_attention_reference(q, k_buffer, v_buffer, one_query_each, kv_indptr, kv_indices,
                                             scale, logit_cap, rope)


# ----------------------------------------------------------------------------- sparse prefill
#
# Chunk-wise sparse prefill (the paper's prefill variant). An extend of positions [P, P + E)
# is cut into sub-chunks on the absolute grid of ``chunk`` positions: the pieces of
# [j * chunk, (j + 1) * chunk) that fall inside [P, P + E). A sub-chunk ending at ``e`` (its
# last query is at e - 1) is one row of the decode selection with length ``e``: its query is
# the mean of its queries, its candidates are [n_init, e - n_local), and it attends everything
# when e <= budget. Its own queries lie in its local window (n_local >= chunk), where the
# attention is causal.


def prefill_subchunks_reference(prefix_len: int, extend_len: int, chunk: int) -> list[tuple[int, int]]:
    """Absolute ``(start, end)`` of the sub-chunks of one request's extend, in order."""
    out, pos, end = [], prefix_len, prefix_len + extend_len
    while pos < end:
        stop = min(end, (pos // chunk + 1) * chunk)
        out.append((pos, stop))
        pos = stop
    return out


def subchunk_mean_queries_reference(q: torch.Tensor, qo_indptr: torch.Tensor) -> torch.Tensor:
    """Mean query of each sub-chunk: [T, H_q, D] -> [N, H_q, D], averaged in float32 and
    rounded to q's dtype (the selection kernels read queries in the model dtype)."""
    means = [q[int(qo_indptr[i]) : int(qo_indptr[i + 1])].float().mean(0) for i in range(qo_indptr.numel() - 1)]
    if not means:
        return q.new_empty((0,) + tuple(q.shape[1:]))
    return torch.stack(means).to(q.dtype)


def sparse_prefill_select_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    prefix_lens: list[int],
    extend_lens: list[int],
    *,
    chunk: int,
    n_init: int,
    n_local: int,
    topk: int,
    scale: float,
    vote: str = "soft",
    group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection of every sub-chunk of an extend batch, as a paged prefill's index lists
    (``group``: votes summed over the TP ranks' heads, as in ``decode_select_reference``).

    Args:
        q: [T, H_q, D] the extend's queries, request after request (T = sum of extend_lens).
        prefix_lens, extend_lens: host ints per request (P and E).
    Returns:
        qo_indptr [N + 1] int32 (queries of sub-chunk i are q[qo_indptr[i]:qo_indptr[i+1]]),
        kv_indptr [N + 1] int32 (cumsum of min(e, budget)), and kv_indices [kv_indptr[N]] int32:
        each sub-chunk's attended physical slots, init then top-k (ascending) then local, so
        its own queries are the last entries (bottom-right aligned causal mask).
    """
    bounds = [(b, s, e) for b, (p, n) in enumerate(zip(prefix_lens, extend_lens))
              for s, e in prefill_subchunks_reference(p, n, chunk)]
    dev = q.device
    qo_indptr = torch.zeros(len(bounds) + 1, dtype=torch.int32, device=dev)
    qo_indptr[1:] = torch.cumsum(torch.tensor([e - s for _, s, e in bounds], dtype=torch.long), 0).to(dev)
    ends = torch.tensor([e for _, _, e in bounds], dtype=torch.long, device=dev)
    rows = req_pool_indices.long()[torch.tensor([b for b, _, _ in bounds], dtype=torch.long, device=dev)]
    means = subchunk_mean_queries_reference(q, qo_indptr)
    votes = vote_scores_reference(means, k_buffer, req_to_token, rows, ends,
                                  n_init=n_init, n_local=n_local, scale=scale, vote=vote, group=group)
    top = topk_positions_reference(votes, ends, n_init=n_init, n_local=n_local, topk=topk)
    kv_indptr = kv_indptr_reference(ends, n_init=n_init, n_local=n_local, topk=topk)
    kv_indices = torch.empty(int(kv_indptr[-1]), dtype=torch.int32, device=dev)
    assemble_kv_indices_reference(top, req_to_token, rows, ends, kv_indptr, kv_indices,
                                  n_init=n_init, n_local=n_local, topk=topk)
    return qo_indptr, kv_indptr, kv_indices


def paged_prefill_attention_reference(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    qo_indptr: torch.Tensor,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    scale: float,
    logit_cap: float = 0.0,
    rope: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Causal attention of each query segment over the slots listed for it, FlashInfer's
    paged prefill semantics: query i of a segment of n queries over m slots sees slots
    ``[0, m - n + i]`` (the mask is aligned at the bottom right).

    Args:
        q: [T, H_q, D]; k_buffer: [S, H_kv, D]; v_buffer: [S, H_kv, Dv];
        qo_indptr, kv_indptr: [N + 1]; kv_indices: [kv_indptr[N]].
        rope: ``(theta, scale)``: FlashInfer's ``ROPE_LLAMA`` over the attended list (q and keys
            pre-RoPE): the key listed ``j``-th at position ``j``, query ``i`` at ``m - n + i``.
    Returns:
        [T, H_q, Dv] in q's dtype, accumulated in float32.
    """
    heads = kv_head_of(q.shape[1], k_buffer.shape[1]).to(q.device)
    out = torch.empty(q.shape[0], q.shape[1], v_buffer.shape[-1], dtype=q.dtype, device=q.device)
    for i in range(qo_indptr.numel() - 1):
        q0, q1 = int(qo_indptr[i]), int(qo_indptr[i + 1])
        slots = kv_indices[int(kv_indptr[i]) : int(kv_indptr[i + 1])].long()
        n, m = q1 - q0, slots.numel()
        keys = k_buffer[slots].float()[:, heads, :]  # [m, H_q, D]
        values = v_buffer[slots].float()[:, heads, :]
        qi = q[q0:q1].float()
        if rope is not None:
            keys = rope_rotate_reference(keys, torch.arange(m, device=q.device), *rope)
            qi = rope_rotate_reference(qi, torch.arange(m - n, m, device=q.device), *rope)
        logits = torch.einsum("thd,mhd->htm", qi, keys) * scale
        if logit_cap > 0:
            logits = logit_cap * torch.tanh(logits / logit_cap)
        visible = torch.arange(m, device=q.device)[None, :] <= (m - n + torch.arange(n, device=q.device))[:, None]
        logits = logits.masked_fill(~visible, NEG_INF)
        out[q0:q1] = torch.einsum("htm,mhd->thd", torch.softmax(logits, dim=-1), values).to(q.dtype)
    return out


# ----------------------------------------------------------------------------- length extrapolation
#
# RoPE as FlashInfer's ``ROPE_LLAMA`` and SGLang's ``RotaryEmbedding`` (NeoX style) apply it:
# the pairs are ``(x[j], x[j + D/2])``, rotated by ``angle(p, j) = (p / scale) * theta ** (-2j/D)``.
# With extrapolation the pool holds pre-RoPE keys: the backend un-rotates the model's rotated
# q and k by their true positions (float32), stores k, attends with RoPE over positions in the
# attended list, and selects with the query rotated to the fixed position ``n_local``.


def rope_inv_freq_reference(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[D/2] float32 ``theta ** (-2j / D)`` (SGLang's ``RotaryEmbedding._compute_inv_freq``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


def rope_angles_reference(positions: torch.Tensor, head_dim: int, theta: float, scale: float = 1.0) -> torch.Tensor:
    """[T] positions -> [T, D/2] float32 angles ``(p / scale) * inv_freq`` (one float32 product:
    SGLang's cos/sin cache rounds them the same way)."""
    inv_freq = rope_inv_freq_reference(head_dim, theta, positions.device)
    return (positions.float() / scale)[:, None] * inv_freq[None, :]


def rope_rotate_by_angles_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE by explicit angles: x [T, H, D], angles [T, D/2] -> [T, H, D] float32."""
    half = x.shape[-1] // 2
    x = x.float()
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def rope_rotate_reference(x: torch.Tensor, positions: torch.Tensor, theta: float, scale: float = 1.0) -> torch.Tensor:
    """RoPE of x [T, H, D] at positions [T]: [T, H, D] float32."""
    return rope_rotate_by_angles_reference(x, rope_angles_reference(positions, x.shape[-1], theta, scale))


def rope_unrotate_reference(x: torch.Tensor, positions: torch.Tensor, theta: float, scale: float = 1.0) -> torch.Tensor:
    """Undo the RoPE of x [T, H, D] at positions [T] (the angles' exact negation): [T, H, D] float32."""
    return rope_rotate_by_angles_reference(x, -rope_angles_reference(positions, x.shape[-1], theta, scale))


def extrapolation_qk_reference(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, *, theta: float, scale: float, n_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backend's inputs under length extrapolation, from the model's rotated q and k.

    Args:
        q: [T, H_q, D], k: [T, H_kv, D] rotated by SGLang at ``positions`` [T].
    Returns:
        q_pre [T, H_q, D] (q's dtype): q with its rotation undone (FlashInfer re-applies RoPE);
        k_pre [T, H_kv, D] (k's dtype): the key stored in the pool;
        q_sel [T, H_q, D] (q's dtype): q_pre rotated to position ``n_local`` (from the float32
        q_pre, one rounding), the selection's query against pre-RoPE keys.
    """
    q_pre = rope_unrotate_reference(q, positions, theta, scale)
    k_pre = rope_unrotate_reference(k, positions, theta, scale)
    at_local = torch.full_like(positions, n_local)
    q_sel = rope_rotate_reference(q_pre, at_local, theta, scale)
    return q_pre.to(q.dtype), k_pre.to(k.dtype), q_sel.to(q.dtype)
