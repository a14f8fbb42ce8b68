"""HTTP measurement client of the end-to-end benchmark (``e2e_bench.py``).

``HttpClient`` (requests if importable, urllib otherwise; JSON and SSE streams, every
call with a timeout), the ``/generate`` request helpers (non-streaming records,
streaming TTFT and decode ms/token via ``summarize_stream``) and the chat request.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from e2e_util import _round

try:  # optional dependency
    import requests as _requests  # type: ignore
except Exception:  # pragma: no cover - exercised when requests is missing
    _requests = None


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
