"""How the serving parts plug into SGLang: ServerArgs.stat_loggers, prometheus multiprocess mode
(as SGLang's /metrics reads it), the HTTP hook and the /tokenselect/stats route on SGLang's app."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import pkgutil
import subprocess
import sys
import textwrap

import pytest
from fastapi.encoders import jsonable_encoder
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from sglang.srt.plugins import load_plugins

load_plugins()

from sglang.srt.server_args import prepare_server_args  # noqa: E402

from sglang_tokenselect.server import metrics, routes  # noqa: E402

TOKENSELECT = ("--attention-backend", "tokenselect", "--tokenselect-n-init", "2", "--tokenselect-n-local", "4",
               "--tokenselect-topk", "8")


def server_args(model, *argv):
    return prepare_server_args(["--model-path", model, "--device", "cpu", "--skip-tokenizer-init", *argv])


def test_metrics_select_the_collector_and_keep_server_args_serializable(tiny_model):
    sa = server_args(tiny_model, *TOKENSELECT, "--enable-metrics")
    assert dict(sa.stat_loggers) == {"scheduler": metrics.COLLECTOR_PATH}
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector, resolve_collector_class

    cls = resolve_collector_class(sa, "scheduler", SchedulerMetricsCollector)
    assert issubclass(cls, SchedulerMetricsCollector) and cls.__name__ == "TokenSelectSchedulerMetricsCollector"
    # /server_info serializes ServerArgs; the scheduler processes get it pickled
    encoded = jsonable_encoder(dataclasses.asdict(sa))
    assert encoded["stat_loggers"] == {"scheduler": metrics.COLLECTOR_PATH}
    back = pickle.loads(pickle.dumps(sa))
    assert resolve_collector_class(back, "scheduler", SchedulerMetricsCollector) is cls
    assert back._tokenselect_stats_dir == sa._tokenselect_stats_dir


def test_without_metrics_or_tokenselect_nothing_is_installed(tiny_model):
    assert not server_args(tiny_model, *TOKENSELECT).stat_loggers
    plain = server_args(tiny_model, "--attention-backend", "triton", "--enable-metrics")
    assert not plain.stat_loggers and not getattr(plain, routes.STATS_DIR_ATTR, None)


SCHEDULER_SIDE = textwrap.dedent("""
    import json, sys, torch
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector
    from sglang_tokenselect.server.monitor import DecodeMonitor
    sa = prepare_server_args(json.loads(sys.argv[1]))
    from types import SimpleNamespace
    # the scheduler's own call (Scheduler.init_metrics_collector), rank 0 of one
    ps = SimpleNamespace(attn_tp_rank=0, pp_rank=0, attn_cp_rank=0, moe_ep_rank=0)
    ctx = SchedulerMetricsCollector.init_new(server_args=sa, ps=ps, tp_rank=0, pp_rank=0, dp_rank=None,
                                             enable_priority_scheduling=False, enable_lora=False,
                                             enable_hierarchical_cache=False)
    assert type(ctx.collector).__name__ == "TokenSelectSchedulerMetricsCollector", type(ctx.collector)
    # per layer: hits, misses, dense, overflow of 2 steps x 4 requests
    counters = torch.tensor([[3, 1, 4, 0], [1, 3, 4, 1]], dtype=torch.int64)
    monitor = DecodeMonitor(counters, budget=14, rank="dp0-tp0-pp0", stats_dir=sa._tokenselect_stats_dir,
                            describe=lambda: ({"budget": 14}, {"scratch": 0}), start_thread=False)
    for _ in range(2):
        monitor.on_decode_step(torch.tensor([6, 14, 41, 91]))
    monitor.read()
    monitor.write()
    # SGLang's periodic log_stats: its own gauges, then our latest snapshot (host values only)
    from sglang.srt.observability.metrics_collector import SchedulerStats
    ctx.collector.log_stats(SchedulerStats())
    print(json.dumps({"stats_dir": sa._tokenselect_stats_dir, "labels": ctx.collector.labels}))
""")


def test_scheduler_metrics_reach_the_multiprocess_registry(tiny_model, tmp_path):
    """The scheduler-side collector in its own process, prometheus in multiprocess mode as SGLang
    runs it; the parent reads the directory like SGLang's /metrics does."""
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
           "SGLANG_TOKENSELECT_STATS_DIR": str(tmp_path)}
    argv = ["--model-path", tiny_model, "--device", "cpu", "--skip-tokenizer-init", *TOKENSELECT, "--enable-metrics"]
    proc = subprocess.run([sys.executable, "-c", SCHEDULER_SIDE, json.dumps(argv)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    stats_dir = reply["stats_dir"]
    assert stats_dir.startswith(str(tmp_path))

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(prom_dir))
    labels = {key: str(value) for key, value in reply["labels"].items()}  # SGLang's: model_name, tp_rank, ...
    assert labels["tp_rank"] == "0"

    def value(name, **extra):
        return registry.get_sample_value(name, {**labels, **extra})

    steps = metrics.LAYER_STEPS + "_total"
    assert [value(steps, outcome=o) for o in ("hit", "miss", "dense", "overflow")] == [4, 4, 8, 1]
    assert value(metrics.ATTENDED + "_total") == 2 * (6 + 14 + 14 + 14)
    assert value(metrics.CONTEXT + "_total") == 2 * (6 + 14 + 41 + 91)
    assert value(metrics.DECODE_STEPS + "_total") == 2
    assert value(metrics.BUDGET) == 14
    names = {m.name for m in registry.collect()}
    assert "sglang:num_running_reqs" in names  # SGLang's own scheduler metrics are still there

    body = routes.stats_body(stats_dir, ("tokenselect", "tokenselect"))
    assert body["hit_rate_per_layer"] == [0.75, 0.25] and body["counts_match_requests"] is True


def test_http_hook_adds_the_route_to_sglangs_app(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SGLANG_TOKENSELECT_STATS_DIR", str(tmp_path))
    target = pkgutil.resolve_name(routes.HTTP_SETUP_TARGET.rsplit(".", 1)[0])
    assert hasattr(target, routes.HTTP_SETUP_TARGET.rsplit(".", 1)[1])  # the hooked function exists
    from sglang.srt.entrypoints.http_server import app

    sa = server_args(tiny_model, *TOKENSELECT)
    assert routes.before_http_server(sa, None, None) is None  # BEFORE hook: arguments unchanged
    routes.before_http_server(sa, None, None)  # idempotent
    assert sum(getattr(r, "path", None) == routes.STATS_PATH for r in app.routes) == 1
    body = TestClient(app).get(routes.STATS_PATH).json()  # no lifespan: the engine is not started
    assert body["serving_decode"] is False and body["stats_dir"] == sa._tokenselect_stats_dir
