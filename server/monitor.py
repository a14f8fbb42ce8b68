"""The scheduler-side reader of the TokenSelect decode counters.

The counters live on the device (``SelectionCache.counters``, [layers, 4] int64, added to by
the selection kernels). Reading them on the decode path would cost a host sync per step, so:

- the decode path (``on_decode_step``, called from the backend's per-step metadata setup,
  outside any CUDA graph) only does host arithmetic on SGLang's host copy of the lengths
  (``seq_lens_cpu``): decode steps, requests, attended and context tokens. It launches nothing
  on the device and never waits on it;
- a daemon thread of the same process snapshots the device counters once per ``period_s``
  while decode steps happen (plus one settling read once they stop): on its own CUDA stream it
  waits for the work queued so far on the decode stream, copies the counters into pinned
  memory and waits on its own event (blocking-sync, GIL released). Only that thread waits;
- each snapshot goes to the registered sinks (the Prometheus metrics, when ``--enable-metrics``
  installed them) and to this rank's JSON file, read by ``GET /tokenselect/stats``.

The thread starts at the first served decode step (a batch with a real request, length > 1),
after SGLang captured its CUDA graphs (their warm-up batches are padding of length 1), so it
never issues device work while a graph is being captured.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Any, Callable, Optional, Protocol

import torch

from sglang_tokenselect.server.stats import RankReport, Snapshot, step_token_counts, write_report

logger = logging.getLogger(__name__)

DEFAULT_PERIOD_S = 1.0


class SnapshotSink(Protocol):
    def publish(self, snapshot: Snapshot) -> None: ...


_SINKS: list[SnapshotSink] = []  # this process's sinks (the metrics collector adds one)
_MONITORS: "weakref.WeakSet[DecodeMonitor]" = weakref.WeakSet()  # a backend owns its monitor


def add_sink(sink: SnapshotSink) -> None:
    """Register a sink for every monitor of this process, existing or future."""
    _SINKS.append(sink)


def monitors() -> list["DecodeMonitor"]:
    return list(_MONITORS)


class DecodeMonitor:
    """Host-side decode accounting plus an off-path reader of the device counters.

    Args:
        counters: [layers, 4] int64, the Selection Cache counters (any device).
        budget: ``n_init + topk + n_local``; a request attends ``min(L, budget)`` per layer.
        rank: this process's name in the stats directory, ``dp<d>-tp<t>-pp<p>``.
        stats_dir: where the rank's JSON report goes (None: no file).
        describe: returns ``(config dict, memory bytes dict)``; called off the decode path.
    """

    def __init__(self, counters: torch.Tensor, *, budget: int, rank: str, stats_dir: Optional[str],
                 describe: Callable[[], tuple[dict[str, Any], dict[str, int]]], start_layer: int = 0,
                 period_s: float = DEFAULT_PERIOD_S, start_thread: bool = True):
        self.counters = counters
        self.budget = budget
        self.rank = rank
        self.stats_dir = stats_dir
        self.describe = describe
        self.start_layer = start_layer
        self.period_s = period_s
        self.decode_steps = 0
        self.request_steps = 0
        self.attended_tokens = 0
        self.context_tokens = 0
        self._start_thread = start_thread
        self._lock = threading.Lock()  # host totals vs the reader
        self._read_lock = threading.Lock()  # one read at a time (thread, tests, shutdown)
        self._decode_stream = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._seen, self._settled = 0, True  # decode steps at the last tick; nothing left to read
        self._cuda = counters.device.type == "cuda"
        if self._cuda:
            self._host = torch.empty(counters.shape, dtype=counters.dtype, pin_memory=True)
            self._side = torch.cuda.Stream(device=counters.device)
            self._done = torch.cuda.Event(blocking=True)
        self.latest = Snapshot(layer_counts=[[0] * counters.shape[1] for _ in range(counters.shape[0])],
                               start_layer=start_layer, time=time.time())
        _MONITORS.add(self)
        self.write()

    # --- the decode path: host arithmetic only ---------------------------------------------

    def on_decode_step(self, seq_lens_cpu: Optional[torch.Tensor], in_capture: bool = False) -> None:
        """Count one served decode batch from SGLang's host lengths (no device access)."""
        if in_capture or seq_lens_cpu is None:
            return
        requests, attended, context = step_token_counts(seq_lens_cpu.tolist(), self.budget)
        if not requests:  # padding only (e.g. a CUDA graph runner's warm-up batch): not served
            return
        with self._lock:
            self.decode_steps += 1
            self.request_steps += requests
            self.attended_tokens += attended
            self.context_tokens += context
        if self._cuda:
            self._decode_stream = torch.cuda.current_stream(self.counters.device)
        if self._thread is None and self._start_thread:
            self._thread = threading.Thread(target=self._run, name=f"tokenselect-stats-{self.rank}",
                                            daemon=True)
            self._thread.start()

    # --- off the decode path ----------------------------------------------------------------

    def read(self) -> Snapshot:
        """Snapshot the device counters; blocks the calling thread only (never the decode
        stream). The host totals are taken first: the counters include at least those steps
        whose kernels were queued before the read (at most the step being launched differs)."""
        with self._read_lock:
            with self._lock:
                totals = (self.decode_steps, self.request_steps, self.attended_tokens, self.context_tokens)
            if self._cuda:
                with torch.cuda.device(self.counters.device), torch.cuda.stream(self._side):
                    if self._decode_stream is not None:
                        self._side.wait_stream(self._decode_stream)
                    self._host.copy_(self.counters, non_blocking=True)
                    self._done.record(self._side)
                self._done.synchronize()
                values = self._host.tolist()
            else:
                values = self.counters.tolist()
            self.latest = Snapshot(layer_counts=values, decode_steps=totals[0], request_steps=totals[1],
                                   attended_tokens=totals[2], context_tokens=totals[3],
                                   start_layer=self.start_layer, time=time.time())
            return self.latest

    def publish(self, snapshot: Optional[Snapshot] = None) -> None:
        """Send a snapshot (default: the latest) to the sinks and the stats file."""
        snapshot = snapshot or self.latest
        for sink in list(_SINKS):
            try:
                sink.publish(snapshot)
            except Exception:  # a metrics failure must not stop the stats file
                logger.exception("TokenSelect stats: a metrics sink failed")
        self.write(snapshot)

    def write(self, snapshot: Optional[Snapshot] = None) -> None:
        if not self.stats_dir:
            return
        config, memory = self.describe()
        report = RankReport(rank=self.rank, pid=os.getpid(), config=config, memory=memory,
                            snapshot=snapshot or self.latest, device=str(self.counters.device))
        try:
            write_report(self.stats_dir, report)
        except OSError as exc:
            logger.warning("TokenSelect stats: cannot write %s: %s", self.stats_dir, exc)

    def tick(self) -> bool:
        """One reader-thread iteration: read and publish if decode steps were served since the
        last one, and once more after they stop (that settling read sees the last step's
        kernels). Returns whether it read."""
        steps = self.decode_steps
        if steps == self._seen and self._settled:
            return False
        self._settled = steps == self._seen
        self._seen = steps
        self.publish(self.read())
        return True

    def _run(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.counters.device)  # the CUDA current device is per thread
        while not self._stop.wait(self.period_s):
            try:
                self.tick()
            except Exception:
                logger.exception("TokenSelect stats: reading the decode counters failed")

    def close(self) -> None:
        """Stop the reader thread (tests; the server's threads are daemons)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _MONITORS.discard(self)
