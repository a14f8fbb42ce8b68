"""Benchmark of TokenSelect's Triton selection kernels on one GPU (target: H100).

Config: Llama-3-8B attention (H_q=32, H_kv=8, D=128, bf16), n_init=128, n_local=512,
topk=2048; B in {1, 4, 16} x L in {8K, 32K, 128K, 512K} (``--quick``: B=4, L in {32K, 128K}).

1. Correctness first: the kernels against ``kernels/reference.py`` on small GPU cases
   (exit code 2 on a mismatch, before any timing).
2. Device-copy bandwidth of a 1 GiB device-to-device copy, (read + written bytes) / time.
3. Per (B, L): one layer's K and V buffers of random bf16 (never zeros) with slots
   scattered by a random permutation; every stage captured in a CUDA graph and timed with
   ``triton.testing.do_bench`` (median; it flushes L2 before each replay):
   scoring + vote (per scoring block size), top-k, assembly, the three together, a naive
   PyTorch selection and dense FlashInfer decode of the same batch.

Prints PASS/MISS per target, writes JSON (``--out``) and, with ``--plot``, a PNG beside it.

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
SCALE = HEAD_DIM ** -0.5
BATCHES = (1, 4, 16)
CONTEXTS = (8 * 1024, 32 * 1024, 128 * 1024, 512 * 1024)
QUICK_BATCHES, QUICK_CONTEXTS = (4,), (32 * 1024, 128 * 1024)
MAX_KV_BYTES = 60e9  # skip (B, L) whose K + V exceed this
WARMUP_MS, REP_MS = 10, 40
DEVICE = "cuda"


def parse_args(argv=None):
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=f"benchmarks/results/select_h100_{today}.json")
    parser.add_argument("--plot", action="store_true", help="write a PNG beside the JSON")
    parser.add_argument("--quick", action="store_true", help="B=4, L in {32K, 128K} only")
    parser.add_argument("--block-n", default="64,128",
                        help="scoring block sizes to time (comma separated); the best is used")
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
    votes = torch.full((batch, c_max), float("nan"), device=DEVICE)
    ws = ts.alloc_workspace(batch, c_max, inputs["q"].shape[1], DEVICE)
    ts.vote_scores(**inputs, active=active, out=votes, n_init=n_init, n_local=n_local, scale=SCALE,
                   vote=vote, workspace=ws)
    expected = ref.vote_scores_reference(**inputs, n_init=n_init, n_local=n_local, scale=SCALE,
                                         vote=vote, max_candidates=c_max)
    failures = []
    if not torch.equal(torch.isneginf(votes), torch.isneginf(expected)):
        failures.append("-inf pattern")
    fin = torch.isfinite(expected)
    err = ((votes[fin] - expected[fin]).norm() / expected[fin].norm()).item()
    if not err < 1e-2:
        failures.append(f"vote rel err {err:.2e}")

    # top-k on the reference votes must pick exactly the reference's values
    positions = torch.full((batch, topk), -1, dtype=torch.int32, device=DEVICE)
    ts.topk_positions(expected, seq_lens, active, positions, n_init=n_init, n_local=n_local,
                      topk=topk, workspace=ws, sort=True)
    ref_pos = ref.topk_positions_reference(expected, seq_lens, n_init=n_init, n_local=n_local, topk=topk)
    for b in range(batch):
        if lens[b] > n_init + topk + n_local:
            got = expected[b, positions[b].long() - n_init].sort().values
            want = expected[b, ref_pos[b].long() - n_init].sort().values
            if not torch.equal(got, want):
                failures.append(f"top-k values row {b}")

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


def bench_row(batch, seq_len, copy_bw, block_ns, args):
    device = DEVICE
    inputs, v_buffer = make_inputs([seq_len] * batch, with_v=True, seed=batch * 7 + seq_len)
    seq_lens = inputs["seq_lens"]
    candidates = seq_len - N_INIT - N_LOCAL
    k_bytes = batch * candidates * H_KV * HEAD_DIM * 2
    floor_us = k_bytes / copy_bw * 1e6
    active = torch.ones(batch, dtype=torch.bool, device=device)
    votes = torch.empty(batch, candidates, dtype=torch.float32, device=device)
    positions = torch.empty(batch, TOPK, dtype=torch.int32, device=device)
    kv_indptr = ref.kv_indptr_reference(seq_lens, n_init=N_INIT, n_local=N_LOCAL, topk=TOPK)
    kv_indices = torch.empty(batch * min(seq_len, BUDGET), dtype=torch.int32, device=device)
    kw = dict(n_init=N_INIT, n_local=N_LOCAL)

    score_by_bn = {}
    workspaces = {bn: ts.alloc_workspace(batch, candidates, H_Q, device, block_n=bn) for bn in block_ns}
    for bn, ws in workspaces.items():
        score_by_bn[bn], _ = time_us(
            lambda ws=ws: ts.vote_scores(**inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws))
    best_bn = min(score_by_bn, key=score_by_bn.get)
    ws = workspaces[best_bn]

    def score():
        ts.vote_scores(**inputs, active=active, out=votes, scale=SCALE, **kw, workspace=ws)

    def topk():
        ts.topk_positions(votes, seq_lens, active, positions, topk=TOPK, workspace=ws, **kw)

    def assemble():
        ts.assemble_kv_indices(positions, inputs["req_to_token"], inputs["req_pool_indices"],
                               seq_lens, kv_indptr, kv_indices, topk=TOPK, **kw)

    def total():
        score()
        topk()
        assemble()

    row = dict(B=batch, L=seq_len, candidates=candidates, k_bytes=k_bytes, block_n=best_bn,
               score_us_by_block_n={str(k): v for k, v in score_by_bn.items()})
    row["score_us"] = score_by_bn[best_bn]
    row["topk_us"], _ = time_us(topk)
    row["assemble_us"], _ = time_us(assemble)
    row["total_us"], row["graph"] = time_us(total)
    row["score_gbps"] = k_bytes / (row["score_us"] * 1e-6) / 1e9
    row["score_frac_copy_bw"] = row["score_gbps"] * 1e9 / copy_bw
    row["floor_us"] = floor_us
    row["total_target_us"] = 1.25 * floor_us + 20.0

    row["naive_us"] = None
    if not args.no_naive:
        try:
            row["naive_us"], _ = time_us(lambda: naive_selection(
                inputs["q"], inputs["k_buffer"], inputs["req_to_token"], inputs["req_pool_indices"],
                candidates))
        except torch.cuda.OutOfMemoryError:
            print("    (naive selection: out of memory)")
        torch.cuda.empty_cache()

    row["dense_us"] = None
    try:
        dense = dense_decode_fn(inputs["q"], inputs["k_buffer"], v_buffer, inputs["req_to_token"],
                                inputs["req_pool_indices"], seq_len)
        if dense is not None:
            row["dense_us"], _ = time_us(dense)
    except Exception as exc:  # noqa: BLE001 - record null, keep benchmarking
        print(f"    (dense FlashInfer decode failed: {type(exc).__name__}: {exc})")
    row["selection_over_dense"] = row["total_us"] / row["dense_us"] if row["dense_us"] else None

    row["fi_topk_us"] = None
    if args.fi_topk:
        try:
            fn = flashinfer_topk_fn(votes, inputs["req_to_token"], inputs["req_pool_indices"],
                                    ref.candidate_counts(seq_lens, N_INIT, N_LOCAL))
            if fn is not None:
                row["fi_topk_us"], _ = time_us(fn)
        except Exception as exc:  # noqa: BLE001
            print(f"    (flashinfer top-k failed: {type(exc).__name__}: {exc})")

    row["targets"] = targets_of(row)
    del inputs, v_buffer, workspaces, ws, votes
    torch.cuda.empty_cache()
    return row


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
    head = (f"{'B':>3} {'L':>7} {'score':>8} {'topk':>7} {'asm':>6} {'total':>8} {'floor':>8} "
            f"{'GB/s':>6} {'%copy':>6} {'naive':>9} {'dense':>8} {'sel/dn':>6}  targets")
    print(head)
    print("-" * len(head))
    for r in rows:
        tg = " ".join(f"{k}:{v}" for k, v in r["targets"].items())
        print(f"{r['B']:>3} {r['L'] // 1024:>6}K {r['score_us']:>8.1f} {r['topk_us']:>7.1f} "
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
    block_ns = [int(x) for x in args.block_n.split(",")]
    batches, contexts = (QUICK_BATCHES, QUICK_CONTEXTS) if args.quick else (BATCHES, CONTEXTS)
    rows = []
    for batch in batches:
        for seq_len in contexts:
            kv_bytes = 2 * batch * seq_len * H_KV * HEAD_DIM * 2
            if kv_bytes > MAX_KV_BYTES:
                print(f"  skip B={batch} L={seq_len}: K+V {kv_bytes / 1e9:.0f} GB")
                continue
            row = bench_row(batch, seq_len, copy_bw, block_ns, args)
            rows.append(row)
            print(f"  B={batch:<3} L={seq_len // 1024:>4}K  score {row['score_us']:.1f} µs "
                  f"(bn {row['block_n']}, {100 * row['score_frac_copy_bw']:.0f}% copy)  "
                  f"topk {row['topk_us']:.1f}  asm {row['assemble_us']:.1f}  total {row['total_us']:.1f}  "
                  f"dense {fmt(row['dense_us'])}  {row['targets']}")

    result = dict(
        device=torch.cuda.get_device_name(device), versions=versions(),
        command=" ".join([os.path.basename(sys.executable)] + sys.argv),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        config=dict(H_q=H_Q, H_kv=H_KV, head_dim=HEAD_DIM, dtype=str(DTYPE), n_init=N_INIT,
                    n_local=N_LOCAL, topk=TOPK, scale=SCALE),
        copy_bandwidth_bytes_per_s=copy_bw, rows=rows,
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


if __name__ == "__main__":
    main()
