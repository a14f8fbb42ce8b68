"""Stats snapshots: what a scheduler process knows, on disk as JSON, and the arithmetic on them.

A scheduler process (one per TP/PP rank) writes its snapshot to ``<stats dir>/<rank>.json``
(atomically: a temporary file then ``os.replace``). The HTTP server process reads every rank's
file to answer ``GET /tokenselect/stats``. Nothing here touches a device.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional

logger = logging.getLogger(__name__)

OUTCOMES = ("hits", "misses", "dense", "overflow")  # kernels/reference.py COUNTERS, same order
FILE_SUFFIX = ".json"


@dataclass
class Snapshot:
    """Cumulative decode counters of one scheduler process (one TP/PP rank).

    layer_counts: per layer of this rank, ``[hits, misses, dense, overflow]`` layer-steps (a
        request in a decode batch at one layer is one layer-step; overflow is a subset of misses).
    decode_steps: decode batches served (CUDA graph capture excluded); request_steps: requests
        summed over those batches (tokens decoded).
    attended_tokens / context_tokens: summed over decode steps and requests, per layer: what a
        request attends (``min(L, budget)``) and its context length ``L``.
    """

    layer_counts: list[list[int]]
    decode_steps: int = 0
    request_steps: int = 0
    attended_tokens: int = 0
    context_tokens: int = 0
    start_layer: int = 0
    time: float = 0.0

    def totals(self) -> dict[str, int]:
        return {name: sum(row[i] for row in self.layer_counts) for i, name in enumerate(OUTCOMES)}

    def counts_match_requests(self) -> bool:
        """Every request of every decode step is a hit, a miss or dense at each layer: per layer,
        hits + misses + dense == request_steps (exact once the reader settled after a drain)."""
        return all(row[0] + row[1] + row[2] == self.request_steps for row in self.layer_counts)


@dataclass
class RankReport:
    """What one scheduler process publishes: its configuration and its latest snapshot."""

    rank: str
    pid: int
    config: dict[str, Any]
    memory: dict[str, int]
    snapshot: Snapshot
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "RankReport":
        data = dict(data)
        data["snapshot"] = Snapshot(**data["snapshot"])
        return cls(**data)


def hit_rate(hits: int, misses: int) -> Optional[float]:
    """Selection Cache hits over selections (hits + misses); None before any selection."""
    selections = hits + misses
    return hits / selections if selections else None


def attended_fraction(attended: int, context: int) -> Optional[float]:
    """Tokens attended over context tokens, summed over decode steps and requests (1.0 = dense)."""
    return attended / context if context else None


def step_token_counts(seq_lens: Iterable[int], budget: int) -> tuple[int, int, int]:
    """(requests, attended, context) of one decode batch from its host-side lengths.

    Rows of length <= 1 are CUDA-graph padding (SGLang fills padded rows with 1), as in the
    kernels' dense counter. Each layer attends ``min(L, budget)`` tokens of a request's ``L``.
    """
    requests = attended = context = 0
    for length in seq_lens:
        if length > 1:
            requests += 1
            attended += min(length, budget)
            context += length
    return requests, attended, context


def write_report(directory: str, report: RankReport) -> str:
    """Write ``report`` to ``directory/<rank>.json`` atomically; returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, report.rank + FILE_SUFFIX)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + report.rank, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(report.to_json())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_reports(directory: Optional[str]) -> list[RankReport]:
    """Every rank's latest report in ``directory`` (none if it does not exist yet)."""
    if not directory or not os.path.isdir(directory):
        return []
    reports = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") or not name.endswith(FILE_SUFFIX):
            continue
        try:
            with open(os.path.join(directory, name)) as handle:
                reports.append(RankReport.from_dict(json.load(handle)))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            logger.warning("TokenSelect stats: skipping unreadable %s: %s", name, exc)
    return reports


def summarize(reports: list[RankReport]) -> dict[str, Any]:
    """The ``/tokenselect/stats`` body for the ranks' reports.

    Layer-steps are summed over ranks (each TP rank selects over its own heads; PP ranks own
    disjoint layers, placed at their global layer index). Token counts and decode steps are the
    same on every TP/PP rank of one batch: the largest is taken per data-parallel group
    (rank names ``dp<d>-...``) and the groups are summed.
    """
    if not reports:
        return {"serving_decode": False, "ranks": 0,
                "reason": "no scheduler process has started the tokenselect backend (yet)"}
    width = max(r.snapshot.start_layer + len(r.snapshot.layer_counts) for r in reports)
    per_layer = [[0] * len(OUTCOMES) for _ in range(width)]
    for r in reports:
        for i, row in enumerate(r.snapshot.layer_counts):
            dst = per_layer[r.snapshot.start_layer + i]
            for j, value in enumerate(row):
                dst[j] += int(value)
    totals = {name: sum(row[i] for row in per_layer) for i, name in enumerate(OUTCOMES)}
    snaps = [r.snapshot for r in reports]
    groups: dict[str, list[Snapshot]] = {}
    for r in reports:
        groups.setdefault(r.rank.split("-")[0] if r.rank.startswith("dp") else "dp0", []).append(r.snapshot)

    def batch_total(field_name: str) -> int:
        return sum(max(getattr(s, field_name) for s in group) for group in groups.values())

    attended, context = batch_total("attended_tokens"), batch_total("context_tokens")
    first = reports[0]
    return {
        "serving_decode": True,
        "sparse_decode_seen": totals["hits"] + totals["misses"] > 0,
        "ranks": len(reports),
        "device": first.device,
        "config": first.config,
        "decode_steps": batch_total("decode_steps"),
        "request_steps": batch_total("request_steps"),
        "layer_steps": totals,
        "hit_rate": hit_rate(totals["hits"], totals["misses"]),
        "hit_rate_per_layer": [hit_rate(row[0], row[1]) for row in per_layer],
        "layer_steps_per_layer": [dict(zip(OUTCOMES, row)) for row in per_layer],
        "attended_tokens": attended,
        "context_tokens": context,
        "attended_fraction": attended_fraction(attended, context),
        "memory_bytes": {key: sum(r.memory.get(key, 0) for r in reports) for key in first.memory},
        "updated": max(s.time for s in snaps),
        "counts_match_requests": all(s.counts_match_requests() for s in snaps),
        "per_rank": [{"rank": r.rank, "pid": r.pid, "time": r.snapshot.time,
                      "decode_steps": r.snapshot.decode_steps,
                      "counts_match_requests": r.snapshot.counts_match_requests(), **r.extra}
                     for r in reports],
    }
