"""Task generators (sizes in SmolLM2 tokens, needle depth) and the server-path evaluation
(benchmarks/eval_longctx.py) against a fake OpenAI-compatible server on 127.0.0.1.

Inputs are drawn fresh each run; the seed is in the failure message.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sglang_tokenselect_eval import tasks as T

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from sglang_tokenselect_eval.smollm2 import ensure_converted

    return ensure_converted()


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture
def rng() -> random.Random:
    seed = random.SystemRandom().randrange(2**31)
    r = random.Random(seed)
    r.seed_value = seed  # type: ignore[attr-defined]
    return r


def _template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def _needle_text(sample: T.TaskSample) -> str:
    if sample.task == "passkey":
        return T.PASSKEY_NEEDLE.format(key=sample.expected)
    if sample.task == "multikey":
        return T.MULTIKEY_NEEDLE.format(word=sample.extra["key"], number=sample.expected)
    return f'"{sample.extra["key"]}": "{sample.expected}"'


@pytest.mark.parametrize("task", T.TASKS)
def test_length_and_needle_depth(task, tokenizer, rng):
    seed = rng.randrange(10**6)
    lengths = [2048, rng.choice([4096, 6144, 8192]), rng.randrange(2000, 8193)]
    depths = [0.0, 1.0, rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95)]
    for length in lengths:
        for depth in depths:
            ctx = f"task={task} length={length} depth={depth:.3f} seed={seed} (rng {rng.seed_value})"
            s = T.make_sample(task, tokenizer, length, depth, seed)
            # Length: within 1%, and it is what the chat template really gives.
            ids = _template_ids(tokenizer, s.messages)
            assert len(ids) == s.token_length, ctx
            assert abs(s.token_length - length) <= 0.01 * length, ctx
            # Needle position, found independently: tokens of the rendered prompt before it.
            rendered = tokenizer.apply_chat_template(s.messages, tokenize=False, add_generation_prompt=True)
            needle = _needle_text(s)
            assert rendered.count(needle) == 1, ctx
            before = len(tokenizer(rendered[: rendered.index(needle)], add_special_tokens=False)["input_ids"])
            assert abs(before - s.needle_token_pos) <= 1, ctx
            assert s.expected in tokenizer.decode(ids[s.needle_token_pos : s.needle_token_pos + s.needle_token_len]), ctx
            # Depth: the needle starts at depth * length (within 2%), or as close as the
            # prompt's framing (instruction before, question after the haystack) allows.
            lo, hi = s.haystack_token_span[0], s.haystack_token_span[1] - s.needle_token_len
            reachable = min(max(depth * s.token_length, lo), hi)
            assert abs(s.needle_token_pos - reachable) <= 0.02 * s.token_length, ctx
            if 0.05 <= depth <= 0.95 and length >= 2048:
                assert abs(s.needle_depth - depth) <= 0.02, ctx
            if depth == 0.0:
                assert s.needle_token_pos - lo <= 2, ctx  # opens the haystack
            if depth == 1.0:
                assert hi - s.needle_token_pos <= 2, ctx  # closes it
            assert s.score(s.expected) and not s.score("no idea")


def test_deterministic_from_seed(tokenizer, rng):
    seed = rng.randrange(10**6)
    for task in T.TASKS:
        a = T.make_sample(task, tokenizer, 2048, 0.3, seed)
        b = T.make_sample(task, tokenizer, 2048, 0.3, seed)
        c = T.make_sample(task, tokenizer, 2048, 0.3, seed + 1)
        assert a.messages == b.messages and a.expected == b.expected
        assert a.expected != c.expected, f"seed={seed}"


def test_passkey_prompt_is_the_papers(tokenizer, rng):
    s = T.make_passkey(tokenizer, 2048, rng.random(), rng.randrange(10**6))
    assert re.fullmatch(r"\d{5}", s.expected)
    assert s.prompt.count(T.PASSKEY_NEEDLE.format(key=s.expected)) == 1
    noise = " ".join(T.PASSKEY_NOISE)
    assert noise == "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
    assert s.prompt.count(noise) > 50
    assert T.PASSKEY_QUESTION in s.prompt
    assert "The pass key is" not in s.prompt.replace(T.PASSKEY_NEEDLE.format(key=s.expected), "")


def test_multikey_needles(tokenizer, rng):
    n = rng.randrange(2, 7)
    s = T.make_multikey(tokenizer, 4096, rng.random(), rng.randrange(10**6), num_needles=n)
    found = dict(re.findall(r"magic numbers for ([a-z]+-[a-z]+) is: (\d{7})\.", s.prompt))
    assert len(found) == n
    assert found[s.extra["key"]] == s.expected
    assert {k: v for k, v in found.items() if k != s.extra["key"]} == s.extra["distractors"]
    assert len(set(found.values())) == n
    assert s.prompt.rstrip().split("\n")[-1].count(s.extra["key"]) == 1  # the question asks it


def test_kv_prompt_is_valid_json(tokenizer, rng):
    s = T.make_kv(tokenizer, rng.choice([2048, 4096]), rng.random(), rng.randrange(10**6))
    body = s.prompt.split("JSON data:\n", 1)[1].split("\n\nKey:", 1)[0]
    data = json.loads(body)
    assert len(data) == s.extra["num_pairs"]
    assert data[s.extra["key"]] == s.expected
    uuid_re = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(uuid_re.fullmatch(k) and uuid_re.fullmatch(v) for k, v in data.items())
    assert f'Key: "{s.extra["key"]}"' in s.prompt


def test_score_answer():
    assert T.score_answer("  The pass key is 71432.  ", "71432")
    assert T.score_answer("71432", "71432")
    assert not T.score_answer("The pass key is 714321.", "71432")
    assert not T.score_answer("The pass key is 17143.", "71432")
    assert not T.score_answer(None, "71432")
    assert T.score_answer('"value": "ab12-cd"', "ab12-cd")
    assert not T.score_answer("xab12-cd", "ab12-cd")


def test_depth_grid():
    assert T.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert T.depth_grid(1) == [0.5]
    with pytest.raises(ValueError):
        T.make_passkey(None, 2048, 1.5)


# --------------------------------------------------------------------------- server path


def _load_eval_module():
    spec = importlib.util.spec_from_file_location("eval_longctx", ROOT / "benchmarks" / "eval_longctx.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _oracle(prompt: str) -> str:
    """Answers like a perfect reader, except for kv where it returns the FIRST pair's value."""
    m = re.search(r"The pass key is (\d+)\. Remember it\.", prompt)
    if "What is the pass key?" in prompt and m:
        return f"The pass key is {m.group(1)}."
    m = re.search(r"magic number for ([a-z]+-[a-z]+) mentioned", prompt)
    if m:
        num = re.search(r"magic numbers for " + re.escape(m.group(1)) + r" is: (\d+)\.", prompt).group(1)
        return f"The special magic number for {m.group(1)} is {num}."
    body = prompt.split("JSON data:\n", 1)[1].split("\n\nKey:", 1)[0]
    first_value = next(iter(json.loads(body).values()))
    return first_value


class _FakeServer:
    def __init__(self, max_model_len=None):
        self.max_model_len = max_model_len
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": "fake-smollm2", "object": "model", "max_model_len": outer.max_model_len}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                time.sleep(0.1)
                answer = _oracle(body["messages"][-1]["content"])
                with outer.lock:
                    outer.in_flight -= 1
                self._send(200, {
                    "id": "x", "object": "chat.completion", "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": answer}}],
                })

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_eval_longctx_against_fake_server(tmp_path, model_dir, rng):
    ev = _load_eval_module()
    seed = rng.randrange(10**6)
    out, png = tmp_path / "res.json", tmp_path / "res.png"
    # Like SGLang, the fake reports its context: 2048-token cells must leave room for the answer.
    with _FakeServer(max_model_len=2048) as server:
        rc = ev.main([
            "--base-url", server.url, "--tasks", "passkey,multikey,kv", "--lengths", "1024,2048",
            "--depths", "3", "--seed", str(seed), "--label", "fake", "--out", str(out),
            "--heatmap", str(png), "--tokenizer", str(model_dir), "--concurrency", "8", "--no-progress",
            "--max-tokens", "40",
        ])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["label"] == "fake" and doc["model"] == "fake-smollm2" and doc["max_context"] == 2048
    cells = doc["results"]
    assert len(cells) == 3 * 2 * 3 == len(server.requests)
    assert {(c["task"], c["length"], c["depth"]) for c in cells} == {
        (t, L, d) for t in ("passkey", "multikey", "kv") for L in (1024, 2048) for d in (0.0, 0.5, 1.0)
    }
    for c in cells:
        assert set(c) >= {"task", "length", "depth", "correct", "answer", "expected"}
        assert c["error"] is None
        target = min(c["length"], 2048 - 40 - 1)
        assert abs(c["token_length"] - target) <= 0.01 * target
        # The fake reads kv wrongly (first pair), which is right only when the asked pair is first.
        assert c["correct"] == (c["task"] != "kv" or c["depth"] == 0.0), c
        assert (c["expected"] in c["answer"]) == c["correct"]
    assert doc["summary"]["per_task"] == {"passkey": 1.0, "multikey": 1.0, "kv": pytest.approx(1 / 3)}
    for req in server.requests:
        assert req["temperature"] == 0 and req["max_tokens"] == 40
        assert req["model"] == "fake-smollm2" and req["messages"][-1]["role"] == "user"
    assert server.max_in_flight > 1  # the thread pool really runs requests concurrently
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_longctx_records_server_errors(tmp_path, model_dir):
    ev = _load_eval_module()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    samples = ev.build_samples(tok, ["passkey"], [1024], [0.5])
    # Nothing listens on this port (bound then closed).
    srv = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.server_close()
    res = ev.evaluate(samples, url, "m", concurrency=2, timeout=5, progress=False, retries=0)
    assert len(res) == 1 and res[0]["correct"] is False and res[0]["error"]
    assert ev.summarize(res)["errors"] == 1
