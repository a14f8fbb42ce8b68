"""Benchmark of one TokenSelect decode layer's selection (``triton_select.decode_select``).

Config: Llama-3-8B attention (H_q=32, H_kv=8, D=128, bf16), n_init=128, n_local=512,
topk=2048; B in {1, 4, 16} x L in {32K, 128K, 512K} (``--quick``: B in {1, 4}, L in {32K, 128K}).

1. Correctness first: on GPU cases of B=4, L up to 32K, the chosen top-k against the fp32
   reference votes by value threshold, and everything else equal to the reference (exit 2 on
   a mismatch, before any timing).
2. Copy bandwidth of a 1 GiB device-to-device copy, (read + written bytes) / time; the
   K-read floor of a miss layer is ``B * C * H_kv * D * 2`` bytes at that bandwidth.
3. Per (B, L), each captured in a CUDA graph and timed with ``triton.testing.do_bench``
   (median; L2 flushed before each replay):
   - miss layer (threshold 1: every row selects), one layer per graph replay, cold L2; again
     with q and K scaled by 1e-3 so that every vote of a row ties (the e2e bench's dummy weights);
   - hit layer (threshold -1, cached selections valid) and dense layer (L = 2048 <= budget):
     per layer within a graph of ``LAYERS_PER_GRAPH`` layer calls (as in a decode step:
     launch gaps, no graph-launch cost), and one layer per replay;
   - an empty graph (one tiny kernel): the graph-launch cost inside the one-layer numbers;
   - per launch (gate, score, lse, vote, select): differences of timed prefixes, one graph each;
   - dense FlashInfer decode over all L tokens and over the 2,688-token budget.

Writes JSON (``--out``) and, with ``--plot``, a PNG beside it.

    python benchmarks/bench_select.py [--quick] [--plot] [--out PATH]
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
BATCHES = (1, 4, 16)
CONTEXTS = (32 * 1024, 128 * 1024, 512 * 1024)
QUICK_BATCHES, QUICK_CONTEXTS = (1, 4), (32 * 1024, 128 * 1024)
DENSE_LEN = 2048
TIED_SCALE = 1e-3  # q and K scaled so that all votes tie (the e2e bench's dummy weights)
LAYERS_PER_GRAPH = 16
WARMUP_MS, REP_MS = 10, 40
DEVICE = "cuda"
KW = dict(n_init=N_INIT, n_local=N_LOCAL, topk=TOPK, scale=1.0, vote="soft")
# Launch configs tried by --sweep: module constants of triton_select -> values.
SWEEP = [dict(SCORE_STAGES=4), dict(SCORE_STAGES=2), dict(SCORE_PROGRAMS_PER_SM=2), dict(VOTE_TILES=4),
         dict(SELECT_MAX_SPLIT=16), dict(SELECT_MAX_SPLIT=128)]


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=f"benchmarks/results/select_h200_{today}.json")
    parser.add_argument("--plot", action="store_true", help="write a PNG beside the JSON")
    parser.add_argument("--quick", action="store_true", help="B in {1, 4}, L in {32K, 128K}")
    parser.add_argument("--phases", action="store_true",
                        help="also time the select launch cut after each phase, the score pass without its "
                             "tile minimum, and layers without programmatic dependent launch, at B in {1, 4} x "
                             "L in {32K, 128K} (measurement knobs of triton_select)")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the launch configs of SWEEP at B in {1, 4}, L=128K")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- timing


def graph_us(fn) -> float:
    """Median µs of one replay of a CUDA graph of ``fn`` (warmed up eagerly first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = do_bench(graph.replay, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    del graph
    return ms * 1e3


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read plus written."""
    n = 1 << 29
    src = torch.randn(n, dtype=DTYPE, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=WARMUP_MS, rep=REP_MS * 2, return_mode="median")
    del src, dst
    return 2 * n * 2 / (ms * 1e-3)


# ----------------------------------------------------------------------------- inputs


def make_layer(batch, seq_len, *, seed=0, with_v=False, layers=1):
    """One layer's scattered paged inputs for ``batch`` requests of ``seq_len`` tokens, the
    planned index buffers, ``layers`` Selection Cache layers and a scratch sized by the work."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    rows = batch + 1
    n_slots = rows * seq_len
    lens = torch.full((batch,), seq_len, dtype=torch.int64, device=DEVICE)
    indptr = ref.kv_indptr_reference(lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    k_buffer = torch.randn(n_slots, H_KV, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen)
    inputs = dict(
        q=torch.randn(batch, H_Q, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=gen),
        k_buffer=k_buffer,
        req_to_token=torch.randperm(n_slots, device=DEVICE, generator=gen).to(torch.int32).view(rows, seq_len),
        req_pool_indices=torch.randperm(rows, device=DEVICE, generator=gen)[:batch],
        seq_lens=lens,
        kv_indptr=indptr,
        kv_indices=torch.full((int(indptr[-1]),), -7, dtype=torch.int32, device=DEVICE),
    )
    cache = dict(
        cache_query=torch.zeros(layers, rows, H_Q * HEAD_DIM, dtype=DTYPE, device=DEVICE),
        cache_positions=torch.full((layers, rows, TOPK), -1, dtype=torch.int32, device=DEVICE),
        cache_valid=torch.zeros(layers, rows, dtype=torch.bool, device=DEVICE),
        counters=torch.zeros(layers, 4, dtype=torch.int64, device=DEVICE),
    )
    scratch = ts.alloc_scratch(batch, batch * seq_len, H_Q, DEVICE)
    v_buffer = torch.randn_like(k_buffer) if with_v else None
    return inputs, cache, scratch, v_buffer


def stage_prefix_fn(inputs, cache, scratch, threshold, upto):
    """The first ``upto`` launches of one layer's selection."""
    stages = ts.decode_select_stages(*inputs.values(), *(t[0] for t in cache.values()), scratch,
                                     threshold=threshold, **KW)

    def run():
        for _, launch in stages[:upto]:
            launch()
    return run, [name for name, _ in stages]


def stage_breakdown(inputs, cache, scratch, threshold) -> dict[str, float]:
    """µs of each launch of a layer, as differences of timed prefixes (one graph each)."""
    _, names = stage_prefix_fn(inputs, cache, scratch, threshold, 0)
    cumulative = [graph_us(stage_prefix_fn(inputs, cache, scratch, threshold, n)[0])
                  for n in range(1, len(names) + 1)]
    return {name: round(t - (cumulative[i - 1] if i else 0.0), 2) for i, (name, t) in enumerate(zip(names, cumulative))}


def layer_fn(inputs, cache, scratch, threshold, layers=1):
    """``layers`` decode_select calls, one per cache layer (the same K, as SGLang's layers
    each read their own)."""
    def run():
        for y in range(layers):
            ts.decode_select(*inputs.values(), *(t[y] for t in cache.values()), scratch,
                             threshold=threshold, **KW)
    return run


# ----------------------------------------------------------------------------- correctness


def check_layer(batch, seq_len, threshold, seed) -> list[str]:
    """The fused kernels against the reference on one layer; returns the problems found."""
    inputs, cache, scratch, _ = make_layer(batch, seq_len, seed=seed)
    if threshold <= -1:  # warm the cache so that the checked step hits
        layer_fn(inputs, cache, scratch, 1.0)()
    cpu = {k: v.cpu().clone() for k, v in {**inputs, **{k: t[0] for k, t in cache.items()}}.items()}
    layer_fn(inputs, cache, scratch, threshold)()
    ref.decode_select_reference(*cpu.values(), threshold=threshold, capacity=scratch.capacity, **KW)
    problems = []
    got_pos, want_pos = cache["cache_positions"][0].cpu(), cpu["cache_positions"]
    for name in ("counters", "cache_valid", "cache_query"):
        if not torch.equal(cache[name][0].cpu(), cpu[name]):
            problems.append(f"{name} differs")
    rows = cpu["req_pool_indices"]
    for b in range(batch):
        row = int(rows[b])
        chosen = got_pos[row].long()
        start, end = int(cpu["kv_indptr"][b]), int(cpu["kv_indptr"][b + 1])
        if seq_len <= BUDGET:
            if not torch.equal(inputs["kv_indices"][start:end].cpu(), cpu["kv_indices"][start:end]):
                problems.append(f"dense row {b}: kv_indices differ")
            continue
        if threshold <= -1:
            if not torch.equal(got_pos[row], want_pos[row]):
                problems.append(f"hit row {b}: cached positions changed")
            continue
        votes = ref.vote_scores_reference(cpu["q"][b:b + 1], cpu["k_buffer"], cpu["req_to_token"],
                                          rows[b:b + 1], cpu["seq_lens"][b:b + 1], n_init=N_INIT,
                                          n_local=N_LOCAL, scale=1.0)[0]
        kth = torch.topk(votes, TOPK).values[-1].item()
        tol = 2e-2 * abs(kth) + 1e-30
        if chosen.unique().numel() != TOPK or votes[chosen - N_INIT].min().item() < kth - tol:
            problems.append(f"row {b}: chosen set not the top-{TOPK} (k-th vote {kth:.3g})")
        got_slots = inputs["kv_indices"][start + N_INIT:start + N_INIT + TOPK].cpu()
        if not torch.equal(got_slots, cpu["req_to_token"][row, chosen]):
            problems.append(f"row {b}: kv_indices do not match the chosen positions")
    return problems


def correctness_checks() -> bool:
    ok = True
    for batch, seq_len, threshold in ((4, 8192, 1.0), (4, 32768, 1.0), (2, 32768, -1.0), (3, 1500, 1.0)):
        problems = check_layer(batch, seq_len, threshold, seed=batch * 7 + seq_len)
        print(f"  B={batch} L={seq_len} threshold={threshold}: {'ok' if not problems else problems[:3]}")
        ok &= not problems
    return ok


# ----------------------------------------------------------------------------- one row


def dense_decode_fn(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_len):
    """FlashInfer paged decode over the first ``seq_len`` slots of every request."""
    import flashinfer

    batch = q.shape[0]
    indptr = torch.arange(batch + 1, device=DEVICE, dtype=torch.int32) * seq_len
    indices = req_to_token[req_pool_indices, :seq_len].reshape(-1).contiguous()
    last_page_len = torch.ones(batch, dtype=torch.int32, device=DEVICE)
    workspace = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=DEVICE)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_cuda_graph=True, use_tensor_cores=(H_Q // H_KV) >= 4,
        paged_kv_indptr_buffer=indptr, paged_kv_indices_buffer=indices,
        paged_kv_last_page_len_buffer=last_page_len,
    )
    wrapper.plan(indptr, indices, last_page_len, H_Q, H_KV, HEAD_DIM, 1,
                 q_data_type=DTYPE, kv_data_type=DTYPE, sm_scale=HEAD_DIM ** -0.5)
    k_cache, v_cache = k_buffer.view(-1, 1, H_KV, HEAD_DIM), v_buffer.view(-1, 1, H_KV, HEAD_DIM)
    out = torch.empty_like(q)
    return lambda: wrapper.run(q, (k_cache, v_cache), out=out)


def bench_row(batch, seq_len, copy_bw):
    inputs, cache, scratch, v_buffer = make_layer(batch, seq_len, with_v=True, layers=LAYERS_PER_GRAPH)
    candidates = seq_len - N_INIT - N_LOCAL
    k_bytes = batch * candidates * H_KV * HEAD_DIM * 2
    row = dict(B=batch, L=seq_len, candidates=candidates, k_bytes=k_bytes,
               floor_us=k_bytes / copy_bw * 1e6, scratch_mb=scratch.nbytes / 2**20)
    row["miss_us"] = graph_us(layer_fn(inputs, cache, scratch, 1.0))
    row["miss_stages_us"] = stage_breakdown(inputs, cache, scratch, 1.0)
    # after a miss: per row, [chosen above digit 2, tie list lengths after digits 0, 1, 2]
    row["tie_lists"] = scratch.radix[:batch, ts.RADIX_COUNTERS:ts.RADIX_COUNTERS + 4].tolist()
    row["miss_us_in_graph"] = graph_us(layer_fn(inputs, cache, scratch, 1.0, LAYERS_PER_GRAPH)) / LAYERS_PER_GRAPH
    layer_fn(inputs, cache, scratch, 1.0, LAYERS_PER_GRAPH)()  # every layer's cache valid
    row["hit_us"] = graph_us(layer_fn(inputs, cache, scratch, -1.0))
    row["hit_stages_us"] = stage_breakdown(inputs, cache, scratch, -1.0)
    row["hit_us_in_graph"] = graph_us(layer_fn(inputs, cache, scratch, -1.0, LAYERS_PER_GRAPH)) / LAYERS_PER_GRAPH
    assert cache["counters"][:, 0].sum() > 0, "the hit rows did not hit"
    args = (inputs["q"], inputs["k_buffer"], v_buffer, inputs["req_to_token"], inputs["req_pool_indices"])
    row["flashinfer_dense_us"] = graph_us(dense_decode_fn(*args, seq_len))
    row["flashinfer_budget_us"] = graph_us(dense_decode_fn(*args, BUDGET))
    # SGLang's dummy weights (U(-1e-3, 1e-3)) make q and k tiny: every vote of a row equal.
    inputs["q"].mul_(TIED_SCALE)
    inputs["k_buffer"].mul_(TIED_SCALE)
    row["miss_tied_us"] = graph_us(layer_fn(inputs, cache, scratch, 1.0))
    row["tie_lists_tied"] = scratch.radix[:batch, ts.RADIX_COUNTERS:ts.RADIX_COUNTERS + 4].tolist()
    row["miss_over_floor"] = row["miss_us"] / row["floor_us"]
    row["miss_target_us"] = 1.15 * row["floor_us"] + 5
    del inputs, cache, scratch, v_buffer
    torch.cuda.empty_cache()
    return row


def sweep_rows():
    """Per config of SWEEP: each launch's µs (miss layer) at B in {1, 4}, L=128K."""
    out = []
    for batch in (1, 4):
        inputs, cache, scratch, _ = make_layer(batch, 128 * 1024)
        for config in SWEEP:
            out.append(dict(B=batch, L=128 * 1024, config=config,
                            stages_us=with_knobs(config, lambda: stage_breakdown(inputs, cache, scratch, 1.0))))
            print(f"  sweep B={batch} {config}: {out[-1]['stages_us']}", flush=True)
        del inputs, cache, scratch
        torch.cuda.empty_cache()
    return out


def with_knobs(knobs: dict, fn):
    """``fn()`` with module constants of triton_select set to ``knobs`` (restored after)."""
    saved = {k: getattr(ts, k) for k in knobs}
    try:
        for k, v in knobs.items():
            setattr(ts, k, v)
        return fn()
    finally:
        for k, v in saved.items():
            setattr(ts, k, v)


def layer_costs(inputs, cache, scratch) -> dict:
    """µs per layer of a miss and of a hit layer, within a graph of LAYERS_PER_GRAPH layers."""
    miss = graph_us(layer_fn(inputs, cache, scratch, 1.0, LAYERS_PER_GRAPH)) / LAYERS_PER_GRAPH
    hit = graph_us(layer_fn(inputs, cache, scratch, -1.0, LAYERS_PER_GRAPH)) / LAYERS_PER_GRAPH
    return dict(miss_us_in_graph=miss, hit_us_in_graph=hit)


def phase_rows():
    """Where a miss layer's select and score time goes: µs of the launches up to the vote, then
    of all five with the select cut after phase u (SELECT_UNTIL = u: 1 first-level bucket, 2
    split, 3 tie-list finish, 4 whole), of gate + score with and without the tile minimum, and
    miss and hit layers with and without programmatic dependent launch and with the persistent
    grids uncapped (4 programs per SM asked, whatever fits)."""
    out = []
    for batch in (1, 4):
        for seq_len in (32 * 1024, 128 * 1024):
            inputs, cache, scratch, _ = make_layer(batch, seq_len, layers=LAYERS_PER_GRAPH)
            prefix = lambda n: graph_us(stage_prefix_fn(inputs, cache, scratch, 1.0, n)[0])  # noqa: E731
            row = dict(B=batch, L=seq_len, up_to_vote_us=prefix(4),
                       select_until_us={u: with_knobs(dict(SELECT_UNTIL=u), lambda: prefix(5)) for u in (1, 2, 3, 4)},
                       gate_score_us=prefix(2),
                       gate_score_no_tile_min_us=with_knobs(dict(SCORE_TILE_MIN=False), lambda: prefix(2)))
            row["pdl_on"] = with_knobs(dict(USE_PDL=True), lambda: layer_costs(inputs, cache, scratch))
            row["pdl_off"] = with_knobs(dict(USE_PDL=False), lambda: layer_costs(inputs, cache, scratch))
            row["uncapped_grids"] = with_knobs(dict(CAP_PERSISTENT_GRIDS=False),
                                               lambda: layer_costs(inputs, cache, scratch))
            out.append(row)
            print(f"  phases B={batch} L={seq_len // 1024}K: {row}", flush=True)
            del inputs, cache, scratch
            torch.cuda.empty_cache()
    return out


def dense_row(batch):
    inputs, cache, scratch, _ = make_layer(batch, DENSE_LEN, layers=LAYERS_PER_GRAPH)
    return dict(B=batch, L=DENSE_LEN,
                dense_us=graph_us(layer_fn(inputs, cache, scratch, 0.9)),
                dense_us_in_graph=graph_us(layer_fn(inputs, cache, scratch, 0.9, LAYERS_PER_GRAPH)) / LAYERS_PER_GRAPH)


def empty_graph_us() -> float:
    x = torch.zeros(1, device=DEVICE)
    return graph_us(lambda: x.add_(1))


# ----------------------------------------------------------------------------- report


def print_table(rows, dense_rows, empty_us, copy_bw):
    print(f"\ncopy bandwidth {copy_bw / 1e12:.2f} TB/s; empty graph {empty_us:.1f} µs")
    print(f"{'B':>3} {'L':>6} {'floor':>7} {'miss':>7} {'target':>7} {'miss/fl':>7} {'miss@g':>7} "
          f"{'hit':>6} {'hit@g':>6} {'FI L':>7} {'FI bud':>7}  (µs)")
    for r in rows:
        verdict = "PASS" if r["miss_us"] <= r["miss_target_us"] else "MISS"
        print(f"{r['B']:>3} {r['L'] // 1024:>5}K {r['floor_us']:7.1f} {r['miss_us']:7.1f} "
              f"{r['miss_target_us']:7.1f} {r['miss_over_floor']:7.2f} {r['miss_us_in_graph']:7.1f} "
              f"{r['hit_us']:6.1f} {r['hit_us_in_graph']:6.1f} {r['flashinfer_dense_us']:7.1f} "
              f"{r['flashinfer_budget_us']:7.1f}  miss {verdict}, hit@g {'PASS' if r['hit_us_in_graph'] <= 8 else 'MISS'}")
    for r in dense_rows:
        print(f"dense layer B={r['B']} L={r['L']}: {r['dense_us']:.1f} µs one graph, "
              f"{r['dense_us_in_graph']:.1f} µs per layer in a graph "
              f"({'PASS' if r['dense_us_in_graph'] <= 8 else 'MISS'} <= 8)")


def plot(rows, dense_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["B"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    series = [("miss_us", "miss layer (one graph, cold L2)", "C3", "-o"),
              ("miss_target_us", "target 1.15 floor + 5", "C3", ":"),
              ("hit_us_in_graph", "hit layer (in a graph)", "C2", "-o"),
              ("flashinfer_dense_us", "dense FlashInfer decode", "C0", "-o"),
              ("flashinfer_budget_us", "FlashInfer over 2,688 tokens", "C1", "-o"),
              ("floor_us", "K-read floor", "k", "--")]
    for ax, batch in zip(axes[0], batches):
        sub = sorted((r for r in rows if r["B"] == batch), key=lambda r: r["L"])
        for key, label, color, style in series:
            ax.plot([r["L"] for r in sub], [r[key] for r in sub], style, label=label, color=color, markersize=3)
        dense = [r["dense_us_in_graph"] for r in dense_rows if r["B"] == batch]
        if dense:
            ax.axhline(dense[0], color="C4", lw=1, label=f"dense layer (L={DENSE_LEN}, in a graph)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"B = {batch}")
        ax.set_xlabel("context length L")
        ax.set_ylabel("µs per layer")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def versions():
    import flashinfer

    return dict(torch=torch.__version__, triton=triton.__version__,
                flashinfer=getattr(flashinfer, "__version__", "unknown"), cuda=torch.version.cuda)


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_select.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}  {versions()}")
    print("correctness against kernels/reference.py:")
    if not correctness_checks():
        print("correctness check FAILED; not timing")
        sys.exit(2)
    copy_bw = copy_bandwidth()
    empty_us = empty_graph_us()
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    rows, dense_rows = [], []
    for batch in batches:
        dense_rows.append(dense_row(batch))
        for seq_len in contexts:
            rows.append(bench_row(batch, seq_len, copy_bw))
            r = rows[-1]
            print(f"  B={batch} L={seq_len // 1024}K: miss {r['miss_us']:.1f} µs (floor {r['floor_us']:.1f}) "
                  f"{r['miss_stages_us']}, hit {r['hit_us_in_graph']:.1f} µs {r['hit_stages_us']}, "
                  f"FlashInfer {r['flashinfer_dense_us']:.1f} µs; tied votes: miss {r['miss_tied_us']:.1f} µs",
                  flush=True)
    print_table(rows, dense_rows, empty_us, copy_bw)
    sweep = sweep_rows() if args.sweep else []
    phases = phase_rows() if args.phases else []
    result = dict(
        device=torch.cuda.get_device_name(), versions=versions(),
        command="python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        config=dict(H_q=H_Q, H_kv=H_KV, D=HEAD_DIM, dtype=str(DTYPE), n_init=N_INIT, n_local=N_LOCAL,
                    topk=TOPK, layers_per_graph=LAYERS_PER_GRAPH),
        copy_bandwidth_Bps=copy_bw, empty_graph_us=empty_us, rows=rows, dense_rows=dense_rows, sweep=sweep,
        phases=phases,
        resident_per_sm={f"{name} {dict(consts)}": n for (name, consts, _), n in ts._RESIDENT.items()},
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    if args.plot:
        path = os.path.splitext(args.out)[0] + ".png"
        plot(rows, dense_rows, path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
