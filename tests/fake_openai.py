"""A fake OpenAI-compatible chat server that streams, for the Locust tests (127.0.0.1, port 0).

It answers ``POST /v1/chat/completions`` with ``stream: true`` by ``max_tokens`` server-sent
events of one token each, then a usage event and ``[DONE]``, one HTTP chunk per event (chunked
transfer encoding, as uvicorn streams). Anything else gets a 400 with an OpenAI-style error.

For ``benchmarks/soak.py`` it also plays the rest of an SGLang server: ``GET /health``,
``/metrics`` (Prometheus text: running streams, queue 0, token usage 0 once idle),
``/tokenselect/stats`` (consistent counters), ``/server_info`` and a non-streaming
``POST /generate``; ``python tests/fake_openai.py --port N`` serves until SIGTERM (extra
server flags are accepted and ignored).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_TOKENS_CAP = 64


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvicorn: no Nagle delay

    def _error(self, status: int, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        stats = self.server.stats
        if self.path == "/health":
            return self._send(200, b"", "text/plain")
        if self.path == "/metrics":
            with stats["lock"]:
                running = stats["active"]
            lines = []
            for name, value in (("sglang:num_running_reqs", running), ("sglang:num_queue_reqs", 0),
                                ("sglang:token_usage", 0.01 * running)):
                lines += [f"# HELP {name} fake", f"# TYPE {name} gauge", f'{name}{{tp_rank="0"}} {float(value)}']
            return self._send(200, ("\n".join(lines) + "\n").encode(), "text/plain; version=0.0.4")
        if self.path == "/tokenselect/stats":
            with stats["lock"]:
                n = stats["requests"]
            body = {"serving_decode": True, "ranks": 1, "hit_rate": 0.5, "attended_fraction": 0.25,
                    "request_steps": n, "layer_steps": n, "counts_match_requests": True}
            return self._send(200, json.dumps(body).encode(), "application/json")
        if self.path == "/server_info":
            return self._send(200, json.dumps({"context_length": 4096, "version": "fake"}).encode(),
                              "application/json")
        return self._error(404, f"no route {self.path}")

    def do_POST(self):  # noqa: N802 (http.server's name)
        stats = self.server.stats
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._error(400, "body is not JSON")
        if self.path == "/generate":  # SGLang's native, non-streaming
            n = int((body.get("sampling_params") or {}).get("max_new_tokens") or 16)
            ids = [1000 + i for i in range(n)]
            out = {"text": " t" * n, "output_ids": ids,
                   "meta_info": {"prompt_tokens": len(body.get("input_ids") or []), "completion_tokens": n,
                                 "finish_reason": {"type": "length", "length": n}}}
            return self._send(200, json.dumps(out).encode(), "application/json")
        if self.path != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        messages = body.get("messages")
        if not body.get("stream") or not isinstance(messages, list) or not messages:
            return self._error(400, "stream and messages are required")
        n = int(body.get("max_tokens") or 16)
        if n < 1:
            return self._error(400, "max_tokens must be >= 1")
        n = min(n, MAX_TOKENS_CAP)
        with stats["lock"]:
            stats["requests"] += 1
            stats["active"] += 1
            stats["prompt_chars"].append(len(messages[0].get("content", "")))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for i in range(n):
                chunk = {"id": "x", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
                self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                self.server.pause.wait(0.001)  # a token every ~millisecond
            usage = {"id": "x", "object": "chat.completion.chunk", "choices": [],
                     "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}
            self._chunk(b"data: " + json.dumps(usage).encode() + b"\n\n")
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")  # the last chunk
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            with stats["lock"]:
                stats["disconnects"] += 1
        finally:
            with stats["lock"]:
                stats["active"] -= 1


class FakeOpenAIServer:
    """Context manager: a threaded fake server on 127.0.0.1 at an OS-chosen port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stats = {"lock": threading.Lock(), "requests": 0, "active": 0, "disconnects": 0,
                             "prompt_chars": []}
        self.httpd.pause = threading.Event()  # never set: wait() is a sleep
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def stats(self) -> dict:
        return self.httpd.stats

    def __enter__(self) -> "FakeOpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main(argv=None) -> int:
    """Serve on --host/--port until SIGTERM; other (server) flags are ignored."""
    parser = argparse.ArgumentParser(description="fake streaming OpenAI / SGLang server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args(argv)
    server = FakeOpenAIServer(args.host, args.port)
    signal.signal(signal.SIGTERM, lambda *_: server.httpd.shutdown())
    print(f"fake server on {server.url}", flush=True)
    server.thread.start()
    server.thread.join()
    server.httpd.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
