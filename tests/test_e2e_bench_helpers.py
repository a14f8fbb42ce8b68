"""CPU tests of benchmarks/e2e_bench.py (and its modules e2e_*.py) and benchmarks/dummy_model.py.

A tiny fake SGLang server (``/health``, ``/generate`` incl. SSE streaming,
``/v1/chat/completions``, ``/server_info``) runs on 127.0.0.1, in a thread for
the client tests and as a subprocess (this file run as a script with
``--fake-server``) for the full ``main()`` run, so the request/measurement code,
the server lifecycle (process group kill) and the log parsing run without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import dummy_model  # noqa: E402
import e2e_bench as eb  # noqa: E402
import e2e_client as ec  # noqa: E402
import e2e_phases as ep  # noqa: E402
import e2e_report as er  # noqa: E402
import e2e_server as es  # noqa: E402
import e2e_util as eu  # noqa: E402
import plot_e2e  # noqa: E402

THIS_FILE = os.path.abspath(__file__)


def free_port() -> int:
    """A port the OS reports free right now (bound to port 0, then released).

    Fixed ports collide with whatever else runs on the machine (another test run, an
    outgoing connection's ephemeral port); the OS hands out one nobody holds.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------
# fake SGLang server
# --------------------------------------------------------------------------


class FakeState:
    def __init__(self, backend: str = "flashinfer", startup_delay: float = 0.0,
                 token_delay: float = 0.002, stats_interval: int = 0, extra_args=None):
        self.backend = backend
        self.t_start = time.monotonic()
        self.startup_delay = startup_delay
        self.token_delay = token_delay
        self.stats_interval = stats_interval
        self.extra_args = list(extra_args or [])
        self.lock = threading.Lock()
        self.prompts = []
        self.decode_steps = 0
        self.hits = 0
        self.misses = 0

    def flag(self, name, typ):
        """Value of ``name`` among the extra server args (``--x v`` or ``--x=v``; last wins)."""
        val = None
        for i, a in enumerate(self.extra_args):
            if a == name and i + 1 < len(self.extra_args):
                val = typ(self.extra_args[i + 1])
            elif a.startswith(name + "="):
                val = typ(a.split("=", 1)[1])
        return val

    def cached_prefix(self, ids):
        best = 0
        with self.lock:
            for p in self.prompts:
                n = 0
                for a, b in zip(p, ids):
                    if a != b:
                        break
                    n += 1
                best = max(best, n)
            self.prompts.append(list(ids))
        return min(best, max(0, len(ids) - 1))

    def decode_step(self):
        if not self.stats_interval:
            return
        with self.lock:
            self.decode_steps += 1
            if self.decode_steps % 4 == 0:
                self.misses += 1
            else:
                self.hits += 1
            if self.decode_steps % self.stats_interval == 0:
                tot = self.hits + self.misses
                print(f"[2026-01-01 00:00:00 TP0] TokenSelect stats: decode_steps={self.decode_steps} "
                      f"selections={self.misses} hits={self.hits} misses={self.misses} dense=0 "
                      f"hit_rate={self.hits / tot:.4f}", flush=True)


def fake_output_ids(input_ids, n):
    s = sum(input_ids) * 31
    return [(s + 7919 * i) % 128000 for i in range(n)]


def make_handler(state: FakeState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # like uvicorn/asyncio (TCP_NODELAY)

        def log_message(self, *a):  # keep test output quiet
            pass

        def _send_json(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _chunk(self, data: bytes):
            self.wfile.write(b"%x\r\n" % len(data) + data + b"\r\n")
            self.wfile.flush()

        def _ready(self):
            return time.monotonic() - state.t_start >= state.startup_delay

        def do_GET(self):
            if self.path == "/flush_cache":
                self._flush()
            elif self.path in ("/health", "/health_generate"):
                if self._ready():
                    self._send_json(200, {})
                else:
                    self._send_json(503, {})
            elif self.path == "/server_info":
                self._send_json(200, {
                    "attention_backend": state.backend, "max_req_input_len": 131000,
                    "max_total_num_tokens": 400000, "chunked_prefill_size": 16384,
                    "max_running_requests": state.flag("--max-running-requests", int),
                    "context_length": state.flag("--context-length", int) or 131072,
                    "tokenselect_cache_threshold": state.flag("--tokenselect-cache-threshold", float),
                    "disable_cuda_graph": False, "version": "fake",
                    "tokenselect_stats_interval": state.stats_interval or None,
                    "extra_args": " ".join(state.extra_args),
                    "internal_states": [{"big": list(range(10))}],
                })
            else:
                self._send_json(404, {"error": "not found"})

        def do_POST(self):
            n = int(self.headers.get("Content-Length", "0"))
            req = json.loads(self.rfile.read(n) or b"{}")
            if not self._ready():
                self._send_json(503, {"error": "starting"})
                return
            if self.path == "/generate":
                self._generate(req)
            elif self.path == "/flush_cache":
                self._flush()
            elif self.path == "/v1/chat/completions":
                self._send_json(200, {
                    "id": "x", "object": "chat.completion", "model": req.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "the sea"},
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": 20, "completion_tokens": req.get("max_tokens", 16),
                              "total_tokens": 36},
                })
            else:
                self._send_json(404, {"error": "not found"})

        def _flush(self):
            with state.lock:
                state.prompts.clear()
            self._send_json(200, {"flushed": True})

        def _generate(self, req):
            ids = req.get("input_ids")
            sp = req.get("sampling_params") or {}
            n_new = int(sp.get("max_new_tokens", 16))
            if not isinstance(ids, list) or not ids:
                self._send_json(400, {"error": {"message": "input_ids required"}})
                return
            t0 = time.monotonic()
            cached = state.cached_prefix(ids)
            out = fake_output_ids(ids, n_new)
            time.sleep(0.0005 * len(ids) / 1000.0)  # "prefill"

            def meta(k, finished):
                m = {"id": "r", "prompt_tokens": len(ids), "completion_tokens": k,
                     "cached_tokens": cached,
                     "finish_reason": {"type": "length", "length": n_new} if finished else None}
                if finished:
                    m["e2e_latency"] = time.monotonic() - t0
                if req.get("return_logprob"):
                    m["output_token_logprobs"] = [[-0.25 - 0.001 * i, t, None] for i, t in enumerate(out[:k])]
                return m

            if not req.get("stream"):
                for _ in range(n_new):
                    state.decode_step()
                time.sleep(state.token_delay * n_new)
                self._send_json(200, {"text": "x" * n_new, "output_ids": out,
                                      "meta_info": meta(n_new, True)})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for k in range(1, n_new + 1):
                state.decode_step()
                if k > 1:
                    time.sleep(state.token_delay)
                ev = {"text": "x" * k, "output_ids": out[:k], "meta_info": meta(k, k == n_new)}
                self._chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")

    return Handler


class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # like uvicorn's backlog: concurrent connects are not dropped


def start_fake_server_thread(**kw):
    state = FakeState(**kw)
    srv = FakeHTTPServer(("127.0.0.1", 0), make_handler(state))
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    return srv, state


def fake_server_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--fake-server", action="store_true")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--backend", default="flashinfer")
    ap.add_argument("--startup-delay", type=float, default=0.3)
    ap.add_argument("--tokenselect-stats-interval", type=int, default=0)
    ap.add_argument("--token-delay", type=float, default=0.002)
    args, rest = ap.parse_known_args(argv)
    print(f"fake env {es.ALLOW_LONGER_CONTEXT_ENV}={os.environ.get(es.ALLOW_LONGER_CONTEXT_ENV)}", flush=True)
    # A child in the same process group, like SGLang's scheduler/detokenizer.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"fake server child pid={child.pid}", flush=True)

    def on_sigterm(signum, frame):
        # Like SGLang's launcher: reap the child (the group's SIGTERM reached it too), then
        # die of the signal; without this the orphan waits for PID 1 to reap it.
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
    state = FakeState(backend=args.backend, startup_delay=args.startup_delay, token_delay=args.token_delay,
                      stats_interval=args.tokenselect_stats_interval, extra_args=rest)
    srv = FakeHTTPServer((args.host, args.port), make_handler(state))
    print(f"fake sglang server ({args.backend}) on {args.host}:{args.port} extra={rest}", flush=True)
    srv.serve_forever()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


def have_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None



@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("dummy_model"))
    dummy_model.write_model_dir(d)
    return d


@pytest.fixture()
def fake_server():
    srv, state = start_fake_server_thread()
    yield f"http://127.0.0.1:{srv.server_address[1]}", state
    srv.shutdown()
    srv.server_close()


# --------------------------------------------------------------------------
# dummy_model.py
# --------------------------------------------------------------------------


def test_dummy_model_config(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    expect = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                  vocab_size=128256, max_position_embeddings=131072, torch_dtype="bfloat16")
    for k, v in expect.items():
        assert cfg[k] == v, k
    assert cfg["rope_theta"] == 500000.0
    assert 0 <= cfg["bos_token_id"] < cfg["vocab_size"]
    assert all(0 <= e < cfg["vocab_size"] for e in cfg["eos_token_id"])
    assert dummy_model.is_model_dir(model_dir)


def test_dummy_model_tokenizer_loads_and_chats(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == 128256
    assert tok.bos_token_id == dummy_model.BOS_ID
    assert tok.eos_token_id == dummy_model.EOT_ID
    text = "The quick brown fox jumps over the lazy dog. 123!"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert max(ids) < dummy_model.NUM_REGULAR
    # every id a random model could emit decodes
    sample = [0, 255, 256, 65791, 65792, 127999, 128000, 128009, 128255]
    assert isinstance(tok.decode(sample), str)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Hi there"}],
                                       tokenize=True, add_generation_prompt=True)
    if isinstance(chat_ids, dict) or hasattr(chat_ids, "keys"):
        chat_ids = chat_ids["input_ids"]
    assert chat_ids[0] == dummy_model.BOS_ID
    assert dummy_model.EOT_ID in chat_ids


def test_dummy_model_sglang_tokenizer_loader(model_dir):
    mod = pytest.importorskip("sglang.srt.utils.hf_transformers.tokenizer")
    tok = mod.get_tokenizer(model_dir)
    assert len(tok) == 128256


def test_dummy_model_cli(tmp_path):
    out = tmp_path / "m"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "dummy_model.py"),
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "chat_prompt" in p.stdout
    assert sorted(os.listdir(out)) == sorted(["config.json", "generation_config.json",
                                              "special_tokens_map.json", "tokenizer.json",
                                              "tokenizer_config.json"])


# --------------------------------------------------------------------------
# pure helpers
# --------------------------------------------------------------------------


def test_make_prompt_ids_deterministic_and_in_range():
    a = eu.make_prompt_ids(300, 1)
    assert a == eu.make_prompt_ids(300, 1)
    assert a != eu.make_prompt_ids(300, 2)
    assert len(a) == 300
    assert all(eu.PROMPT_ID_LO <= x < eu.PROMPT_ID_HI for x in a)
    assert eu.PROMPT_ID_HI <= dummy_model.NUM_REGULAR


def test_parse_lists():
    assert eu.parse_int_list("4096, 32768,122880") == [4096, 32768, 122880]
    assert eu.parse_str_list("flashinfer,tokenselect,") == ["flashinfer", "tokenselect"]


def test_summarize_stream_basic_and_coalesced():
    t0 = 100.0
    ev = [(101.0, 1), (101.01, 2), (101.02, 3), (101.05, 6), (101.05, 6), (101.06, 7)]
    s = ec.summarize_stream(t0, ev)
    assert s["ttft_s"] == pytest.approx(1.0)
    assert s["tokens"] == 7
    # intervals: 10,10,(10,10,10),10 ms -> median 10
    assert s["decode_ms_per_token"] == pytest.approx(10.0, rel=1e-3)
    assert s["decode_ms_per_token_mean"] == pytest.approx(10.0, rel=1e-3)
    assert s["decode_tokens_per_s"] == pytest.approx(100.0, rel=1e-3)


def test_summarize_stream_bunched_falls_back_to_mean():
    # events arrive in threes: two thirds of the intervals ~0
    ev = [(1.0, 1)]
    t = 1.0
    for k in range(2, 32, 3):
        t += 0.03
        ev += [(t, k), (t + 1e-6, k + 1), (t + 2e-6, k + 2)]
    s = ec.summarize_stream(0.0, ev)
    assert s["decode_metric"].startswith("window_mean")
    assert s["decode_ms_per_token"] == s["decode_ms_per_token_mean"]
    assert s["decode_ms_per_token_median"] < 0.01
    ev2 = [(1.0, 1), (1.01, 2), (1.02, 3), (1.03, 4)]
    assert ec.summarize_stream(0.0, ev2)["decode_metric"] == "median_itl"


def test_summarize_stream_empty_and_single():
    assert ec.summarize_stream(0.0, [])["ttft_s"] is None
    s = ec.summarize_stream(0.0, [(0.5, 1)])
    assert s["ttft_s"] == 0.5 and s["decode_ms_per_token"] is None


def test_parse_sse_line():
    assert ec._parse_sse_line(b'data: {"a": 1}') == {"a": 1}
    assert ec._parse_sse_line("data: [DONE]") is ec._SSE_DONE
    assert ec._parse_sse_line(b"") is None
    assert ec._parse_sse_line(b": keepalive") is None
    assert ec._parse_sse_line(b"data: not json") is None


def test_parse_stats_lines_cumulative():
    text = "\n".join([
        "[2026 TP0] Decode batch. #running-req: 1",
        "[2026 TP0] TokenSelect stats: decode_steps=64 selections=20 hits=40 misses=20 dense=4 hit_rate=0.6667",
        "garbage TokenSelect stats: nothing here",
        "[2026 TP0] TokenSelect stats: decode_steps=128 selections=30 hits=90 misses=30 dense=8 hit_rate=0.75",
    ])
    s = es.parse_stats_lines(text)
    assert s["n_lines"] == 2 and s["counters"] == "cumulative"
    assert s["hits"] == 90 and s["misses"] == 30
    assert s["hit_rate"] == pytest.approx(0.75)
    assert s["reported_hit_rate"] == pytest.approx(0.75)
    assert s["decode_steps"] == 128 and s["dense"] == 8


def test_parse_stats_lines_per_interval_and_missing():
    text = ("TokenSelect stats: decode_steps=64 hits=60 misses=4\n"
            "TokenSelect stats: decode_steps=64 hits=30 misses=34\n")
    s = es.parse_stats_lines(text)
    assert s["counters"] == "per_interval_summed"
    assert s["hits"] == 90 and s["misses"] == 38 and s["decode_steps"] == 128
    assert es.parse_stats_lines("no stats\nTokenSelect stats: hits=3") is None
    z = es.parse_stats_lines("TokenSelect stats: hits=0 misses=0")
    assert z["hit_rate"] is None


def test_scan_log_errors():
    text = "ok\nTraceback (most recent call last):\nValueError: boom\nall fine\nRuntimeError x\n"
    r = es.scan_log_errors(text)
    assert r["traceback_count"] == 1
    assert r["error_line_count"] == 2
    assert len(r["examples"]) == 3


def test_compare_ids():
    assert er.compare_ids([1, 2, 3], [1, 2, 3])["identical"]
    c = er.compare_ids([1, 2, 3, 4], [1, 2, 9, 4])
    assert not c["identical"] and c["first_divergence"] == 2 and c["match_fraction"] == 0.75
    c = er.compare_ids([1, 2], [1, 2, 3])
    assert not c["identical"] and c["first_divergence"] == 2
    assert er.compare_ids(None, [1])["comparable"] is False


def _fake_results(ts_ids=None, ts_ms=(5.0, 6.0)):
    def corr(ids3):
        return {"ok": True, "prompts": [
            {"name": f"p{L}", "prompt_len": L, "output_ids": ids, "ok": True,
             "output_logprobs": [-0.1] * len(ids)} for L, ids in zip((300, 1000, 2000), ids3)]}

    ref_ids = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    ts_ids = ts_ids or ref_ids

    def lc(ms, ids32):
        return {"ok": True, "contexts": [
            {"context": 4096, "ok": True, "decode_ms_per_token": ms[0], "decode_tokens_per_s": 1000 / ms[0],
             "ttft_s": 0.3, "output_ids": [1, 2]},
            {"context": 32768, "ok": True, "decode_ms_per_token": ms[1], "decode_tokens_per_s": 1000 / ms[1],
             "ttft_s": 2.0, "output_ids": ids32},
            {"context": 122880, "skipped": "time budget"},
        ]}

    return {
        "schema_version": 1, "date": "d", "command": "c", "device": {"name": "H100"}, "versions": {},
        "status": "complete",
        "config": {"backends": ["flashinfer", "tokenselect"], "contexts": [4096, 32768, 122880]},
        "backends": {
            "flashinfer": {"server": {"cmd": "x", "ready": True}, "errors": [],
                           "phases": {"correctness": corr(ref_ids), "long_context": lc((6.7, 7.9), [1, 3]),
                                      "log": {"traceback_count": 0, "selection_cache": None}}},
            "tokenselect": {"server": {"cmd": "y", "ready": True}, "errors": [],
                            "phases": {"correctness": corr(ts_ids), "long_context": lc(ts_ms, [1, 4]),
                                       "log": {"traceback_count": 0, "selection_cache": {
                                           "hit_rate": 0.8, "hits": 8, "misses": 2, "n_lines": 1}}}},
        },
        "comparison": {}, "summary": {},
    }


def test_summarize_table_and_schema():
    r = er.summarize(_fake_results())
    comp = r["comparison"]
    rows = {row["context"]: row for row in comp["decode_ms_per_token"]}
    assert rows[4096]["flashinfer_ms_per_token"] == 6.7
    assert rows[4096]["ratio_tokenselect_over_flashinfer"] == pytest.approx(5.0 / 6.7, rel=1e-3)
    assert rows[32768]["output_match_tokenselect"]["first_divergence"] == 1
    assert rows[122880]["tokenselect_ms_per_token"] is None
    assert comp["identical_outputs"]["all_identical"] is True
    assert comp["selection_cache_hit_rate"]["tokenselect"]["hit_rate"] == 0.8
    assert any("122880 skipped" in p for p in r["summary"]["problems"])
    assert er.validate_results(r) == []
    table = er.format_table(r)
    assert "4096" in table and "identical" in table and "hit rate: 0.8" in table


def test_summarize_detects_divergence():
    r = er.summarize(_fake_results(ts_ids=[[1, 2, 3], [4, 0, 6], [7, 8, 9]]))
    ident = r["comparison"]["identical_outputs"]
    assert ident["all_identical"] is False
    p = ident["backends"]["tokenselect"]["prompts"][1]
    assert p["identical"] is False and p["first_divergence"] == 1
    assert p["max_abs_logprob_diff"] == 0.0
    assert "correctness: outputs differ from the reference backend" in r["summary"]["problems"]
    assert "DIFF@1" in er.format_table(r)


def test_validate_results_reports_missing():
    errs = er.validate_results({"schema_version": 1})
    assert any("missing top-level key backends" in e for e in errs)


def test_build_server_cmd():
    fi = es.build_server_cmd("flashinfer", "/m", "127.0.0.1", 30000, "py",
                             eb.DEFAULT_COMMON_SERVER_ARGS, "--foo 1", eb.DEFAULT_TOKENSELECT_ARGS)
    assert fi[:3] == ["py", "-m", "sglang.launch_server"]
    assert fi[fi.index("--attention-backend") + 1] == "flashinfer"
    assert fi[fi.index("--load-format") + 1] == "dummy"
    assert fi[fi.index("--max-running-requests") + 1] == "16"
    assert fi[fi.index("--chunked-prefill-size") + 1] == "16384"
    assert "--tokenselect-stats-interval" not in fi and fi[-2:] == ["--foo", "1"]
    for forbidden in ("--context-length", "--mem-fraction-static", "--disable-cuda-graph"):
        assert forbidden not in fi
    ts = es.build_server_cmd("tokenselect", "/m", "127.0.0.1", 30001, "py",
                             eb.DEFAULT_COMMON_SERVER_ARGS, "", eb.DEFAULT_TOKENSELECT_ARGS)
    assert ts[:3] == ["py", "-m", "sglang_tokenselect.launch_server"]
    assert "--attention-backend" not in ts
    assert ts[ts.index("--tokenselect-stats-interval") + 1] == "64"
    assert ts[ts.index("--port") + 1] == "30001"
    nocg = es.build_server_cmd("flashinfer@nocg", "/m", "127.0.0.1", 30000, "py", "", "", "")
    assert nocg[nocg.index("--attention-backend") + 1] == "flashinfer"
    assert "--disable-cuda-graph" in nocg
    with pytest.raises(ValueError):
        es.split_backend("flashinfer@bogus")


def test_split_backend_threshold_variants():
    flag = es.THRESHOLD_FLAG
    assert es.split_backend("tokenselect@t1") == ("tokenselect", [f"{flag}=1"])
    assert es.split_backend("tokenselect@t0.9") == ("tokenselect", [f"{flag}=0.9"])
    assert es.split_backend("tokenselect@t-1") == ("tokenselect", [f"{flag}=-1"])
    assert es.split_backend("tokenselect@t.5") == ("tokenselect", [f"{flag}=.5"])
    assert es.split_backend("tokenselect@t0.9@nocg") == ("tokenselect", [f"{flag}=0.9", "--disable-cuda-graph"])
    assert es.split_backend("flashinfer@nocg") == ("flashinfer", ["--disable-cuda-graph"])
    assert es.split_backend("tokenselect") == ("tokenselect", [])
    assert es.split_backend("tokenselect@t1@sp") == ("tokenselect", [f"{flag}=1", "--tokenselect-sparse-prefill"])
    assert es.split_backend("tokenselect@x")[1] == ["--tokenselect-sparse-prefill", "--tokenselect-extrapolate"]
    for bad in ("flashinfer@sp", "flashinfer@x", "tokenselect@spx", "flashinfer@t1", "tokenselect@tx", "tokenselect@t", "tokenselect@", "@nocg", "tokenselect@t1e"):
        with pytest.raises(ValueError):
            es.split_backend(bad)
    with pytest.raises(SystemExit):
        ep.BenchConfig(eb.build_arg_parser().parse_args(["--out-dir", "x", "--backends", "flashinfer@t0.9"]))
    # the "=" form keeps a negative threshold a value for an argparse parser like SGLang's
    ap = argparse.ArgumentParser()
    ap.add_argument(flag, type=float, default=0.9)
    ap.add_argument("--port", type=int)
    _, args = es.split_backend("tokenselect@t-1")
    assert ap.parse_args(args + ["--port", "1"]).tokenselect_cache_threshold == -1.0


def test_build_server_cmd_threshold_context_length_and_env():
    ts_args = "--tokenselect-stats-interval 64 --tokenselect-cache-threshold 0.5"
    ts = es.build_server_cmd("tokenselect@t-1", "/m", "127.0.0.1", 30000, "py",
                             eb.DEFAULT_COMMON_SERVER_ARGS, "--foo 1", ts_args, context_length=266240)
    assert ts[:3] == ["py", "-m", "sglang_tokenselect.launch_server"]
    assert ts[ts.index("--context-length") + 1] == "266240"
    # the label's threshold comes after --tokenselect-args (argparse: last wins), extra args last
    assert ts.index(f"{es.THRESHOLD_FLAG}=-1") > ts.index("--tokenselect-cache-threshold")
    assert ts[-2:] == ["--foo", "1"]
    fi = es.build_server_cmd("flashinfer", "/m", "127.0.0.1", 30000, "py", "", "", ts_args,
                             context_length=266240)
    assert fi[fi.index("--context-length") + 1] == "266240"
    assert not any(a.startswith(es.THRESHOLD_FLAG) for a in fi)
    plain = es.build_server_cmd("tokenselect@t1", "/m", "127.0.0.1", 30000, "py", "", "", "")
    assert "--context-length" not in plain and plain[-1] == f"{es.THRESHOLD_FLAG}=1"
    assert es.server_env(266240) == {"SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN": "1"}
    assert es.server_env(None) == {}
    a = eb.build_arg_parser().parse_args(["--out-dir", "x", "--context-length", "266240"])
    assert ep.BenchConfig(a).context_length == 266240
    assert a.server_start_timeout == 480.0


def test_max_running_requests_for_throughput():
    f = es.with_min_running_requests
    assert f("--max-running-requests 16 --chunked-prefill-size 16384", 64) == \
        "--max-running-requests 64 --chunked-prefill-size 16384"
    assert f("--max-running-requests=128", 64) == "--max-running-requests=128"
    assert f("--max-running-requests=8", 64) == "--max-running-requests=64"
    assert f("", 32) == "--max-running-requests 32"
    ap = eb.build_arg_parser()
    tput = ep.BenchConfig(ap.parse_args(["--out-dir", "x", "--phases", "warmup,throughput"]))
    assert tput.throughput == [(32, 24576), (64, 8192)] and tput.throughput_decode_tokens == 128
    assert eb.throughput_common_args(tput, eb.DEFAULT_COMMON_SERVER_ARGS, "") == \
        "--max-running-requests 64 --chunked-prefill-size 16384"
    assert eb.throughput_common_args(tput, "--x 1", "--max-running-requests 8") == "--x 1"
    no_tput = ep.BenchConfig(ap.parse_args(["--out-dir", "x"]))
    assert "throughput" not in no_tput.phases
    assert eb.throughput_common_args(no_tput, "--max-running-requests 16", "") == "--max-running-requests 16"


def test_parse_throughput():
    assert ep.parse_throughput("32x24576, 64x8192") == [(32, 24576), (64, 8192)]
    assert ep.parse_throughput("4X1000") == [(4, 1000)]
    for bad in ("32", "x100", "0x100", "3x0", "axb"):
        with pytest.raises(ValueError):
            ep.parse_throughput(bad)
    with pytest.raises(SystemExit):
        ep.BenchConfig(eb.build_arg_parser().parse_args(["--out-dir", "x", "--throughput", "32by8"]))
    assert ep.throughput_label(32, 24576) == "32x24576"


def _staggered_streams():
    """Request A: first token at 1.0 s, stalled while B prefills, then 10 ms/token;
    B: first token at 3.005 s, then 10 ms/token; 10 tokens each; both sent at 0."""
    a = [(1.0, 1)] + [(3.0 + 0.01 * k, 1 + k) for k in range(1, 10)]
    b = [(3.005 + 0.01 * k, 1 + k) for k in range(10)]
    return [{"t_send": 0.0, "events": a, "ok": True}, {"t_send": 0.0, "events": b, "ok": True}]


def test_steady_window_helpers():
    streams = _staggered_streams()
    a, b = streams[0]["events"], streams[1]["events"]
    start, end = ep.steady_window([a, b])
    assert start == pytest.approx(3.005) and end == pytest.approx(3.09)
    assert ep.tokens_at(a, 0.5) == 0 and ep.tokens_at(a, 2.0) == 1 and ep.tokens_at(a, 3.09) == 10
    assert ep.tokens_at(b, 3.09) == 9
    iv = ep.window_intervals(a, start, end)
    assert len(iv) == 8 and all(x == pytest.approx(0.01) for x in iv)
    # a coalesced chunk of 3 tokens after 30 ms is three 10 ms intervals
    assert ep.window_intervals([(0.0, 1), (0.03, 4)], 0.0, 1.0) == pytest.approx([0.01] * 3)
    # no overlap (A done before B starts), or a stream without tokens: no window
    assert ep.steady_window([[(1.0, 1), (1.1, 2)], [(2.0, 1), (2.1, 2)]]) is None
    assert ep.steady_window([a, []]) is None


def test_summarize_throughput_math():
    s = ep.summarize_throughput(_staggered_streams(), prompt_len=1000, n_new=10)
    assert s["n_requests"] == 2 and s["n_ok"] == 2 and s["output_tokens"] == 20
    assert s["prefill_tokens"] == 2000
    assert s["prefill_s"] == pytest.approx(3.005)
    assert s["prefill_tokens_per_s"] == pytest.approx(2000 / 3.005, rel=1e-3)
    assert s["ttft_s"] == {"min": 1.0, "median": pytest.approx(2.0025, abs=1e-3), "max": pytest.approx(3.005)}
    assert s["wall_s"] == pytest.approx(3.095)
    # window [3.005, 3.09]: A 1 -> 10 tokens (9), B 1 -> 9 tokens (8): 17 tokens in 85 ms
    assert s["steady_window_s"] == pytest.approx(0.085, abs=1e-4)
    assert s["steady_tokens"] == 17
    assert s["steady_decode_tokens_per_s"] == pytest.approx(200.0, rel=1e-3)
    assert s["steady_ms_per_step"] == pytest.approx(10.0, rel=1e-3)
    assert s["steady_per_request_decode_ms"]["median"] == pytest.approx(10.0, rel=1e-3)
    # whole-stream medians ignore A's one long stall
    assert s["per_request_decode_ms"]["max"] == pytest.approx(10.0, rel=1e-3)
    late = _staggered_streams()
    late[1]["events"] = [(t + 1.0, n) for t, n in late[1]["events"]]  # B starts after A finished
    s2 = ep.summarize_throughput(late, prompt_len=1000, n_new=10)
    assert s2["steady_window_s"] is None and "steady_decode_tokens_per_s" not in s2 and s2["steady_note"]
    assert ep.summarize_throughput([], 10, 10)["n_requests"] == 0


def test_time_plan():
    # warm machine, two backends, 540 s: the first start may take 375 s (the second keeps 150 s)
    assert eu.start_limit_s(540, 2, 480) == pytest.approx(375)
    assert eu.start_limit_s(540, 1, 480) == pytest.approx(480)
    assert eu.start_limit_s(540, 1, 600) == pytest.approx(525)
    assert eu.start_limit_s(120, 2, 30) == pytest.approx(30)  # small budgets: equal shares
    assert eu.start_limit_s(100, 3, 480) == pytest.approx(85 / 3)
    # phases: equal share after the later starts (guessed as this one's, at most 90 s)
    assert eu.phase_time_s(470, 2, 70) == pytest.approx((470 - 15 - 70) / 2)
    assert eu.phase_time_s(240, 2, 300) == pytest.approx((240 - 15 - 90) / 2)
    assert eu.phase_time_s(300, 1, 70) == pytest.approx(285)
    assert eu.phase_time_s(10, 2, 5) == 0.0


def test_phase_throughput_against_fake_server(fake_server):
    url, state = fake_server
    state.token_delay = 0.004
    c = ec.HttpClient(url)
    cfg = ep.BenchConfig(eb.build_arg_parser().parse_args([
        "--out-dir", "x", "--phases", "throughput", "--throughput", "3x512,2x256",
        "--throughput-decode-tokens", "40"]))
    si = {"max_total_num_tokens": 400000, "max_running_requests": 16}
    res = ep.phase_throughput(c, cfg, eu.Budget(60), si)
    assert res["ok"], res
    assert [x["config"] for x in res["configs"]] == ["3x512", "2x256"]
    for x in res["configs"]:
        assert x["kv_pool_fits"] is True and x["warnings"] == [] and x["flush_cache_status"] == 200
        assert x["steady_decode_tokens_per_s"] > 0 and x["steady_window_s"] > 0
    assert res["configs"][0]["kv_tokens_needed"] == 3 * (512 + 40)
    small = ep.run_throughput_config(c, 2, 256, 8, eu.Budget(30),
                                     {"max_total_num_tokens": 300, "max_running_requests": 1}, seed=5)
    assert small["kv_pool_fits"] is False and len(small["warnings"]) == 2
    skipped = ep.phase_throughput(c, cfg, eu.Budget(1), si)
    assert all("skipped" in x for x in skipped["configs"]) and skipped["ok"] is False
    json.dumps([res, small, skipped])
    c.close()


def _results_with(labels_ms, contexts=(4096, 32768)):
    """Minimal results: ``{label: [ms per context]}`` as long_context entries."""
    backends = {}
    for b, ms in labels_ms.items():
        backends[b] = {"server": {"cmd": b, "ready": True}, "errors": [], "phases": {"long_context": {
            "ok": True, "contexts": [{"context": L, "ok": True, "decode_ms_per_token": m}
                                     for L, m in zip(contexts, ms) if m is not None]}}}
    return {"schema_version": 1, "date": "d", "command": "c", "device": {"name": "H200"}, "versions": {},
            "status": "complete", "config": {"backends": list(labels_ms), "contexts": list(contexts)},
            "backends": backends, "comparison": {}, "summary": {}}


def test_ratio_to_flashinfer_table():
    r = er.summarize(_results_with({"tokenselect@t1": [10.0, 12.0], "flashinfer": [5.0, 6.0],
                                    "tokenselect@t-1": [7.5, None]}))
    ratio = r["summary"]["ratio_to_flashinfer"]
    assert ratio["reference"] == "flashinfer"  # not the first label
    assert ratio["labels"] == ["tokenselect@t1", "tokenselect@t-1"]
    assert ratio["rows"][0] == {"context": 4096, "reference_ms_per_token": 5.0,
                                "ratios": {"tokenselect@t1": 2.0, "tokenselect@t-1": 1.5}}
    assert ratio["rows"][1]["ratios"] == {"tokenselect@t1": 2.0, "tokenselect@t-1": None}
    table = er.format_table(r)
    assert "ratio to flashinfer" in table and "2.000" in table and "1.500" in table
    # flashinfer@nocg stands in when plain flashinfer did not run; none at all: no table
    r2 = er.summarize(_results_with({"flashinfer@nocg": [4.0, 4.0], "tokenselect": [8.0, 6.0]}))
    assert r2["comparison"]["ratio_to_flashinfer"]["reference"] == "flashinfer@nocg"
    assert r2["comparison"]["ratio_to_flashinfer"]["rows"][1]["ratios"]["tokenselect"] == 1.5
    r3 = er.summarize(_results_with({"tokenselect": [8.0, 6.0]}))
    assert r3["summary"]["ratio_to_flashinfer"] is None and "ratio to" not in er.format_table(r3)
    assert er.validate_results(r) == []


def test_throughput_table_and_problems():
    r = _results_with({"flashinfer": [5.0, 6.0], "tokenselect@t1": [8.0, 9.0]})
    r["backends"]["flashinfer"]["phases"]["throughput"] = {"ok": True, "configs": [
        {"config": "32x24576", "ok": True, "steady_decode_tokens_per_s": 1000.0, "steady_ms_per_step": 32.0,
         "prefill_s": 60.0, "kv_pool_fits": True, "n_ok": 32, "n_requests": 32, "warnings": []}]}
    r["backends"]["tokenselect@t1"]["phases"]["throughput"] = {"ok": True, "configs": [
        {"config": "32x24576", "ok": True, "steady_decode_tokens_per_s": 2500.0, "steady_ms_per_step": 12.8,
         "prefill_s": 61.0, "kv_pool_fits": False, "n_ok": 32, "n_requests": 32,
         "warnings": ["KV pool too small: ..."], "steady_per_request_decode_ms": {"median": 12.9}},
        {"config": "64x8192", "skipped": "time budget (5 s left, need ~56 s)"}]}
    er.summarize(r)
    rows = r["comparison"]["throughput"]
    assert len(rows) == 1 and rows[0]["config"] == "32x24576" and rows[0]["reference"] == "flashinfer"
    assert rows[0]["tokens_per_s_ratio_to_reference"] == {"tokenselect@t1": 2.5}
    assert rows[0]["backends"]["tokenselect@t1"]["steady_per_request_decode_ms_median"] == 12.9
    probs = r["summary"]["problems"]
    assert any("64x8192 skipped" in p for p in probs) and any("KV pool too small" in p for p in probs)
    table = er.format_table(r)
    assert "throughput" in table and "2.500" in table and "[KV pool too small]" in table


def test_plot_decode_and_cli(tmp_path, capsys):
    r = er.summarize(_results_with({"flashinfer": [5.0, 6.0, 8.5, 13.0], "tokenselect@t1": [9.0, 9.5, 10.0, 11.0]},
                                   contexts=(4096, 32768, 131072, 262144)))
    assert plot_e2e.plot_decode(_results_with({"x": [None, None]}), str(tmp_path / "none.png")) == \
        {"skipped": "no long_context results"}
    assert plot_e2e._context_tick(262144) == "256K" and plot_e2e._context_tick(1000) == "1000"
    out = tmp_path / "plot.png"
    res = plot_e2e.plot_decode(r, str(out))
    if not have_matplotlib():
        assert "matplotlib" in res["skipped"] and not out.exists()
        return
    assert res["labels"] == ["flashinfer", "tokenselect@t1"] and res["contexts"] == [4096, 32768, 131072, 262144]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # CLI: merge two files (a later file's label wins), plot, print the ratio table
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_results_with({"flashinfer": [5.0, 6.0], "tokenselect@t1": [1.0, 1.0]})))
    b.write_text(json.dumps(_results_with({"tokenselect@t1": [10.0, 9.0], "tokenselect@t-1": [7.5, 6.0]})))
    merged = plot_e2e.merge_results([str(a), str(b)])
    assert merged["config"]["compare_order"] == ["flashinfer", "tokenselect@t1", "tokenselect@t-1"]
    assert merged["summary"]["ratio_to_flashinfer"]["rows"][0]["ratios"] == {
        "tokenselect@t1": 2.0, "tokenselect@t-1": 1.5}
    assert plot_e2e.main([str(a), str(b), str(tmp_path / "m.png")]) == 0
    assert "ratio to flashinfer" in capsys.readouterr().out and (tmp_path / "m.png").exists()
    assert plot_e2e.main([str(a)]) == 2  # usage


def test_quick_config():
    ap = eb.build_arg_parser()
    c = ep.BenchConfig(ap.parse_args(["--out-dir", "x", "--quick"]))
    assert c.contexts == [4096, 32768] and len(c.batch_lengths) == 4
    c = ep.BenchConfig(ap.parse_args(["--out-dir", "x"]))
    assert c.contexts == [4096, 32768, 122880] and len(c.batch_lengths) == 8
    assert c.chunk_size == 16384 and c.decode_tokens == 64
    c = ep.BenchConfig(ap.parse_args(["--out-dir", "x", "--quick", "--contexts", "1000"]))
    assert c.contexts == [1000]


# --------------------------------------------------------------------------
# client against the in-thread fake server
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_requests", [True, False])
def test_client_generate_stream_chat(fake_server, use_requests):
    if use_requests and ec._requests is None:
        pytest.skip("requests not installed")
    url, state = fake_server
    c = ec.HttpClient(url, use_requests=use_requests)
    assert c.use_requests == use_requests
    status, _ = c.get("/health", timeout=5)
    assert status == 200
    ids = eu.make_prompt_ids(300, 1)
    r = ec.generate_once(c, ids, 32, timeout=10, return_logprob=True)
    assert r["ok"] and r["completion_tokens"] == 32
    assert r["output_ids"] == fake_output_ids(ids, 32)
    assert len(r["output_logprobs"]) == 32
    assert r["cached_tokens"] == 0
    r2 = ec.generate_once(c, ids[:200] + eu.make_prompt_ids(50, 9), 4, timeout=10)
    assert r2["cached_tokens"] == 200

    s = ec.generate_stream(c, eu.make_prompt_ids(2000, 3), 16, timeout=10)
    assert s["ok"], s
    assert s["completion_tokens"] == 16 and s["tokens"] == 16 and s["n_events"] == 16
    assert s["output_ids"] == fake_output_ids(eu.make_prompt_ids(2000, 3), 16)
    assert s["ttft_s"] is not None and s["ttft_s"] >= 0
    assert 1.0 <= s["decode_ms_per_token"] < 100.0  # fake sleeps 2 ms/token
    assert s["decode_metric"] == "median_itl"
    assert s["decode_tokens_per_s"] == pytest.approx(1000.0 / s["decode_ms_per_token"], rel=1e-2)

    ch = ec.chat_once(c, timeout=10)
    assert ch["ok"] and ch["http_status"] == 200 and ch["n_choices"] == 1

    bad = ec.generate_once(c, [], 4, timeout=10)
    assert not bad["ok"] and bad["http_status"] == 400
    c.close()


def test_client_errors_are_recorded():
    port = free_port()
    c = ec.HttpClient(f"http://127.0.0.1:{port}")
    r = ec.generate_once(c, [1, 2, 3], 4, timeout=2)
    assert r["ok"] is False and "error" in r
    s = ec.generate_stream(c, [1, 2, 3], 4, timeout=2)
    assert s["ok"] is False and "error" in s
    assert ec.chat_once(c, timeout=2)["ok"] is False


def test_phases_against_fake_server(fake_server):
    url, state = fake_server
    c = ec.HttpClient(url)
    ap = eb.build_arg_parser()
    cfg = ep.BenchConfig(ap.parse_args([
        "--out-dir", "x", "--contexts", "4096,8192", "--decode-tokens", "8",
        "--batch-lengths", "512,1024,2048", "--prefix-len", "1024"]))
    budget = eu.Budget(60)

    class Alive:
        def alive(self):
            return True

    ready = es.wait_ready(c, Alive(), budget)
    assert ready["ready"], ready
    assert es.fetch_server_info(c)["attention_backend"] == "flashinfer"
    assert ep.phase_warmup(c, cfg, budget)["ok"]
    corr = ep.phase_correctness(c, cfg, budget)
    assert corr["ok"] and [p["name"] for p in corr["prompts"]] == ["p300", "p1000", "p2000"]
    lc = ep.phase_long_context(c, cfg, budget, max_input=5000)
    assert lc["contexts"][0]["ok"] and "skipped" in lc["contexts"][1]
    bat = ep.phase_batching(c, cfg, budget)
    assert bat["ok"] and bat["n_ok"] == 3
    assert all(r["completion_tokens"] == 32 for r in bat["requests"])
    assert bat["decode_tokens_per_s"] and bat["decode_tokens_per_s"] > 0
    sp = ep.phase_shared_prefix(c, cfg, budget)
    assert sp["ok"] and sp["radix_hit"] and sp["cached_tokens_b"] >= 1024
    assert ep.phase_chat(c, cfg, budget)["ok"]
    json.dumps([corr, lc, bat, sp])


def test_wait_ready_server_exits(tmp_path):
    srv = es.ServerProcess([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                           str(tmp_path / "s.log"))
    srv.start()
    port = free_port()
    r = es.wait_ready(ec.HttpClient(f"http://127.0.0.1:{port}"), srv, eu.Budget(20))
    assert not r["ready"] and "exited with code 3" in r["error"]
    srv.stop()
    assert "boom" in "".join(es.tail_file(str(tmp_path / "s.log")))


def test_server_process_kills_group(tmp_path):
    code = ("import subprocess,sys,time,signal;"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']);"
            "print(c.pid, flush=True); time.sleep(600)")
    srv = es.ServerProcess([sys.executable, "-c", code], str(tmp_path / "g.log"))
    srv.start()
    deadline = time.time() + 10
    child = None
    while time.time() < deadline and child is None:
        lines = [l for l in es.tail_file(str(tmp_path / "g.log")) if l.strip().isdigit()]
        child = int(lines[0]) if lines else None
        time.sleep(0.1)
    assert child is not None
    info = srv.stop(grace_s=1.0)  # parent ignores SIGTERM -> SIGKILL path
    assert info["signal"] == "SIGKILL"
    assert info["group_alive_after_stop"] is False
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


# --------------------------------------------------------------------------
# full main() run with fake servers as subprocesses
# --------------------------------------------------------------------------


def test_main_end_to_end_with_fake_servers(tmp_path, model_dir):
    out = tmp_path / "out"
    res_json = tmp_path / "results" / "e2e_fake.json"
    port = free_port()
    template = f"{{python}} {THIS_FILE} --fake-server --host {{host}} --port {{port}} --backend {{backend}}"
    argv = [
        "--out-dir", str(out), "--model-dir", model_dir, "--port", str(port),
        "--contexts", "4096,8192", "--decode-tokens", "16", "--batch-lengths", "512,1024,2048,4096",
        "--prefix-len", "2048", "--time-budget", "120", "--server-start-timeout", "30",
        "--tokenselect-args", "--tokenselect-stats-interval 8",
        "--extra-server-args", "--log-level info",
        "--results-json", str(res_json), "--server-cmd", template, "--stop-grace", "3",
    ]
    t0 = time.time()
    rc = eb.main(argv)
    assert rc == 0
    assert time.time() - t0 < 90
    files = sorted(os.listdir(out))
    assert files == sorted(["e2e.json", "e2e_stdout.log", "server_flashinfer.log", "server_tokenselect.log",
                            "e2e_decode.png"] if have_matplotlib() else
                           ["e2e.json", "e2e_stdout.log", "server_flashinfer.log", "server_tokenselect.log"])
    assert len(files) <= 8
    with open(out / "e2e.json") as f:
        r = json.load(f)
    with open(res_json) as f:
        assert json.load(f)["status"] == "complete"
    assert er.validate_results(r) == [] and "schema_problems" not in r
    assert r["status"] == "complete"
    for b in ("flashinfer", "tokenselect"):
        br = r["backends"][b]
        assert br["server"]["ready"], br["server"]
        assert br["server"]["stop"]["group_alive_after_stop"] is False
        ph = br["phases"]
        for name in ep.DEFAULT_PHASES:
            assert ph[name].get("ok"), (b, name, ph[name])
        assert "throughput" not in ph  # only on request
        assert ph["log"]["traceback_count"] == 0
        si = br["server"]["server_info"]
        assert si["attention_backend"] == b
    assert r["backends"]["flashinfer"]["server"]["cwd"] == str(out)  # not the repo root
    assert r["backends"]["flashinfer"]["server"]["cmd"].endswith("--log-level info")
    assert "--tokenselect-stats-interval" not in r["backends"]["flashinfer"]["server"]["cmd"]
    assert "--max-running-requests 16" in r["backends"]["tokenselect"]["server"]["cmd"]
    assert r["backends"]["tokenselect"]["server"]["server_info"]["tokenselect_stats_interval"] == 8
    comp = r["comparison"]
    assert comp["identical_outputs"]["all_identical"] is True
    rows = comp["decode_ms_per_token"]
    assert [row["context"] for row in rows] == [4096, 8192]
    assert all(row["ratio_tokenselect_over_flashinfer"] for row in rows)
    hr = comp["selection_cache_hit_rate"]["tokenselect"]
    assert hr["hit_rate"] == pytest.approx(0.75, abs=0.01)
    assert "flashinfer" not in comp["selection_cache_hit_rate"]
    assert r["summary"]["ok"], r["summary"]
    assert r["versions"]["python"]
    assert "e2e_bench" in r["command"] or "pytest" in r["command"] or r["command"]
    assert all(v for v in comp["shared_prefix_cached_tokens"].values())



def test_main_single_backend_urllib_subset(tmp_path, model_dir):
    out = tmp_path / "out1"
    port = free_port()
    template = f"{{python}} {THIS_FILE} --fake-server --host {{host}} --port {{port}} --backend {{backend}}"
    rc = eb.main([
        "--out-dir", str(out), "--model-dir", model_dir, "--port", str(port), "--backends", "tokenselect",
        "--phases", "correctness,long_context", "--contexts", "2048", "--decode-tokens", "8",
        "--time-budget", "60", "--server-cmd", template, "--no-requests", "--stop-grace", "2",
    ])
    assert rc == 0
    with open(out / "e2e.json") as f:
        r = json.load(f)
    assert r["config"]["http_client"] == "urllib"
    assert set(r["backends"]["tokenselect"]["phases"]) == {"correctness", "long_context", "log"}
    assert r["comparison"]["identical_outputs"] is None
    row = r["comparison"]["decode_ms_per_token"][0]
    assert row["tokenselect_ms_per_token"] > 0 and not any(k.startswith("ratio") for k in row)
    assert er.validate_results(r) == []


def test_normalize_argv():
    assert eb.normalize_argv(["--out-dir", "o", "--extra-server-args", "--disable-cuda-graph", "--quick"]) == [
        "--out-dir", "o", "--extra-server-args=--disable-cuda-graph", "--quick"]
    a = eb.build_arg_parser().parse_args(eb.normalize_argv(
        ["--out-dir", "o", "--extra-server-args", "--disable-cuda-graph", "--tokenselect-args", "--x 1"]))
    assert a.extra_server_args == "--disable-cuda-graph" and a.tokenselect_args == "--x 1"


def test_main_split_runs_compare_with(tmp_path, model_dir):
    """Two runs like gpu_session's e2e-*-a / -b: flashinfer first, then two tokenselect
    threshold variants merged via --compare-with; context length, throughput phase,
    ratio table and plot on the merge."""
    template = (f"{{python}} {THIS_FILE} --fake-server --host {{host}} --port {{port}} --backend {{backend}}"
                " --token-delay 0.004")
    common = ["--model-dir", model_dir, "--phases", "correctness,long_context,throughput",
              "--contexts", "2048,4096", "--decode-tokens", "8", "--context-length", "266240",
              "--throughput", "3x256", "--throughput-decode-tokens", "40",
              "--time-budget", "120", "--server-cmd", template, "--stop-grace", "2"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert eb.main(["--out-dir", str(out_a), "--backends", "flashinfer",
                    "--port", str(free_port())] + common) == 0
    assert eb.main(["--out-dir", str(out_b), "--backends", "tokenselect@t1,tokenselect@t-1",
                    "--port", str(free_port()),
                    "--compare-with", str(out_a / "e2e.json")] + common) == 0
    with open(out_b / "e2e.json") as f:
        r = json.load(f)
    labels = ["flashinfer", "tokenselect@t1", "tokenselect@t-1"]
    assert r["config"]["compare_order"] == labels
    assert list(r["backends"]) == labels  # the label is the key
    assert r["backends"]["flashinfer"]["from_file"]["path"].endswith("e2e.json")
    assert r["comparison"]["identical_outputs"]["all_identical"] is True
    assert r["comparison"]["decode_ms_per_token"][0]["ratio_tokenselect@t1_over_flashinfer"] > 0
    assert er.validate_results(r) == []
    for b in labels:
        srv = r["backends"][b]["server"]
        assert "--context-length 266240" in srv["cmd"]
        assert srv["env"] == {es.ALLOW_LONGER_CONTEXT_ENV: "1"}
        assert srv["server_info"]["context_length"] == 266240
        log_dir = out_a if b == "flashinfer" else out_b
        assert f"fake env {es.ALLOW_LONGER_CONTEXT_ENV}=1" in (log_dir / srv["log_file"]).read_text()
    si = {b: r["backends"][b]["server"]["server_info"] for b in labels}
    assert si["tokenselect@t1"]["tokenselect_cache_threshold"] == 1.0
    assert si["tokenselect@t-1"]["tokenselect_cache_threshold"] == -1.0
    assert si["flashinfer"]["tokenselect_cache_threshold"] is None
    assert r["backends"]["tokenselect@t-1"]["server"]["log_file"] == "server_tokenselect_t-1.log"
    # throughput phase on every label, merged into one table
    for b in labels:
        tp = r["backends"][b]["phases"]["throughput"]
        c = tp["configs"][0]
        assert c["config"] == "3x256" and c["n_ok"] == 3 and c["kv_pool_fits"] is True, c
        assert c["steady_decode_tokens_per_s"] > 0 and c["prefill_s"] >= 0 and c["flush_cache_status"] == 200
    row = r["comparison"]["throughput"][0]
    assert row["config"] == "3x256" and set(row["backends"]) == set(labels)
    assert set(row["tokens_per_s_ratio_to_reference"]) == {"tokenselect@t1", "tokenselect@t-1"}
    # ratio-to-flashinfer table in the summary, the printed table and the plot
    ratio = r["summary"]["ratio_to_flashinfer"]
    assert ratio == r["comparison"]["ratio_to_flashinfer"]
    assert ratio["reference"] == "flashinfer" and ratio["labels"] == ["tokenselect@t1", "tokenselect@t-1"]
    assert [row["context"] for row in ratio["rows"]] == [2048, 4096]
    assert all(v > 0 for row in ratio["rows"] for v in row["ratios"].values())
    stdout = (out_b / "e2e_stdout.log").read_text()
    assert "ratio to flashinfer" in stdout and "tokenselect@t-1" in stdout and "3x256" in stdout
    if have_matplotlib():
        assert r["plot"]["labels"] == labels
        assert (out_b / er.PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert "matplotlib" in r["plot"]["skipped"]


def test_load_previous_chains_merges(tmp_path):
    prev = _results_with({"flashinfer": [5.0, 6.0], "tokenselect@t1": [9.0, 9.0], "tokenselect@t-1": [7.0, 7.0]})
    prev["config"]["backends"] = ["tokenselect@t-1"]  # run in that file; the others merged into it
    prev["config"]["compare_order"] = ["flashinfer", "tokenselect@t1", "tokenselect@t-1"]
    prev["backends"]["flashinfer"]["from_file"] = {"path": "/first/e2e.json"}
    path = tmp_path / "prev.json"
    path.write_text(json.dumps(prev))
    got, order = er.load_previous(str(path), ["tokenselect@t1"])
    assert order == ["flashinfer", "tokenselect@t-1"]
    assert got["flashinfer"]["from_file"] == {"path": "/first/e2e.json"}  # first origin kept
    assert got["tokenselect@t-1"]["from_file"]["path"] == str(path)


def test_main_server_fails_to_start(tmp_path, model_dir):
    out = tmp_path / "out2"
    rc = eb.main([
        "--out-dir", str(out), "--model-dir", model_dir, "--backends", "flashinfer",
        "--time-budget", "60", "--server-cmd", "{python} -c 'import sys; print(\"Traceback: nope\"); sys.exit(1)'",
        "--strict",
    ])
    assert rc == 2
    with open(out / "e2e.json") as f:
        r = json.load(f)
    srv = r["backends"]["flashinfer"]["server"]
    assert srv["ready"] is False and "exited with code 1" in srv["error"]
    assert any("nope" in l for l in srv["log_tail"])
    assert r["summary"]["ok"] is False


def test_cap_file_size(tmp_path):
    p = tmp_path / "big.log"
    p.write_bytes(b"a" * 1000 + b"b" * 1000)
    assert es.cap_file_size(str(p), max_bytes=500, head=100, tail=100)
    data = p.read_bytes()
    assert data.startswith(b"a" * 100) and data.endswith(b"b" * 100) and len(data) < 300
    assert not es.cap_file_size(str(p), max_bytes=10_000)


if __name__ == "__main__":
    if "--fake-server" in sys.argv:
        fake_server_main(sys.argv[1:])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
