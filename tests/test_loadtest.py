"""loadtest/: the synthetic prompts, a bounded headless Locust run against a fake streaming
OpenAI server on 127.0.0.1, and the side-by-side comparison of two runs."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fake_openai import FakeOpenAIServer

LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"
sys.path.insert(0, str(LOADTEST))

import compare  # noqa: E402
import prompts  # noqa: E402


def test_long_mix_lengths_follow_the_stated_buckets():
    rng = random.Random(1)
    lengths = [prompts.draw_long_length(rng) for _ in range(4000)]
    assert 1024 <= min(lengths) and max(lengths) <= 65536
    shares = [sum(low <= n <= high for n in lengths) / len(lengths) for _, low, high in prompts.LONG_MIX]
    for (share, _, _), seen in zip(prompts.LONG_MIX, shares):
        assert abs(seen - share) < 0.05, (shares, prompts.LONG_MIX)
    capped = [prompts.draw_long_length(rng, max_words=2048) for _ in range(200)]
    assert max(capped) <= 2048


def test_scenarios_build_what_they_promise():
    opts = prompts.Options(scenario="shared-prefix:1,cross-budget:1", budget=300, past_budget=16,
                           max_tokens=8, prefix_words=50, disconnect_fraction=0.0)
    a, b = prompts.PromptFactory(opts, 0), prompts.PromptFactory(opts, 1)
    plans = [f.next() for f in (a, b) for _ in range(40)]
    shared = [p for p in plans if p.scenario == "shared-prefix"]
    crossing = [p for p in plans if p.scenario == "cross-budget"]
    assert shared and crossing and all(p.disconnect_after is None for p in plans)
    prefixes = {p.messages[0]["content"].split("\n")[1] for p in shared}  # the document's words
    assert len(prefixes) <= opts.prefix_count  # every user sends the same few documents
    for p in crossing:  # starts below the budget, decodes past it
        assert p.prompt_words < opts.budget <= p.prompt_words + p.max_tokens - opts.past_budget
    contents = [p.messages[0]["content"] for p in plans]
    assert len(set(contents)) == len(contents)  # unique requests
    everyone = prompts.PromptFactory(prompts.Options(scenario="long", disconnect_fraction=1.0,
                                                     max_prompt_words=1100), 0)
    assert all(1 <= everyone.next().disconnect_after <= 128 for _ in range(5))


@pytest.mark.parametrize("text, message", [
    ("medium", "unknown scenario 'medium'"),
    ("long:x", "weight of 'long' must be a number"),
    ("long:0", "weight of 'long' must be > 0"),
    ("", "give at least one scenario"),
])
def test_bad_scenarios_fail_naming_the_option(text, message):
    with pytest.raises(ValueError, match="--scenario: " + message):
        prompts.parse_weights(text)


def read_stats(prefix: Path) -> dict[tuple[str, str], dict]:
    with open(f"{prefix}_stats.csv", newline="") as handle:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def locust_run(tmp_path_factory):
    """A 3-second headless run, 4 users, every scenario, 30% disconnects."""
    out = tmp_path_factory.mktemp("locust")
    prefix = out / "run"
    with FakeOpenAIServer() as server:
        cmd = [sys.executable, "-m", "locust", "-f", str(LOADTEST / "locustfile.py"), "--headless",
               "-u", "4", "-r", "4", "-t", "3s", "--stop-timeout", "5", "--host", server.url,
               "--scenario", "long:1,shared-prefix:1,cross-budget:1", "--max-prompt-words", "1500",
               "--prefix-words", "200", "--budget", "300", "--past-budget", "8", "--max-tokens", "12",
               "--disconnect-fraction", "0.3", "--csv", str(prefix), "--html", str(out / "run.html"),
               "--only-summary", "--loglevel", "WARNING"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        served = dict(server.stats)
    return proc, prefix, served


def test_headless_locust_reports_streaming_latencies(locust_run):
    proc, prefix, served = locust_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_stats(prefix)
    kinds = {kind for kind, _ in rows}
    assert {"TTFT", "ITL", "TPOT", "E2E", "DISCONNECT"} <= kinds, kinds
    aggregated = rows[("", "Aggregated")]
    assert int(aggregated["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    ttft = sum(int(r["Request Count"]) for (k, _), r in rows.items() if k == "TTFT")
    itl = sum(int(r["Request Count"]) for (k, _), r in rows.items() if k == "ITL")
    assert ttft > 0 and itl >= ttft  # per-token rows: at least one gap per completed stream
    scenarios = {name for kind, name in rows if kind == "E2E"}
    assert scenarios == {"long", "shared-prefix", "cross-budget"}
    assert served["requests"] >= ttft
    assert "TTFT" in (prefix.parent / "run.html").read_text()


def test_compare_writes_a_table_and_a_plot(locust_run, tmp_path):
    _, prefix, _ = locust_run
    out = tmp_path / "cmp"
    assert compare.main(["--run", f"tokenselect={prefix}", "--run", f"flashinfer={prefix}", "--out", str(out)]) == 0
    table = (tmp_path / "cmp.md").read_text()
    assert "| TTFT | long |" in table and "p50 tokenselect/flashinfer" in table
    ttft_line = next(line for line in table.splitlines() if line.startswith("| TTFT | long |"))
    assert ttft_line.rstrip(" |").endswith("1.00")  # a run against itself
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert compare.main(["--run", "a=/nonexistent/x", "--out", str(out)]) == 1


def _serve(pages: dict):
    """A 127.0.0.1:0 server answering GET path -> (status, body) from ``pages``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            status, body = pages.get(self.path, (404, "no"))
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, "http://127.0.0.1:%d" % httpd.server_address[1]


def _metrics_text(running: float) -> str:
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    for name, value in (("sglang:num_running_reqs", running), ("sglang:num_queue_reqs", 0),
                        ("sglang:token_usage", 0)):
        Gauge(name, "x", ["tp_rank"], registry=registry).labels(tp_rank="0").set(value)
    return generate_latest(registry).decode()


def test_check_server_passes_a_drained_server_and_names_what_is_not(tmp_path):
    import json

    import check_server
    from sglang_tokenselect.server import stats

    snap = stats.Snapshot(layer_counts=[[1, 1, 2, 0]], decode_steps=2, request_steps=4,
                          attended_tokens=40, context_tokens=80)
    report = stats.RankReport(rank="dp0-tp0-pp0", pid=1, config={"budget": 14}, memory={}, snapshot=snap)
    good = json.dumps(stats.summarize([report]))
    httpd, url = _serve({"/health": (200, ""), "/metrics": (200, _metrics_text(0)), "/tokenselect/stats": (200, good)})
    try:
        out = tmp_path / "after.json"
        assert check_server.main(["--url", url, "--tokenselect", "--wait", "0", "--out", str(out)]) == 0
        seen = json.loads(out.read_text())
        assert seen["tokenselect_stats"]["attended_fraction"] == 0.5
        failures, _ = check_server.check(url, tokenselect=False, wait=0)
        assert failures == []
    finally:
        httpd.shutdown()
    snap.request_steps = 5  # one request the counters did not see
    bad = json.dumps(stats.summarize([report]))
    httpd, url = _serve({"/health": (503, ""), "/metrics": (200, _metrics_text(2)), "/tokenselect/stats": (200, bad)})
    try:
        failures, _ = check_server.check(url, tokenselect=True, wait=0)
    finally:
        httpd.shutdown()
    assert failures[0] == "/health returned 503"
    assert "sglang:num_running_reqs is 2.0 after the drain, expected 0" in failures
    assert failures[-1].startswith("tokenselect counters do not match the requests served")
