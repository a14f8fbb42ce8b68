"""Triton selection kernels against the PyTorch references, on CPU through Triton's interpreter.

Every case draws fresh random inputs with its own seed. Batches mix requests whose
lengths straddle every boundary of the selection, with slots scattered through a random
permutation and pool rows that are not 0..B-1. Outputs are poisoned first so that
unwritten elements show, and inactive rows must stay untouched.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.kernels import triton_select as ts

N_INIT, N_LOCAL, TOPK = 4, 8, 16
BUDGET = N_INIT + TOPK + N_LOCAL
# Lengths straddling every boundary: no candidates (L < and = n_init + n_local), fewer
# candidates than topk (dense), exactly the budget (dense, count == topk), one past the
# budget (sparse, count == topk + 1), and longer sparse requests.
BOUNDARY_LENS = [5, N_INIT + N_LOCAL, 20, BUDGET, BUDGET + 1, 97, 260]
EXTRA_COLUMNS = 5  # out columns past the longest request, which must read -inf
POISON = float("nan")


# ----------------------------------------------------------------------------- helpers


def make_batch(seed, lens, *, num_kv_heads, group, head_dim, dtype, idx_dtype=torch.int64,
               active=None, spare_rows=3):
    """Random paged inputs: scattered slots and pool rows, randn keys and queries."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(lens)
    max_ctx = max(lens) + 7
    rows = batch + spare_rows
    n_slots = rows * max_ctx + 11
    req_to_token = torch.randperm(n_slots, generator=gen)[: rows * max_ctx].view(rows, max_ctx)
    pool = torch.randperm(rows, generator=gen)[:batch]
    num_q_heads = num_kv_heads * group
    if active is None:
        active = torch.ones(batch, dtype=torch.bool)
    return dict(
        q=torch.randn(batch, num_q_heads, head_dim, generator=gen).to(dtype),
        k_buffer=torch.randn(n_slots, num_kv_heads, head_dim, generator=gen).to(dtype),
        req_to_token=req_to_token.to(torch.int32),
        req_pool_indices=pool.to(idx_dtype),
        seq_lens=torch.tensor(lens, dtype=idx_dtype),
        active=active,
    )


def rel_err(out, expected):
    return ((out - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check_votes(out, expected, active, poison_rows):
    """Exact -inf pattern and relative error on finite entries of active rows."""
    for b in range(out.shape[0]):
        if not bool(active[b]):
            assert torch.equal(out[b].isnan(), poison_rows[b].isnan()), f"inactive row {b} written"
            continue
        exp_inf = torch.isneginf(expected[b])
        assert torch.equal(torch.isneginf(out[b]), exp_inf), f"row {b}: -inf pattern differs"
        fin = ~exp_inf
        if fin.any():
            assert torch.isfinite(out[b][fin]).all(), f"row {b}: non-finite vote"
            err = rel_err(out[b][fin], expected[b][fin])
            assert err < 1e-2, f"row {b}: relative error {err:.2e}"


def run_votes(inputs, c_max, vote, scale, workspace=None):
    out = torch.full((len(inputs["seq_lens"]), c_max), POISON)
    ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=scale, vote=vote,
                   workspace=workspace)
    ref_in = {k: v for k, v in inputs.items() if k != "active"}
    expected = ref.vote_scores_reference(**ref_in, n_init=N_INIT, n_local=N_LOCAL, scale=scale,
                                         vote=vote, max_candidates=c_max)
    return out, expected


def c_max_of(lens):
    return max(lens) - N_INIT - N_LOCAL + EXTRA_COLUMNS


# ----------------------------------------------------------------------------- vote_scores

# dtype x head_dim x GQA fully crossed; H_kv alternates 2/3 so both appear with every ratio.
VOTE_CASES = [
    (dtype, head_dim, group, 3 if (i % 2) else 2)
    for i, (dtype, head_dim, group) in enumerate(
        itertools.product([torch.bfloat16, torch.float16], [64, 128], [1, 3, 4, 8])
    )
]


@pytest.mark.parametrize("dtype,head_dim,group,num_kv_heads", VOTE_CASES)
def test_soft_vote_matches_reference(dtype, head_dim, group, num_kv_heads):
    seed = 1000 + 100 * group + head_dim + (dtype == torch.float16) + num_kv_heads
    lens = BOUNDARY_LENS
    active = torch.ones(len(lens), dtype=torch.bool)
    active[[2, 5]] = False  # one dense and one sparse request skipped (Selection Cache hits)
    inputs = make_batch(seed, lens, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim,
                        dtype=dtype, active=active)
    c_max = c_max_of(lens)
    out, expected = run_votes(inputs, c_max, "soft", head_dim ** -0.5)
    check_votes(out, expected, active, torch.full_like(out, POISON))


@pytest.mark.parametrize(
    "dtype,head_dim,group,idx_dtype",
    [(torch.bfloat16, 128, 4, torch.int32), (torch.float16, 64, 3, torch.int64),
     (torch.bfloat16, 64, 1, torch.int64), (torch.float16, 128, 8, torch.int32)],
)
def test_sum_vote_matches_reference(dtype, head_dim, group, idx_dtype):
    seed = 2000 + group + head_dim
    lens = BOUNDARY_LENS[::-1]
    active = torch.tensor([1, 0, 1, 1, 1, 0, 1], dtype=torch.int8)
    inputs = make_batch(seed, lens, num_kv_heads=2, group=group, head_dim=head_dim, dtype=dtype,
                        idx_dtype=idx_dtype, active=active)
    out, expected = run_votes(inputs, c_max_of(lens), "sum", 1.0)
    check_votes(out, expected, active, torch.full_like(out, POISON))


@pytest.mark.parametrize("block_n,length", [(16, 4 * 16 * ts.LSE_BLOCK_S // 4 + 45), (128, 700)])
def test_soft_vote_block_sizes_and_long_rows(block_n, length):
    """block_n=16 with > LSE_BLOCK_S blocks exercises the multi-step statistics combine."""
    lens = [length, 50, length - 300]
    assert triton_cdiv(length - N_INIT - N_LOCAL, block_n) > ts.LSE_BLOCK_S or block_n != 16
    inputs = make_batch(3000 + block_n, lens, num_kv_heads=1, group=2, head_dim=64,
                        dtype=torch.bfloat16, active=torch.tensor([1, 1, 1], dtype=torch.int32))
    c_max = c_max_of(lens)
    ws = ts.alloc_workspace(4, c_max + 10, 2, "cpu", block_n=block_n)
    out, expected = run_votes(inputs, c_max, "soft", 0.125, workspace=ws)
    check_votes(out, expected, inputs["active"], torch.full_like(out, POISON))


def test_vote_workspace_reused_and_scale_sensitive():
    """A shared workspace serves successive calls of different shapes; a larger scale
    sharpens the softmax (checks the scale is applied before the exp)."""
    ws = ts.alloc_workspace(8, 400, 8, "cpu")
    for buf in (ws.probs, ws.block_max, ws.block_sum, ws.lse):
        buf.fill_(float("nan"))  # stale scratch must never leak into the votes
    for seed, lens, scale in [(1, [300, 40, 29], 2.0), (2, [120, 260], 0.05)]:
        inputs = make_batch(4000 + seed, lens, num_kv_heads=2, group=4, head_dim=64,
                            dtype=torch.float16)
        out, expected = run_votes(inputs, c_max_of(lens), "soft", scale, workspace=ws)
        check_votes(out, expected, inputs["active"], torch.full_like(out, POISON))


def test_vote_rejects_small_workspace():
    inputs = make_batch(5, [100], num_kv_heads=1, group=1, head_dim=64, dtype=torch.float16)
    out = torch.empty(1, 200)
    with pytest.raises(ValueError):
        ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=1.0,
                       workspace=ts.alloc_workspace(1, 100, 1, "cpu"))


def triton_cdiv(a, b):
    return -(-a // b)


# ----------------------------------------------------------------------------- topk_positions


def run_topk(votes, lens, active, topk, *, idx_dtype=torch.int64, sort=False, workspace=None):
    seq_lens = torch.tensor(lens, dtype=idx_dtype)
    out = torch.full((votes.shape[0], topk), -7, dtype=torch.int32)
    ts.topk_positions(votes, seq_lens, active, out, n_init=N_INIT, n_local=N_LOCAL, topk=topk,
                      workspace=workspace, sort=sort)
    return out


def padded_votes(votes, lens):
    """Votes with -inf past each row's candidate count, as vote_scores writes them."""
    votes = votes.clone()
    counts = ref.candidate_counts(torch.tensor(lens), N_INIT, N_LOCAL)
    for b, count in enumerate(counts.tolist()):
        votes[b, count:] = float("-inf")
    return votes


def check_topk_rows(out, votes, lens, active, topk, *, exact):
    """Untouched rows stay -7; written rows hold topk distinct valid candidates whose votes
    are all >= the reference k-th largest (the same multiset when ``exact``)."""
    votes = padded_votes(votes, lens)
    expected = ref.topk_positions_reference(votes, torch.tensor(lens), n_init=N_INIT,
                                            n_local=N_LOCAL, topk=topk)
    for b, length in enumerate(lens):
        if not bool(active[b]) or length <= N_INIT + topk + N_LOCAL:
            assert (out[b] == -7).all(), f"row {b} (L={length}) must stay untouched"
            continue
        got = out[b].long()
        assert got.unique().numel() == topk, f"row {b}: duplicate or missing positions"
        assert (got >= N_INIT).all() and (got < length - N_LOCAL).all(), f"row {b}: out of range"
        got_votes = votes[b, got - N_INIT].sort().values
        ref_votes = votes[b, expected[b].long() - N_INIT].sort().values
        kth = ref_votes[0]
        tol = 1e-6 * kth.abs().clamp_min(1.0)
        assert (got_votes >= kth - tol).all(), f"row {b}: a selected vote is below the k-th"
        assert torch.equal(got_votes, ref_votes), f"row {b}: selected votes differ"
        if exact:
            assert torch.equal(got.sort().values, expected[b].long()), f"row {b}: positions differ"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_distinct_votes_exact(seed):
    gen = torch.Generator().manual_seed(6000 + seed)
    lens = [BUDGET + 1, 5, 97, BUDGET, 260, 20, 4500 + 37 * seed]  # 4500: several radix programs
    active = torch.ones(len(lens), dtype=torch.bool)
    active[1 + seed] = False
    c_max = c_max_of(lens)
    # distinct and well separated, mixed signs; poison past count must be ignored
    votes = (torch.randperm(len(lens) * c_max, generator=gen).float().view(len(lens), c_max) - 5000) * 0.37
    votes[0, -3:] = 1e30
    out = run_topk(votes, lens, active, TOPK, sort=bool(seed % 2))
    check_topk_rows(out, votes, lens, active, TOPK, exact=True)
    if seed % 2:
        for b in range(len(lens)):
            if (out[b] != -7).all():
                assert torch.equal(out[b], out[b].sort().values), "sort=True must sort rows"


@pytest.mark.parametrize("levels,topk", [(3, 16), (50, 200), (1, 16)])
def test_topk_ties_take_exactly_topk(levels, topk):
    """Heavily tied votes (a few distinct levels, across several radix programs)."""
    gen = torch.Generator().manual_seed(7000 + levels)
    lens = [N_INIT + topk + N_LOCAL + 1, 5000, 300 + topk]
    c_max = c_max_of(lens)
    votes = torch.randint(0, levels, (len(lens), c_max), generator=gen).float() * 0.5
    active = torch.ones(len(lens), dtype=torch.int32)
    ws = ts.alloc_workspace(4, c_max, 1, "cpu")
    out = run_topk(votes, lens, active, topk, workspace=ws)
    check_topk_rows(out, votes, lens, active, topk, exact=False)


def test_topk_special_values():
    """Zeros of both signs, subnormals, negatives and huge values order correctly."""
    lens = [200, 200]
    base = torch.tensor([0.0, -0.0, 1e-42, -1e-42, -3.0e38, 3.0e38, 1.0, -1.0, 2.5, -2.5])
    gen = torch.Generator().manual_seed(8)
    votes = base[torch.randint(0, len(base), (2, c_max_of(lens)), generator=gen)]
    votes[1] = torch.randn(c_max_of(lens), generator=gen) * 1e-3
    active = torch.ones(2, dtype=torch.bool)
    out = run_topk(votes, lens, active, TOPK, idx_dtype=torch.int32)
    check_topk_rows(out, votes, lens, active, TOPK, exact=False)


@pytest.mark.parametrize("dtype,head_dim,group", [(torch.bfloat16, 128, 4), (torch.float16, 64, 3)])
def test_topk_on_kernel_votes_overlaps_reference(dtype, head_dim, group):
    """End to end: kernel votes -> kernel top-k vs reference votes -> reference top-k."""
    lens = [600, BUDGET + 1, 400, 33]
    inputs = make_batch(9000 + group, lens, num_kv_heads=2, group=group, head_dim=head_dim,
                        dtype=dtype)
    c_max = c_max_of(lens)
    votes, ref_votes = run_votes(inputs, c_max, "soft", head_dim ** -0.5)
    topk = 64
    out = run_topk(votes, lens, inputs["active"], topk)
    expected = ref.topk_positions_reference(ref_votes, inputs["seq_lens"], n_init=N_INIT,
                                            n_local=N_LOCAL, topk=topk)
    for b, length in enumerate(lens):
        if length <= N_INIT + topk + N_LOCAL:
            assert (out[b] == -7).all()
            continue
        got, exp = set(out[b].tolist()), set(expected[b].tolist())
        assert len(got) == topk
        assert len(got & exp) >= 0.95 * topk, f"row {b}: overlap {len(got & exp)}/{topk}"
        kth = ref_votes[b, expected[b].long() - N_INIT].min()
        chosen = ref_votes[b, out[b].long() - N_INIT]
        assert (chosen >= kth - 1e-3 * kth.abs()).all()


# ----------------------------------------------------------------------------- assemble_kv_indices


@pytest.mark.parametrize("idx_dtype,seed", [(torch.int64, 0), (torch.int32, 1)])
def test_assemble_matches_reference(idx_dtype, seed):
    gen = torch.Generator().manual_seed(10000 + seed)
    lens = BOUNDARY_LENS + [700]
    inputs = make_batch(10000 + seed, lens, num_kv_heads=1, group=1, head_dim=64,
                        dtype=torch.float16, idx_dtype=idx_dtype)
    seq_lens = inputs["seq_lens"]
    # Rows that are not sparse carry garbage positions: the kernel must not read them.
    positions = torch.full((len(lens), TOPK), -123456, dtype=torch.int32)
    for b, length in enumerate(lens):
        if length > BUDGET:
            cand = torch.randperm(length - N_INIT - N_LOCAL, generator=gen)[:TOPK] + N_INIT
            positions[b] = cand.to(torch.int32)
    kv_indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    total = int(kv_indptr[-1])
    kv_indices = torch.full((total + 9,), -7, dtype=torch.int32)
    ts.assemble_kv_indices(positions, inputs["req_to_token"], inputs["req_pool_indices"], seq_lens,
                           kv_indptr, kv_indices, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    expected = torch.full_like(kv_indices, -7)
    ref.assemble_kv_indices_reference(positions, inputs["req_to_token"], inputs["req_pool_indices"],
                                      seq_lens, kv_indptr, expected, n_init=N_INIT,
                                      n_local=N_LOCAL, topk=TOPK)
    assert (kv_indices[:total] != -7).all(), "an output slot was not written"
    assert (kv_indices[total:] == -7).all(), "wrote past kv_indptr[B]"
    for b in range(len(lens)):
        lo, hi = int(kv_indptr[b]), int(kv_indptr[b + 1])
        got, exp = kv_indices[lo:hi], expected[lo:hi]
        assert torch.equal(got.sort().values, exp.sort().values), f"request {b}: slots differ"
        assert got.unique().numel() == hi - lo


def test_pipeline_end_to_end():
    """vote_scores -> topk_positions -> assemble_kv_indices, with inactive rows keeping
    their (cached) positions, as the backend composes them."""
    lens = [500, 29, 300, 7]
    active = torch.tensor([True, True, False, True])
    inputs = make_batch(11000, lens, num_kv_heads=2, group=4, head_dim=128, dtype=torch.bfloat16,
                        active=active)
    seq_lens = inputs["seq_lens"]
    c_max = c_max_of(lens)
    ws = ts.alloc_workspace(4, c_max, 8, "cpu")
    votes = torch.full((4, c_max), POISON)
    ts.vote_scores(**inputs, out=votes, n_init=N_INIT, n_local=N_LOCAL, scale=128 ** -0.5,
                   workspace=ws)
    cached = torch.arange(N_INIT, N_INIT + TOPK, dtype=torch.int32)
    positions = cached.repeat(4, 1)
    ts.topk_positions(votes, seq_lens, active, positions, n_init=N_INIT, n_local=N_LOCAL,
                      topk=TOPK, workspace=ws)
    assert torch.equal(positions[2], cached), "inactive row's cached positions overwritten"
    kv_indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    kv_indices = torch.full((int(kv_indptr[-1]),), -7, dtype=torch.int32)
    ts.assemble_kv_indices(positions, inputs["req_to_token"], inputs["req_pool_indices"], seq_lens,
                           kv_indptr, kv_indices, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    assert (kv_indices != -7).all()
    row0 = int(inputs["req_pool_indices"][0])
    sel = set(kv_indices[: int(kv_indptr[1])].tolist())
    assert set(inputs["req_to_token"][row0, :N_INIT].tolist()) <= sel
    assert set(inputs["req_to_token"][row0, 500 - N_LOCAL : 500].tolist()) <= sel


# ----------------------------------------------------------------------------- variants


@pytest.mark.parametrize("variant,block_n,programs", [("grid", 64, None), ("flat", 16, 1),
                                                     ("flat", 64, 3), ("flat", 32, 64)])
def test_score_variants_match_reference(variant, block_n, programs):
    """Every scoring variant: random inputs, inactive rows untouched, a static C well past
    the longest row (-inf columns), few programs (each walks many tiles) or many."""
    seed = int.from_bytes(__import__("os").urandom(4), "little")
    lens = [260, 5, BUDGET + 1, 97, 700, 20]
    active = torch.tensor([1, 1, 0, 1, 1, 0], dtype=torch.int32)
    inputs = make_batch(seed, lens, num_kv_heads=3, group=4, head_dim=64, dtype=torch.bfloat16,
                        active=active)
    c_max = c_max_of(lens) + 3 * block_n + 1  # static C: blocks with no candidates at all
    ws = ts.alloc_workspace(8, c_max + 40, 12, "cpu", block_n=block_n)
    out = torch.full((len(lens), c_max), POISON)
    ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=0.125, workspace=ws,
                   score_variant=variant, score_programs_per_sm=programs)
    ref_in = {k: v for k, v in inputs.items() if k != "active"}
    expected = ref.vote_scores_reference(**ref_in, n_init=N_INIT, n_local=N_LOCAL, scale=0.125,
                                         max_candidates=c_max)
    check_votes(out, expected, active, torch.full_like(out, POISON))


def test_flat_scoring_all_inactive_is_noop():
    lens = [300, 200]
    inputs = make_batch(77, lens, num_kv_heads=2, group=2, head_dim=64, dtype=torch.float16,
                        active=torch.zeros(2, dtype=torch.bool))
    ws = ts.alloc_workspace(2, 400, 4, "cpu")
    ws.probs.fill_(float("nan"))
    out = torch.full((2, 400), POISON)
    ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=0.1, workspace=ws,
                   score_variant="flat")
    assert out.isnan().all() and ws.probs.isnan().all(), "inactive rows must not be touched"


@pytest.mark.parametrize("bits", [8, 11])
def test_topk_radix_bits_exact(bits):
    seed = int.from_bytes(__import__("os").urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    lens = [BUDGET + 1, 4700, 97, 260, 20]
    active = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    c_max = c_max_of(lens) + 2000  # static C past every row
    votes = torch.randn(len(lens), c_max, generator=gen) * torch.rand(len(lens), 1, generator=gen) * 3
    votes[2, :10] = votes[2, 10:20]  # some exact ties
    ws = ts.alloc_workspace(8, c_max, 1, "cpu", radix_bits=bits)
    ws.radix.fill_(12345)  # the memset must clear stale scratch
    out = run_topk(votes, lens, active, TOPK, workspace=ws)
    check_topk_rows(out, votes, lens, active, TOPK, exact=False)
    tied = torch.randint(0, 7, (len(lens), c_max), generator=gen).float()
    out = run_topk(tied, lens, active, 64, workspace=ws)
    check_topk_rows(out, tied, lens, active, 64, exact=False)


@pytest.mark.parametrize("bits,variant", [(8, "flat"), (11, "grid")])
def test_fused_first_histogram_pipeline(bits, variant):
    """vote_scores(topk=...) builds the first radix histogram; topk_positions(fused_hist=True)
    then gives the same selection as the unfused path, on stale scratch and inactive rows."""
    seed = int.from_bytes(__import__("os").urandom(4), "little")
    lens = [600, BUDGET + 1, 33, 450, 2100]
    active = torch.tensor([1, 1, 1, 0, 1], dtype=torch.bool)
    inputs = make_batch(seed, lens, num_kv_heads=2, group=4, head_dim=64, dtype=torch.bfloat16,
                        active=active)
    c_max = c_max_of(lens) + 100
    topk = 48
    ws = ts.alloc_workspace(8, c_max, 8, "cpu", radix_bits=bits)
    ws.radix.fill_(-999)  # stale scratch: the lse pass must clear the fused rows
    votes = torch.full((len(lens), c_max), POISON)
    ts.vote_scores(**inputs, out=votes, n_init=N_INIT, n_local=N_LOCAL, scale=0.125, workspace=ws,
                   topk=topk, score_variant=variant)
    fused = torch.full((len(lens), topk), -7, dtype=torch.int32)
    ts.topk_positions(votes, inputs["seq_lens"], active, fused, n_init=N_INIT, n_local=N_LOCAL,
                      topk=topk, workspace=ws, fused_hist=True)
    check_topk_rows(fused, votes.nan_to_num(float("-inf")), lens, active, topk, exact=False)
    plain = run_topk(votes, lens, active, topk)
    for b in range(len(lens)):
        assert set(fused[b].tolist()) == set(plain[b].tolist()) or (
            votes[b, fused[b].long() - N_INIT].sort().values.equal(
                votes[b, plain[b].long() - N_INIT].sort().values)), f"row {b}"


def test_fused_hist_needs_workspace_and_soft_vote():
    inputs = make_batch(5, [100], num_kv_heads=1, group=1, head_dim=64, dtype=torch.float16)
    out = torch.empty(1, 100)
    with pytest.raises(ValueError):
        ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=1.0, topk=TOPK)
    with pytest.raises(ValueError):
        ts.vote_scores(**inputs, out=out, n_init=N_INIT, n_local=N_LOCAL, scale=1.0, vote="sum",
                       topk=TOPK, workspace=ts.alloc_workspace(1, 100, 1, "cpu"))
    with pytest.raises(ValueError):
        ts.topk_positions(out, inputs["seq_lens"], inputs["active"],
                          torch.empty(1, TOPK, dtype=torch.int32), n_init=N_INIT, n_local=N_LOCAL,
                          topk=TOPK, fused_hist=True)
