"""The fused decode selection (``triton_select.decode_select``) against its PyTorch
specification (``reference.decode_select_reference``), on CPU through Triton's interpreter.

Every case draws fresh random inputs (its seed is in the failure message). Batches mix dense,
Selection Cache hit and miss rows, CUDA-graph padding rows that duplicate a real request's
pool row, and lengths on every boundary of the budget. Outputs are poisoned first so that
unwritten elements show. The chosen top-k set is checked against the fp32 reference votes
by value threshold, not by order.
"""

from __future__ import annotations

import os
import types

import pytest
import torch

from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.kernels import triton_select as ts

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N_INIT, N_LOCAL, TOPK = 4, 8, 16
BUDGET = N_INIT + TOPK + N_LOCAL
POISON = -7


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def make_case(seed, lens, *, num_kv_heads=2, group=4, head_dim=32, dtype=torch.bfloat16,
              kinds=None, padding=1, tied=False):
    """A decode batch and one layer's Selection Cache.

    ``kinds[b]`` for the cache row of request b: "hit" (valid, cached query close to q),
    "stale" (valid, unrelated cached query) or "empty" (invalid). ``padding`` rows of length 1
    are appended that reuse the pool row of the first request (CUDA-graph padding).
    ``tied``: many candidates share a KV slot, so their votes tie exactly.
    """
    gen = torch.Generator().manual_seed(seed)
    real = len(lens)
    kinds = kinds or ["empty"] * real
    rows_total = real + 3
    width = max(lens) + 5
    n_slots = rows_total * width + 13
    req_to_token = torch.randperm(n_slots, generator=gen)[: rows_total * width].view(rows_total, width)
    if tied:  # every candidate slot of a row points to one of 4 slots
        req_to_token[:, N_INIT:] = req_to_token[:, N_INIT:N_INIT + 4].repeat(1, width)[:, : width - N_INIT]
    pool = torch.randperm(rows_total, generator=gen)[:real]
    num_q_heads = num_kv_heads * group
    q = torch.randn(real, num_q_heads, head_dim, generator=gen)
    k_buffer = torch.randn(n_slots, num_kv_heads, head_dim, generator=gen)
    flat = num_q_heads * head_dim
    cache_query = torch.randn(rows_total, flat, generator=gen)
    cache_positions = torch.full((rows_total, TOPK), -1, dtype=torch.int32)
    cache_valid = torch.zeros(rows_total, dtype=torch.bool)
    for b, (length, kind) in enumerate(zip(lens, kinds)):
        row = int(pool[b])
        if kind == "hit":
            cache_query[row] = q[b].flatten() + 0.05 * torch.randn(flat, generator=gen)
        if kind in ("hit", "stale") and length > BUDGET:
            count = length - N_INIT - N_LOCAL - 1  # cached one step earlier
            cache_positions[row] = N_INIT + torch.randperm(count, generator=gen)[:TOPK].int()
            cache_valid[row] = True
    seq_lens = torch.tensor(list(lens) + [1] * padding)
    pool = torch.cat([pool, pool[:1].repeat(padding)])
    q = torch.cat([q, torch.randn(padding, num_q_heads, head_dim, generator=gen)])
    indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return dict(
        q=to(q.to(dtype)), k_buffer=to(k_buffer.to(dtype)), req_to_token=to(req_to_token.int()),
        req_pool_indices=to(pool), seq_lens=to(seq_lens), kv_indptr=to(indptr),
        kv_indices=to(torch.full((int(indptr[-1]),), POISON, dtype=torch.int32)),
        cache_query=to(cache_query.to(dtype)), cache_positions=to(cache_positions),
        cache_valid=to(cache_valid), counters=to(torch.zeros(4, dtype=torch.int64)),
    )


def clone(case):
    return {k: v.clone() for k, v in case.items()}


def run_kernel(case, scratch, **kw):
    out = clone(case)
    ts.decode_select(*out.values(), scratch, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK, **kw)
    return out


def run_reference(case, capacity, **kw):
    out = {k: v.cpu() for k, v in clone(case).items()}
    ref.decode_select_reference(*out.values(), n_init=N_INIT, n_local=N_LOCAL, topk=TOPK,
                                capacity=capacity, block_n=ts.BLOCK_N, **kw)
    return out


def reference_votes(case, b, scale, vote):
    one = slice(b, b + 1)
    c = {k: v.cpu() for k, v in case.items()}
    return ref.vote_scores_reference(c["q"][one], c["k_buffer"], c["req_to_token"], c["req_pool_indices"][one],
                                     c["seq_lens"][one], n_init=N_INIT, n_local=N_LOCAL, scale=scale, vote=vote)[0]


def check_chosen_by_threshold(chosen, votes, msg):
    """``chosen``: TOPK distinct candidate positions; every vote above the k-th largest (within
    tolerance) is in, and none below it."""
    assert chosen.unique().numel() == TOPK, f"duplicate positions {msg}"
    idx = chosen.long() - N_INIT
    assert ((idx >= 0) & (idx < votes.numel())).all(), f"position out of the candidates {msg}"
    kth = torch.topk(votes, TOPK).values[-1].item()
    tol = 2e-2 * abs(kth) + 1e-4 * votes.abs().max().item() * (votes.min() < 0).item() + 1e-30
    assert votes[idx].min().item() >= kth - tol, f"a chosen vote is below the k-th {msg}"
    must = (votes > kth + tol).nonzero().flatten()
    assert set(must.tolist()) <= set(idx.tolist()), f"a clearly better candidate was left out {msg}"


def fresh_selections(case, *, threshold, capacity):
    """[B] bool: rows that select afresh (sparse, no cache hit, room in the scratch)."""
    c = {k: v.cpu() for k, v in case.items()}
    rows = c["req_pool_indices"]
    sparse = ref.is_sparse(c["seq_lens"], N_INIT, N_LOCAL, TOPK)
    hit = ref.selection_cache_hits_reference(c["q"].flatten(1), c["cache_query"][rows], c["cache_valid"][rows],
                                             threshold)
    return ref.fitting_misses(c["seq_lens"], sparse & ~hit, n_init=N_INIT, n_local=N_LOCAL,
                              capacity=capacity, block_n=ts.BLOCK_N)


def compare(case, got, want, *, threshold, capacity, scale, vote, msg):
    """Everything equal to the reference except the order and near-ties of fresh top-k picks."""
    assert (got["kv_indices"] != POISON).all(), f"unwritten kv_indices {msg}"
    assert torch.equal(got["counters"].cpu(), want["counters"]), f"{got['counters']} vs {want['counters']} {msg}"
    assert torch.equal(got["cache_valid"].cpu(), want["cache_valid"]), msg
    assert torch.equal(got["cache_query"].cpu(), want["cache_query"]), msg
    fresh = fresh_selections(case, threshold=threshold, capacity=capacity)
    indptr, rows = want["kv_indptr"], want["req_pool_indices"]
    reselected = set(rows[fresh].tolist())  # padding rows may share these pool rows
    for b in range(rows.numel()):
        seg = slice(int(indptr[b]), int(indptr[b + 1]))
        g, w = got["kv_indices"].cpu()[seg], want["kv_indices"][seg]
        row = int(rows[b])
        if not fresh[b]:
            assert torch.equal(g, w), f"request {b} {msg}"
            if row not in reselected:
                assert torch.equal(got["cache_positions"].cpu()[row], want["cache_positions"][row]), msg
            continue
        assert torch.equal(g[:N_INIT], w[:N_INIT]) and torch.equal(g[N_INIT + TOPK:], w[N_INIT + TOPK:]), msg
        chosen = got["cache_positions"].cpu()[row]
        assert torch.equal(g[N_INIT:N_INIT + TOPK], got["req_to_token"].cpu()[row, chosen.long()]), msg
        check_chosen_by_threshold(chosen, reference_votes(case, b, scale, vote), f"request {b} {msg}")


def check_case(case, scratch, *, threshold, scale, vote="soft", msg=""):
    kw = dict(threshold=threshold, scale=scale, vote=vote)
    got = run_kernel(case, scratch, **kw)
    want = run_reference(case, scratch.capacity, **kw)
    compare(case, got, want, capacity=scratch.capacity, msg=msg, **kw)
    return got, want


LENS = [5, N_INIT + N_LOCAL, BUDGET, BUDGET + 1, 97, 260, 700, 333]
KINDS = ["empty", "hit", "hit", "hit", "hit", "stale", "empty", "hit"]


@pytest.mark.parametrize("threshold", [-1.0, 0.9, 1.0])
@pytest.mark.parametrize("vote, scale", [("soft", 1.0), ("soft", "layer"), ("sum", 1.0)])
def test_decode_select_matches_reference(threshold, vote, scale):
    seed = fresh_seed()
    head_dim = 32
    scale = head_dim ** -0.5 if scale == "layer" else scale
    case = make_case(seed, LENS, kinds=KINDS, head_dim=head_dim, padding=2)
    scratch = ts.alloc_scratch(len(LENS) + 2, 4096, case["q"].shape[1], DEVICE)
    _, want = check_case(case, scratch, threshold=threshold, scale=scale, vote=vote, msg=f"seed {seed}")
    counts = dict(zip(ref.COUNTERS, want["counters"].tolist()))
    assert counts["dense"] == 3 and counts["overflow"] == 0, counts  # padding rows not counted
    expected_hits = {-1.0: 4, 0.9: 3, 1.0: 0}[threshold]  # "stale" hits only when static
    assert counts["hits"] == expected_hits, counts


@pytest.mark.skipif(DEVICE != "cuda" or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs an sm_90+ GPU")
@pytest.mark.parametrize("threshold", [-1.0, 1.0])
@pytest.mark.parametrize("vote", ["soft", "sum"])
def test_decode_select_with_programmatic_dependent_launch(monkeypatch, threshold, vote):
    """The five kernels launched with PDL (each waits for the previous) compute the reference's
    selection, twice in a row (the second launch of each kernel uses its learnt grid cap)."""
    monkeypatch.setattr(ts, "USE_PDL", True)
    seed = fresh_seed()
    case = make_case(seed, LENS, kinds=KINDS, head_dim=32, padding=2)
    scratch = ts.alloc_scratch(len(LENS) + 2, 4096, case["q"].shape[1], DEVICE)
    for _ in range(2):
        check_case(case, scratch, threshold=threshold, scale=1.0, vote=vote, msg=f"seed {seed}")


@pytest.mark.parametrize("heads, head_dim, dtype", [
    ((1, 8), 64, torch.float16),   # MQA-like group of 8
    ((4, 1), 16, torch.bfloat16),  # MHA
    ((2, 3), 32, torch.bfloat16),  # group of 3: padded and masked
])
def test_decode_select_head_layouts(heads, head_dim, dtype):
    seed = fresh_seed()
    lens = [BUDGET + 1, 150, 411]
    case = make_case(seed, lens, num_kv_heads=heads[0], group=heads[1], head_dim=head_dim, dtype=dtype,
                     kinds=["empty", "stale", "hit"])
    scratch = ts.alloc_scratch(len(lens) + 1, 1024, case["q"].shape[1], DEVICE)
    check_case(case, scratch, threshold=0.9, scale=1.0, msg=f"seed {seed}")


def test_decode_select_exact_ties_take_exactly_topk():
    seed = fresh_seed()
    lens = [300, 1500]
    case = make_case(seed, lens, tied=True)
    scratch = ts.alloc_scratch(3, 2048, case["q"].shape[1], DEVICE)
    check_case(case, scratch, threshold=1.0, scale=1.0, msg=f"seed {seed}")


def test_decode_select_overflow_falls_back_to_recent_window():
    """Miss rows beyond the scratch capacity take the window before n_local and stay uncached."""
    seed = fresh_seed()
    lens = [700, 700, 700]  # 688 candidates = 11 tiles each
    case = make_case(seed, lens, padding=0)
    scratch = ts.alloc_scratch(3, 700 - 2 * ts.BLOCK_N, case["q"].shape[1], DEVICE)  # 9 + 3 tiles
    got, want = check_case(case, scratch, threshold=0.9, scale=1.0, msg=f"seed {seed}")
    assert dict(zip(ref.COUNTERS, want["counters"].tolist())) == dict(hits=0, misses=3, dense=0, overflow=2)
    window = torch.arange(700 - N_LOCAL - TOPK, 700 - N_LOCAL, dtype=torch.int32)
    for b in (1, 2):
        row = int(case["req_pool_indices"][b])
        assert torch.equal(got["cache_positions"].cpu()[row], window)


def test_two_layers_share_the_scratch_and_hits_follow_misses():
    """Layer 0 then layer 1 on one scratch; then a second step where the cache hits."""
    seed = fresh_seed()
    lens = [200, 450, 20]
    case = make_case(seed, lens, padding=0)
    scratch = ts.alloc_scratch(3, 2048, case["q"].shape[1], DEVICE)
    for _ in range(2):  # the second run reuses scratch the first one filled
        step, _ = check_case(case, scratch, threshold=0.5, scale=1.0, msg=f"seed {seed}")
    step["kv_indices"].fill_(POISON)
    again = run_kernel(step, scratch, threshold=0.5, scale=1.0)  # same queries: both sparse rows hit
    assert (again["kv_indices"] != POISON).all()
    assert again["counters"].tolist() == [2, 2, 2, 0]
    assert torch.equal(again["cache_positions"], step["cache_positions"])


def test_decode_select_rejects_bad_inputs():
    case = make_case(fresh_seed(), [50], padding=0)
    scratch = ts.alloc_scratch(1, 256, case["q"].shape[1], DEVICE)
    with pytest.raises(ValueError, match="threshold"):
        run_kernel(case, scratch, threshold=1.5, scale=1.0)
    small = ts.alloc_scratch(1, 256, case["q"].shape[1] * 2, DEVICE)
    with pytest.raises(ValueError, match="scratch"):
        run_kernel(case, small, threshold=0.9, scale=1.0)


def concentrate_votes(case, lens, seed, noise=2e-3):
    """Every candidate key of request b becomes its kv group's summed query direction plus a
    little noise: all votes of a row within ~1 % of each other, distinct, and positive."""
    gen = torch.Generator().manual_seed(seed)
    k_buffer, q = case["k_buffer"].cpu().float(), case["q"].cpu().float()
    num_kv = k_buffer.shape[1]
    for b, length in enumerate(lens):
        row = int(case["req_pool_indices"][b])
        slots = case["req_to_token"].cpu()[row, N_INIT:length - N_LOCAL].long()
        direction = q[b].view(num_kv, -1, q.shape[-1]).sum(1)  # [H_kv, D]
        direction = direction / direction.norm(dim=-1, keepdim=True)
        k_buffer[slots] = direction + noise * torch.randn(slots.numel(), *direction.shape, generator=gen)
    case["k_buffer"] = k_buffer.to(case["k_buffer"].dtype).to(DEVICE)


@pytest.mark.parametrize("vote", ["soft", "sum"])
@pytest.mark.parametrize("keys", ["one_key", "exact_ties", "near_ties"])
def test_rows_of_equal_or_nearly_equal_votes(monkeypatch, vote, keys):
    """Rows whose votes are all equal (one KV slot for every candidate, like SGLang's dummy
    weights), a few values (4 slots) or nearly equal. A 16-entry register finisher forces the
    in-memory narrowing of any longer tie list."""
    monkeypatch.setattr(ts, "SELECT_LIST_MAX", 16)
    monkeypatch.setattr(ts, "SELECT_BLOCK", 64)  # several blocks per in-memory pass
    seed = fresh_seed()
    lens = [1500, 600]
    case = make_case(seed, lens, tied=keys != "near_ties", padding=0)
    if keys == "one_key":
        case["req_to_token"][:, N_INIT:] = case["req_to_token"][:, N_INIT:N_INIT + 1]
        # q and K on a 1/16 grid in [-4, 4]: every q.k is exact in fp32 whatever the summation
        # order, so all candidates of a row score exactly alike (as on a GPU with dummy weights;
        # the interpreter's dot otherwise rounds rows differently, and its bf16 conversion
        # truncates, turning those ulps into distinct probabilities).
        for name in ("q", "k_buffer"):
            case[name] = ((case[name].float() * 16).round().clamp(-64, 64) / 16).to(case[name].dtype)
    if keys == "near_ties":
        concentrate_votes(case, lens, seed)
    scratch = ts.alloc_scratch(2, 2048, case["q"].shape[1], DEVICE)
    check_case(case, scratch, threshold=1.0, scale=1.0, vote=vote, msg=f"seed {seed}")
    if keys == "one_key" and vote == "soft":  # equal votes are taken by rank: no tie list
        radix = scratch.radix.cpu()
        assert (radix[:, ts.RADIX_COUNTERS + 1] == 0).all() and (radix[:, ts.RADIX_COUNTERS + 7] > 0).all(), \
            f"equal votes went through a tie list: {radix[:, ts.RADIX_COUNTERS:].tolist()} seed {seed}"


@pytest.mark.parametrize("n_regs, shared, num_warps, expected", [
    (168, 21008, 4, 3),   # the score pass on sm_90: registers allow 3 of the 4 programs asked for
    (148, 4096, 4, 3),    # the vote pass
    (128, 21008, 4, 4),
    (160, 1024, 8, 1),    # the select launch
    (32, 0, 4, 16),       # threads bound (2,048 per SM)
    (32, 100_000, 4, 2),  # shared memory bound
])
def test_resident_programs_per_sm(n_regs, shared, num_warps, expected):
    """Persistent grids are capped at the programs an SM holds at once (H100/H200 limits)."""
    props = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472)
    assert ts._resident_per_sm(n_regs, shared, num_warps, props) == expected
