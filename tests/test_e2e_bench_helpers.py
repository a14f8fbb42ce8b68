"""CPU tests of benchmarks/e2e_bench.py and benchmarks/dummy_model.py.

A tiny fake SGLang server (``/health``, ``/generate`` incl. SSE streaming,
``/v1/chat/completions``, ``/server_info``) runs on 127.0.0.1, in a thread for
the client tests and as a subprocess (this file run as a script with
``--fake-server``) for the full ``main()`` run, so the request/measurement code,
the server lifecycle (process group kill) and the log parsing run without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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

THIS_FILE = os.path.abspath(__file__)


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
            if self.path in ("/health", "/health_generate"):
                if self._ready():
                    self._send_json(200, {})
                else:
                    self._send_json(503, {})
            elif self.path == "/server_info":
                self._send_json(200, {
                    "attention_backend": state.backend, "max_req_input_len": 131000,
                    "max_total_num_tokens": 400000, "chunked_prefill_size": 16384,
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


def start_fake_server_thread(**kw):
    state = FakeState(**kw)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    srv.daemon_threads = True
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
    args, rest = ap.parse_known_args(argv)
    # A child in the same process group, like SGLang's scheduler/detokenizer.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"fake server child pid={child.pid}", flush=True)
    state = FakeState(backend=args.backend, startup_delay=args.startup_delay,
                      stats_interval=args.tokenselect_stats_interval, extra_args=rest)
    srv = ThreadingHTTPServer((args.host, args.port), make_handler(state))
    srv.daemon_threads = True
    print(f"fake sglang server ({args.backend}) on {args.host}:{args.port} extra={rest}", flush=True)
    srv.serve_forever()


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------


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
    a = eb.make_prompt_ids(300, 1)
    assert a == eb.make_prompt_ids(300, 1)
    assert a != eb.make_prompt_ids(300, 2)
    assert len(a) == 300
    assert all(eb.PROMPT_ID_LO <= x < eb.PROMPT_ID_HI for x in a)
    assert eb.PROMPT_ID_HI <= dummy_model.NUM_REGULAR


def test_parse_lists():
    assert eb.parse_int_list("4096, 32768,122880") == [4096, 32768, 122880]
    assert eb.parse_str_list("flashinfer,tokenselect,") == ["flashinfer", "tokenselect"]


def test_summarize_stream_basic_and_coalesced():
    t0 = 100.0
    ev = [(101.0, 1), (101.01, 2), (101.02, 3), (101.05, 6), (101.05, 6), (101.06, 7)]
    s = eb.summarize_stream(t0, ev)
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
    s = eb.summarize_stream(0.0, ev)
    assert s["decode_metric"].startswith("window_mean")
    assert s["decode_ms_per_token"] == s["decode_ms_per_token_mean"]
    assert s["decode_ms_per_token_median"] < 0.01
    ev2 = [(1.0, 1), (1.01, 2), (1.02, 3), (1.03, 4)]
    assert eb.summarize_stream(0.0, ev2)["decode_metric"] == "median_itl"


def test_summarize_stream_empty_and_single():
    assert eb.summarize_stream(0.0, [])["ttft_s"] is None
    s = eb.summarize_stream(0.0, [(0.5, 1)])
    assert s["ttft_s"] == 0.5 and s["decode_ms_per_token"] is None


def test_parse_sse_line():
    assert eb._parse_sse_line(b'data: {"a": 1}') == {"a": 1}
    assert eb._parse_sse_line("data: [DONE]") is eb._SSE_DONE
    assert eb._parse_sse_line(b"") is None
    assert eb._parse_sse_line(b": keepalive") is None
    assert eb._parse_sse_line(b"data: not json") is None


def test_parse_stats_lines_cumulative():
    text = "\n".join([
        "[2026 TP0] Decode batch. #running-req: 1",
        "[2026 TP0] TokenSelect stats: decode_steps=64 selections=20 hits=40 misses=20 dense=4 hit_rate=0.6667",
        "garbage TokenSelect stats: nothing here",
        "[2026 TP0] TokenSelect stats: decode_steps=128 selections=30 hits=90 misses=30 dense=8 hit_rate=0.75",
    ])
    s = eb.parse_stats_lines(text)
    assert s["n_lines"] == 2 and s["counters"] == "cumulative"
    assert s["hits"] == 90 and s["misses"] == 30
    assert s["hit_rate"] == pytest.approx(0.75)
    assert s["reported_hit_rate"] == pytest.approx(0.75)
    assert s["decode_steps"] == 128 and s["dense"] == 8


def test_parse_stats_lines_per_interval_and_missing():
    text = ("TokenSelect stats: decode_steps=64 hits=60 misses=4\n"
            "TokenSelect stats: decode_steps=64 hits=30 misses=34\n")
    s = eb.parse_stats_lines(text)
    assert s["counters"] == "per_interval_summed"
    assert s["hits"] == 90 and s["misses"] == 38 and s["decode_steps"] == 128
    assert eb.parse_stats_lines("no stats\nTokenSelect stats: hits=3") is None
    z = eb.parse_stats_lines("TokenSelect stats: hits=0 misses=0")
    assert z["hit_rate"] is None


def test_scan_log_errors():
    text = "ok\nTraceback (most recent call last):\nValueError: boom\nall fine\nRuntimeError x\n"
    r = eb.scan_log_errors(text)
    assert r["traceback_count"] == 1
    assert r["error_line_count"] == 2
    assert len(r["examples"]) == 3


def test_compare_ids():
    assert eb.compare_ids([1, 2, 3], [1, 2, 3])["identical"]
    c = eb.compare_ids([1, 2, 3, 4], [1, 2, 9, 4])
    assert not c["identical"] and c["first_divergence"] == 2 and c["match_fraction"] == 0.75
    c = eb.compare_ids([1, 2], [1, 2, 3])
    assert not c["identical"] and c["first_divergence"] == 2
    assert eb.compare_ids(None, [1])["comparable"] is False


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
    r = eb.summarize(_fake_results())
    comp = r["comparison"]
    rows = {row["context"]: row for row in comp["decode_ms_per_token"]}
    assert rows[4096]["flashinfer_ms_per_token"] == 6.7
    assert rows[4096]["ratio_tokenselect_over_flashinfer"] == pytest.approx(5.0 / 6.7, rel=1e-3)
    assert rows[32768]["output_match_tokenselect"]["first_divergence"] == 1
    assert rows[122880]["tokenselect_ms_per_token"] is None
    assert comp["identical_outputs"]["all_identical"] is True
    assert comp["selection_cache_hit_rate"]["tokenselect"]["hit_rate"] == 0.8
    assert any("122880 skipped" in p for p in r["summary"]["problems"])
    assert eb.validate_results(r) == []
    table = eb.format_table(r)
    assert "4096" in table and "identical" in table and "hit rate: 0.8" in table


def test_summarize_detects_divergence():
    r = eb.summarize(_fake_results(ts_ids=[[1, 2, 3], [4, 0, 6], [7, 8, 9]]))
    ident = r["comparison"]["identical_outputs"]
    assert ident["all_identical"] is False
    p = ident["backends"]["tokenselect"]["prompts"][1]
    assert p["identical"] is False and p["first_divergence"] == 1
    assert p["max_abs_logprob_diff"] == 0.0
    assert "correctness: outputs differ from the reference backend" in r["summary"]["problems"]
    assert "DIFF@1" in eb.format_table(r)


def test_validate_results_reports_missing():
    errs = eb.validate_results({"schema_version": 1})
    assert any("missing top-level key backends" in e for e in errs)


def test_build_server_cmd():
    fi = eb.build_server_cmd("flashinfer", "/m", "127.0.0.1", 30000, "py",
                             eb.DEFAULT_COMMON_SERVER_ARGS, "--foo 1", eb.DEFAULT_TOKENSELECT_ARGS)
    assert fi[:3] == ["py", "-m", "sglang.launch_server"]
    assert fi[fi.index("--attention-backend") + 1] == "flashinfer"
    assert fi[fi.index("--load-format") + 1] == "dummy"
    assert fi[fi.index("--max-running-requests") + 1] == "16"
    assert fi[fi.index("--chunked-prefill-size") + 1] == "16384"
    assert "--tokenselect-stats-interval" not in fi and fi[-2:] == ["--foo", "1"]
    for forbidden in ("--context-length", "--mem-fraction-static", "--disable-cuda-graph"):
        assert forbidden not in fi
    ts = eb.build_server_cmd("tokenselect", "/m", "127.0.0.1", 30001, "py",
                             eb.DEFAULT_COMMON_SERVER_ARGS, "", eb.DEFAULT_TOKENSELECT_ARGS)
    assert ts[:3] == ["py", "-m", "sglang_tokenselect.launch_server"]
    assert "--attention-backend" not in ts
    assert ts[ts.index("--tokenselect-stats-interval") + 1] == "64"
    assert ts[ts.index("--port") + 1] == "30001"
    nocg = eb.build_server_cmd("flashinfer@nocg", "/m", "127.0.0.1", 30000, "py", "", "", "")
    assert nocg[nocg.index("--attention-backend") + 1] == "flashinfer"
    assert "--disable-cuda-graph" in nocg
    with pytest.raises(ValueError):
        eb.split_backend("flashinfer@bogus")


def test_quick_config():
    ap = eb.build_arg_parser()
    c = eb.BenchConfig(ap.parse_args(["--out-dir", "x", "--quick"]))
    assert c.contexts == [4096, 32768] and len(c.batch_lengths) == 4
    c = eb.BenchConfig(ap.parse_args(["--out-dir", "x"]))
    assert c.contexts == [4096, 32768, 122880] and len(c.batch_lengths) == 8
    assert c.chunk_size == 16384 and c.decode_tokens == 64
    c = eb.BenchConfig(ap.parse_args(["--out-dir", "x", "--quick", "--contexts", "1000"]))
    assert c.contexts == [1000]


# --------------------------------------------------------------------------
# client against the in-thread fake server
# --------------------------------------------------------------------------


@pytest.mark.parametrize("use_requests", [True, False])
def test_client_generate_stream_chat(fake_server, use_requests):
    if use_requests and eb._requests is None:
        pytest.skip("requests not installed")
    url, state = fake_server
    c = eb.HttpClient(url, use_requests=use_requests)
    assert c.use_requests == use_requests
    status, _ = c.get("/health", timeout=5)
    assert status == 200
    ids = eb.make_prompt_ids(300, 1)
    r = eb.generate_once(c, ids, 32, timeout=10, return_logprob=True)
    assert r["ok"] and r["completion_tokens"] == 32
    assert r["output_ids"] == fake_output_ids(ids, 32)
    assert len(r["output_logprobs"]) == 32
    assert r["cached_tokens"] == 0
    r2 = eb.generate_once(c, ids[:200] + eb.make_prompt_ids(50, 9), 4, timeout=10)
    assert r2["cached_tokens"] == 200

    s = eb.generate_stream(c, eb.make_prompt_ids(2000, 3), 16, timeout=10)
    assert s["ok"], s
    assert s["completion_tokens"] == 16 and s["tokens"] == 16 and s["n_events"] == 16
    assert s["output_ids"] == fake_output_ids(eb.make_prompt_ids(2000, 3), 16)
    assert s["ttft_s"] is not None and s["ttft_s"] >= 0
    assert 1.0 <= s["decode_ms_per_token"] < 100.0  # fake sleeps 2 ms/token
    assert s["decode_metric"] == "median_itl"
    assert s["decode_tokens_per_s"] == pytest.approx(1000.0 / s["decode_ms_per_token"], rel=1e-2)

    ch = eb.chat_once(c, timeout=10)
    assert ch["ok"] and ch["http_status"] == 200 and ch["n_choices"] == 1

    bad = eb.generate_once(c, [], 4, timeout=10)
    assert not bad["ok"] and bad["http_status"] == 400
    c.close()


def test_client_errors_are_recorded():
    port = eb.pick_port("127.0.0.1", 39123)
    c = eb.HttpClient(f"http://127.0.0.1:{port}")
    r = eb.generate_once(c, [1, 2, 3], 4, timeout=2)
    assert r["ok"] is False and "error" in r
    s = eb.generate_stream(c, [1, 2, 3], 4, timeout=2)
    assert s["ok"] is False and "error" in s
    assert eb.chat_once(c, timeout=2)["ok"] is False


def test_phases_against_fake_server(fake_server):
    url, state = fake_server
    c = eb.HttpClient(url)
    ap = eb.build_arg_parser()
    cfg = eb.BenchConfig(ap.parse_args([
        "--out-dir", "x", "--contexts", "4096,8192", "--decode-tokens", "8",
        "--batch-lengths", "512,1024,2048", "--prefix-len", "1024"]))
    budget = eb.Budget(60)

    class Alive:
        def alive(self):
            return True

    ready = eb.wait_ready(c, Alive(), budget)
    assert ready["ready"], ready
    assert eb.fetch_server_info(c)["attention_backend"] == "flashinfer"
    assert eb.phase_warmup(c, cfg, budget)["ok"]
    corr = eb.phase_correctness(c, cfg, budget)
    assert corr["ok"] and [p["name"] for p in corr["prompts"]] == ["p300", "p1000", "p2000"]
    lc = eb.phase_long_context(c, cfg, budget, max_input=5000)
    assert lc["contexts"][0]["ok"] and "skipped" in lc["contexts"][1]
    bat = eb.phase_batching(c, cfg, budget)
    assert bat["ok"] and bat["n_ok"] == 3
    assert all(r["completion_tokens"] == 32 for r in bat["requests"])
    assert bat["decode_tokens_per_s"] and bat["decode_tokens_per_s"] > 0
    sp = eb.phase_shared_prefix(c, cfg, budget)
    assert sp["ok"] and sp["radix_hit"] and sp["cached_tokens_b"] >= 1024
    assert eb.phase_chat(c, cfg, budget)["ok"]
    json.dumps([corr, lc, bat, sp])


def test_wait_ready_server_exits(tmp_path):
    srv = eb.ServerProcess([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                           str(tmp_path / "s.log"))
    srv.start()
    port = eb.pick_port("127.0.0.1", 39200)
    r = eb.wait_ready(eb.HttpClient(f"http://127.0.0.1:{port}"), srv, eb.Budget(20))
    assert not r["ready"] and "exited with code 3" in r["error"]
    srv.stop()
    assert "boom" in "".join(eb.tail_file(str(tmp_path / "s.log")))


def test_server_process_kills_group(tmp_path):
    code = ("import subprocess,sys,time,signal;"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(600)']);"
            "print(c.pid, flush=True); time.sleep(600)")
    srv = eb.ServerProcess([sys.executable, "-c", code], str(tmp_path / "g.log"))
    srv.start()
    deadline = time.time() + 10
    child = None
    while time.time() < deadline and child is None:
        lines = [l for l in eb.tail_file(str(tmp_path / "g.log")) if l.strip().isdigit()]
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
    port = eb.pick_port("127.0.0.1", 39300)
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
    assert files == sorted(["e2e.json", "e2e_stdout.log", "server_flashinfer.log", "server_tokenselect.log"])
    assert len(files) <= 8
    with open(out / "e2e.json") as f:
        r = json.load(f)
    with open(res_json) as f:
        assert json.load(f)["status"] == "complete"
    assert eb.validate_results(r) == [] and "schema_problems" not in r
    assert r["status"] == "complete"
    for b in ("flashinfer", "tokenselect"):
        br = r["backends"][b]
        assert br["server"]["ready"], br["server"]
        assert br["server"]["stop"]["group_alive_after_stop"] is False
        ph = br["phases"]
        for name in eb.ALL_PHASES:
            assert ph[name].get("ok"), (b, name, ph[name])
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
    port = eb.pick_port("127.0.0.1", 39400)
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
    assert eb.validate_results(r) == []


def test_normalize_argv():
    assert eb.normalize_argv(["--out-dir", "o", "--extra-server-args", "--disable-cuda-graph", "--quick"]) == [
        "--out-dir", "o", "--extra-server-args=--disable-cuda-graph", "--quick"]
    a = eb.build_arg_parser().parse_args(eb.normalize_argv(
        ["--out-dir", "o", "--extra-server-args", "--disable-cuda-graph", "--tokenselect-args", "--x 1"]))
    assert a.extra_server_args == "--disable-cuda-graph" and a.tokenselect_args == "--x 1"


def test_main_split_runs_compare_with(tmp_path, model_dir):
    template = f"{{python}} {THIS_FILE} --fake-server --host {{host}} --port {{port}} --backend {{backend}}"
    common = ["--model-dir", model_dir, "--phases", "correctness,long_context", "--contexts", "2048",
              "--decode-tokens", "8", "--time-budget", "60", "--server-cmd", template, "--stop-grace", "2"]
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert eb.main(["--out-dir", str(out_a), "--backends", "flashinfer",
                    "--port", str(eb.pick_port("127.0.0.1", 39500))] + common) == 0
    assert eb.main(["--out-dir", str(out_b), "--backends", "tokenselect",
                    "--port", str(eb.pick_port("127.0.0.1", 39600)),
                    "--compare-with", str(out_a / "e2e.json")] + common) == 0
    with open(out_b / "e2e.json") as f:
        r = json.load(f)
    assert r["config"]["compare_order"] == ["flashinfer", "tokenselect"]
    assert r["backends"]["flashinfer"]["from_file"]["path"].endswith("e2e.json")
    assert r["comparison"]["identical_outputs"]["all_identical"] is True
    assert r["comparison"]["decode_ms_per_token"][0]["ratio_tokenselect_over_flashinfer"] > 0
    assert eb.validate_results(r) == []


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
    assert eb.cap_file_size(str(p), max_bytes=500, head=100, tail=100)
    data = p.read_bytes()
    assert data.startswith(b"a" * 100) and data.endswith(b"b" * 100) and len(data) < 300
    assert not eb.cap_file_size(str(p), max_bytes=10_000)


if __name__ == "__main__":
    if "--fake-server" in sys.argv:
        fake_server_main(sys.argv[1:])
    else:
        sys.exit(pytest.main([__file__, "-q"]))
