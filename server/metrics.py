"""Prometheus metrics on SGLang's ``/metrics`` (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: each scheduler process writes its metrics
into ``PROMETHEUS_MULTIPROC_DIR`` and the HTTP server's ``/metrics`` aggregates that directory.
The scheduler's collector class is chosen through ``ServerArgs.stat_loggers`` (SGLang's
dependency-injection point for its metrics collectors, role ``"scheduler"``); with tokenselect
and ``--enable-metrics`` the plugin registers ``TokenSelectSchedulerMetricsCollector`` there.
It is SGLang's collector plus the metrics below, created in the scheduler process that owns
the TokenSelect counters, with SGLang's labels (model_name, tp_rank, ...).

Names (``sglang:`` prefix and colon like SGLang's own; Prometheus keeps the colons):

- ``sglang:tokenselect_decode_layer_steps_total{outcome=hit|miss|dense|overflow}``
- ``sglang:tokenselect_decode_steps_total``, ``sglang:tokenselect_decode_request_steps_total``
- ``sglang:tokenselect_decode_attended_tokens_total``, ``sglang:tokenselect_decode_context_tokens_total``
- ``sglang:tokenselect_budget_tokens`` (gauge)

Hit rate: ``rate(...{outcome="hit"}) / (rate(...{outcome="hit"}) + rate(...{outcome="miss"}))``;
attended fraction: ``rate(attended) / rate(context)``.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any, Optional

from sglang_tokenselect.server.stats import OUTCOMES, Snapshot

logger = logging.getLogger(__name__)

PREFIX = "sglang:tokenselect_"
LAYER_STEPS = PREFIX + "decode_layer_steps"
DECODE_STEPS = PREFIX + "decode_steps"
REQUEST_STEPS = PREFIX + "decode_request_steps"
ATTENDED = PREFIX + "decode_attended_tokens"
CONTEXT = PREFIX + "decode_context_tokens"
BUDGET = PREFIX + "budget_tokens"
OUTCOME_LABELS = dict(zip(OUTCOMES, ("hit", "miss", "dense", "overflow")))
# Sample names as scraped (prometheus_client appends _total to counters).
SAMPLE_NAMES = (LAYER_STEPS + "_total", DECODE_STEPS + "_total", REQUEST_STEPS + "_total",
                ATTENDED + "_total", CONTEXT + "_total", BUDGET)
COLLECTOR_PATH = "sglang_tokenselect.server.metrics:TokenSelectSchedulerMetricsCollector"


class TokenSelectMetrics:
    """The TokenSelect counters and gauge; a sink of ``DecodeMonitor`` snapshots.

    Snapshots are cumulative; each publish adds the difference to the last one published.
    """

    def __init__(self, labels: dict[str, Any], registry=None, budget: Optional[int] = None):
        # Imported here: SGLang sets PROMETHEUS_MULTIPROC_DIR before its collectors import it.
        from prometheus_client import REGISTRY, Counter, Gauge

        registry = REGISTRY if registry is None else registry
        self.labels = {k: str(v) for k, v in labels.items()}
        names = list(self.labels)
        self.layer_steps = Counter(LAYER_STEPS, "TokenSelect decode layer-steps (a request at one layer of "
                                   "one decode step) by outcome: hit/miss of the Selection Cache, dense "
                                   "(context within the budget), overflow (misses that took the fallback "
                                   "selection; a subset of miss).", names + ["outcome"], registry=registry)
        self.decode_steps = Counter(DECODE_STEPS, "Decode batches served by tokenselect.", names,
                                    registry=registry)
        self.request_steps = Counter(REQUEST_STEPS, "Requests summed over tokenselect decode batches "
                                     "(tokens decoded).", names, registry=registry)
        self.attended = Counter(ATTENDED, "Tokens attended per layer, summed over decode steps and "
                                "requests (min(L, budget)).", names, registry=registry)
        self.context = Counter(CONTEXT, "Context tokens L, summed over decode steps and requests.",
                               names, registry=registry)
        self.budget = Gauge(BUDGET, "Configured TokenSelect budget n_init + topk + n_local (tokens).",
                            names, registry=registry, multiprocess_mode="mostrecent")
        self._last = (0, 0, 0, 0, (0,) * len(OUTCOMES))
        self._lock = threading.Lock()
        if budget is not None:
            self.set_budget(budget)

    def set_budget(self, budget: int) -> None:
        self.budget.labels(**self.labels).set(budget)

    def publish(self, snapshot: Snapshot) -> None:
        totals = snapshot.totals()
        now = (snapshot.decode_steps, snapshot.request_steps, snapshot.attended_tokens,
               snapshot.context_tokens, tuple(totals[name] for name in OUTCOMES))
        with self._lock:
            last, self._last = self._last, now
        for metric, new, old in zip((self.decode_steps, self.request_steps, self.attended, self.context),
                                    now[:4], last[:4]):
            if new > old:
                metric.labels(**self.labels).inc(new - old)
        for name, new, old in zip(OUTCOMES, now[4], last[4]):
            if new > old:
                self.layer_steps.labels(**self.labels, outcome=OUTCOME_LABELS[name]).inc(new - old)


def _scheduler_collector_base():
    from sglang.srt.observability.metrics_collector import SchedulerMetricsCollector

    return SchedulerMetricsCollector


def _make_collector_class():
    base = _scheduler_collector_base()

    class TokenSelectSchedulerMetricsCollector(base):
        """SGLang's scheduler collector plus the TokenSelect metrics (registered as a sink of
        this process's decode monitors)."""

        def __init__(self, labels, *args, **kwargs):
            super().__init__(labels, *args, **kwargs)
            from sglang_tokenselect.server.monitor import add_sink
            from sglang_tokenselect.server_args import config_from_server_args

            server_args = kwargs.get("server_args")
            budget = config_from_server_args(server_args).budget
            self.tokenselect = TokenSelectMetrics(labels, budget=budget)
            add_sink(self.tokenselect)

        def log_stats(self, stats) -> None:
            super().log_stats(stats)
            # SGLang's own cadence (every --decode-log-interval decode steps, and when idle):
            # republish the latest snapshot; host values only, the reader thread does the reads.
            from sglang_tokenselect.server.monitor import monitors

            for monitor in monitors():
                self.tokenselect.publish(monitor.latest)

    TokenSelectSchedulerMetricsCollector.__module__ = __name__
    TokenSelectSchedulerMetricsCollector.__qualname__ = "TokenSelectSchedulerMetricsCollector"
    return TokenSelectSchedulerMetricsCollector


_collector_class = None


def __getattr__(name: str):
    # The subclass needs SGLang's collector at class creation: built on first use, so this
    # module imports without SGLang's observability stack (HTTP process, tests).
    global _collector_class
    if name == "TokenSelectSchedulerMetricsCollector":
        if _collector_class is None:
            _collector_class = _make_collector_class()
        return _collector_class
    raise AttributeError(name)


def resolve(path: str) -> type:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


class StatLoggers(dict):
    """``ServerArgs.stat_loggers`` holding import paths instead of classes.

    SGLang looks collector classes up with ``stat_loggers.get(role, default)``; this resolves
    the path there. Paths, unlike class objects, keep ServerArgs JSON-serializable for
    ``/server_info`` and picklable for the scheduler processes.
    """

    def get(self, key, default=None):
        value = super().get(key, default)
        return resolve(value) if isinstance(value, str) else value

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return resolve(value) if isinstance(value, str) else value


def install_collector(server_args) -> bool:
    """Select the TokenSelect scheduler collector on ``server_args`` (if the user chose none)."""
    current = getattr(server_args, "stat_loggers", None) or {}
    if "scheduler" in current:
        logger.warning("TokenSelect: stat_loggers already names a scheduler collector; the "
                       "sglang:tokenselect_* metrics are not exported (/tokenselect/stats still is).")
        return False
    loggers = StatLoggers(dict(current))
    dict.__setitem__(loggers, "scheduler", COLLECTOR_PATH)
    server_args.stat_loggers = loggers
    return True
