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
every step, ``@t-1`` selects once per request); e.g. ``tokenselect@t0.9@nocg``.
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
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

try:  # optional dependency
    import requests as _requests  # type: ignore
except Exception:  # pragma: no cover - exercised when requests is missing
    _requests = None

SCHEMA_VERSION = 1
JSON_NAME = "e2e.json"
STDOUT_COPY_NAME = "e2e_stdout.log"

DEFAULT_BACKENDS = "flashinfer,tokenselect"
DEFAULT_CONTEXTS = "4096,32768,122880"
QUICK_CONTEXTS = "4096,32768"
DEFAULT_BATCH_LENGTHS = "1024,2048,4096,8192,12288,16384,24576,32768"
QUICK_BATCH_LENGTHS = "1024,4096,8192,16384"
DEFAULT_CORRECTNESS_LENGTHS = "300,1000,2000"
DEFAULT_TOKENSELECT_ARGS = "--tokenselect-stats-interval 64"
DEFAULT_COMMON_SERVER_ARGS = "--max-running-requests 16 --chunked-prefill-size 16384"
DEFAULT_MODEL_DIR = "/tmp/sglang_tokenselect_dummy_llama3_8b"
ALL_PHASES = ("warmup", "correctness", "long_context", "chat", "batching", "shared_prefix", "throughput")
DEFAULT_PHASES = ALL_PHASES[:-1]  # throughput prefills ~1M tokens: only on request
DEFAULT_THROUGHPUT = "32x24576,64x8192"
PLOT_NAME = "e2e_decode.png"

# SGLang 0.5.17 refuses --context-length above the model config's length unless this is
# set (sglang/srt/configs/model_config.py, _derive_context_length); the RoPE cache is then
# extended to the server's context length (reserve_rope_cache_for_long_sequences).
ALLOW_LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"

# Time planning: every later backend keeps at least this much (a warm server start is
# ~70 s, plus a few phases) when an earlier server start runs long.
LATER_BACKEND_MIN_S = 150.0
FINAL_RESERVE_S = 15.0  # final shutdown + report
# Conservative prefill rate (tokens/s) of the 8B model on an H200 for 8K-24K prompts,
# used only to decide whether a throughput configuration still fits the budget.
THROUGHPUT_PREFILL_TOK_S = 12000.0

# Random prompt ids are drawn from [PROMPT_ID_LO, PROMPT_ID_HI): regular (non
# special) ids of the dummy tokenizer, whose vocab is the model's 128256.
PROMPT_ID_LO = 1000
PROMPT_ID_HI = 128000

SERVER_INFO_KEYS = (
    "attention_backend",
    "prefill_attention_backend",
    "decode_attention_backend",
    "sampling_backend",
    "mem_fraction_static",
    "chunked_prefill_size",
    "max_running_requests",
    "context_length",
    "max_total_num_tokens",
    "max_req_input_len",
    "page_size",
    "disable_radix_cache",
    "disable_cuda_graph",
    "cuda_graph_max_bs",
    "cuda_graph_bs",
    "dtype",
    "kv_cache_dtype",
    "tp_size",
    "version",
    "load_format",
)


# --------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------

_STDOUT_COPY: List[Any] = []


def log(msg: str) -> None:
    line = f"[e2e {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    for f in _STDOUT_COPY:
        try:
            f.write(line + "\n")
            f.flush()
        except Exception:
            pass


def parse_int_list(text: str) -> List[int]:
    out = []
    for part in str(text).replace(" ", "").split(","):
        if part:
            out.append(int(float(part)))
    return out


def parse_str_list(text: str) -> List[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def _round(x: Optional[float], nd: int = 3) -> Optional[float]:
    if x is None:
        return None
    try:
        return round(float(x), nd)
    except (TypeError, ValueError):
        return None


def make_prompt_ids(length: int, seed: int, lo: int = PROMPT_ID_LO, hi: int = PROMPT_ID_HI) -> List[int]:
    """``length`` pseudo-random token ids in ``[lo, hi)``, reproducible from ``seed``."""
    rng = random.Random(int(seed) * 1_000_003 + int(length))
    return [rng.randrange(lo, hi) for _ in range(int(length))]


class Budget:
    """A wall-clock deadline (monotonic seconds)."""

    def __init__(self, seconds: float, start: Optional[float] = None):
        self.start = time.monotonic() if start is None else start
        self.deadline = self.start + float(seconds)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def sub(self, seconds: float) -> "Budget":
        """A child budget ending at ``min(now + seconds, self.deadline)``."""
        b = Budget(0.0)
        b.deadline = min(time.monotonic() + max(0.0, seconds), self.deadline)
        return b

    def timeout(self, wanted: float, floor: float = 1.0) -> float:
        """``wanted`` capped by what is left (never below ``floor``)."""
        return max(floor, min(float(wanted), self.remaining()))


# --------------------------------------------------------------------------
# HTTP client (requests if importable, urllib otherwise)
# --------------------------------------------------------------------------


class HttpError(Exception):
    pass


class HttpClient:
    """Minimal JSON/SSE client; every call has a timeout."""

    def __init__(self, base_url: str, use_requests: Optional[bool] = None):
        self.base_url = base_url.rstrip("/")
        if use_requests is None:
            use_requests = _requests is not None
        self.use_requests = bool(use_requests and _requests is not None)
        self._session = _requests.Session() if self.use_requests else None
        if self._session is not None:
            self._session.trust_env = False  # never route 127.0.0.1 through an env proxy
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def close(self) -> None:
        if self._session is not None:
            self._session.close()

    def _url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, timeout: float) -> Tuple[int, str]:
        if self.use_requests:
            r = self._session.get(self._url(path), timeout=timeout)
            return r.status_code, r.text
        req = urllib.request.Request(self._url(path), method="GET")
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode("utf-8", "replace")

    def post_json(self, path: str, payload: Dict[str, Any], timeout: float) -> Tuple[int, Any]:
        """POST JSON; returns (status, parsed JSON or raw text)."""
        if self.use_requests:
            r = self._session.post(self._url(path), json=payload, timeout=timeout)
            status, text = r.status_code, r.text
        else:
            data = json.dumps(payload).encode("utf-8")
            req = urllib.request.Request(
                self._url(path), data=data, method="POST",
                headers={"Content-Type": "application/json"},
            )
            try:
                with self._opener.open(req, timeout=timeout) as resp:
                    status, text = resp.status, resp.read().decode("utf-8", "replace")
            except urllib.error.HTTPError as e:
                status, text = e.code, e.read().decode("utf-8", "replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def post_stream(
        self, path: str, payload: Dict[str, Any], timeout: float, deadline: Optional[float] = None
    ) -> Iterator[Tuple[float, Dict[str, Any]]]:
        """POST and yield ``(perf_counter_time, event_dict)`` for each SSE ``data:`` event.

        ``timeout`` bounds each socket read; ``deadline`` (monotonic) bounds the whole
        stream.  Raises HttpError on a non-200 status.
        """
        if self.use_requests:
            r = self._session.post(self._url(path), json=payload, timeout=timeout, stream=True)
            try:
                if r.status_code != 200:
                    raise HttpError(f"HTTP {r.status_code}: {r.text[:500]}")
                yield from _sse_events(r.iter_lines(chunk_size=None, decode_unicode=False), deadline)
            finally:
                r.close()
            return
        data = json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(
            self._url(path), data=data, method="POST",
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        try:
            resp = self._opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise HttpError(f"HTTP {e.code}: {e.read()[:500]!r}") from None
        with resp:
            yield from _sse_events(iter(resp.readline, b""), deadline)


_SSE_DONE = object()


def _sse_events(lines: Iterable[Any], deadline: Optional[float]) -> Iterator[Tuple[float, Dict[str, Any]]]:
    """``(perf_counter_time, event)`` for each SSE ``data:`` line of ``lines``.

    After ``[DONE]`` the rest of the body is still read, so the connection closes cleanly
    (no reset on the server side).
    """
    done = False
    for raw in lines:
        ev = None if done else _parse_sse_line(raw)
        if ev is _SSE_DONE:
            done = True
            continue
        if ev is not None:
            yield time.perf_counter(), ev
        if deadline is not None and time.monotonic() > deadline:
            raise HttpError("stream deadline exceeded")


def _parse_sse_line(raw: Any) -> Any:
    """One SSE line -> dict, ``_SSE_DONE``, or None (blank/comment/non-JSON)."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    line = raw.strip()
    if not line.startswith("data:"):
        return None
    body = line[5:].strip()
    if body == "[DONE]":
        return _SSE_DONE
    try:
        ev = json.loads(body)
    except ValueError:
        return None
    return ev if isinstance(ev, dict) else None


# --------------------------------------------------------------------------
# request helpers (the measurement client)
# --------------------------------------------------------------------------


def gen_payload(input_ids: Sequence[int], max_new_tokens: int, stream: bool = False,
                return_logprob: bool = False) -> Dict[str, Any]:
    p: Dict[str, Any] = {
        "input_ids": list(input_ids),
        "sampling_params": {
            "temperature": 0,
            "max_new_tokens": int(max_new_tokens),
            "ignore_eos": True,
        },
    }
    if stream:
        p["stream"] = True
    if return_logprob:
        p["return_logprob"] = True
    return p


def _output_ids(resp: Dict[str, Any]) -> Optional[List[int]]:
    ids = resp.get("output_ids")
    if isinstance(ids, list):
        return [int(x) for x in ids]
    mi = resp.get("meta_info") or {}
    lp = mi.get("output_token_logprobs")
    if isinstance(lp, list) and lp and isinstance(lp[0], (list, tuple)):
        return [int(x[1]) for x in lp]
    return None


def _completion_tokens(resp: Dict[str, Any]) -> Optional[int]:
    mi = resp.get("meta_info") or {}
    ct = mi.get("completion_tokens")
    if isinstance(ct, (int, float)):
        return int(ct)
    ids = resp.get("output_ids")
    if isinstance(ids, list):
        return len(ids)
    return None


def generate_once(client: HttpClient, input_ids: Sequence[int], max_new_tokens: int,
                  timeout: float, return_logprob: bool = False) -> Dict[str, Any]:
    """Non-streaming ``/generate``; returns a compact record."""
    t0 = time.perf_counter()
    rec: Dict[str, Any] = {"prompt_len": len(input_ids), "max_new_tokens": int(max_new_tokens)}
    try:
        status, body = client.post_json(
            "/generate", gen_payload(input_ids, max_new_tokens, return_logprob=return_logprob), timeout
        )
    except Exception as e:  # timeout, connection refused, ...
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500], latency_s=_round(time.perf_counter() - t0))
        return rec
    rec["latency_s"] = _round(time.perf_counter() - t0, 4)
    rec["http_status"] = status
    if status != 200 or not isinstance(body, dict):
        rec.update(ok=False, error=str(body)[:500])
        return rec
    mi = body.get("meta_info") or {}
    ids = _output_ids(body)
    ct = _completion_tokens(body)
    rec.update(
        output_ids=ids,
        completion_tokens=ct,
        cached_tokens=mi.get("cached_tokens"),
        prompt_tokens=mi.get("prompt_tokens"),
        finish_reason=mi.get("finish_reason"),
        e2e_latency_s=_round(mi.get("e2e_latency"), 4),
    )
    lp = mi.get("output_token_logprobs")
    if isinstance(lp, list):
        vals = []
        for x in lp:
            if isinstance(x, (list, tuple)) and x and isinstance(x[0], (int, float)):
                vals.append(float(x[0]))
        if vals:
            rec["output_logprobs"] = [round(v, 5) for v in vals]
    rec["ok"] = ct == int(max_new_tokens)
    if not rec["ok"]:
        rec["error"] = f"completion_tokens={ct}, expected {max_new_tokens}"
    return rec


def summarize_stream(t_send: float, events: Sequence[Tuple[float, int]]) -> Dict[str, Any]:
    """Timing summary from ``(time, cumulative_completion_tokens)`` stream events.

    TTFT = first event with >= 1 token minus ``t_send``.  Each later event that
    adds ``dn`` tokens after ``dt`` seconds contributes ``dn`` intervals of
    ``dt/dn`` (coalesced chunks are spread evenly); decode ms/token is the median
    of those intervals, and the mean is the whole decode window over its tokens.
    If the median is below half the mean (events bunched in transit) the mean is
    reported as ``decode_ms_per_token`` instead (``decode_metric`` says which).
    """
    out: Dict[str, Any] = {
        "ttft_s": None, "decode_ms_per_token": None, "decode_ms_per_token_mean": None,
        "decode_ms_per_token_p90": None, "decode_tokens_per_s": None,
        "n_events": len(events), "tokens": 0,
    }
    first_t = None
    first_n = 0
    last_t = None
    last_n = 0
    intervals: List[float] = []
    for t, n in events:
        if n is None:
            continue
        if first_t is None:
            if n >= 1:
                first_t, first_n = t, n
                last_t, last_n = t, n
            continue
        dn = n - last_n
        if dn <= 0:
            continue
        dt = t - last_t
        intervals.extend([dt / dn] * dn)
        last_t, last_n = t, n
    out["tokens"] = last_n
    if first_t is None:
        return out
    out["ttft_s"] = _round(first_t - t_send, 4)
    if intervals:
        med = statistics.median(intervals) * 1000.0
        mean = (last_t - first_t) / (last_n - first_n) * 1000.0
        srt = sorted(intervals)
        p90 = srt[min(len(srt) - 1, int(round(0.9 * (len(srt) - 1))))] * 1000.0
        # Events bunched in transit (e.g. Nagle) make many intervals ~0 and the
        # median meaningless; the window mean is immune, so fall back to it.
        bunched = med < 0.5 * mean
        primary = mean if bunched else med
        out["decode_ms_per_token"] = _round(primary, 4)
        out["decode_ms_per_token_median"] = _round(med, 4)
        out["decode_ms_per_token_mean"] = _round(mean, 4)
        out["decode_ms_per_token_p90"] = _round(p90, 4)
        out["decode_metric"] = "window_mean (stream events bunched)" if bunched else "median_itl"
        out["decode_tokens_per_s"] = _round(1000.0 / primary, 2) if primary > 0 else None
        out["decode_window_s"] = _round(last_t - first_t, 4)
    out["first_token_time"] = first_t
    out["last_token_time"] = last_t
    return out


def generate_stream(client: HttpClient, input_ids: Sequence[int], max_new_tokens: int,
                    timeout: float, deadline: Optional[float] = None) -> Dict[str, Any]:
    """Streaming ``/generate``; returns TTFT, decode ms/token, output ids, ..."""
    rec: Dict[str, Any] = {"prompt_len": len(input_ids), "max_new_tokens": int(max_new_tokens)}
    events: List[Tuple[float, int]] = []
    last: Dict[str, Any] = {}
    t_send = time.perf_counter()
    try:
        for t, ev in client.post_stream(
            "/generate", gen_payload(input_ids, max_new_tokens, stream=True), timeout, deadline
        ):
            if "error" in ev and "meta_info" not in ev:
                raise HttpError(f"server error event: {str(ev['error'])[:300]}")
            events.append((t, _completion_tokens(ev)))
            last = ev
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:500])
    t_end = time.perf_counter()
    summ = summarize_stream(t_send, events)
    mi = last.get("meta_info") or {}
    rec.update({k: v for k, v in summ.items() if k not in ("first_token_time", "last_token_time")})
    rec["_first_token_time"] = summ.get("first_token_time")
    rec["_last_token_time"] = summ.get("last_token_time")
    rec["_t_send"] = t_send
    rec["_events"] = events
    rec["total_s"] = _round(t_end - t_send, 4)
    rec["completion_tokens"] = _completion_tokens(last) if last else None
    rec["cached_tokens"] = mi.get("cached_tokens")
    rec["finish_reason"] = mi.get("finish_reason")
    rec["e2e_latency_s"] = _round(mi.get("e2e_latency"), 4)
    ids = last.get("output_ids") if last else None
    # Non-incremental streaming (SGLang's default) sends cumulative ids; the
    # last event then holds them all.  Keep them only when complete.
    if isinstance(ids, list) and len(ids) == rec["completion_tokens"]:
        rec["output_ids"] = [int(x) for x in ids]
    if "ok" not in rec:
        rec["ok"] = rec["completion_tokens"] == int(max_new_tokens)
        if not rec["ok"]:
            rec["error"] = f"completion_tokens={rec['completion_tokens']}, expected {max_new_tokens}"
    return rec


def _public(rec: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in rec.items() if not k.startswith("_")}


def chat_once(client: HttpClient, timeout: float, max_tokens: int = 16) -> Dict[str, Any]:
    payload = {
        "model": "default",
        "messages": [{"role": "user", "content": "Write one short sentence about the sea."}],
        "max_tokens": int(max_tokens),
        "temperature": 0,
    }
    t0 = time.perf_counter()
    rec: Dict[str, Any] = {}
    try:
        status, body = client.post_json("/v1/chat/completions", payload, timeout)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    rec["latency_s"] = _round(time.perf_counter() - t0, 4)
    rec["http_status"] = status
    choices = body.get("choices") if isinstance(body, dict) else None
    rec["n_choices"] = len(choices) if isinstance(choices, list) else 0
    rec["ok"] = status == 200 and rec["n_choices"] > 0
    if isinstance(body, dict):
        rec["usage"] = body.get("usage")
        if rec["n_choices"]:
            ch = choices[0] or {}
            msg = ch.get("message") or {}
            content = msg.get("content")
            rec["finish_reason"] = ch.get("finish_reason")
            rec["content_preview"] = (content or "")[:80]
    if not rec["ok"]:
        rec["error"] = str(body)[:500]
    return rec


# --------------------------------------------------------------------------
# server log parsing
# --------------------------------------------------------------------------

_STATS_RE = re.compile(r"TokenSelect stats", re.IGNORECASE)
_KV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)")


def parse_stats_lines(text: str) -> Optional[Dict[str, Any]]:
    """Selection Cache stats from ``TokenSelect stats: ... hits=H misses=M ...`` lines.

    Uses the last line that has both ``hits=`` and ``misses=`` (counters
    cumulative since server start).  If the counters look per-interval
    (``decode_steps`` -- or ``hits+misses`` without it -- not strictly increasing,
    or ``hits``/``misses`` decreasing) the lines are summed instead.  Returns None when no such line exists.
    """
    lines = []
    for line in text.splitlines():
        if not _STATS_RE.search(line):
            continue
        kv: Dict[str, float] = {}
        for k, v in _KV_RE.findall(line):
            try:
                kv[k] = float(v)
            except ValueError:
                continue
        if "hits" in kv and "misses" in kv:
            lines.append((line.strip(), kv))
    if not lines:
        return None

    def key(kv: Dict[str, float]) -> float:
        return kv.get("decode_steps", kv["hits"] + kv["misses"])

    seq = [key(kv) for _, kv in lines]
    cumulative = all(b > a for a, b in zip(seq, seq[1:])) and all(
        b[1][k] >= a[1][k] for a, b in zip(lines, lines[1:]) for k in ("hits", "misses")
    )
    last_line, last_kv = lines[-1]
    if cumulative:
        agg = dict(last_kv)
    else:
        agg = {}
        for _, kv in lines:
            for k, v in kv.items():
                if k in ("hit_rate",):
                    continue
                agg[k] = agg.get(k, 0.0) + v
    hits, misses = agg["hits"], agg["misses"]
    out: Dict[str, Any] = {
        "n_lines": len(lines),
        "counters": "cumulative" if cumulative else "per_interval_summed",
        "hits": int(hits),
        "misses": int(misses),
        "hit_rate": _round(hits / (hits + misses), 4) if hits + misses > 0 else None,
        "reported_hit_rate": _round(last_kv.get("hit_rate"), 4),
        "last_line": last_line[-400:],
    }
    for k in ("decode_steps", "selections", "dense"):
        if k in agg:
            out[k] = int(agg[k])
    return out


def scan_log_errors(text: str, max_examples: int = 5) -> Dict[str, Any]:
    tb = 0
    err_lines: List[str] = []
    for line in text.splitlines():
        if "Traceback" in line:
            tb += 1
        if "Error" in line or "Traceback" in line:
            err_lines.append(line.strip()[:300])
    return {
        "traceback_count": tb,
        "error_line_count": sum(1 for l in err_lines if "Error" in l),
        "examples": err_lines[:max_examples],
    }


def analyze_log(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return {"error": f"cannot read log: {e}"}
    res: Dict[str, Any] = {"log_bytes": len(text)}
    res.update(scan_log_errors(text))
    res["selection_cache"] = parse_stats_lines(text)
    return res


def cap_file_size(path: str, max_bytes: int = 8 << 20, head: int = 2 << 20, tail: int = 4 << 20) -> bool:
    """Keep a log under ``max_bytes`` (first ``head`` + last ``tail`` bytes); True if cut."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            return False
        with open(path, "rb") as f:
            a = f.read(head)
            f.seek(size - tail)
            b = f.read(tail)
        with open(path, "wb") as f:
            f.write(a + f"\n... [{size - head - tail} bytes cut by e2e_bench] ...\n".encode() + b)
        return True
    except OSError:
        return False


def tail_file(path: str, n: int = 30) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return [l.rstrip("\n")[:400] for l in f.readlines()[-n:]]
    except OSError:
        return []


# --------------------------------------------------------------------------
# server process
# --------------------------------------------------------------------------


BACKEND_VARIANTS = {"nocg": ["--disable-cuda-graph"]}
THRESHOLD_FLAG = "--tokenselect-cache-threshold"
_THRESHOLD_RE = re.compile(r"^t([-+]?(?:\d+\.?\d*|\.\d+))$")


def variant_args(base: str, variant: str, label: str = "") -> List[str]:
    """Server flags of one ``@variant`` of backend ``base``.

    ``nocg`` -> ``--disable-cuda-graph``; ``t<float>`` (tokenselect only) ->
    ``--tokenselect-cache-threshold=<float>`` (the ``=`` form keeps ``-1`` a value).
    """
    if variant in BACKEND_VARIANTS:
        return list(BACKEND_VARIANTS[variant])
    m = _THRESHOLD_RE.match(variant)
    if m:
        if base != "tokenselect":
            raise ValueError(f"variant {variant!r} in {label!r}: a cache threshold needs the tokenselect backend")
        return [f"{THRESHOLD_FLAG}={m.group(1)}"]
    raise ValueError(f"unknown backend variant {variant!r} in {label!r}; known: "
                     f"{sorted(BACKEND_VARIANTS)} and t<float> (tokenselect cache threshold)")


def split_backend(label: str) -> Tuple[str, List[str]]:
    """``tokenselect@t0.9@nocg`` -> (``tokenselect``, [threshold flag, ``--disable-cuda-graph``])."""
    base, *variants = label.split("@")
    if not base:
        raise ValueError(f"backend label {label!r} has no backend name")
    args: List[str] = []
    for v in variants:
        args += variant_args(base, v, label)
    return base, args


def server_env(context_length: Optional[int]) -> Dict[str, str]:
    """Extra environment of every server: a ``--context-length`` may exceed the model config's."""
    return {ALLOW_LONGER_CONTEXT_ENV: "1"} if context_length else {}


def build_server_cmd(label: str, model_dir: str, host: str, port: int, python: str,
                     common_args: str, extra_args: str, tokenselect_args: str,
                     template: Optional[str] = None, context_length: Optional[int] = None) -> List[str]:
    """Command line of one server.  ``template`` (tests) replaces the launcher.

    Order: launcher, model/host/port, ``common_args``, ``--context-length``, the
    tokenselect args (tokenselect only), the label's variant flags (so ``@t0.9``
    wins over a threshold in ``tokenselect_args``), ``extra_args``.
    """
    backend, var_args = split_backend(label)
    if template:
        cmd = shlex.split(template.format(python=python, backend=backend, model=model_dir,
                                          host=host, port=port))
    elif backend == "tokenselect":
        cmd = [python, "-m", "sglang_tokenselect.launch_server"]
    else:
        cmd = [python, "-m", "sglang.launch_server", "--attention-backend", backend]
    if not template:
        cmd += ["--model-path", model_dir, "--load-format", "dummy",
                "--host", host, "--port", str(port)]
    cmd += shlex.split(common_args or "")
    if context_length:
        cmd += ["--context-length", str(int(context_length))]
    if backend == "tokenselect":
        cmd += shlex.split(tokenselect_args or "")
    cmd += var_args
    cmd += shlex.split(extra_args or "")
    return cmd


def with_min_running_requests(server_args: str, n: int) -> str:
    """``server_args`` with ``--max-running-requests`` raised to at least ``n``."""
    parts = shlex.split(server_args or "")
    for i, a in enumerate(parts):
        if a == "--max-running-requests" and i + 1 < len(parts):
            if int(parts[i + 1]) < n:
                parts[i + 1] = str(n)
            return shlex.join(parts)
        if a.startswith("--max-running-requests="):
            if int(a.split("=", 1)[1]) < n:
                parts[i] = f"--max-running-requests={n}"
            return shlex.join(parts)
    return shlex.join(parts + ["--max-running-requests", str(n)])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def pick_port(host: str, port: int, tries: int = 20) -> int:
    for p in range(port, port + tries):
        if port_is_free(host, p):
            return p
    return port


class ServerProcess:
    """One server subprocess in its own process group, logging to a file."""

    def __init__(self, cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None):
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        # ``python -m`` puts the cwd first on sys.path: started from the repo root,
        # the source tree's ``sglang_tokenselect`` (no ``kernels`` subpackage there)
        # would shadow the installed package.  So servers run from ``cwd``.
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self._log_f = None

    def start(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_f = open(self.log_path, "ab", buffering=0)
        self._log_f.write(("$ " + shlex.join(self.cmd) + "\n").encode())
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, cwd=self.cwd,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 8.0) -> Dict[str, Any]:
        """SIGTERM the process group, SIGKILL it after ``grace_s``."""
        info: Dict[str, Any] = {}
        if self.proc is None:
            return info
        pgid = self.proc.pid  # start_new_session => pgid == pid
        t0 = time.monotonic()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                break
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                if self.proc.poll() is not None and not _pgid_alive(pgid):
                    break
                time.sleep(0.1)
            if self.proc.poll() is not None and not _pgid_alive(pgid):
                info["signal"] = sig.name
                break
            info["signal"] = sig.name
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        info["returncode"] = self.proc.poll()
        info["stop_s"] = _round(time.monotonic() - t0, 2)
        info["group_alive_after_stop"] = _pgid_alive(pgid)
        if self._log_f is not None:
            try:
                self._log_f.close()
            except Exception:
                pass
            self._log_f = None
        return info


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_ready(client: HttpClient, server: ServerProcess, budget: Budget) -> Dict[str, Any]:
    """Poll ``/health`` until 200, then send a tiny ``/generate``."""
    t0 = time.monotonic()
    res: Dict[str, Any] = {"ready": False}
    last_err = ""
    while budget.remaining() > 0:
        if not server.alive():
            res["error"] = f"server exited with code {server.returncode()} before becoming healthy"
            return res
        try:
            status, _ = client.get("/health", timeout=budget.timeout(5.0))
            if status == 200:
                break
            last_err = f"/health HTTP {status}"
        except Exception as e:
            last_err = f"{type(e).__name__}"
        time.sleep(0.5)
    else:
        res["error"] = f"/health not ready within the time limit ({last_err})"
        return res
    res["health_s"] = _round(time.monotonic() - t0, 2)
    r = generate_once(client, [PROMPT_ID_LO + i for i in range(8)], 4, timeout=budget.timeout(120.0))
    res["tiny_generate"] = _public({k: v for k, v in r.items() if k != "output_logprobs"})
    if not r.get("ok"):
        res["error"] = f"tiny /generate failed: {r.get('error')}"
        return res
    res["ready"] = True
    res["ready_s"] = _round(time.monotonic() - t0, 2)
    return res


def fetch_server_info(client: HttpClient, timeout: float = 10.0) -> Dict[str, Any]:
    for path in ("/server_info", "/get_server_info"):
        try:
            status, body = client.get(path, timeout=timeout)
        except Exception:
            continue
        if status != 200:
            continue
        try:
            info = json.loads(body)
        except ValueError:
            continue
        if not isinstance(info, dict):
            continue
        out = {k: info.get(k) for k in SERVER_INFO_KEYS if k in info}
        for k, v in info.items():
            if ("tokenselect" in k.lower() or "cuda_graph" in k.lower()) and k not in out:
                if isinstance(v, (int, float, str, bool, type(None), list)) and len(str(v)) < 300:
                    out[k] = v
        return out
    return {}


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
# cross-backend comparison and summary
# --------------------------------------------------------------------------


def compare_ids(ref: Optional[Sequence[int]], other: Optional[Sequence[int]]) -> Dict[str, Any]:
    if ref is None or other is None:
        return {"identical": False, "comparable": False}
    n = min(len(ref), len(other))
    first_div = None
    same = 0
    for i in range(n):
        if ref[i] == other[i]:
            same += 1
        elif first_div is None:
            first_div = i
    if first_div is None and len(ref) != len(other):
        first_div = n
    identical = list(ref) == list(other)
    return {
        "identical": identical,
        "comparable": True,
        "first_divergence": first_div,
        "match_fraction": _round(same / max(len(ref), len(other)), 4) if max(len(ref), len(other)) else 1.0,
        "len_ref": len(ref),
        "len_other": len(other),
    }


def compare_correctness(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Optional[Dict[str, Any]]:
    ran = [b for b in order
           if isinstance(backends.get(b, {}).get("phases", {}).get("correctness"), dict)
           and backends[b]["phases"]["correctness"].get("prompts")]
    if len(ran) < 2:
        return None
    ref = ran[0]
    out: Dict[str, Any] = {"reference": ref, "backends": {}}
    ref_prompts = {p["name"]: p for p in backends[ref]["phases"]["correctness"]["prompts"]}
    all_ok = True
    for b in ran[1:]:
        rows = []
        for p in backends[b]["phases"]["correctness"]["prompts"]:
            rp = ref_prompts.get(p["name"])
            c = compare_ids(rp.get("output_ids") if rp else None, p.get("output_ids"))
            c["name"] = p["name"]
            c["prompt_len"] = p.get("prompt_len")
            lr = (rp or {}).get("output_logprobs")
            lo = p.get("output_logprobs")
            if lr and lo:
                m = min(len(lr), len(lo), (c.get("first_divergence") if c.get("first_divergence") is not None else 10**9))
                if m > 0:
                    c["max_abs_logprob_diff"] = _round(max(abs(x - y) for x, y in zip(lr[:m], lo[:m])), 6)
            rows.append(c)
            all_ok = all_ok and c["identical"]
        out["backends"][b] = {"prompts": rows, "all_identical": all(r["identical"] for r in rows) and bool(rows)}
    out["all_identical"] = all_ok and all(v["all_identical"] for v in out["backends"].values())
    return out


def _long_entries(backends: Dict[str, Any], b: str) -> Dict[int, Dict[str, Any]]:
    lc = backends.get(b, {}).get("phases", {}).get("long_context")
    if not isinstance(lc, dict):
        return {}
    return {int(c["context"]): c for c in lc.get("contexts", []) if "skipped" not in c}


def decode_table(backends: Dict[str, Dict[str, Any]], order: Sequence[str],
                 contexts: Sequence[int]) -> List[Dict[str, Any]]:
    """Side-by-side decode ms/token (and TTFT) per context; ratio = other / reference."""
    ref = order[0] if order else None
    per = {b: _long_entries(backends, b) for b in order}
    rows = []
    for L in contexts:
        row: Dict[str, Any] = {"context": int(L)}
        for b in order:
            e = per[b].get(int(L), {})
            row[f"{b}_ms_per_token"] = e.get("decode_ms_per_token") if e.get("ok") else None
            row[f"{b}_tokens_per_s"] = e.get("decode_tokens_per_s") if e.get("ok") else None
            row[f"{b}_ttft_s"] = e.get("ttft_s") if e.get("ok") else None
        for b in order[1:]:
            r, o = row.get(f"{ref}_ms_per_token"), row.get(f"{b}_ms_per_token")
            row[f"ratio_{b}_over_{ref}"] = _round(o / r, 4) if r and o else None
            row[f"speedup_{b}_vs_{ref}"] = _round(r / o, 4) if r and o else None
            ids_r = per[ref].get(int(L), {}).get("output_ids")
            ids_o = per[b].get(int(L), {}).get("output_ids")
            if ids_r and ids_o:
                c = compare_ids(ids_r, ids_o)
                row[f"output_match_{b}"] = {k: c[k] for k in ("identical", "first_divergence", "match_fraction")}
        rows.append(row)
    return rows


def decode_series(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Dict[str, List[Tuple[int, float]]]:
    """``{label: [(context, decode ms/token), ...]}`` from the successful long-context requests."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for b in order:
        pts = [(L, float(e["decode_ms_per_token"])) for L, e in sorted(_long_entries(backends, b).items())
               if e.get("ok") and isinstance(e.get("decode_ms_per_token"), (int, float))]
        if pts:
            out[b] = pts
    return out


def flashinfer_reference(labels: Sequence[str]) -> Optional[str]:
    """``flashinfer`` if among ``labels``, else the first ``flashinfer@...`` label, else None."""
    if "flashinfer" in labels:
        return "flashinfer"
    return next((b for b in labels if b.split("@")[0] == "flashinfer"), None)


def ratio_to_flashinfer(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> Optional[Dict[str, Any]]:
    """Decode ms/token of every other label divided by flashinfer's, per context (>1: slower).

    None unless a flashinfer label has long-context results.  Contexts are the union
    over all labels (merged files may differ); a missing value is None.
    """
    series = decode_series(backends, order)
    ref = flashinfer_reference(list(series))
    if ref is None:
        return None
    ref_ms = dict(series[ref])
    others = [b for b in series if b != ref]
    contexts = sorted({L for pts in series.values() for L, _ in pts})
    rows = []
    for L in contexts:
        row: Dict[str, Any] = {"context": L, "reference_ms_per_token": ref_ms.get(L), "ratios": {}}
        for b in others:
            o = dict(series[b]).get(L)
            row["ratios"][b] = _round(o / ref_ms[L], 4) if o and ref_ms.get(L) else None
        rows.append(row)
    return {"reference": ref, "metric": "decode ms/token of label / reference (>1: slower)",
            "labels": others, "rows": rows}


def throughput_table(backends: Dict[str, Dict[str, Any]], order: Sequence[str]) -> List[Dict[str, Any]]:
    """Per throughput configuration: each label's steady aggregate decode tokens/s,
    ms per step, prefill time, and tokens/s relative to flashinfer (>1: faster)."""
    per: Dict[str, Dict[str, Dict[str, Any]]] = {}
    configs: List[str] = []
    for b in order:
        tp = backends.get(b, {}).get("phases", {}).get("throughput")
        if not isinstance(tp, dict):
            continue
        for c in tp.get("configs", []):
            if "skipped" in c or "config" not in c:
                continue
            per.setdefault(c["config"], {})[b] = c
            if c["config"] not in configs:
                configs.append(c["config"])
    rows = []
    for name in configs:
        ran = per[name]
        row: Dict[str, Any] = {"config": name, "backends": {}}
        for b, c in ran.items():
            row["backends"][b] = {k: c.get(k) for k in (
                "ok", "steady_decode_tokens_per_s", "steady_ms_per_step", "prefill_s", "wall_s",
                "kv_pool_fits", "n_ok", "n_requests")}
            spr = c.get("steady_per_request_decode_ms") or {}
            row["backends"][b]["steady_per_request_decode_ms_median"] = spr.get("median")
        ref = flashinfer_reference([b for b in order if b in ran])
        if ref is not None:
            row["reference"] = ref
            r = ran[ref].get("steady_decode_tokens_per_s")
            row["tokens_per_s_ratio_to_reference"] = {
                b: (_round(c.get("steady_decode_tokens_per_s") / r, 4)
                    if r and c.get("steady_decode_tokens_per_s") else None)
                for b, c in ran.items() if b != ref}
        rows.append(row)
    return rows


def hit_rates(backends: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    out = {}
    for b, r in backends.items():
        sc = (r.get("phases", {}).get("log") or {}).get("selection_cache")
        if sc:
            out[b] = {k: sc.get(k) for k in ("hit_rate", "hits", "misses", "decode_steps",
                                             "selections", "dense", "n_lines", "counters")}
    return out


def summarize(results: Dict[str, Any]) -> Dict[str, Any]:
    """Fill ``results['comparison']`` and ``results['summary']``."""
    cfg = results.get("config", {})
    order = [b for b in (cfg.get("compare_order") or cfg.get("backends", []))
             if b in results.get("backends", {})]
    backends = results.get("backends", {})
    comp: Dict[str, Any] = {
        "reference_backend": order[0] if order else None,
        "decode_ms_per_token": decode_table(backends, order, cfg.get("contexts", [])),
        "identical_outputs": compare_correctness(backends, order),
        "selection_cache_hit_rate": hit_rates(backends),
    }
    sp = {}
    for b in order:
        p = backends[b].get("phases", {}).get("shared_prefix")
        if isinstance(p, dict):
            sp[b] = p.get("cached_tokens_b")
    comp["shared_prefix_cached_tokens"] = sp
    comp["ratio_to_flashinfer"] = ratio_to_flashinfer(backends, order)
    comp["throughput"] = throughput_table(backends, order)
    results["comparison"] = comp

    problems: List[str] = []
    for b in (cfg.get("compare_order") or cfg.get("backends", [])):
        r = backends.get(b)
        if r is None:
            problems.append(f"{b}: not run")
            continue
        if not r.get("server", {}).get("ready"):
            problems.append(f"{b}: server not ready ({r.get('server', {}).get('error')})")
            continue
        for name, p in r.get("phases", {}).items():
            if isinstance(p, dict) and p.get("skipped"):
                problems.append(f"{b}: {name} skipped ({p['skipped']})")
            elif isinstance(p, dict) and p.get("ok") is False:
                problems.append(f"{b}: {name} failed")
        lc = r.get("phases", {}).get("long_context") or {}
        for c in lc.get("contexts", []) if isinstance(lc, dict) else []:
            if c.get("skipped"):
                problems.append(f"{b}: long_context {c.get('context')} skipped ({c['skipped']})")
        tp = r.get("phases", {}).get("throughput") or {}
        for c in tp.get("configs", []) if isinstance(tp, dict) else []:
            if c.get("skipped"):
                problems.append(f"{b}: throughput {c.get('config')} skipped ({c['skipped']})")
            for w in c.get("warnings") or []:
                problems.append(f"{b}: throughput {c.get('config')}: {w}")
        lg = r.get("phases", {}).get("log") or {}
        if lg.get("traceback_count"):
            problems.append(f"{b}: {lg['traceback_count']} Traceback(s) in server log")
        if b.partition("@")[0] == "tokenselect" and "log" in r.get("phases", {}) and not lg.get("selection_cache"):
            problems.append(f"{b}: no 'TokenSelect stats' line with hits=/misses= in server log")
        for e in r.get("errors", []):
            problems.append(f"{b}: {e}")
    ident = comp["identical_outputs"]
    if ident is not None and not ident.get("all_identical"):
        problems.append("correctness: outputs differ from the reference backend")
    results["summary"] = {"ok": not problems, "problems": problems,
                          "ratio_to_flashinfer": comp["ratio_to_flashinfer"]}
    return results


def validate_results(results: Dict[str, Any]) -> List[str]:
    """Structural check of the results JSON; returns a list of problems (empty = valid)."""
    errs: List[str] = []
    top = {"schema_version": int, "date": str, "command": str, "device": dict, "versions": dict,
           "config": dict, "backends": dict, "comparison": dict, "summary": dict, "status": str}
    for k, t in top.items():
        if k not in results:
            errs.append(f"missing top-level key {k}")
        elif not isinstance(results[k], t):
            errs.append(f"{k} should be {t.__name__}")
    if errs:
        return errs
    for b, r in results["backends"].items():
        for k in ("server", "phases", "errors"):
            if k not in r:
                errs.append(f"backends.{b} missing {k}")
        if "server" in r and "cmd" not in r["server"]:
            errs.append(f"backends.{b}.server missing cmd")
    comp = results["comparison"]
    for k in ("decode_ms_per_token", "identical_outputs", "selection_cache_hit_rate"):
        if k not in comp:
            errs.append(f"comparison missing {k}")
    if not isinstance(comp.get("decode_ms_per_token"), list):
        errs.append("comparison.decode_ms_per_token should be a list")
    for k in ("ok", "problems"):
        if k not in results["summary"]:
            errs.append(f"summary missing {k}")
    try:
        json.dumps(results)
    except (TypeError, ValueError) as e:
        errs.append(f"not JSON-serializable: {e}")
    return errs


def _fmt(x: Any, w: int, nd: int = 2) -> str:
    return f"{x:>{w}.{nd}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"


def format_ratio_lines(ratio: Optional[Dict[str, Any]]) -> List[str]:
    """The ratio-to-flashinfer table (decode ms/token, label / flashinfer) as text lines."""
    if not ratio or not ratio.get("labels"):
        return []
    ref, labels = ratio["reference"], ratio["labels"]
    w = max([18] + [len(b) + 2 for b in labels])
    lines = [f"ratio to {ref} (decode ms/token, label / {ref}; >1 = slower):",
             f"{'context':>8} {ref + ' ms':>{w}} " + " ".join(f"{b:>{w}}" for b in labels)]
    for row in ratio["rows"]:
        lines.append(f"{row['context']:>8} {_fmt(row.get('reference_ms_per_token'), w)} "
                     + " ".join(_fmt(row["ratios"].get(b), w, 3) for b in labels))
    return lines


def format_throughput_lines(rows: Sequence[Dict[str, Any]]) -> List[str]:
    """Throughput table: steady aggregate decode tokens/s (ms/step, prefill s) per label."""
    lines: List[str] = []
    for row in rows:
        if not lines:
            lines.append("throughput (all requests decoding): aggregate decode tok/s | ms/step | prefill s"
                         " | tok/s vs flashinfer")
        for b, c in row["backends"].items():
            rr = (row.get("tokens_per_s_ratio_to_reference") or {}).get(b)
            fit = "" if c.get("kv_pool_fits") is not False else "  [KV pool too small]"
            lines.append(f"{row['config']:>10} {b:>22}: {_fmt(c.get('steady_decode_tokens_per_s'), 10, 1)} |"
                         f"{_fmt(c.get('steady_ms_per_step'), 8, 2)} |{_fmt(c.get('prefill_s'), 7, 1)} |"
                         f"{_fmt(rr, 6, 3)}  ok={c.get('ok')} {c.get('n_ok')}/{c.get('n_requests')}{fit}")
    return lines


def format_table(results: Dict[str, Any]) -> str:
    cfg = results.get("config", {})
    order = [b for b in (cfg.get("compare_order") or cfg.get("backends", []))
             if b in results.get("backends", {})]
    comp = results.get("comparison", {})
    lines = []
    dev = results.get("device", {}).get("name")
    lines.append(f"=== e2e summary: {dev} | status={results.get('status')} | "
                 f"elapsed {results.get('elapsed_s')} s ===")
    ref = order[0] if order else "-"
    head = f"{'context':>8} " + " ".join(f"{b + ' ms/tok':>18}" for b in order)
    head += " " + " ".join(f"{b + '/' + ref:>22}" for b in order[1:])
    head += " " + " ".join(f"{b + ' TTFT s':>16}" for b in order)
    lines.append("decode ms/token (bs=1, median inter-token latency):")
    lines.append(head)

    def f(x: Any, w: int, nd: int = 2) -> str:
        return f"{x:>{w}.{nd}f}" if isinstance(x, (int, float)) else f"{'-':>{w}}"

    rows = comp.get("decode_ms_per_token", [])
    if not any(row.get(f"{b}_ms_per_token") is not None for row in rows for b in order):
        lines[-2:] = ["decode ms/token (bs=1): no long_context results"]
        rows = []
    for row in rows:
        s = f"{row['context']:>8} " + " ".join(f(row.get(f'{b}_ms_per_token'), 18) for b in order)
        s += " " + " ".join(f(row.get(f"ratio_{b}_over_{ref}"), 22, 3) for b in order[1:])
        s += " " + " ".join(f(row.get(f"{b}_ttft_s"), 16, 2) for b in order)
        lines.append(s)
    lines += format_ratio_lines(comp.get("ratio_to_flashinfer"))
    lines += format_throughput_lines(comp.get("throughput") or [])
    ident = comp.get("identical_outputs")
    if ident:
        for b, v in ident.get("backends", {}).items():
            parts = []
            for p in v["prompts"]:
                tag = "identical" if p["identical"] else f"DIFF@{p.get('first_divergence')}"
                parts.append(f"{p['name']}={tag}")
            lines.append(f"correctness {b} vs {ident['reference']}: " + ", ".join(parts))
    else:
        lines.append("correctness: not compared (needs two backends with results)")
    for b in order:
        ph = results["backends"][b].get("phases", {})
        chat = ph.get("chat") or {}
        bat = ph.get("batching") or {}
        sp = ph.get("shared_prefix") or {}
        lg = ph.get("log") or {}
        srv = results["backends"][b].get("server", {})
        lines.append(
            f"{b}: ready={srv.get('ready')} start={srv.get('ready_s', '-')}s | chat={'ok' if chat.get('ok') else chat.get('error', '-') if chat else '-'}"
            f" | batch {bat.get('n_ok', '-')}/{bat.get('n_requests', '-')} ok, "
            f"{bat.get('decode_tokens_per_s', '-')} decode tok/s"
            f" | prefix cached_tokens={sp.get('cached_tokens_b', '-')}"
            f" | log tracebacks={lg.get('traceback_count', '-')} error_lines={lg.get('error_line_count', '-')}"
        )
    for b, hr in comp.get("selection_cache_hit_rate", {}).items():
        lines.append(f"{b} Selection Cache hit rate: {hr.get('hit_rate')} "
                     f"(hits={hr.get('hits')} misses={hr.get('misses')} lines={hr.get('n_lines')})")
    summ = results.get("summary", {})
    lines.append(f"OK={summ.get('ok')}" + ("" if summ.get("ok") else " problems: " + "; ".join(summ.get("problems", [])[:8])))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# environment info
# --------------------------------------------------------------------------


def package_versions() -> Dict[str, Optional[str]]:
    try:
        from importlib import metadata
    except ImportError:  # pragma: no cover
        return {}
    names = {
        "torch": ["torch"],
        "sglang": ["sglang"],
        "sgl_kernel": ["sgl-kernel", "sgl_kernel"],
        "flashinfer": ["flashinfer-python", "flashinfer"],
        "flashinfer_cubin": ["flashinfer-cubin"],
        "flashinfer_jit_cache": ["flashinfer-jit-cache"],
        "triton": ["triton"],
        "transformers": ["transformers"],
        "tokenizers": ["tokenizers"],
        "sglang_tokenselect": ["sglang-tokenselect", "sglang_tokenselect"],
        "requests": ["requests"],
    }
    out: Dict[str, Optional[str]] = {}
    for key, cands in names.items():
        out[key] = None
        for c in cands:
            try:
                out[key] = metadata.version(c)
                break
            except Exception:
                continue
    out["python"] = platform.python_version()
    return out


def device_info(timeout: float = 15.0) -> Dict[str, Any]:
    info: Dict[str, Any] = {"name": None}
    try:
        p = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout,
        )
        if p.returncode == 0 and p.stdout.strip():
            gpus = [l.strip() for l in p.stdout.strip().splitlines() if l.strip()]
            parts = [x.strip() for x in gpus[0].split(",")]
            info.update(name=parts[0], source="nvidia-smi", count=len(gpus))
            if len(parts) > 1:
                info["driver"] = parts[1]
            if len(parts) > 2:
                info["memory_total"] = parts[2]
            return info
    except Exception:
        pass
    if not any(os.path.exists(f"/dev/nvidia{i}") for i in range(8)):
        info["note"] = "no nvidia-smi and no /dev/nvidia*"
        return info
    # Fallback: torch in a subprocess, so no CUDA context lingers in this process.
    code = ("import json,torch;print(json.dumps({'name': torch.cuda.get_device_name(0) "
            "if torch.cuda.is_available() else None, 'cuda': torch.version.cuda}))")
    try:
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if p.returncode == 0:
            d = json.loads(p.stdout.strip().splitlines()[-1])
            info.update(name=d.get("name"), cuda=d.get("cuda"), source="torch")
    except Exception:
        pass
    return info


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------


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


def _atomic_write_json(path: str, obj: Dict[str, Any]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


class _Terminated(BaseException):
    pass


def _on_sigterm(signum, frame):  # pragma: no cover - signal path
    raise _Terminated(f"signal {signum}")


LATER_START_EST_S = 90.0  # a warm server start (~70 s) plus its stop, for later backends


def start_limit_s(remaining: float, n_left: int, start_timeout: float,
                  reserve: float = FINAL_RESERVE_S) -> float:
    """Seconds this server's start may take: ``start_timeout``, capped so that each of
    the ``n_left - 1`` later backends keeps ``LATER_BACKEND_MIN_S`` (or an equal share of
    the time left, if that is smaller)."""
    left = remaining - reserve
    share = left / max(1, n_left)
    later_min = min(LATER_BACKEND_MIN_S, share)
    return max(0.0, min(float(start_timeout), left - later_min * (n_left - 1)))


def phase_time_s(remaining: float, n_left: int, start_s: float, reserve: float = FINAL_RESERVE_S) -> float:
    """Seconds for this backend's phases once its server is up: an equal share of what is
    left after the later backends' server starts, each guessed as this start's duration
    ``start_s`` but at most ``LATER_START_EST_S`` (a warm start; the first start on a
    fresh machine JIT-compiles FlashInfer and is no guide).

    On a warm machine this is the old equal share (start included); after a slow first
    start the overrun is shared by all backends left.
    """
    later = min(LATER_START_EST_S, max(0.0, start_s)) * (n_left - 1)
    return max(0.0, (remaining - reserve - later) / max(1, n_left))


def server_max_input(si: Dict[str, Any]) -> Optional[int]:
    """Longest prompt the server takes: min of max_req_input_len, context_length, max_total_num_tokens."""
    vals = [si[k] for k in ("max_req_input_len", "context_length", "max_total_num_tokens")
            if isinstance(si.get(k), int) and si[k] > 0]
    return min(vals) if vals else None


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
                         "(t1: select every step, t-1: once per request); variants combine: tokenselect@t0.9@nocg")
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


def load_previous(path: str, run_now: Sequence[str]) -> Tuple[Dict[str, Any], List[str]]:
    """Backends of an earlier e2e.json (those not run now) for the comparison.

    Labels that file itself merged (its ``compare_order``) come along, keeping the
    ``from_file`` of their first origin, so merges chain (bs1-a -> bs1-b -> ...).
    """
    with open(path, encoding="utf-8") as f:
        prev = json.load(f)
    got: Dict[str, Any] = {}
    order: List[str] = []
    pcfg = prev.get("config", {})
    for b in pcfg.get("compare_order") or pcfg.get("backends") or list(prev.get("backends", {})):
        if b in run_now or b not in prev.get("backends", {}) or b in got:
            continue
        rec = dict(prev["backends"][b])
        rec.setdefault("from_file", {"path": os.path.abspath(path), "date": prev.get("date"),
                                     "device": (prev.get("device") or {}).get("name")})
        got[b] = rec
        order.append(b)
    return got, order


def throughput_common_args(cfg: BenchConfig, common_args: str, extra_args: str) -> str:
    """``common_args`` with ``--max-running-requests`` >= the largest throughput N, when the
    throughput phase runs and ``extra_args`` does not set it itself."""
    if "throughput" not in cfg.phases or not cfg.throughput or "--max-running-requests" in (extra_args or ""):
        return common_args
    return with_min_running_requests(common_args, max(n for n, _ in cfg.throughput))


def write_plot(results: Dict[str, Any], out_dir: str) -> Dict[str, Any]:
    """Write ``PLOT_NAME`` (decode ms/token vs context, ``plot_e2e.py``) into ``out_dir``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import plot_e2e  # noqa: E402  (sibling file)

        res = plot_e2e.plot_decode(results, os.path.join(out_dir, PLOT_NAME))
    except Exception as e:
        res = {"skipped": f"plot failed: {type(e).__name__}: {e}"[:300]}
    if res.get("path"):
        log(f"plot: {res['path']} ({len(res.get('labels', []))} label(s))")
    else:
        log(f"plot: skipped ({res.get('skipped')})")
    return res


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
