"""ServerArgs settings for the serving parts, applied by the plugin's argument hook in the
launcher (the resolved ServerArgs travels to every SGLang process)."""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

from sglang_tokenselect.server.routes import STATS_DIR_ATTR

logger = logging.getLogger(__name__)

STATS_DIR_ENV = "SGLANG_TOKENSELECT_STATS_DIR"


def new_stats_dir() -> str:
    """A directory name for this server's rank reports (created by the first writer).

    ``$SGLANG_TOKENSELECT_STATS_DIR`` as parent if set, else the temp dir; unique per launch so
    a restarted server never reports its predecessor's counters."""
    parent = os.environ.get(STATS_DIR_ENV) or tempfile.gettempdir()
    return os.path.join(parent, f"sglang-tokenselect-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def configure(server_args) -> None:
    """Choose the stats directory and, with --enable-metrics, the metrics collector."""
    if not getattr(server_args, STATS_DIR_ATTR, None):
        setattr(server_args, STATS_DIR_ATTR, new_stats_dir())
    if getattr(server_args, "enable_metrics", False):
        from sglang_tokenselect.server.metrics import install_collector

        install_collector(server_args)
