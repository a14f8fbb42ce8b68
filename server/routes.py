"""``GET /tokenselect/stats`` on SGLang's FastAPI app.

SGLang's HTTP server and its schedulers are different processes; the schedulers own the
counters. Each scheduler's ``DecodeMonitor`` writes its rank's report to a JSON file in the
stats directory (``server_args._tokenselect_stats_dir``, chosen in the launcher and carried to
every process on ServerArgs); this route reads and sums them. A file per rank, replaced
atomically, needs no extra socket, no shared-memory lifetime and works with or without
``--enable-metrics``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from sglang_tokenselect.server.stats import read_reports, summarize

logger = logging.getLogger(__name__)

STATS_PATH = "/tokenselect/stats"
STATS_DIR_ATTR = "_tokenselect_stats_dir"
HTTP_SETUP_TARGET = "sglang.srt.entrypoints.http_server._setup_and_run_http_server"


def stats_body(stats_dir: Optional[str], backends: Optional[tuple[str, str]] = None) -> dict[str, Any]:
    """The JSON body: the ranks' summary, or why tokenselect is not serving decode."""
    from sglang_tokenselect.server_args import BACKEND_NAME

    if backends is not None and backends[1] != BACKEND_NAME:
        return {"serving_decode": False, "ranks": 0,
                "reason": f"the decode attention backend is {backends[1]!r}, not {BACKEND_NAME!r}"}
    body = summarize(read_reports(stats_dir))
    body["stats_dir"] = stats_dir
    return body


def add_stats_route(app, stats_dir: Optional[str], backends: Optional[tuple[str, str]] = None) -> None:
    """Add ``GET /tokenselect/stats`` to a FastAPI app or router."""

    def tokenselect_stats() -> dict[str, Any]:
        """TokenSelect: active configuration, whether it serves decode, cumulative counters,
        hit rate per layer, attended fraction, scratch memory."""
        return stats_body(stats_dir, backends)

    app.add_api_route(STATS_PATH, tokenselect_stats, methods=["GET"], tags=["tokenselect"])


def install_routes(app, server_args) -> None:
    """Add the TokenSelect routes to SGLang's ``app`` (once)."""
    if any(getattr(route, "path", None) == STATS_PATH for route in app.routes):
        return
    backends = tuple(server_args.get_attention_backends())
    add_stats_route(app, getattr(server_args, STATS_DIR_ATTR, None), backends)
    logger.info("TokenSelect: GET %s on the HTTP server", STATS_PATH)


def before_http_server(*args, **kwargs):
    """BEFORE hook on ``http_server._setup_and_run_http_server(server_args, ...)``: SGLang
    calls it in the HTTP server process, once, before uvicorn serves ``app``."""
    from sglang.srt.entrypoints.http_server import app

    server_args = kwargs.get("server_args", args[0] if args else None)
    try:
        install_routes(app, server_args)
    except Exception:  # the server must come up even if the stats route cannot
        logger.exception("TokenSelect: could not add %s", STATS_PATH)
    return None

