"""Benchmark of TokenSelect's Triton selection kernels on one GPU (target: H100).

Config: Llama-3-8B attention (H_q=32, H_kv=8, D=128, bf16), n_init=128, n_local=512,
topk=2048; B in {1, 4, 16} x L in {8K, 32K, 128K, 512K} (``--quick``: B=4, L in {32K, 128K}).

1. Correctness first: the kernels against ``kernels/reference.py`` on small GPU cases
   (exit code 2 on a mismatch, before any timing).
2. Device-copy bandwidth of a 1 GiB device-to-device copy, (read + written bytes) / time.
3. Per (B, L): one layer's K and V buffers of random bf16 (never zeros) with slots
   scattered by a random permutation; every stage captured in a CUDA graph and timed with
   ``triton.testing.do_bench`` (median; it flushes L2 before each replay):
   scoring + vote (per scoring config), pass 1 alone and passes 2+3 alone, top-k (8- and
   11-bit digits, plain and with the first histogram fused into the vote), assembly, the
   three together (best configs), a naive PyTorch selection and dense FlashInfer decode.
4. Static-shape rows (CUDA graphs of the backend): votes / workspace sized for
   C_static = 130 432 (128K model) while the real rows are 4K or 32K, B in {1, 4}, and
   the same with every row inactive; beside the same batch with a tight C.

``--sweep`` times every scoring config of ``SWEEP`` per shape (default: the module default
and the run-1 baseline "grid bn64") and reports the best; top-k variants are always timed.

Prints PASS/MISS per target, writes JSON (``--out``) and, with ``--plot``, a PNG beside it.

    python benchmarks/bench_select.py [--quick] [--sweep] [--plot] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench

from sglang_tokenselect.kernels import reference as ref
from sglang_tokenselect.kernels import triton_select as ts

H_Q, H_KV, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
N_INIT, N_LOCAL, TOPK = 128, 512, 2048
BUDGET = N_INIT + TOPK + N_LOCAL
SCALE = HEAD_DIM ** -0.5
BATCHES = (1, 4, 16)
CONTEXTS = (8 * 1024, 32 * 1024, 128 * 1024, 512 * 1024)
QUICK_BATCHES, QUICK_CONTEXTS = (4,), (32 * 1024, 128 * 1024)
MAX_KV_BYTES = 60e9  # skip (B, L) whose K + V exceed this
WARMUP_MS, REP_MS = 10, 40
DEVICE = "cuda"
C_STATIC = 128 * 1024 - N_INIT - N_LOCAL  # 130 432: votes width of a 128K model's graphs
STATIC_ROWS = [(1, 4 * 1024), (4, 4 * 1024), (1, 32 * 1024), (4, 32 * 1024)]

# Scoring configs: name -> (vote_scores kwargs, workspace block_n).
DEFAULT_CONFIG = "default"
BASELINE_CONFIG = "grid bn64 w4"
SWEEP = {
    "grid bn64 w4": (dict(score_variant="grid", score_warps=4), 64),
    "grid bn128 w8": (dict(score_variant="grid", score_warps=8), 128),
    "flat bn64 w4 s2 p4": (dict(score_variant="flat", score_warps=4, score_stages=2, score_programs_per_sm=4), 64),
    "flat bn64 w4 s3 p4": (dict(score_variant="flat", score_warps=4, score_stages=3, score_programs_per_sm=4), 64),
    "flat bn64 w4 s4 p4": (dict(score_variant="flat", score_warps=4, score_stages=4, score_programs_per_sm=4), 64),
    "flat bn64 w4 s3 p5": (dict(score_variant="flat", score_warps=4, score_stages=3, score_programs_per_sm=5), 64),
    "flat bn64 w8 s3 p4": (dict(score_variant="flat", score_warps=8, score_stages=3, score_programs_per_sm=4), 64),
    "flat bn128 w8 s3 p2": (dict(score_variant="flat", score_warps=8, score_stages=3, score_programs_per_sm=2), 128),
}


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=f"benchmarks/results/select_h100_{today}.json")
    parser.add_argument("--plot", action="store_true", help="write a PNG beside the JSON")
    parser.add_argument("--quick", action="store_true", help="B=4, L in {32K, 128K} only")
    parser.add_argument("--sweep", action="store_true",
                        help="time every scoring config of SWEEP per shape and use the best")
    parser.add_argument("--no-static", action="store_true", help="skip the static-shape rows")
    parser.add_argument("--no-naive", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--fi-topk", action="store_true",
                        help="also time flashinfer.top_k_page_table_transform on the votes")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- timing


def time_us(fn) -> tuple[float, bool]:
    """Median µs of ``fn`` replayed from a CUDA graph (eager if capture fails)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up and Triton compilation outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = do_bench(graph.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
        del graph
        return ms * 1e3, True
    except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
        print(f"    (graph capture failed: {type(exc).__name__}: {exc}; timing eagerly)")
        torch.cuda.synchronize()
        ms = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
        return ms * 1e3, False


def copy_bandwidth(device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    n = 1 << 29  # bf16 elements = 1 GiB
    src = torch.randn(n, dtype=DTYPE, device=device)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=WARMUP_MS, rep=REP_MS * 2, return_mode="median")
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


# ----------------------------------------------------------------------------- inputs


def make_inputs(lens, *, num_q_heads=H_Q, num_kv_heads=H_KV, head_dim=HEAD_DIM, dtype=DTYPE,
                with_v=False, seed=0):
    """Scattered paged inputs: slots a random permutation, pool rows shuffled."""
    device = DEVICE
    gen = torch.Generator(device=device).manual_seed(seed)
    batch, max_len = len(lens), max(lens)
    rows = batch + 1
    n_slots = rows * max_len
    req_to_token = torch.randperm(n_slots, device=device, generator=gen).to(torch.int32)
    inputs = dict(
        q=torch.randn(batch, num_q_heads, head_dim, device=device, dtype=dtype, generator=gen),
        k_buffer=torch.randn(n_slots, num_kv_heads, head_dim, device=device, dtype=dtype, generator=gen),
        req_to_token=req_to_token.view(rows, max_len),
        req_pool_indices=torch.randperm(rows, device=device, generator=gen)[:batch],
        seq_lens=torch.tensor(lens, dtype=torch.int64, device=device),
    )
    v_buffer = torch.randn_like(inputs["k_buffer"]) if with_v else None
    return inputs, v_buffer


# ----------------------------------------------------------------------------- correctness


def check_case(name, lens, *, n_init, n_local, topk, vote, **shape):
    inputs, _ = make_inputs(lens, **shape, seed=len(lens) + topk)
    batch = len(lens)
    seq_lens = inputs["seq_lens"]
    c_max = max(max(lens) - n_init - n_local, 1) + 3
    active = torch.ones(batch, dtype=torch.bool, device=DEVICE)
    expected = ref.vote_scores_reference(**inputs, n_init=n_init, n_local=n_local, scale=SCALE,
                                         vote=vote, max_candidates=c_max)
    failures = []
    configs = {"sum": (dict(), 64)} if vote == "sum" else {DEFAULT_CONFIG: config_def(DEFAULT_CONFIG), **SWEEP}
    err = 0.0
    for name, (cfg_kw, bn) in configs.items():
        votes = torch.full((batch, c_max), float("nan"), device=DEVICE)
        ws = ts.alloc_workspace(batch, c_max, inputs["q"].shape[1], DEVICE, block_n=bn)
        ts.vote_scores(**inputs, active=active, out=votes, n_init=n_init, n_local=n_local, scale=SCALE,
                       vote=vote, workspace=ws, **cfg_kw)
        if not torch.equal(torch.isneginf(votes), torch.isneginf(expected)):
            failures.append(f"{name}: -inf pattern")
        fin = torch.isfinite(expected)
        e = ((votes[fin] - expected[fin]).norm() / expected[fin].norm()).item()
        err = max(err, e)
        if not e < 1e-2:
            failures.append(f"{name}: vote rel err {e:.2e}")

    # top-k on the reference votes must pick exactly the reference's values
    ref_pos = ref.topk_positions_reference(expected, seq_lens, n_init=n_init, n_local=n_local, topk=topk)
    for bits in (8, 11):
        ws = ts.alloc_workspace(batch, c_max, inputs["q"].shape[1], DEVICE, radix_bits=bits)
        for fused in ((False, True) if vote == "soft" else (False,)):
            positions = torch.full((batch, topk), -1, dtype=torch.int32, device=DEVICE)
            votes_k = expected
            if fused:  # the kernel's own votes, with the first histogram built by the vote pass
                votes_k = torch.full((batch, c_max), float("nan"), device=DEVICE)
                ts.vote_scores(**inputs, active=active, out=votes_k, n_init=n_init, n_local=n_local,
                               scale=SCALE, workspace=ws, topk=topk)
            ts.topk_positions(votes_k, seq_lens, active, positions, n_init=n_init, n_local=n_local,
                              topk=topk, workspace=ws, sort=True, fused_hist=fused)
            want_pos = ref_pos if not fused else ref.topk_positions_reference(
                votes_k, seq_lens, n_init=n_init, n_local=n_local, topk=topk)
            for b in range(batch):
                if lens[b] > n_init + topk + n_local:
                    got = votes_k[b, positions[b].long() - n_init].sort().values
                    want = votes_k[b, want_pos[b].long() - n_init].sort().values
                    if not torch.equal(got, want):
                        failures.append(f"top-k values row {b} (bits {bits}, fused {fused})")

    kv_indptr = ref.kv_indptr_reference(seq_lens, n_init=n_init, n_local=n_local, topk=topk)
    kv_indices = torch.full((int(kv_indptr[-1]),), -7, dtype=torch.int32, device=DEVICE)
    want = kv_indices.clone()
    args = (positions, inputs["req_to_token"], inputs["req_pool_indices"], seq_lens, kv_indptr)
    ts.assemble_kv_indices(*args, kv_indices, n_init=n_init, n_local=n_local, topk=topk)
    ref.assemble_kv_indices_reference(*args, want, n_init=n_init, n_local=n_local, topk=topk)
    if not torch.equal(kv_indices, want):
        failures.append("assembled indices")
    status = "PASS" if not failures else "FAIL: " + ", ".join(failures)
    print(f"  check {name:<34} vote err {err:.1e}  {status}")
    return not failures


def correctness_checks() -> bool:
    small = dict(n_init=16, n_local=64, topk=256)
    lens = [700, 3000, 200, 16 + 256 + 64 + 1]
    ok = check_case("llama3-8b bf16 soft", lens, vote="soft", **small)
    ok &= check_case("llama3-8b bf16 sum", lens, vote="sum", **small)
    ok &= check_case("gqa3 fp16 d64 soft", lens, vote="soft", num_q_heads=9, num_kv_heads=3,
                     head_dim=64, dtype=torch.float16, **small)
    ok &= check_case("llama3-8b bf16 soft, full config", [BUDGET + 1, 9000], vote="soft",
                     n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    return ok


# ----------------------------------------------------------------------------- baselines


def naive_selection(q, k_buffer, req_to_token, req_pool_indices, candidates):
    """PyTorch: gather the candidates' keys, QK einsum, softmax, head sum, torch.topk."""
    batch = q.shape[0]
    slots = req_to_token[req_pool_indices, N_INIT : N_INIT + candidates].long()  # [B, C]
    keys = k_buffer[slots]  # [B, C, H_kv, D]
    qg = q.view(batch, H_KV, H_Q // H_KV, HEAD_DIM)
    scores = torch.einsum("bkgd,bnkd->bkgn", qg, keys).float() * SCALE
    votes = torch.softmax(scores, dim=-1).sum(dim=(1, 2))
    return torch.topk(votes, TOPK, dim=-1).indices


def dense_decode_fn(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_len):
    """FlashInfer paged decode over every slot of every request, or None if unavailable."""
    try:
        import flashinfer
    except ImportError:
        return None
    batch, device = q.shape[0], q.device
    indptr = (torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len)
    indices = req_to_token[req_pool_indices, :seq_len].reshape(-1).contiguous()
    last_page_len = torch.ones(batch, dtype=torch.int32, device=device)
    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True,
        use_tensor_cores=(H_Q // H_KV) >= 4,  # SGLang's should_use_tensor_core for bf16
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last_page_len,
    )
    wrapper.plan(indptr, indices, last_page_len, H_Q, H_KV, HEAD_DIM, 1,
                 q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=SCALE)
    k_cache = k_buffer.view(-1, 1, H_KV, HEAD_DIM)
    v_cache = v_buffer.view(-1, 1, H_KV, HEAD_DIM)
    out = torch.empty_like(q)
    return lambda: wrapper.run(q, (k_cache, v_cache), out=out)


def flashinfer_topk_fn(votes, req_to_token, req_pool_indices, counts):
    try:
        import flashinfer
        transform = flashinfer.top_k_page_table_transform
    except (ImportError, AttributeError):
        return None
    page_table = req_to_token[req_pool_indices, N_INIT : N_INIT + votes.shape[1]].contiguous()
    lengths = counts.to(torch.int32)
    return lambda: transform(votes, page_table, lengths, TOPK)


# ----------------------------------------------------------------------------- one row


def config_def(name):
    return (dict(), ts.SCORE_BLOCK_N) if name == DEFAULT_CONFIG else SWEEP[name]


def score_configs(args):
    if args.sweep:
        return dict(SWEEP)
    return {DEFAULT_CONFIG: (dict(), ts.SCORE_BLOCK_N), BASELINE_CONFIG: SWEEP[BASELINE_CONFIG]}


def time_topk_variants(row, inputs, votes, positions, active, workspaces, best_kw, kw):
    """Top-k per digit width, plain and fused; fills row and returns the best total setup."""
    seq_lens = inputs["seq_lens"]
    for bits, ws in workspaces.items():
        row[f"topk_us_bits{bits}"], _ = time_us(lambda ws=ws: ts.topk_positions(
            votes, seq_lens, active, positions, topk=TOPK, workspace=ws, **kw))
        # fused: the vote pass builds the first histogram; time vote + top-k together, and
        # the vote alone, and report the difference as the top-k part
        score_fused, _ = time_us(lambda ws=ws: ts.vote_scores(
            **inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws, topk=TOPK, **best_kw))

        def both(ws=ws):
            ts.vote_scores(**inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws,
                           topk=TOPK, **best_kw)
            ts.topk_positions(votes, seq_lens, active, positions, topk=TOPK, workspace=ws,
                              fused_hist=True, **kw)

        both_us, _ = time_us(both)
        row[f"score_fused_us_bits{bits}"] = score_fused
        row[f"topk_fused_us_bits{bits}"] = both_us - row["score_us"]  # top-k part incl. vote epilogue
    keys = [k for k in row if k.startswith("topk_us_bits") or k.startswith("topk_fused_us_bits")]
    best = min(keys, key=row.get)
    row["topk_best"] = best
    row["topk_us"] = row[best]
    return int(best.rsplit("bits", 1)[1]), "fused" in best


def bench_row(batch, seq_len, copy_bw, args, *, c_static=None, all_inactive=False, timings=None):
    """One (B, L) row. ``c_static``: votes / workspace width (default: tight C)."""
    device = DEVICE
    inputs, v_buffer = make_inputs([seq_len] * batch, with_v=c_static is None, seed=batch * 7 + seq_len)
    seq_lens = inputs["seq_lens"]
    candidates = seq_len - N_INIT - N_LOCAL
    width = c_static or candidates
    k_bytes = batch * candidates * H_KV * HEAD_DIM * 2
    floor_us = k_bytes / copy_bw * 1e6
    active = torch.full((batch,), not all_inactive, dtype=torch.bool, device=device)
    votes = torch.empty(batch, width, dtype=torch.float32, device=device)
    # valid "cached" positions: inactive rows keep theirs and the assembly reads them
    positions = (torch.arange(TOPK, dtype=torch.int32, device=device) + N_INIT).repeat(batch, 1)
    kv_indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    kv_indices = torch.empty(batch * min(seq_len, BUDGET), dtype=torch.int32, device=device)
    kw = dict(n_init=N_INIT, n_local=N_LOCAL)

    configs = score_configs(args) if timings is None else {timings["config"]: timings["config_def"]}
    ws_by_bn = {}
    score_by_cfg = {}
    for name, (cfg_kw, bn) in configs.items():
        if bn not in ws_by_bn:
            ws_by_bn[bn] = ts.alloc_workspace(batch, width, H_Q, device, block_n=bn)
        ws = ws_by_bn[bn]
        score_by_cfg[name], _ = time_us(lambda ws=ws, cfg_kw=cfg_kw: ts.vote_scores(
            **inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws, **cfg_kw))
    best_cfg = min(score_by_cfg, key=score_by_cfg.get)
    best_kw, best_bn = configs[best_cfg]
    ws = ws_by_bn[best_bn]
    row = dict(B=batch, L=seq_len, candidates=candidates, C=width, k_bytes=k_bytes,
               active=not all_inactive, score_config=best_cfg, block_n=best_bn,
               score_us_by_config=score_by_cfg, score_us=score_by_cfg[best_cfg])

    # passes: 1 alone, 2 + 3 alone
    row["pass1_us"], _ = time_us(lambda: ts._soft_pass1(
        inputs["q"], inputs["k_buffer"], inputs["req_to_token"], inputs["req_pool_indices"],
        seq_lens, active, width, ws, scale=SCALE, **kw, variant=best_kw.get("score_variant"),
        stages=best_kw.get("score_stages"), programs_per_sm=best_kw.get("score_programs_per_sm"),
        warps=best_kw.get("score_warps")))
    row["combine_us"], _ = time_us(lambda: ts._soft_combine(seq_lens, active, votes, ws, **kw))

    radix_ws = {bits: ts.alloc_workspace(batch, width, H_Q, device, block_n=best_bn, radix_bits=bits)
                for bits in (8, 11)}
    bits, fused = time_topk_variants(row, inputs, votes, positions, active, radix_ws, best_kw, kw)
    ws_t = radix_ws[bits]

    def assemble():
        ts.assemble_kv_indices(positions, inputs["req_to_token"], inputs["req_pool_indices"],
                               seq_lens, kv_indptr, kv_indices, topk=TOPK, **kw)

    def total():
        ts.vote_scores(**inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws_t,
                       topk=TOPK if fused else None, **best_kw)
        ts.topk_positions(votes, seq_lens, active, positions, topk=TOPK, workspace=ws_t,
                          fused_hist=fused, **kw)
        assemble()

    row["assemble_us"], _ = time_us(assemble)
    row["total_us"], row["graph"] = time_us(total)
    row["score_gbps"] = k_bytes / (row["score_us"] * 1e-6) / 1e9
    row["score_frac_copy_bw"] = row["score_gbps"] * 1e9 / copy_bw
    row["pass1_frac_copy_bw"] = k_bytes / (row["pass1_us"] * 1e-6) / copy_bw
    row["floor_us"] = floor_us
    row["total_target_us"] = 1.25 * floor_us + 20.0

    row["naive_us"] = None
    row["dense_us"] = None
    row["fi_topk_us"] = None
    if c_static is not None:  # static-shape rows: selection only
        row["selection_over_dense"] = None
        row["targets"] = {}
        del inputs, ws_by_bn, radix_ws, ws, ws_t, votes
        torch.cuda.empty_cache()
        return row

    if not args.no_naive:
        try:
            row["naive_us"], _ = time_us(lambda: naive_selection(
                inputs["q"], inputs["k_buffer"], inputs["req_to_token"], inputs["req_pool_indices"],
                candidates))
        except torch.cuda.OutOfMemoryError:
            print("    (naive selection: out of memory)")
        torch.cuda.empty_cache()

    try:
        dense = dense_decode_fn(inputs["q"], inputs["k_buffer"], v_buffer, inputs["req_to_token"],
                                inputs["req_pool_indices"], seq_len)
        if dense is not None:
            row["dense_us"], _ = time_us(dense)
    except Exception as exc:  # noqa: BLE001 - record null, keep benchmarking
        print(f"    (dense FlashInfer decode failed: {type(exc).__name__}: {exc})")
    row["selection_over_dense"] = row["total_us"] / row["dense_us"] if row["dense_us"] else None

    if args.fi_topk:
        try:
            fn = flashinfer_topk_fn(votes, inputs["req_to_token"], inputs["req_pool_indices"],
                                    ref.candidate_counts(seq_lens, N_INIT, N_LOCAL))
            if fn is not None:
                row["fi_topk_us"], _ = time_us(fn)
        except Exception as exc:  # noqa: BLE001
            print(f"    (flashinfer top-k failed: {type(exc).__name__}: {exc})")

    row["targets"] = targets_of(row)
    del inputs, v_buffer, ws_by_bn, radix_ws, ws, ws_t, votes
    torch.cuda.empty_cache()
    return row


def static_rows(copy_bw, args, config):
    """C_static = 130 432 with real rows of 4K / 32K (and all rows inactive) vs tight C."""
    out = []
    timings = dict(config=config, config_def=config_def(config))
    for batch, seq_len in STATIC_ROWS:
        for c_static, inactive in ((None, False), (C_STATIC, False), (C_STATIC, True)):
            row = bench_row(batch, seq_len, copy_bw, args, c_static=c_static or (seq_len - N_INIT - N_LOCAL),
                            all_inactive=inactive, timings=timings)
            row["kind"] = "tight C" if c_static is None else ("static C, inactive" if inactive else "static C")
            out.append(row)
            print(f"  static B={batch} L={seq_len // 1024}K C={row['C']:<7} {row['kind']:<19} "
                  f"score {row['score_us']:.1f} (pass1 {row['pass1_us']:.1f})  topk {row['topk_us']:.1f}  "
                  f"asm {row['assemble_us']:.1f}  total {row['total_us']:.1f}")
    return out


def targets_of(row):
    def verdict(ok):
        return "PASS" if ok else "MISS"

    out = {"total<=1.25*floor+20us": verdict(row["total_us"] <= row["total_target_us"])}
    if row["L"] >= 32 * 1024 and row["B"] >= 4:
        out["score>=80%copy"] = verdict(row["score_frac_copy_bw"] >= 0.8)
    if row["L"] == 128 * 1024 and row["selection_over_dense"] is not None:
        out["total<=55%dense"] = verdict(row["selection_over_dense"] <= 0.55)
    return out


# ----------------------------------------------------------------------------- output


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def print_table(rows, copy_bw):
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s (read + write)")
    head = (f"{'B':>3} {'L':>7} {'score':>8} {'pass1':>8} {'topk':>7} {'asm':>6} {'total':>8} {'floor':>8} "
            f"{'GB/s':>6} {'%copy':>6} {'naive':>9} {'dense':>8} {'sel/dn':>6}  targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        tg = " ".join(f"{k}:{v}" for k, v in r["targets"].items())
        print(f"{r['B']:>3} {r['L'] // 1024:>6}K {r['score_us']:>8.1f} {r['pass1_us']:>8.1f} {r['topk_us']:>7.1f} "
              f"{r['assemble_us']:>6.1f} {r['total_us']:>8.1f} {r['floor_us']:>8.1f} "
              f"{r['score_gbps']:>6.0f} {100 * r['score_frac_copy_bw']:>5.0f}% "
              f"{fmt(r['naive_us']):>9} {fmt(r['dense_us']):>8} {fmt(r['selection_over_dense'], '.2f'):>6}  {tg}")
    print("(µs; floor = K bytes / copy bandwidth)")


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    series = [("score_us", "scoring + vote", "C0"), ("topk_us", "top-k", "C1"),
              ("assemble_us", "assembly", "C2"), ("total_us", "selection total", "C3"),
              ("dense_us", "dense decode (FlashInfer)", "C4"),
              ("naive_us", "naive PyTorch selection", "C5"), ("floor_us", "K bytes / copy BW", "k")]
    for ax, batch in zip(axes[0], batches):
        sub = sorted((r for r in rows if r["B"] == batch), key=lambda r: r["L"])
        for key, label, color in series:
            pts = [(r["L"], r[key]) for r in sub if r.get(key)]
            if pts:
                style = "--" if key == "floor_us" else "-o"
                ax.plot(*zip(*pts), style, label=label, color=color, markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"B = {batch}")
        ax.set_xlabel("context length L")
        ax.set_ylabel("µs")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions():
    try:
        import flashinfer

        fi = getattr(flashinfer, "__version__", "unknown")
    except ImportError:
        fi = None
    return dict(torch=torch.__version__, triton=triton.__version__, flashinfer=fi,
                cuda=torch.version.cuda)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_select.py needs a CUDA GPU")
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(device)}  {versions()}")
    print("correctness against kernels/reference.py:")
    if not correctness_checks():
        print("correctness check FAILED; not timing")
        sys.exit(2)

    copy_bw = copy_bandwidth(device)
    print(f"device copy bandwidth: {copy_bw / 1e12:.2f} TB/s")
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    rows = []
    for batch in batches:
        for seq_len in contexts:
            kv_bytes = 2 * batch * seq_len * H_KV * HEAD_DIM * 2
            if kv_bytes > MAX_KV_BYTES:
                print(f"  skip B={batch} L={seq_len}: K+V {kv_bytes / 1e9:.0f} GB")
                continue
            row = bench_row(batch, seq_len, copy_bw, args)
            rows.append(row)
            print(f"  B={batch:<3} L={seq_len // 1024:>4}K  score {row['score_us']:.1f} µs "
                  f"({row['score_config']}, {100 * row['score_frac_copy_bw']:.0f}% copy; pass1 "
                  f"{row['pass1_us']:.1f} = {100 * row['pass1_frac_copy_bw']:.0f}%, passes 2+3 "
                  f"{row['combine_us']:.1f})  topk {row['topk_us']:.1f} ({row['topk_best']})  "
                  f"asm {row['assemble_us']:.1f}  total {row['total_us']:.1f}  "
                  f"dense {fmt(row['dense_us'])}  {row['targets']}")
            print("      score by config: " + ", ".join(
                f"{k} {v:.1f}" for k, v in sorted(row["score_us_by_config"].items(), key=lambda kv: kv[1])))
    sweep_summary = summarize_sweep(rows)
    static = []
    if not args.no_static:
        ref_row = next((r for r in rows if r["B"] == 4 and r["L"] == 32 * 1024), rows[0] if rows else None)
        config = ref_row["score_config"] if ref_row else DEFAULT_CONFIG
        print(f"static-shape rows (C_static = {C_STATIC}, scoring config {config}):")
        static = static_rows(copy_bw, args, config)

    result = dict(
        device=torch.cuda.get_device_name(device), versions=versions(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        config=dict(H_q=H_Q, H_kv=H_KV, head_dim=HEAD_DIM, dtype=str(DTYPE), n_init=N_INIT,
                    n_local=N_LOCAL, topk=TOPK, scale=SCALE),
        copy_bandwidth_bytes_per_s=copy_bw, rows=rows, static_rows=static, sweep=sweep_summary,
        module_defaults=dict(SCORE_VARIANT=ts.SCORE_VARIANT, SCORE_STAGES=ts.SCORE_STAGES,
                             SCORE_PROGRAMS_PER_SM=ts.SCORE_PROGRAMS_PER_SM,
                             SCORE_BLOCK_N=ts.SCORE_BLOCK_N, RADIX_BITS=ts.RADIX_BITS),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    if args.plot:
        png = os.path.splitext(args.out)[0] + ".png"
        plot(rows, png)
        print(f"wrote {png}")
    print_table(rows, copy_bw)
    if sweep_summary:
        print("\nscoring configs, geometric-mean time relative to the best per row (1.00 = best):")
        for name, rel in sweep_summary["relative"]:
            print(f"  {name:<24} {rel:.3f}")
        print(f"best overall: {sweep_summary['best']}; top-k best per row: {sweep_summary['topk_best']}")
    if static:
        print(f"\nstatic shapes (C_static = {C_STATIC}):")
        for r in static:
            print(f"  B={r['B']} L={r['L'] // 1024:>2}K {r['kind']:<19} C={r['C']:<7} score {r['score_us']:7.1f} "
                  f"pass1 {r['pass1_us']:7.1f} combine {r['combine_us']:6.1f} topk {r['topk_us']:6.1f} "
                  f"asm {r['assemble_us']:5.1f} total {r['total_us']:7.1f}")


def summarize_sweep(rows):
    """Geometric mean over rows of each scoring config's time relative to the row's best."""
    import math

    names = set.intersection(*(set(r["score_us_by_config"]) for r in rows)) if rows else set()
    if len(names) < 2:
        return None
    rel = {}
    for name in names:
        logs = [math.log(r["score_us_by_config"][name] / r["score_us"]) for r in rows]
        rel[name] = math.exp(sum(logs) / len(logs))
    ranked = sorted(rel.items(), key=lambda kv: kv[1])
    return dict(relative=ranked, best=ranked[0][0],
                topk_best={f"B{r['B']} L{r['L'] // 1024}K": r["topk_best"] for r in rows})


if __name__ == "__main__":
    main()
