"""The serving parts on real counters: the decode monitor, the Prometheus metrics and the
``/tokenselect/stats`` route (prometheus_client registries, FastAPI's test client)."""

from __future__ import annotations

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from sglang_tokenselect.backend import TokenSelectTorchBackend
from sglang_tokenselect.config import TokenSelectConfig
from sglang_tokenselect.server import metrics, stats
from sglang_tokenselect.server.monitor import DecodeMonitor
from sglang_tokenselect.server.routes import STATS_PATH, add_stats_route
from ts_fixtures import build, decode_case, forward, fresh_seed

SMALL = dict(n_init=2, n_local=4, topk=8)  # budget 14 tokens
LENS = (5, 13, 40, 90)  # prefixes: L = 6, 14 (dense), 41, 91 (sparse)
LABELS = {"model_name": "m", "tp_rank": "0"}


def test_step_token_counts_clamp_to_the_budget_and_skip_graph_padding():
    # rows of length 1 are CUDA graph padding: neither attended nor context
    assert stats.step_token_counts([1, 6, 14, 41, 91, 1], budget=14) == (4, 6 + 14 + 14 + 14, 6 + 14 + 41 + 91)
    assert stats.step_token_counts([], budget=14) == (0, 0, 0)


def test_attended_fraction_and_hit_rate_arithmetic():
    assert stats.attended_fraction(48, 152) == pytest.approx(48 / 152)
    assert stats.attended_fraction(0, 0) is None
    assert stats.hit_rate(3, 1) == 0.75
    assert stats.hit_rate(0, 0) is None


@pytest.fixture
def served(tmp_path):
    """A CPU tokenselect backend after two decode steps of one batch: the first selects (misses),
    the second reuses every selection (threshold -1: static selection, hits)."""
    run = build(decode_case(LENS, name="stats"), fresh_seed())
    fx = run.fixture
    backend = TokenSelectTorchBackend(fx.runner, TokenSelectConfig(**SMALL, cache_threshold=-1.0))
    backend.ts_monitor.close()  # this test reads by hand, into its own directory
    monitor = DecodeMonitor(backend.selection_cache.counters, budget=backend.ts_config.budget, rank="dp0-tp0-pp0",
                            stats_dir=str(tmp_path), describe=backend.describe, start_thread=False)
    backend.ts_monitor = monitor
    forward(fx, backend)
    forward(fx, backend)
    yield backend, monitor, tmp_path
    monitor.close()


def test_monitor_snapshot_matches_the_device_counters(served):
    backend, monitor, _ = served
    snap = monitor.read()
    assert snap.totals() == backend.selection_cache.counts() == {"hits": 2, "misses": 2, "dense": 4, "overflow": 0}
    lengths = [n + 1 for n in LENS]
    assert snap.decode_steps == 2 and snap.request_steps == 2 * len(LENS)
    assert snap.attended_tokens == 2 * sum(min(n, 14) for n in lengths)
    assert snap.context_tokens == 2 * sum(lengths)
    assert snap.counts_match_requests()
    counters = backend.selection_cache.counters
    assert snap.layer_counts == counters.tolist() and counters.shape[0] == len(snap.layer_counts)


def test_prometheus_metrics_publish_increments_once(served):
    _, monitor, _ = served
    registry = CollectorRegistry()
    sink = metrics.TokenSelectMetrics(LABELS, registry=registry, budget=14)
    snap = monitor.read()
    sink.publish(snap)
    sink.publish(snap)  # republishing the same snapshot adds nothing

    def value(name, **labels):
        return registry.get_sample_value(name, {**LABELS, **labels})

    assert value(metrics.LAYER_STEPS + "_total", outcome="hit") == 2
    assert value(metrics.LAYER_STEPS + "_total", outcome="miss") == 2
    assert value(metrics.LAYER_STEPS + "_total", outcome="dense") == 4
    assert value(metrics.LAYER_STEPS + "_total", outcome="overflow") is None  # never incremented
    assert value(metrics.ATTENDED + "_total") == snap.attended_tokens
    assert value(metrics.CONTEXT + "_total") == snap.context_tokens
    assert value(metrics.DECODE_STEPS + "_total") == 2
    assert value(metrics.REQUEST_STEPS + "_total") == 8
    assert value(metrics.BUDGET) == 14
    # a later snapshot adds only the difference
    monitor.on_decode_step(torch.tensor([20, 30]))
    sink.publish(monitor.read())
    assert value(metrics.CONTEXT + "_total") == snap.context_tokens + 50
    assert value(metrics.ATTENDED + "_total") == snap.attended_tokens + 28


def test_stats_route_reports_config_counters_and_fractions(served):
    backend, monitor, directory = served
    monitor.publish(monitor.read())
    client = TestClient(_app(str(directory)))
    body = client.get(STATS_PATH).json()
    assert body["serving_decode"] is True and body["sparse_decode_seen"] is True
    assert body["config"]["budget"] == 14 and body["config"]["cache_threshold"] == -1.0
    assert body["config"]["backend"] == "TokenSelectTorchBackend"
    assert body["layer_steps"] == {"hits": 2, "misses": 2, "dense": 4, "overflow": 0}
    assert body["hit_rate"] == 0.5
    assert body["hit_rate_per_layer"] == [0.5]  # the kit's module is one layer
    lengths = [n + 1 for n in LENS]
    assert body["attended_fraction"] == pytest.approx(sum(min(n, 14) for n in lengths) / sum(lengths))
    assert body["decode_steps"] == 2 and body["counts_match_requests"] is True
    assert body["memory_bytes"]["selection_cache"] == backend.selection_cache.nbytes > 0
    assert "scratch" in body["memory_bytes"]


def test_stats_route_sums_tensor_parallel_ranks(tmp_path):
    for rank, counts in (("dp0-tp0-pp0", [[3, 1, 4, 0], [1, 3, 4, 1]]), ("dp0-tp1-pp0", [[1, 3, 4, 0], [2, 2, 4, 0]])):
        snap = stats.Snapshot(layer_counts=counts, decode_steps=2, request_steps=8, attended_tokens=48,
                              context_tokens=152, time=1.0)
        stats.write_report(str(tmp_path), stats.RankReport(rank=rank, pid=1, config={"budget": 14},
                                                           memory={"scratch": 10}, snapshot=snap))
    body = TestClient(_app(str(tmp_path))).get(STATS_PATH).json()
    assert body["ranks"] == 2
    assert body["hit_rate_per_layer"] == [0.5, 0.375]
    assert body["attended_fraction"] == pytest.approx(48 / 152)  # same batch on every rank: not summed
    assert body["memory_bytes"] == {"scratch": 20}
    assert body["counts_match_requests"] is True


def test_stats_route_says_when_tokenselect_is_not_serving(tmp_path):
    body = TestClient(_app(str(tmp_path / "missing"))).get(STATS_PATH).json()
    assert body["serving_decode"] is False and "no scheduler" in body["reason"]
    other = TestClient(_app(None, ("flashinfer", "flashinfer"))).get(STATS_PATH).json()
    assert other["serving_decode"] is False and "'flashinfer'" in other["reason"]


def _app(directory, backends=None) -> FastAPI:
    app = FastAPI()
    add_stats_route(app, directory, backends)
    return app


def test_reader_ticks_while_steps_are_served_and_once_after(tmp_path):
    counters = torch.zeros(2, 4, dtype=torch.int64)
    monitor = DecodeMonitor(counters, budget=14, rank="dp0-tp0-pp0", stats_dir=str(tmp_path),
                            describe=lambda: ({}, {}), start_thread=False)
    try:
        assert not monitor.tick()  # nothing served yet
        monitor.on_decode_step(torch.tensor([1, 1]))  # CUDA-graph padding only: not a step
        monitor.on_decode_step(torch.tensor([20]), in_capture=True)  # graph capture: not a step
        assert monitor.decode_steps == 0 and not monitor.tick()
        monitor.on_decode_step(torch.tensor([20, 1]))
        counters[0, 2] += 1  # the kernels' work of that step lands later
        counters[1, 2] += 1
        assert monitor.tick() and monitor.latest.decode_steps == 1
        assert monitor.tick() and monitor.latest.counts_match_requests()  # the settling read
        assert not monitor.tick() and not monitor.tick()  # idle: no more reads
        monitor.on_decode_step(torch.tensor([30]))
        assert monitor.tick() and monitor.latest.decode_steps == 2
        body = stats.summarize(stats.read_reports(str(tmp_path)))
        assert body["decode_steps"] == 2 and body["attended_tokens"] == 14 + 14
    finally:
        monitor.close()


def test_stats_route_sums_data_parallel_groups(tmp_path):
    for dp in (0, 1):  # two schedulers serving different batches
        snap = stats.Snapshot(layer_counts=[[1, 1, 2, 0]], decode_steps=2, request_steps=4, attended_tokens=40,
                              context_tokens=80 * (dp + 1))
        stats.write_report(str(tmp_path), stats.RankReport(rank=f"dp{dp}-tp0-pp0", pid=dp, config={},
                                                           memory={}, snapshot=snap))
    body = stats.summarize(stats.read_reports(str(tmp_path)))
    assert body["decode_steps"] == 4 and body["request_steps"] == 8
    assert body["attended_fraction"] == pytest.approx(80 / 240)


def test_backend_names_its_report_by_the_runners_parallel_ranks():
    from types import SimpleNamespace

    from sglang_tokenselect.backend import TokenSelectDecodeMixin

    backend = SimpleNamespace(selection_cache=SimpleNamespace(counters=torch.zeros(2, 4, dtype=torch.int64)),
                              ts_config=TokenSelectConfig(**SMALL), ts_start_layer=0,
                              describe=lambda: ({}, {}))
    runner = SimpleNamespace(ps=SimpleNamespace(dp_rank=None, tp_rank=3, pp_rank=1), server_args=SimpleNamespace())
    monitor = TokenSelectDecodeMixin._make_monitor(backend, runner)
    try:
        assert monitor.rank == "dp0-tp3-pp1" and monitor.budget == 14 and monitor.stats_dir is None
    finally:
        monitor.close()
