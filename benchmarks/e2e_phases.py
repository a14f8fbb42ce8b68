"""Benchmark phases of the end-to-end benchmark (``e2e_bench.py``).

``BenchConfig`` (what the phases run with), the phases against one server (warmup,
correctness, long_context, chat, batching, shared_prefix, throughput with its
steady-window analysis) and ``run_backend``: start one server, run the selected
phases within the time plan, stop it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from e2e_client import HttpClient, _public, chat_once, generate_once, generate_stream, summarize_stream
from e2e_server import (ServerProcess, analyze_log, build_server_cmd, cap_file_size, fetch_server_info,
                        pick_port, port_is_free, server_env, server_max_input, split_backend, tail_file,
                        wait_ready)
from e2e_util import (Budget, _round, _Terminated, log, make_prompt_ids, parse_int_list, parse_str_list,
                      phase_time_s, start_limit_s)

DEFAULT_CONTEXTS = "4096,32768,122880"
QUICK_CONTEXTS = "4096,32768"
DEFAULT_BATCH_LENGTHS = "1024,2048,4096,8192,12288,16384,24576,32768"
QUICK_BATCH_LENGTHS = "1024,4096,8192,16384"
ALL_PHASES = ("warmup", "correctness", "long_context", "chat", "batching", "shared_prefix", "throughput")
DEFAULT_PHASES = ALL_PHASES[:-1]  # throughput prefills ~1M tokens: only on request

# Conservative prefill rate (tokens/s) of the 8B model on an H200 for 8K-24K prompts,
# used only to decide whether a throughput configuration still fits the budget.
THROUGHPUT_PREFILL_TOK_S = 12000.0


class BenchConfig:
    def __init__(self, args: argparse.Namespace):
        self.backends = parse_str_list(args.backends)
        ctx = args.contexts if args.contexts is not None else (QUICK_CONTEXTS if args.quick else DEFAULT_CONTEXTS)
        self.contexts = parse_int_list(ctx)
        bl = args.batch_lengths if args.batch_lengths is not None else (
            QUICK_BATCH_LENGTHS if args.quick else DEFAULT_BATCH_LENGTHS)
        self.batch_lengths = parse_int_list(bl)
        self.correctness_lengths = parse_int_list(args.correctness_lengths)
        self.decode_tokens = int(args.decode_tokens)
        self.correctness_new_tokens = 32
        self.batch_new_tokens = 32
        self.prefix_len = int(args.prefix_len)
        self.suffix_len = 64
        self.prefix_new_tokens = 32
        self.chunk_size = 16384
        m = re.search(r"--chunked-prefill-size[ =](\d+)", f"{args.common_server_args} {args.extra_server_args}")
        if m:
            self.chunk_size = int(m.group(1))
        try:
            self.throughput = parse_throughput(args.throughput)
        except ValueError as e:
            raise SystemExit(str(e))
        self.throughput_decode_tokens = int(args.throughput_decode_tokens)
        self.context_length = args.context_length
        self.phases = [p for p in parse_str_list(args.phases)]
        bad = [p for p in self.phases if p not in ALL_PHASES]
        if bad:
            raise SystemExit(f"unknown phase(s) {bad}; choose from {ALL_PHASES}")
        for b in self.backends:
            try:
                split_backend(b)
            except ValueError as e:
                raise SystemExit(str(e))

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


# --------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------


def estimate_request_s(prompt_len: int, decode_tokens: int) -> float:
    """Conservative wall-time guess for one bs=1 request (H100, 8B model)."""
    return 3.0 + prompt_len / 6000.0 + decode_tokens * 0.05


def phase_warmup(client: HttpClient, cfg: "BenchConfig", budget: Budget) -> Dict[str, Any]:
    """Short requests that trigger first-use JIT (dense, sparse and chunked-prefix paths)."""
    res: Dict[str, Any] = {"requests": []}
    plan = [(64, 8), (4608, 16)]
    if max(cfg.contexts or [0]) > cfg.chunk_size:
        plan.append((cfg.chunk_size + 2048, 8))
    for i, (L, n) in enumerate(plan):
        if budget.remaining() < 30:
            res["skipped_rest"] = "time budget"
            break
        r = generate_once(client, make_prompt_ids(L, 900 + i), n, timeout=budget.timeout(240.0))
        res["requests"].append({"prompt_len": L, "max_new_tokens": n, "ok": r.get("ok"),
                                "latency_s": r.get("latency_s"), "error": r.get("error")})
    res["ok"] = all(r["ok"] for r in res["requests"]) and bool(res["requests"])
    return res


def phase_correctness(client: HttpClient, cfg: "BenchConfig", budget: Budget) -> Dict[str, Any]:
    res: Dict[str, Any] = {"max_new_tokens": cfg.correctness_new_tokens, "prompts": []}
    for i, L in enumerate(cfg.correctness_lengths):
        ids = make_prompt_ids(L, 100 + i)
        r = generate_once(client, ids, cfg.correctness_new_tokens,
                          timeout=budget.timeout(120.0), return_logprob=True)
        r["name"] = f"p{L}"
        res["prompts"].append(_public(r))
    res["ok"] = all(p.get("ok") for p in res["prompts"])
    return res


def phase_long_context(client: HttpClient, cfg: "BenchConfig", budget: Budget,
                       max_input: Optional[int]) -> Dict[str, Any]:
    res: Dict[str, Any] = {"decode_tokens": cfg.decode_tokens, "batch_size": 1, "contexts": []}
    for i, L in enumerate(cfg.contexts):
        entry: Dict[str, Any] = {"context": L}
        if max_input is not None and L + cfg.decode_tokens > max_input:
            entry["skipped"] = f"context {L}+{cfg.decode_tokens} exceeds server limit {max_input}"
        elif budget.remaining() < estimate_request_s(L, cfg.decode_tokens) + 5:
            entry["skipped"] = "time budget"
        if "skipped" in entry:
            log(f"  long_context {L}: skipped ({entry['skipped']})")
            res["contexts"].append(entry)
            continue
        r = generate_stream(client, make_prompt_ids(L, 200 + i), cfg.decode_tokens,
                            timeout=budget.timeout(300.0), deadline=budget.deadline)
        entry.update(_public(r))
        log(f"  long_context {L}: ok={r.get('ok')} ttft={r.get('ttft_s')} s "
            f"decode={r.get('decode_ms_per_token')} ms/tok {('err=' + str(r.get('error'))) if not r.get('ok') else ''}")
        res["contexts"].append(entry)
    ran = [c for c in res["contexts"] if "skipped" not in c]
    res["ok"] = bool(ran) and all(c.get("ok") for c in ran)
    return res


def phase_chat(client: HttpClient, cfg: "BenchConfig", budget: Budget) -> Dict[str, Any]:
    return chat_once(client, timeout=budget.timeout(60.0))


def concurrent_streams(client: HttpClient, n: int, make_ids: Callable[[int], List[int]], n_new: int,
                       budget: Budget, timeout: float) -> Tuple[List[Dict[str, Any]], float]:
    """``n`` streaming ``/generate`` requests at once, each from its own thread and client.

    Each thread builds its prompt (``make_ids(j)``), then all wait at a barrier and send
    together.  Returns the ``generate_stream`` records (in order) and the wall time.
    """
    results: List[Optional[Dict[str, Any]]] = [None] * n
    barrier = threading.Barrier(n) if n else None
    base, use_req = client.base_url, client.use_requests

    def worker(j: int) -> None:
        ids = make_ids(j)
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:
            pass
        c = HttpClient(base, use_requests=use_req)
        try:
            results[j] = generate_stream(c, ids, n_new, timeout=timeout, deadline=budget.deadline)
        except Exception as e:  # pragma: no cover - defensive
            results[j] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        finally:
            c.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, budget.remaining() + 5))
    wall = time.perf_counter() - t0
    return [r or {"ok": False, "error": "did not finish"} for r in results], wall


def phase_batching(client: HttpClient, cfg: "BenchConfig", budget: Budget) -> Dict[str, Any]:
    lengths = list(cfg.batch_lengths)
    n_new = cfg.batch_new_tokens
    results, wall = concurrent_streams(client, len(lengths), lambda j: make_prompt_ids(lengths[j], 300 + j),
                                       n_new, budget, timeout=budget.timeout(300.0))
    reqs = []
    total_tokens = 0
    firsts, lasts, decode_tokens = [], [], 0
    for j, L in enumerate(lengths):
        r = results[j]
        ct = r.get("completion_tokens") or 0
        total_tokens += ct
        if r.get("_first_token_time") is not None and r.get("_last_token_time") is not None:
            firsts.append(r["_first_token_time"])
            lasts.append(r["_last_token_time"])
            decode_tokens += max(0, (r.get("tokens") or ct) - 1)
        reqs.append({
            "prompt_len": L, "ok": bool(r.get("ok")), "completion_tokens": r.get("completion_tokens"),
            "ttft_s": r.get("ttft_s"), "total_s": r.get("total_s"),
            "decode_ms_per_token": r.get("decode_ms_per_token"), "error": r.get("error"),
        })
    res: Dict[str, Any] = {
        "n_requests": len(lengths),
        "max_new_tokens": n_new,
        "requests": reqs,
        "n_ok": sum(1 for r in reqs if r["ok"]),
        "wall_s": _round(wall, 3),
        "total_output_tokens": total_tokens,
        "output_tokens_per_s": _round(total_tokens / wall, 2) if wall > 0 else None,
    }
    if firsts:
        window = max(lasts) - min(firsts)
        res["decode_window_s"] = _round(window, 3)
        res["decode_tokens_per_s"] = _round(decode_tokens / window, 2) if window > 0 else None
    res["ok"] = res["n_ok"] == len(lengths) and len(lengths) > 0
    return res


def phase_shared_prefix(client: HttpClient, cfg: "BenchConfig", budget: Budget) -> Dict[str, Any]:
    prefix = make_prompt_ids(cfg.prefix_len, 400)
    a_ids = prefix + make_prompt_ids(cfg.suffix_len, 401)
    b_ids = prefix + make_prompt_ids(cfg.suffix_len, 402)
    n = cfg.prefix_new_tokens
    a = generate_once(client, a_ids, n, timeout=budget.timeout(120.0))
    b = generate_once(client, b_ids, n, timeout=budget.timeout(120.0))
    res: Dict[str, Any] = {
        "prefix_len": cfg.prefix_len, "suffix_len": cfg.suffix_len, "max_new_tokens": n,
        "a": {k: a.get(k) for k in ("ok", "completion_tokens", "cached_tokens", "latency_s", "output_ids", "error")},
        "b": {k: b.get(k) for k in ("ok", "completion_tokens", "cached_tokens", "latency_s", "output_ids", "error")},
    }
    cached_b = b.get("cached_tokens")
    res["cached_tokens_b"] = cached_b
    res["radix_hit"] = isinstance(cached_b, (int, float)) and cached_b > 0
    res["ok"] = bool(a.get("ok")) and bool(b.get("ok")) and res["radix_hit"]
    return res


def parse_throughput(text: str) -> List[Tuple[int, int]]:
    """``"32x24576,64x8192"`` -> ``[(32, 24576), (64, 8192)]`` (requests x prompt tokens)."""
    out = []
    for part in parse_str_list(text):
        m = re.match(r"^(\d+)[xX*](\d+(?:\.\d+)?)$", part)
        if not m or int(m.group(1)) < 1 or int(float(m.group(2))) < 1:
            raise ValueError(f"bad throughput configuration {part!r}; expected NxL, e.g. 32x24576")
        out.append((int(m.group(1)), int(float(m.group(2)))))
    return out


def throughput_label(n: int, prompt_len: int) -> str:
    return f"{int(n)}x{int(prompt_len)}"


def estimate_throughput_s(n: int, prompt_len: int, n_new: int) -> float:
    """Conservative wall-time guess for one throughput configuration (H200, 8B model)."""
    return 5.0 + n * prompt_len / THROUGHPUT_PREFILL_TOK_S + n_new * 0.06


def _first_token_time(events: Sequence[Tuple[float, Optional[int]]]) -> Optional[float]:
    for t, n in events:
        if n is not None and n >= 1:
            return t
    return None


def _last_token_time(events: Sequence[Tuple[float, Optional[int]]]) -> Optional[float]:
    for t, n in reversed(list(events)):
        if n is not None and n >= 1:
            return t
    return None


def tokens_at(events: Sequence[Tuple[float, Optional[int]]], t: float) -> int:
    """Cumulative tokens a stream had received at time ``t`` (last event at or before ``t``)."""
    got = 0
    for te, n in events:
        if te > t:
            break
        if n is not None:
            got = max(got, int(n))
    return got


def steady_window(streams: Sequence[Sequence[Tuple[float, Optional[int]]]]) -> Optional[Tuple[float, float]]:
    """``(start, end)`` in which every stream is decoding: from the last first token to
    the first last token; None when some stream has no token or the spans do not overlap."""
    firsts = [_first_token_time(ev) for ev in streams]
    lasts = [_last_token_time(ev) for ev in streams]
    if not streams or any(t is None for t in firsts + lasts):
        return None
    start, end = max(firsts), min(lasts)
    return (start, end) if end > start else None


def window_intervals(events: Sequence[Tuple[float, Optional[int]]], start: float, end: float) -> List[float]:
    """Per-token intervals (s) between consecutive events inside ``[start, end]``
    (a chunk of ``dn`` tokens after ``dt`` counts as ``dn`` intervals of ``dt/dn``)."""
    out: List[float] = []
    prev: Optional[Tuple[float, int]] = None
    for t, n in events:
        if n is None or t < start or t > end:
            continue
        if prev is not None and n > prev[1]:
            out.extend([(t - prev[0]) / (n - prev[1])] * (n - prev[1]))
        if prev is None or n > prev[1]:
            prev = (t, int(n))
    return out


def _spread(values: Sequence[float], nd: int = 3) -> Optional[Dict[str, Optional[float]]]:
    """min / median / max of ``values`` (None when empty)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"min": _round(min(vals), nd), "median": _round(statistics.median(vals), nd),
            "max": _round(max(vals), nd)}


def summarize_throughput(streams: Sequence[Dict[str, Any]], prompt_len: int, n_new: int) -> Dict[str, Any]:
    """Timing summary of N concurrent streams of ``prompt_len`` prompt tokens each.

    ``streams``: one dict per request with ``t_send`` (perf_counter), ``events``
    (``(time, cumulative_tokens)``) and ``ok``.  Prefill accounting: ``prefill_s`` runs
    from the first send to the last first token (every request prefilled).  Steady
    decode: in the window where all requests decode (``steady_window``), aggregate
    tokens/s = tokens received in the window by all requests / window length;
    ``steady_ms_per_step`` = window / tokens per request in it; per-request median
    inter-token latencies inside the window (and over each whole stream) as
    min/median/max over the requests.
    """
    n = len(streams)
    events = [list(s.get("events") or []) for s in streams]
    sends = [s["t_send"] for s in streams if s.get("t_send") is not None]
    firsts = [_first_token_time(ev) for ev in events]
    lasts = [_last_token_time(ev) for ev in events]
    out: Dict[str, Any] = {
        "n_requests": n, "n_ok": sum(1 for s in streams if s.get("ok")),
        "prompt_len": int(prompt_len), "max_new_tokens": int(n_new),
        "prefill_tokens": n * int(prompt_len),
        "output_tokens": sum(tokens_at(ev, float("inf")) for ev in events),
    }
    t0 = min(sends) if sends else None
    got_first = [f for f in firsts if f is not None]
    if t0 is not None and got_first:
        out["ttft_s"] = _spread([f - s["t_send"] for f, s in zip(firsts, streams)
                                 if f is not None and s.get("t_send") is not None])
        if len(got_first) == n:
            out["prefill_s"] = _round(max(got_first) - t0, 3)
            out["prefill_tokens_per_s"] = (_round(out["prefill_tokens"] / (max(got_first) - t0), 1)
                                           if max(got_first) > t0 else None)
        got_last = [t for t in lasts if t is not None]
        out["wall_s"] = _round(max(got_last) - t0, 3) if got_last else None
    whole = [summarize_stream(s.get("t_send") or 0.0, ev).get("decode_ms_per_token_median")
             for s, ev in zip(streams, events)]
    out["per_request_decode_ms"] = _spread(whole)
    win = steady_window(events) if n else None
    if win is None:
        out["steady_window_s"] = None
        out["steady_note"] = "no window in which all requests decode (queued requests or too few tokens)"
        return out
    start, end = win
    per_req = [tokens_at(ev, end) - tokens_at(ev, start) for ev in events]
    tokens = sum(per_req)
    span = end - start
    out["steady_window_s"] = _round(span, 4)
    out["steady_tokens"] = tokens
    out["steady_decode_tokens_per_s"] = _round(tokens / span, 2) if span > 0 else None
    mean_steps = tokens / n
    out["steady_ms_per_step"] = _round(span / mean_steps * 1000.0, 4) if mean_steps > 0 else None
    meds = []
    for ev in events:
        iv = window_intervals(ev, start, end)
        meds.append(statistics.median(iv) * 1000.0 if iv else None)
    out["steady_per_request_decode_ms"] = _spread(meds, 4)
    return out


def flush_cache(client: HttpClient, timeout: float = 30.0) -> Optional[int]:
    """``POST /flush_cache`` (drops the radix cache); the HTTP status, None on error."""
    try:
        status, _ = client.post_json("/flush_cache", {}, timeout)
        return status
    except Exception:
        return None


def run_throughput_config(client: HttpClient, n: int, prompt_len: int, n_new: int, budget: Budget,
                          server_info: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """One ``NxL`` configuration: KV/concurrency checks, N concurrent streams, summary."""
    res: Dict[str, Any] = {"config": throughput_label(n, prompt_len), "warnings": []}
    needed = n * (prompt_len + n_new)
    res["kv_tokens_needed"] = needed
    mt = server_info.get("max_total_num_tokens")
    res["max_total_num_tokens"] = mt
    res["kv_pool_fits"] = (needed <= mt) if isinstance(mt, int) else None
    if res["kv_pool_fits"] is False:
        res["warnings"].append(f"KV pool too small: {n}x({prompt_len}+{n_new}) = {needed} tokens > "
                               f"max_total_num_tokens {mt}; requests will queue")
    mrr = server_info.get("max_running_requests")
    res["max_running_requests"] = mrr
    if isinstance(mrr, int) and mrr < n:
        res["warnings"].append(f"max_running_requests {mrr} < {n}; requests will queue")
    for w in res["warnings"]:
        log(f"  throughput {res['config']}: WARNING {w}")
    res["flush_cache_status"] = flush_cache(client, timeout=budget.timeout(30.0))
    recs, wall = concurrent_streams(
        client, n, lambda j: make_prompt_ids(prompt_len, seed + j), n_new, budget,
        timeout=budget.timeout(600.0))
    streams = [{"t_send": r.get("_t_send"), "events": r.get("_events") or [], "ok": bool(r.get("ok"))}
               for r in recs]
    res.update(summarize_throughput(streams, prompt_len, n_new))
    res["client_wall_s"] = _round(wall, 3)
    errors = [r.get("error") for r in recs if not r.get("ok")]
    if errors:
        res["errors"] = errors[:5]
    res["ok"] = res["n_ok"] == n and res.get("steady_decode_tokens_per_s") is not None
    return res


def phase_throughput(client: HttpClient, cfg: "BenchConfig", budget: Budget,
                     server_info: Dict[str, Any]) -> Dict[str, Any]:
    """Every ``cfg.throughput`` configuration that fits the budget, radix cache flushed before each."""
    res: Dict[str, Any] = {"decode_tokens": cfg.throughput_decode_tokens, "configs": []}
    n_new = cfg.throughput_decode_tokens
    for k, (n, L) in enumerate(cfg.throughput):
        need = estimate_throughput_s(n, L, n_new)
        if budget.remaining() < need:
            entry = {"config": throughput_label(n, L),
                     "skipped": f"time budget ({budget.remaining():.0f} s left, need ~{need:.0f} s)"}
            log(f"  throughput {entry['config']}: skipped ({entry['skipped']})")
            res["configs"].append(entry)
            continue
        t0 = time.monotonic()
        entry = run_throughput_config(client, n, L, n_new, budget, server_info, seed=10_000 * (k + 1))
        entry["elapsed_s"] = _round(time.monotonic() - t0, 2)
        log(f"  throughput {entry['config']}: ok={entry.get('ok')} prefill={entry.get('prefill_s')} s "
            f"steady={entry.get('steady_decode_tokens_per_s')} tok/s "
            f"({entry.get('steady_ms_per_step')} ms/step) wall={entry.get('wall_s')} s")
        res["configs"].append(entry)
    ran = [c for c in res["configs"] if "skipped" not in c]
    res["ok"] = bool(ran) and all(c.get("ok") for c in ran)
    return res


# --------------------------------------------------------------------------
# one backend: server start, phases, stop
# --------------------------------------------------------------------------


def run_backend(backend: str, idx: int, cfg: BenchConfig, args: argparse.Namespace,
                model_dir: str, results: Dict[str, Any], total: Budget, n_left: int,
                save: Callable[[], None]) -> None:
    """Start one server, run the selected phases within the time plan, stop it by PID."""
    port = pick_port(args.host, args.port)
    log_name = f"server_{re.sub(r'[^A-Za-z0-9_.-]', '_', backend)}.log"
    log_path = os.path.join(args.out_dir, log_name)
    cmd = build_server_cmd(backend, model_dir, args.host, port, args.python,
                           args.common_server_args, args.extra_server_args,
                           args.tokenselect_args, template=args.server_cmd,
                           context_length=cfg.context_length)
    extra_env = server_env(cfg.context_length)
    rec: Dict[str, Any] = {
        "server": {"cmd": shlex.join(cmd), "env": extra_env, "port": port, "log_file": log_name,
                   "ready": False},
        "phases": {},
        "errors": [],
    }
    results["backends"][backend] = rec
    t_backend = time.monotonic()
    limit = start_limit_s(total.remaining(), n_left, args.server_start_timeout)
    rec["server"]["start_limit_s"] = _round(limit, 1)
    save()
    log(f"[{backend}] starting server (start limit {limit:.0f} s, {total.remaining():.0f} s left in all, "
        f"{n_left} backend(s) to go): {shlex.join(cmd)}")
    server_cwd = os.path.abspath(args.out_dir)
    rec["server"]["cwd"] = server_cwd
    server = ServerProcess(cmd, log_path, env={**os.environ, **extra_env}, cwd=server_cwd)
    client = HttpClient(f"http://{args.host}:{port}", use_requests=None if not args.no_requests else False)
    try:
        server.start()
        ready = wait_ready(client, server, total.sub(limit))
        rec["server"].update(ready)
        if not ready.get("ready"):
            rec["server"]["log_tail"] = tail_file(log_path, 40)
            log(f"[{backend}] server NOT ready: {ready.get('error')}; log tail:")
            for line in rec["server"]["log_tail"][-8:]:
                log(f"    | {line}")
            save()
            return
        budget = total.sub(phase_time_s(total.remaining(), n_left, time.monotonic() - t_backend))
        rec["phase_budget_s"] = _round(budget.remaining(), 1)
        log(f"[{backend}] server ready in {ready.get('ready_s')} s; phases get {budget.remaining():.0f} s")
        rec["server"]["server_info"] = fetch_server_info(client, timeout=budget.timeout(10.0))
        si = rec["server"]["server_info"]
        max_input = server_max_input(si)
        save()

        phase_fns = {
            "warmup": (lambda: phase_warmup(client, cfg, budget), 20),
            "correctness": (lambda: phase_correctness(client, cfg, budget), 10),
            "long_context": (lambda: phase_long_context(client, cfg, budget, max_input), 10),
            "chat": (lambda: phase_chat(client, cfg, budget), 5),
            "batching": (lambda: phase_batching(client, cfg, budget),
                         5 + sum(cfg.batch_lengths) / 6000.0 + 3),
            "shared_prefix": (lambda: phase_shared_prefix(client, cfg, budget),
                              2 * estimate_request_s(cfg.prefix_len, cfg.prefix_new_tokens)),
            # each configuration checks the budget itself (skipped ones are recorded)
            "throughput": (lambda: phase_throughput(client, cfg, budget, si), 10),
        }
        for name in ALL_PHASES:
            if name not in cfg.phases:
                continue
            fn, need = phase_fns[name]
            if budget.remaining() < need:
                rec["phases"][name] = {"skipped": f"time budget ({budget.remaining():.0f} s left, need ~{need:.0f} s)"}
                log(f"[{backend}] phase {name}: skipped (time budget)")
                save()
                continue
            if not server.alive():
                rec["phases"][name] = {"skipped": f"server died (rc={server.returncode()})"}
                save()
                continue
            t0 = time.monotonic()
            log(f"[{backend}] phase {name} ...")
            try:
                out = fn()
            except Exception as e:
                out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
            out["elapsed_s"] = _round(time.monotonic() - t0, 2)
            rec["phases"][name] = out
            log(f"[{backend}] phase {name}: ok={out.get('ok')} ({out['elapsed_s']} s)")
            save()
    except _Terminated as e:
        rec["errors"].append(f"terminated: {e}")
        raise
    except Exception as e:
        rec["errors"].append(f"{type(e).__name__}: {e}"[:500])
    finally:
        alive_before = server.alive()
        stop = server.stop(grace_s=args.stop_grace)
        stop["alive_before_stop"] = alive_before
        rec["server"]["stop"] = stop
        client.close()
        rec["phases"]["log"] = analyze_log(log_path)
        if cap_file_size(log_path):
            rec["phases"]["log"]["log_file_truncated"] = True
        rec["elapsed_s"] = _round(time.monotonic() - t_backend, 2)
        save()
        # let the port and GPU memory go before the next server
        end = time.monotonic() + 10
        while time.monotonic() < end and not port_is_free(args.host, port):
            time.sleep(0.5)
