#!/usr/bin/env python3
"""End-to-end GPU benchmark: SGLang dense (flashinfer) vs TokenSelect.

For each backend in ``--backends`` (one server at a time, same flags except the
backend) this script starts an SGLang server on a Llama-3-8B-shaped model with
``--load-format dummy`` (random weights; config + tokenizer written by
``benchmarks/dummy_model.py``), then runs these phases against it:

0. warmup          a few short requests so FlashInfer/Triton JIT happens here
1. correctness     3 fixed random-id prompts (~300/1000/2000 tokens, below the
                   TokenSelect budget), greedy, 32 tokens; ids compared across
                   backends afterwards (must be identical)
2. long_context    bs=1 streaming generate at each ``--contexts`` length:
                   TTFT and decode ms/token (median inter-token latency)
3. chat            ``/v1/chat/completions`` answers
4. batching        8 concurrent requests of different lengths (continuous
                   batching); all must finish with 32 tokens
5. shared_prefix   two requests sharing an 8K prefix; the second must hit the
                   radix cache (``meta_info.cached_tokens`` > 0)
6. throughput      (not run by default) per ``--throughput NxL`` configuration, N
                   concurrent streaming requests of L prompt tokens: prefill time
                   and aggregate decode tokens/s in the steady window where all N
                   requests decode
7. log             server log: TokenSelect Selection Cache stats lines,
                   Traceback / Error counts

Backend labels: a backend name with optional ``@variant`` suffixes, which add
server flags: ``@nocg`` (``--disable-cuda-graph``) and, for tokenselect,
``@t<float>`` (``--tokenselect-cache-threshold=<float>``: ``@t1`` selects at
every step, ``@t-1`` selects once per request), ``@sp`` (``--tokenselect-sparse-prefill``) and
``@x`` (sparse prefill plus ``--tokenselect-extrapolate``); e.g. ``tokenselect@t0.9@nocg``.
The label is the key of the backend's results, so several variants coexist in
one e2e.json and in ``--compare-with`` merges.

Results go to ``<out-dir>/e2e.json`` after every phase (partial results survive
a timeout) and, with ``--results-json``, to that path too.  Server logs go to
``<out-dir>/server_<backend>.log``; a plot of decode ms/token against context
to ``<out-dir>/e2e_decode.png`` (``plot_e2e.py``).  The last thing printed is a
short table.

Everything is bounded by ``--time-budget`` seconds (default 480): phases that
would not fit are skipped and recorded as skipped.  A server start may take up
to ``--server-start-timeout`` (default 480 s: a fresh machine JIT-compiles
FlashInfer for minutes), as far as that leaves the later backends their minimum.

Code: this file is the command line (arguments, ``main``); ``e2e_util.py`` (logging,
``Budget``, time plan), ``e2e_client.py`` (HTTP client, ``/generate`` measurements),
``e2e_server.py`` (server commands, process, readiness, log parsing), ``e2e_phases.py``
(``BenchConfig``, the phases, ``run_backend``) and ``e2e_report.py`` (comparison,
summary, tables, plot, JSON, environment) hold the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from e2e_client import _requests
from e2e_phases import (ALL_PHASES, DEFAULT_BATCH_LENGTHS, DEFAULT_CONTEXTS, DEFAULT_PHASES, QUICK_BATCH_LENGTHS,
                        QUICK_CONTEXTS, BenchConfig, run_backend)
from e2e_report import (PLOT_NAME, _atomic_write_json, device_info, format_table, load_previous,
                        package_versions, summarize, validate_results, write_plot)
from e2e_server import ALLOW_LONGER_CONTEXT_ENV, server_env, with_min_running_requests
from e2e_util import (FINAL_RESERVE_S, LATER_BACKEND_MIN_S, _STDOUT_COPY, Budget, _on_sigterm, _round,
                      _Terminated, log, now_iso)

SCHEMA_VERSION = 1
JSON_NAME = "e2e.json"
STDOUT_COPY_NAME = "e2e_stdout.log"

DEFAULT_BACKENDS = "flashinfer,tokenselect"
DEFAULT_CORRECTNESS_LENGTHS = "300,1000,2000"
DEFAULT_TOKENSELECT_ARGS = "--tokenselect-stats-interval 64"
DEFAULT_COMMON_SERVER_ARGS = "--max-running-requests 16 --chunked-prefill-size 16384"
DEFAULT_MODEL_DIR = "/tmp/sglang_tokenselect_dummy_llama3_8b"
DEFAULT_THROUGHPUT = "32x24576,64x8192"


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="End-to-end SGLang benchmark: flashinfer (dense) vs tokenselect.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out-dir", required=True, help="directory for e2e.json and server logs")
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR,
                    help="model folder (config.json + tokenizer); written by dummy_model.py if missing")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS,
                    help="comma list of labels; the first is the reference; NAME@nocg adds "
                         "--disable-cuda-graph, tokenselect@t<float> adds --tokenselect-cache-threshold=<float> "
                         "(t1: select every step, t-1: once per request), tokenselect@sp sparse prefill, "
                         "tokenselect@x sparse prefill + extrapolation; variants combine: tokenselect@t0.9@nocg")
    ap.add_argument("--contexts", default=None, help=f"comma list of prompt lengths (default {DEFAULT_CONTEXTS}; --quick: {QUICK_CONTEXTS})")
    ap.add_argument("--decode-tokens", type=int, default=64, help="max_new_tokens of the long-context requests")
    ap.add_argument("--quick", action="store_true", help="fewer contexts and batching requests")
    ap.add_argument("--extra-server-args", default="",
                    help="appended to every server's command line (one string, e.g. \"--disable-cuda-graph\")")
    ap.add_argument("--tokenselect-args", default=DEFAULT_TOKENSELECT_ARGS,
                    help="appended to the tokenselect server's command line only")
    ap.add_argument("--common-server-args", default=DEFAULT_COMMON_SERVER_ARGS,
                    help="passed to every server")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--results-json", default=None, help="also write the results JSON to this path")
    ap.add_argument("--time-budget", type=float, default=480.0,
                    help="seconds for the whole run; phases that would not fit are skipped")
    ap.add_argument("--server-start-timeout", type=float, default=480.0,
                    help="seconds a server may take to become ready (a fresh machine JIT-compiles FlashInfer "
                         f"for >4 min); capped so that each later backend keeps {LATER_BACKEND_MIN_S:.0f} s")
    ap.add_argument("--context-length", type=int, default=None,
                    help="passed as --context-length to every server, with "
                         f"{ALLOW_LONGER_CONTEXT_ENV}=1 in its environment (the dummy model's config has "
                         "131072 positions; 256K contexts need e.g. 266240)")
    ap.add_argument("--throughput", default=DEFAULT_THROUGHPUT,
                    help="throughput phase configurations NxL (N concurrent requests of L prompt tokens)")
    ap.add_argument("--throughput-decode-tokens", type=int, default=128,
                    help="max_new_tokens of each throughput request")
    ap.add_argument("--no-plot", action="store_true", help=f"do not write {PLOT_NAME}")
    ap.add_argument("--stop-grace", type=float, default=8.0, help="seconds between SIGTERM and SIGKILL")
    ap.add_argument("--batch-lengths", default=None,
                    help=f"prompt lengths of the concurrent requests (default {DEFAULT_BATCH_LENGTHS}; --quick: {QUICK_BATCH_LENGTHS})")
    ap.add_argument("--correctness-lengths", default=DEFAULT_CORRECTNESS_LENGTHS)
    ap.add_argument("--prefix-len", type=int, default=8192)
    ap.add_argument("--phases", default=",".join(DEFAULT_PHASES),
                    help=f"comma list of phases to run, from {','.join(ALL_PHASES)}")
    ap.add_argument("--python", default=sys.executable, help="python used to launch the servers")
    ap.add_argument("--compare-with", default=None, metavar="E2E_JSON",
                    help="an earlier e2e.json: its backends not run now join the comparison "
                         "(run flashinfer and tokenselect in separate commands)")
    ap.add_argument("--strict", action="store_true",
                    help="exit with code 2 when summary.ok is false (default: 0 once the run completed)")
    ap.add_argument("--no-requests", action="store_true", help="use urllib even if requests is importable")
    # Test hook: a command template replacing the launcher ({python} {backend} {model} {host} {port}).
    ap.add_argument("--server-cmd", default=None, help=argparse.SUPPRESS)
    return ap


_ARGS_VALUED_OPTS = ("--extra-server-args", "--tokenselect-args", "--common-server-args", "--server-cmd")


def normalize_argv(argv: Sequence[str]) -> List[str]:
    """``--extra-server-args --foo`` -> ``--extra-server-args=--foo`` (argparse would
    otherwise take ``--foo`` for an option of this script)."""
    out: List[str] = []
    i = 0
    argv = list(argv)
    while i < len(argv):
        a = argv[i]
        if a in _ARGS_VALUED_OPTS and i + 1 < len(argv):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def throughput_common_args(cfg: BenchConfig, common_args: str, extra_args: str) -> str:
    """``common_args`` with ``--max-running-requests`` >= the largest throughput N, when the
    throughput phase runs and ``extra_args`` does not set it itself."""
    if "throughput" not in cfg.phases or not cfg.throughput or "--max-running-requests" in (extra_args or ""):
        return common_args
    return with_min_running_requests(common_args, max(n for n, _ in cfg.throughput))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_arg_parser().parse_args(normalize_argv(sys.argv[1:] if argv is None else argv))
    args.out_dir = os.path.abspath(args.out_dir)
    if args.results_json:
        args.results_json = os.path.abspath(args.results_json)
    budget = Budget(args.time_budget)
    cfg = BenchConfig(args)
    common_args_given = args.common_server_args
    args.common_server_args = throughput_common_args(cfg, args.common_server_args, args.extra_server_args)
    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, JSON_NAME)
    stdout_copy = open(os.path.join(args.out_dir, STDOUT_COPY_NAME), "a", encoding="utf-8")
    _STDOUT_COPY.append(stdout_copy)
    prev_handler = None
    if threading.current_thread() is threading.main_thread():
        prev_handler = signal.signal(signal.SIGTERM, _on_sigterm)

    argv_list = list(sys.argv if argv is None else [sys.argv[0]] + list(argv))
    results: Dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "sglang-tokenselect e2e (dense flashinfer vs tokenselect)",
        "status": "running",
        "date": now_iso(),
        "command": shlex.join([sys.executable] + argv_list),
        "cwd": os.getcwd(),
        "host": {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
                 "platform": platform.platform()},
        "device": {},
        "versions": {},
        "config": {},
        "backends": {},
        "comparison": {},
        "summary": {"ok": False, "problems": ["incomplete"]},
    }

    def save() -> None:
        results["elapsed_s"] = _round(budget.elapsed(), 1)
        _atomic_write_json(json_path, results)
        if args.results_json:
            _atomic_write_json(args.results_json, results)

    rc = 1
    try:
        results["device"] = device_info()
        results["versions"] = package_versions()
        model_dir = os.path.abspath(args.model_dir)
        model_info: Dict[str, Any] = {"path": model_dir}
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import dummy_model  # noqa: E402  (sibling file)

        if not dummy_model.is_model_dir(model_dir):
            t0 = time.monotonic()
            dummy_model.write_model_dir(model_dir)
            model_info["written_s"] = _round(time.monotonic() - t0, 2)
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                mc = json.load(f)
            model_info["config"] = {k: mc.get(k) for k in (
                "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                "rope_theta", "max_position_embeddings", "torch_dtype")}
        except Exception as e:
            model_info["config_error"] = str(e)
        results["config"] = {
            **cfg.as_dict(),
            "model": model_info,
            "load_format": "dummy",
            "common_server_args": args.common_server_args,
            "common_server_args_given": common_args_given,
            "extra_server_args": args.extra_server_args,
            "server_env": server_env(cfg.context_length),
            "tokenselect_args": args.tokenselect_args,
            "time_budget_s": args.time_budget,
            "quick": bool(args.quick),
            "http_client": "requests" if (_requests is not None and not args.no_requests) else "urllib",
            "decode_metric": "median inter-token latency of a streamed bs=1 request",
            "throughput_metric": "tokens received by all requests while all decode / that window",
        }
        if args.common_server_args != common_args_given:
            log(f"throughput phase: --max-running-requests raised to {max(n for n, _ in cfg.throughput)} "
                f"(common server args now: {args.common_server_args})")
        results["config"]["compare_order"] = list(cfg.backends)
        if args.compare_with:
            prev, prev_order = load_previous(args.compare_with, cfg.backends)
            results["backends"].update(prev)
            results["config"]["compare_with"] = os.path.abspath(args.compare_with)
            results["config"]["compare_order"] = prev_order + list(cfg.backends)
            log(f"compare-with {args.compare_with}: loaded backends {prev_order}")
        save()
        log(f"device={results['device'].get('name')} backends={cfg.backends} contexts={cfg.contexts} "
            f"budget={args.time_budget:.0f}s out={args.out_dir}")
        n = len(cfg.backends)
        for i, b in enumerate(cfg.backends):
            share = (budget.remaining() - FINAL_RESERVE_S) / max(1, n - i)
            if share < 30:
                results["backends"][b] = {"server": {"cmd": "", "ready": False, "error": "time budget"},
                                          "phases": {}, "errors": ["skipped: time budget"]}
                continue
            run_backend(b, i, cfg, args, model_dir, results, budget, n - i, save)
        results["status"] = "complete"
        rc = 0
    except (_Terminated, KeyboardInterrupt) as e:
        results["status"] = "partial"
        results["error"] = f"interrupted: {e}"
        rc = 130
    except Exception as e:
        results["status"] = "partial"
        import traceback
        results["error"] = traceback.format_exc()[-2000:]
        rc = 1
    finally:
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)
        summarize(results)
        if not args.no_plot:
            results["plot"] = write_plot(results, args.out_dir)
        v = validate_results(results)
        if v:
            results["schema_problems"] = v
        save()
        log(f"results: {json_path}" + (f" and {args.results_json}" if args.results_json else ""))
        table = format_table(results)
        print(table, flush=True)
        try:
            stdout_copy.write(table + "\n")
            stdout_copy.close()
        except Exception:
            pass
        _STDOUT_COPY.clear()
    if rc == 0 and args.strict and not results["summary"]["ok"]:
        rc = 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
