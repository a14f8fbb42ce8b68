"""A fake OpenAI-compatible chat server that streams, for the Locust tests (127.0.0.1, port 0).

It answers ``POST /v1/chat/completions`` with ``stream: true`` by ``max_tokens`` server-sent
events of one token each, then a usage event and ``[DONE]``, one HTTP chunk per event (chunked
transfer encoding, as uvicorn streams). Anything else gets a 400 with an OpenAI-style error.
"""

from __future__ import annotations

import json
import socket
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

    def do_POST(self):  # noqa: N802 (http.server's name)
        stats = self.server.stats
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._error(400, "body is not JSON")
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


class FakeOpenAIServer:
    """Context manager: a threaded fake server on 127.0.0.1 at an OS-chosen port."""

    def __init__(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stats = {"lock": threading.Lock(), "requests": 0, "disconnects": 0, "prompt_chars": []}
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
