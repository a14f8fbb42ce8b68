"""Chunk-wise sparse prefill on CPU: the sub-chunk plan, the selection driver (PyTorch
reference and the Triton kernels through Triton's interpreter) and the backend's sparse extend
through SGLang's attention test kit, against a reference written in this file.

Every check draws fresh random inputs (the seed is in the failure message). Index buffers are
poisoned first, and so are the KV pool slots outside the batch's contexts: a read of a slot
that no request owns turns the output into NaN. Top-k sets are compared by value threshold
against votes computed here, not by order.
"""

from __future__ import annotations

import random

import pytest
import torch

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

from sglang_tokenselect.backend import TokenSelectTorchBackend
from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.prefill import build_step, plan_subchunks, select_subchunks, subchunk_bounds
from sglang_tokenselect.selection import TorchSelectionOps
from ts_fixtures import ATOL, RTOL, build, extend_case, forward, fresh_seed, make_batch

N_INIT, N_LOCAL, TOPK = 2, 6, 8  # budget 16
BUDGET = N_INIT + TOPK + N_LOCAL
POISON = -7


def config(chunk=4, **overrides) -> TokenSelectConfig:
    return TokenSelectConfig(**{**dict(n_init=N_INIT, n_local=N_LOCAL, topk=TOPK, cache_threshold=1.0,
                                       sparse_prefill=True, prefill_chunk=chunk), **overrides})


# ----------------------------------------------------------------------------- the plan


def brute_force_subchunks(prefix, extend, chunk):
    """Group the extend's positions by grid cell ``pos // chunk``."""
    cells: dict[int, list[int]] = {}
    for pos in range(prefix, prefix + extend):
        cells.setdefault(pos // chunk, []).append(pos)
    return [(ps[0], ps[-1] + 1) for _, ps in sorted(cells.items())]


def test_subchunk_bounds_match_the_reference_and_the_grid():
    rng = random.Random(fresh_seed())
    for _ in range(50):
        chunk = rng.randint(1, 9)
        prefix = [rng.randint(0, 40) for _ in range(rng.randint(1, 5))]
        extend = [rng.choice([0, 1, rng.randint(1, 50)]) for _ in prefix]
        req, start, end = subchunk_bounds(prefix, extend, chunk)
        want = [(b, s, e) for b, (p, n) in enumerate(zip(prefix, extend)) for s, e in brute_force_subchunks(p, n, chunk)]
        assert list(zip(req.tolist(), start.tolist(), end.tolist())) == want, (prefix, extend, chunk)
        assert [(s, e) for b, s, e in want if b == 0] == ref.prefill_subchunks_reference(prefix[0], extend[0], chunk)


def test_a_prompt_is_cut_the_same_however_it_is_chunked():
    """Chunked prefill or a radix hit at ``cut`` splits only the sub-chunk that holds ``cut``."""
    rng = random.Random(fresh_seed())
    for _ in range(30):
        chunk, length = rng.randint(2, 8), rng.randint(10, 60)
        cut = rng.randint(1, length - 1)
        whole = ref.prefill_subchunks_reference(0, length, chunk)
        parts = ref.prefill_subchunks_reference(0, cut, chunk) + ref.prefill_subchunks_reference(cut, length - cut, chunk)
        split = [(s, e) for s, e in whole if s < cut < e]
        assert [x for x in parts if x not in whole] == ([(split[0][0], cut), (cut, split[0][1])] if split else [])
        assert [x for x in whole if x not in parts] == split


def test_plan_indptrs_and_selection_groups():
    rng = random.Random(fresh_seed())
    for _ in range(30):
        cfg = config(chunk=rng.randint(1, N_LOCAL))
        prefix = [rng.randint(0, 70) for _ in range(rng.randint(1, 4))]
        extend = [rng.randint(1, 60) for _ in prefix]
        capacity, max_rows = rng.choice([None, 64, 200, 1000]), rng.randint(1, 6)
        plan = plan_subchunks(prefix, extend, cfg, capacity=capacity, max_rows=max_rows)
        lens = plan.end - plan.start
        assert plan.qo_indptr.dtype == plan.kv_indptr.dtype == torch.int32
        assert plan.qo_indptr.tolist() == [0] + torch.cumsum(lens, 0).tolist()
        assert plan.num_tokens == sum(extend)
        assert plan.kv_indptr.tolist() == ref.kv_indptr_reference(plan.end, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK).tolist()
        assert plan.sparse == any(p + e > BUDGET for p, e in zip(prefix, extend))
        flat = [i for lo, hi in plan.groups for i in range(lo, hi)]
        assert flat == list(range(plan.num_rows)) and all(hi - lo <= max_rows for lo, hi in plan.groups)
        need = torch.where(plan.end > BUDGET, -(-(plan.end - N_INIT - N_LOCAL) // 64) * 64, 0)
        for lo, hi in plan.groups:
            if capacity is not None and hi - lo > 1:
                assert int(need[lo:hi].sum()) <= capacity
        # what the selection reads for these rows: reference.fitting_misses keeps every sparse row
        if capacity is not None:
            for lo, hi in plan.groups:
                miss = plan.end[lo:hi] > BUDGET
                fits = ref.fitting_misses(plan.end[lo:hi], miss, n_init=N_INIT, n_local=N_LOCAL, capacity=capacity)
                assert bool((fits == miss).all()) or (hi - lo == 1 and int(need[lo]) > capacity)


def test_tile_matches_the_kernels():
    from sglang_tokenselect import prefill
    from sglang_tokenselect.kernels import triton_select

    assert prefill.TILE == triton_select.BLOCK_N


# ----------------------------------------------------------------------------- the selection driver


def selection_case(seed, prefix, extend, *, num_kv_heads=2, group=2, head_dim=16, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    lens = [p + e for p, e in zip(prefix, extend)]
    rows_total, width = len(lens) + 2, max(lens) + 3
    n_slots = rows_total * width + 11
    req_to_token = torch.randperm(n_slots, generator=gen)[: rows_total * width].view(rows_total, width).int()
    pool = torch.randperm(rows_total, generator=gen)[: len(lens)]
    q = torch.randn(sum(extend), num_kv_heads * group, head_dim, generator=gen).to(dtype)
    k_buffer = torch.randn(n_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    return q, k_buffer, req_to_token, pool


def check_selection(got_indptr, got_indices, want_indptr, want_indices, votes_of, ends, msg):
    """Same per-row slot lists: init and local exactly, top-k by value threshold."""
    assert torch.equal(got_indptr.long(), want_indptr.long()), msg
    assert (got_indices != POISON).all(), f"unwritten kv_indices {msg}"
    for i, e in enumerate(ends):
        got = got_indices[int(want_indptr[i]) : int(want_indptr[i + 1])]
        want = want_indices[int(want_indptr[i]) : int(want_indptr[i + 1])]
        if e <= BUDGET:
            assert torch.equal(got, want), f"dense row {i} {msg}"
            continue
        assert torch.equal(got[:N_INIT], want[:N_INIT]) and torch.equal(got[-N_LOCAL:], want[-N_LOCAL:]), f"row {i} {msg}"
        votes, slot_to_pos = votes_of(i)
        chosen = torch.tensor([slot_to_pos[int(s)] for s in got[N_INIT:-N_LOCAL]])
        assert chosen.unique().numel() == TOPK, f"duplicate positions row {i} {msg}"
        idx = chosen - N_INIT
        kth = torch.topk(votes, TOPK).values[-1].item()
        tol = 2e-2 * abs(kth) + 1e-30
        assert votes[idx].min().item() >= kth - tol, f"a chosen vote is below the k-th, row {i} {msg}"
        must = set((votes > kth + tol).nonzero().flatten().tolist())
        assert must <= set(idx.tolist()), f"a clearly better candidate was left out, row {i} {msg}"


@pytest.mark.parametrize("ops_name, chunk", [("reference", 4), ("reference", 6), ("triton", 6)])
def test_select_subchunks_matches_the_reference(ops_name, chunk):
    seed = fresh_seed()
    # below the budget, from 0, radix hits mid sub-chunk (the interpreter is slow: fewer rows)
    prefix, extend = ([0, 0, 13, 30], [9, 40, 20, 17]) if ops_name == "reference" else ([0, 13], [9, 30])
    q, k_buffer, req_to_token, pool = selection_case(seed, prefix, extend)
    cfg = config(chunk=chunk)
    if ops_name == "triton":
        from sglang_tokenselect.kernels import triton_select as ops
    else:
        ops = TorchSelectionOps()
    capacity = 2 * 64  # several groups: the scratch holds two sparse rows at most
    scratch = ops.alloc_scratch(2, capacity, q.shape[1], "cpu")  # and two rows per call
    plan = plan_subchunks(prefix, extend, cfg, capacity=scratch.capacity, max_rows=scratch.max_batch)
    assert len(plan.groups) > 2
    flat = q.shape[1] * q.shape[2]
    step = build_step(plan, req_to_token, pool, query_width=flat, topk=TOPK, dtype=q.dtype)
    step.kv_indices.fill_(POISON)
    select_subchunks(ops, step, q, k_buffer, scratch, cfg, scale=1.0)
    assert int(step.counters[3]) == 0, "no sub-chunk may overflow the scratch"

    want_qo, want_kv, want_idx = ref.sparse_prefill_select_reference(
        q, k_buffer, req_to_token, pool, prefix, extend, chunk=chunk, n_init=N_INIT, n_local=N_LOCAL,
        topk=TOPK, scale=1.0)
    assert torch.equal(plan.qo_indptr, want_qo)
    means = ref.subchunk_mean_queries_reference(q, want_qo)
    rows = pool[plan.req]

    def votes_of(i):
        e, row = int(plan.end[i]), int(rows[i])
        v = ref.vote_scores_reference(means[i : i + 1], k_buffer, req_to_token, rows[i : i + 1],
                                      plan.end[i : i + 1], n_init=N_INIT, n_local=N_LOCAL, scale=1.0)[0]
        return v, {int(req_to_token[row, p]): p for p in range(e)}

    check_selection(step.kv_indptr, step.kv_indices, want_kv, want_idx, votes_of, plan.end.tolist(),
                    f"seed {seed} ops {ops_name}")


def test_paged_prefill_reference_is_bottom_right_causal():
    """Dense rows over all of a request's slots: equal to causal SDPA with a prefix."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    p, n, h, d = 5, 7, 2, 8
    q = torch.randn(n, h, d, generator=gen)
    k, v = torch.randn(p + n, h, d, generator=gen), torch.randn(p + n, h, d, generator=gen)
    out = ref.paged_prefill_attention_reference(q, k, v, torch.tensor([0, n]), torch.tensor([0, p + n]),
                                                torch.arange(p + n), d ** -0.5)
    mask = torch.arange(p + n)[None, :] <= (p + torch.arange(n))[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                            attn_mask=mask).transpose(0, 1)
    torch.testing.assert_close(out, want, msg=f"seed {seed}")


# ----------------------------------------------------------------------------- the backend


def grid_pieces(prefix, extend, chunk):
    """This test's own cut: for each grid cell, the part inside [prefix, prefix + extend)."""
    out = []
    for cell in range(prefix // chunk, (prefix + extend + chunk - 1) // chunk):
        s, e = max(prefix, cell * chunk), min(prefix + extend, (cell + 1) * chunk)
        if s < e:
            out.append((s, e))
    return out


def expected_sparse_extend(fx, hidden_per_req, prefix_lens, extend_lens, cfg, top_of=None) -> torch.Tensor:
    """Selection then masked attention per sub-chunk, from the kit's reference module.

    hidden_per_req[b]: [P_b + E_b, hidden] the request's whole context so far. ``top_of(b, s,
    e)``: the top-k positions to attend instead of this function's own (already checked by
    value threshold). Returns the module output of the extend's queries, [sum E, hidden].
    """
    m = fx.reference_module
    group = m.num_heads // m.num_kv_heads
    outs = []
    for b, (hidden, p, n) in enumerate(zip(hidden_per_req, prefix_lens, extend_lens)):
        q, k, v = (x.cpu() for x in m.project_qkv(hidden))  # the reference runs on the CPU
        q = q.view(-1, m.num_heads, m.head_dim).float()
        keys = k.view(-1, m.num_kv_heads, m.head_dim).float().repeat_interleave(group, dim=1)  # [L, H_q, D]
        values = v.view(-1, m.num_kv_heads, m.head_dim).float().repeat_interleave(group, dim=1)
        for s, e in grid_pieces(p, n, cfg.prefill_chunk):
            if e <= cfg.budget:
                chosen = torch.arange(e)
            else:
                mean = q[s:e].mean(0).to(hidden.dtype).float()  # the documented rounding
                cand = torch.arange(cfg.n_init, e - cfg.n_local)
                scores = torch.einsum("hd,jhd->hj", mean, keys[cand]) * cfg.score_scale
                best = cand[torch.softmax(scores, dim=1).sum(0).argsort(descending=True)[: cfg.topk]]
                if top_of is not None:
                    best = top_of(b, s, e)
                chosen = torch.cat([torch.arange(cfg.n_init), best, torch.arange(e - cfg.n_local, e)])
            for pos in range(s, e):
                keep = chosen[chosen <= pos]
                logits = torch.einsum("hd,jhd->hj", q[pos], keys[keep]) * m.scaling
                outs.append(torch.einsum("hj,jhd->hd", torch.softmax(logits, 1), values[keep]).reshape(-1))
    return m.reconstruct_output(torch.stack(outs).to(hidden_per_req[0]))


def poison_unowned_slots(fx, batch) -> None:
    """NaN in every KV slot outside the batch's contexts [0, L)."""
    pool = fx.runner.token_to_kv_pool
    owned = torch.zeros(pool.get_key_buffer(0).shape[0], dtype=torch.bool, device=pool.get_key_buffer(0).device)
    r2t = fx.runner.req_to_token_pool.req_to_token
    for b, length in enumerate(batch.seq_lens.tolist()):
        owned[r2t[int(batch.req_pool_indices[b]), :length].long()] = True
    pool.get_key_buffer(0)[~owned] = float("nan")
    pool.get_value_buffer(0)[~owned] = float("nan")


def contexts(fx, prefix_lens):
    """Each request's whole hidden context: its prefix, then its extend's inputs."""
    out, offset = [], 0
    for b, n in enumerate(fx.case.extend_lens):
        out.append(torch.cat([fx.prefix_hidden[b], fx.input_hidden[offset : offset + n]]))
        offset += n
    return out


def sparse_backend(fx, cfg, ops=None):
    return TokenSelectTorchBackend(fx.runner, cfg, ops=ops)


@pytest.mark.parametrize("chunk", [4, 6])
def test_sparse_extend_mixed_batch_and_radix_prefix(chunk):
    """Requests below and above the budget; the third one's prefix came from the radix cache
    and ends in the middle of a sub-chunk (30 = 7 * 4 + 2 = 5 * 6)."""
    case = extend_case((0, 0, 30), (10, 60, 25), num_heads=4, num_kv_heads=2, name="sparse_mixed")
    run = build(case, fresh_seed())
    fx, cfg = run.fixture, config(chunk=chunk)
    poison_unowned_slots(fx, fx.forward_batch)
    backend = sparse_backend(fx, cfg)
    actual = forward(fx, backend)
    assert backend.ts_prefill is not None and len(backend.ts_prefill.plan.groups) > 1
    expected = expected_sparse_extend(fx, contexts(fx, case.prefix_lens), case.prefix_lens, case.extend_lens, cfg)
    assert torch.isfinite(actual).all(), f"seed {run.seed}: a slot outside the contexts was read"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")
    dense = forward(fx, TorchNativeAttnBackend(fx.runner))
    torch.testing.assert_close(actual[:10], dense[:10], atol=ATOL, rtol=RTOL)  # L = 10: dense
    assert (actual[10 + 50 :70] - dense[10 + 50 :70]).abs().max() > ATOL, "late queries must differ from dense"
    # the decode Selection Cache is untouched by the extend
    assert not backend.selection_cache.valid.any() and int(backend.selection_cache.counters.sum()) == 0


def test_sparse_extend_with_the_triton_selection_through_the_interpreter():
    """The backend's extend with the Triton selection. Its votes are approximate (bf16
    probabilities), so its top-k is checked by value threshold against votes computed here,
    then the output against this file's attention over that top-k."""
    from sglang_tokenselect.kernels import triton_select

    case = extend_case((0, 21), (30, 11), num_heads=4, num_kv_heads=2, name="sparse_triton")
    run = build(case, fresh_seed(), runner_batch_size=8)
    fx, cfg = run.fixture, config(chunk=6)
    poison_unowned_slots(fx, fx.forward_batch)
    backend = sparse_backend(fx, cfg, ops=triton_select)
    actual = forward(fx, backend)
    step, seed = backend.ts_prefill, run.seed
    r2t = fx.runner.req_to_token_pool.req_to_token
    rows = fx.forward_batch.req_pool_indices.long()[step.plan.req]
    m = fx.reference_module
    hidden = contexts(fx, case.prefix_lens)
    k_buffer = fx.runner.token_to_kv_pool.get_key_buffer(0)
    qo = step.plan.qo_indptr
    q_ext = m.project_qkv(fx.input_hidden)[0].view(-1, m.num_heads, m.head_dim)
    means = ref.subchunk_mean_queries_reference(q_ext, qo)

    def votes_of(i):
        e, row = int(step.plan.end[i]), int(rows[i])
        v = ref.vote_scores_reference(means[i : i + 1], k_buffer, r2t, rows[i : i + 1], step.plan.end[i : i + 1],
                                      n_init=N_INIT, n_local=N_LOCAL, scale=1.0)[0]
        return v, {int(r2t[row, p]): p for p in range(e)}

    want_kv = ref.kv_indptr_reference(step.plan.end, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    _, _, want_idx = ref.sparse_prefill_select_reference(
        q_ext, k_buffer, r2t, fx.forward_batch.req_pool_indices, list(case.prefix_lens), list(case.extend_lens),
        chunk=6, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK, scale=1.0)
    check_selection(step.kv_indptr, step.kv_indices, want_kv, want_idx, votes_of, step.plan.end.tolist(), f"seed {seed}")

    def top_of(b, s, e):
        i = int(((step.plan.req == b) & (step.plan.start == s) & (step.plan.end == e)).nonzero())
        slots = step.kv_indices[int(step.kv_indptr[i]) + N_INIT : int(step.kv_indptr[i + 1]) - N_LOCAL]
        slot_to_pos = votes_of(i)[1]
        return torch.tensor([slot_to_pos[int(x)] for x in slots])

    expected = expected_sparse_extend(fx, hidden, case.prefix_lens, case.extend_lens, cfg, top_of=top_of)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")


def test_chunked_prefill_cutting_a_sub_chunk():
    """SGLang's chunked prefill sends a 70-token prompt as 37 + 33 tokens: the sub-chunk
    [36, 40) is selected as [36, 37) with the first extend and [37, 40) with the second, whose
    prefix K/V the backend itself wrote."""
    seed = fresh_seed()
    run = build(extend_case((0,), (37,), num_heads=4, num_kv_heads=4, name="chunk1"), seed)
    fx, cfg = run.fixture, config(chunk=4)
    gen = torch.Generator().manual_seed(seed + 1)
    prompt = torch.randn(70, fx.input_hidden.shape[1], generator=gen).to(fx.input_hidden.dtype)
    backend = sparse_backend(fx, cfg)
    # both batches map positions to slots the same way (the kit's own batch shuffles them)
    first = forward(fx, backend, make_batch(fx, extend_case((0,), (37,), name="chunk1")), prompt[:37])
    assert ((backend.ts_prefill.plan.start == 36) & (backend.ts_prefill.plan.end == 37)).any()
    second_batch = make_batch(fx, extend_case((37,), (33,), name="chunk2"))
    poison_unowned_slots(fx, second_batch)
    second = forward(fx, backend, second_batch, prompt[37:])
    assert ((backend.ts_prefill.plan.start == 37) & (backend.ts_prefill.plan.end == 40)).any()
    want_first = expected_sparse_extend(fx, [prompt[:37]], [0], [37], cfg)
    want_second = expected_sparse_extend(fx, [prompt], [37], [33], cfg)
    torch.testing.assert_close(first, want_first, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")
    torch.testing.assert_close(second, want_second, atol=ATOL, rtol=RTOL, msg=f"seed {seed}")


@pytest.mark.parametrize("lens", [((0, 0), (16, 9)), ((11, 3), (5, 13))], ids=["no_prefix", "prefix"])
def test_budget_covering_the_prompt_equals_dense_extend(lens):
    case = extend_case(*lens, num_heads=4, num_kv_heads=2, name="sparse_dense")
    run = build(case, fresh_seed())
    fx = run.fixture
    backend = sparse_backend(fx, config(chunk=4))
    actual = forward(fx, backend)
    assert backend.ts_prefill is None  # every sub-chunk ends within the budget of 16
    dense = forward(fx, TorchNativeAttnBackend(fx.runner))
    torch.testing.assert_close(actual, dense, atol=ATOL, rtol=RTOL, msg=f"seed {run.seed}")


def test_sparse_prefill_off_leaves_long_extends_dense():
    case = extend_case((0, 20), (60, 30), name="sparse_off")
    run = build(case, fresh_seed())
    fx = run.fixture
    backend = sparse_backend(fx, config(chunk=4, sparse_prefill=False))
    actual = forward(fx, backend)
    assert backend.ts_prefill is None
    torch.testing.assert_close(actual, forward(fx, TorchNativeAttnBackend(fx.runner)), atol=ATOL, rtol=RTOL,
                               msg=f"seed {run.seed}")
