"""Tensor parallelism (issue 12, CPU part): the global head soft vote and the Selection Cache
decision of ``reference.decode_select_reference`` over a 2-process gloo group.

Each rank holds whole KV-head groups and their query heads (SGLang's TP split; KV heads are
replicated when there are fewer than ranks). The ranks' all-reduced partial votes must equal
the single-process vote over all heads, both ranks must select identical positions and make
identical cache decisions, and those must be the single-process ones (fresh top-k picks checked
by value threshold against the full vote, not by order). Every case draws a fresh seed.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_tokenselect.kernels import reference as ref

N_INIT, N_LOCAL, TOPK = 4, 8, 16
BUDGET = N_INIT + TOPK + N_LOCAL
WORLD = 2
THRESHOLDS = (-1.0, 0.9, 1.0)
LENS = [5, BUDGET, BUDGET + 1, 97, 260, 180, 333]
KINDS = ["empty", "hit", "hit", "hit", "stale", "empty", "hit"]  # "hit": cos ~ 0.999, "stale": ~ 0
PADDING = 2  # CUDA-graph padding rows: length 1, the first request's pool row
# (num_kv_heads, group, vote, coordinator): coordinator=True all-reduces through an object with
# SGLang's GroupCoordinator interface (``all_reduce(t) -> t``, out of place) instead of the group.
LAYOUTS = [(2, 4, "soft", False), (1, 4, "soft", True), (4, 1, "sum", False)]
DEADLINE_S = 60


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def make_case(seed: int, num_kv_heads: int, group: int, head_dim: int = 16) -> dict:
    """A float32 decode batch over all heads and one layer's Selection Cache (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    real, h_q = len(LENS), num_kv_heads * group
    rows_total, width = real + 3, max(LENS) + 5
    n_slots = rows_total * width + 13
    req_to_token = torch.randperm(n_slots, generator=gen)[: rows_total * width].view(rows_total, width).int()
    pool = torch.randperm(rows_total, generator=gen)[:real]
    q = torch.randn(real + PADDING, h_q, head_dim, generator=gen)
    cache_query = torch.randn(rows_total, h_q * head_dim, generator=gen)
    cache_positions = torch.full((rows_total, TOPK), -1, dtype=torch.int32)
    cache_valid = torch.zeros(rows_total, dtype=torch.bool)
    for b, (length, kind) in enumerate(zip(LENS, KINDS)):
        row = int(pool[b])
        if kind == "hit":
            cache_query[row] = q[b].flatten() + 0.05 * torch.randn(h_q * head_dim, generator=gen)
        if kind in ("hit", "stale") and length > BUDGET:
            count = length - N_INIT - N_LOCAL - 1  # cached one step earlier
            cache_positions[row] = N_INIT + torch.randperm(count, generator=gen)[:TOPK].int()
            cache_valid[row] = True
    seq_lens = torch.tensor(LENS + [1] * PADDING)
    indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    return dict(q=q, k_buffer=torch.randn(n_slots, num_kv_heads, head_dim, generator=gen),
                req_to_token=req_to_token, req_pool_indices=torch.cat([pool, pool[:1].repeat(PADDING)]),
                seq_lens=seq_lens, kv_indptr=indptr, kv_indices=torch.full((int(indptr[-1]),), -7, dtype=torch.int32),
                cache_query=cache_query, cache_positions=cache_positions, cache_valid=cache_valid,
                counters=torch.zeros(4, dtype=torch.int64))


def rank_heads(rank: int, world: int, h_q: int, h_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([H_q / world] query heads, their KV heads) of ``rank``: whole GQA groups, a KV head
    replicated on several ranks when H_kv < world (SGLang's TP)."""
    qh = torch.arange(rank * h_q // world, (rank + 1) * h_q // world)
    return qh, torch.unique(ref.kv_head_of(h_q, h_kv)[qh])


def shard(case: dict, rank: int, world: int) -> dict:
    """``case`` as ``rank`` holds it: its query heads, KV heads and cached-query heads."""
    b, h_q, d = case["q"].shape
    qh, kvh = rank_heads(rank, world, h_q, case["k_buffer"].shape[1])
    out = {k: v.clone() for k, v in case.items()}
    out["q"] = case["q"][:, qh].contiguous()
    out["k_buffer"] = case["k_buffer"][:, kvh].contiguous()
    out["cache_query"] = case["cache_query"].view(-1, h_q, d)[:, qh].flatten(1).contiguous()
    return out


def select(case: dict, threshold: float, vote: str, group=None) -> dict:
    """One decode_select_reference step on a copy of ``case``; the copy, updated."""
    out = {k: v.clone() for k, v in case.items()}
    ref.decode_select_reference(*out.values(), n_init=N_INIT, n_local=N_LOCAL, topk=TOPK, threshold=threshold,
                                scale=1.0, vote=vote, group=group)
    return out


def votes(case: dict, vote: str, group=None) -> torch.Tensor:
    """[B, C] votes of every request (padding rows have no candidates)."""
    return ref.vote_scores_reference(case["q"], case["k_buffer"], case["req_to_token"], case["req_pool_indices"],
                                     case["seq_lens"], n_init=N_INIT, n_local=N_LOCAL, scale=1.0, vote=vote,
                                     group=group)


def hits(case: dict, threshold: float, group=None) -> torch.Tensor:
    rows = case["req_pool_indices"]
    return ref.selection_cache_hits_reference(case["q"].flatten(1), case["cache_query"][rows],
                                              case["cache_valid"][rows], threshold, group)


class Coordinator:
    """SGLang's ``GroupCoordinator.all_reduce`` interface over a process group (out of place)."""

    def __init__(self, group):
        self.group = group

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t


def _worker(rank: int, port: int, cases: list, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # 127.0.0.1 only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=30))
    try:
        results = []
        for case, vote, coordinator in cases:
            group = Coordinator(dist.group.WORLD) if coordinator else dist.group.WORLD
            mine = shard(case, rank, WORLD)
            results.append(dict(votes=votes(mine, vote, group),
                                hits={t: hits(mine, t, group) for t in THRESHOLDS},
                                steps={t: select(mine, t, vote, group) for t in THRESHOLDS}))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cases: list, out_dir: str) -> list:
    """Run ``_worker`` on WORLD spawned processes (bounded wall time); per-rank results."""
    ctx = mp.start_processes(_worker, args=(free_port(), cases, out_dir), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, f"ranks still running after {DEADLINE_S} s"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def check_chosen_by_threshold(chosen: torch.Tensor, votes_row: torch.Tensor, msg: str) -> None:
    """``chosen``: TOPK distinct candidate positions; every vote clearly above the k-th largest
    is in, none clearly below it (fp32 tolerance: near-ties may go either way)."""
    assert chosen.unique().numel() == TOPK, f"duplicate positions {msg}"
    idx = chosen.long() - N_INIT
    kth = torch.topk(votes_row, TOPK).values[-1].item()
    tol = 1e-5 * votes_row.abs().max().item() + 1e-30
    assert votes_row[idx].min().item() >= kth - tol, f"a chosen vote is below the k-th {msg}"
    assert set((votes_row > kth + tol).nonzero().flatten().tolist()) <= set(idx.tolist()), f"missed one {msg}"


def check_step_against_single_process(got: dict, case: dict, want: dict, fresh: torch.Tensor,
                                      full_votes: torch.Tensor, msg: str) -> None:
    """The ranks' step equals the single process's; ``fresh`` [B] rows (selected afresh) are
    checked by value threshold against the single-process votes ``full_votes`` [B, C]."""
    for key in ("counters", "cache_valid"):
        assert torch.equal(got[key], want[key]), f"{key} {msg}"
    indptr, rows = want["kv_indptr"], want["req_pool_indices"]
    for b in range(rows.numel()):
        seg = slice(int(indptr[b]), int(indptr[b + 1]))
        if not fresh[b]:
            assert torch.equal(got["kv_indices"][seg], want["kv_indices"][seg]), f"request {b} {msg}"
            continue
        count = int(ref.candidate_counts(case["seq_lens"][b : b + 1], N_INIT, N_LOCAL))
        chosen = got["cache_positions"][int(rows[b])]
        assert torch.equal(got["kv_indices"][seg][N_INIT : N_INIT + TOPK], case["req_to_token"][int(rows[b]), chosen.long()])
        check_chosen_by_threshold(chosen, full_votes[b, :count], f"request {b} {msg}")


def test_global_vote_and_cache_decisions_agree_across_ranks(tmp_path):
    seeds = [fresh_seed() for _ in LAYOUTS]
    cases = [(make_case(seed, h_kv, group), vote, coord) for seed, (h_kv, group, vote, coord) in zip(seeds, LAYOUTS)]
    per_rank = run_ranks(cases, str(tmp_path))
    for i, (case, vote, _) in enumerate(cases):
        msg = f"layout {LAYOUTS[i]} seed {seeds[i]}"
        r0, r1 = per_rank[0][i], per_rank[1][i]
        full = votes(case, vote)
        assert torch.equal(r0["votes"], r1["votes"]), f"ranks' votes differ {msg}"
        torch.testing.assert_close(r0["votes"], full, rtol=1e-5, atol=1e-6, msg=f"global vs single-process vote {msg}")
        for t in THRESHOLDS:
            assert torch.equal(r0["hits"][t], r1["hits"][t]), f"cache decisions differ at θ={t} {msg}"
            assert torch.equal(r0["hits"][t], hits(case, t)), f"cache decisions vs single process at θ={t} {msg}"
            for key in ("kv_indices", "cache_positions", "cache_valid", "counters"):
                assert torch.equal(r0["steps"][t][key], r1["steps"][t][key]), f"ranks' {key} differ at θ={t} {msg}"
            fresh = ref.is_sparse(case["seq_lens"], N_INIT, N_LOCAL, TOPK) & ~hits(case, t)
            check_step_against_single_process(r0["steps"][t], case, select(case, t, vote), fresh, full, f"θ={t} {msg}")
        hit_counts = {t: int(r0["steps"][t]["counters"][0]) for t in THRESHOLDS}
        assert hit_counts == {-1.0: 4, 0.9: 3, 1.0: 0}, f"{hit_counts} {msg}"  # "stale" hits only when static


# --- group=None: today's behaviour, no communication ------------------------------------------


def test_no_group_communicates_nothing_and_matches_the_plain_formulas(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.distributed called without a group")

    monkeypatch.setattr(dist, "all_reduce", refuse)
    seed = fresh_seed()
    case = make_case(seed, 2, 4)
    a, c = case["q"].flatten(1), case["cache_query"][case["req_pool_indices"]]
    cos = (a * c).sum(-1) / ((a * a).sum(-1) * (c * c).sum(-1)).sqrt().clamp_min(1e-6)  # the formula before TP
    want_hits = case["cache_valid"][case["req_pool_indices"]] & (cos >= 0.9)
    assert torch.equal(hits(case, 0.9), want_hits), f"seed {seed}"
    b = 3  # one sparse request: softmax per head, summed over heads
    slots = case["req_to_token"][int(case["req_pool_indices"][b]), N_INIT : LENS[b] - N_LOCAL].long()
    keys = case["k_buffer"][slots].repeat_interleave(4, dim=1)
    want = torch.softmax(torch.einsum("hd,nhd->hn", case["q"][b], keys), -1).sum(0)
    assert torch.equal(votes(case, "soft")[b, : want.numel()], want), f"seed {seed}"

    class Identity:  # a group of one rank: the same step as no group
        def all_reduce(self, t):
            return t

    for t in THRESHOLDS:
        plain, one = select(case, t, "soft"), select(case, t, "soft", Identity())
        assert all(torch.equal(plain[k], one[k]) for k in plain), f"θ={t} seed {seed}"


def test_selector_passes_the_group_only_when_there_is_one():
    from sglang_tokenselect.config import TokenSelectConfig
    from sglang_tokenselect.selection import SelectionCache, Selector, TorchSelectionOps

    seen = []

    class Recording(TorchSelectionOps):
        def decode_select(self, *args, **kw):
            seen.append("group" in kw)

    cache = SelectionCache.allocate(num_layers=1, num_rows=2, query_width=4, topk=16, dtype=torch.float32,
                                    device="cpu")
    args = (0, None, None, None, None, None, None, None, 1.0, None)
    Selector(TokenSelectConfig(), cache, Recording()).select(*args)
    Selector(TokenSelectConfig(), cache, Recording(), group=object()).select(*args)
    assert seen == [False, True]
    with pytest.raises(ValueError, match="cannot all-reduce"):
        Selector(TokenSelectConfig(), cache, object(), group=object())


# --- the backend: SGLang's attention TP group, and the GPU path's refusal ---------------------


def test_backend_takes_sglangs_attention_tp_group_or_refuses_global_on_the_gpu_path():
    from sglang.srt.runtime_context import get_parallel

    from sglang_tokenselect.backend import UnsupportedConfigError, tp_vote_group
    from sglang_tokenselect.config import TokenSelectConfig
    from sglang_tokenselect.kernels import triton_select
    from sglang_tokenselect.selection import TorchSelectionOps

    glob, local = TokenSelectConfig(), TokenSelectConfig(tp_vote="local")
    assert glob.tp_vote == "global"  # the default
    sentinel = object()
    with get_parallel().override(attn_tp_group=sentinel):
        assert tp_vote_group(glob, 2, TorchSelectionOps()) is sentinel
        assert tp_vote_group(glob, 1, TorchSelectionOps()) is None
        assert tp_vote_group(local, 2, TorchSelectionOps()) is None
        assert tp_vote_group(local, 2, triton_select) is None  # per-rank vote: the GPU path serves it
        assert tp_vote_group(glob, 1, triton_select) is None
        with pytest.raises(UnsupportedConfigError) as exc:
            tp_vote_group(glob, 2, triton_select)
    text = str(exc.value)
    assert text.startswith("--tokenselect-tp-vote global") and "--tokenselect-tp-vote local" in text
    assert "\n" not in text
