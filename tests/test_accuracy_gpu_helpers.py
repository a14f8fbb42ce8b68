"""benchmarks/accuracy_gpu.py's bookkeeping (the GPU run itself is on the device): the
configurations per length and the Selection Cache hit rate read back from a server log."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import accuracy_gpu as acc  # noqa: E402


def test_configs_cover_both_budgets_and_three_thresholds():
    configs = acc.tokenselect_configs(4096, first=True)
    assert set(configs) == {f"ts{p}_t{t}" for p in (5, 15) for t in ("0.8", "0.9", "1.0")} | {"ts_default"}
    flags = configs["ts15_t0.8"]
    assert flags[flags.index("--tokenselect-cache-threshold") + 1] == "0.8"
    topk = int(flags[flags.index("--tokenselect-topk") + 1])
    n_local = int(flags[flags.index("--tokenselect-n-local") + 1])
    assert acc.N_INIT + topk + n_local == round(0.15 * 4096)
    assert "ts_default" not in acc.tokenselect_configs(4096, first=False)


def test_sparse_prefill_configs_pair_each_budget_with_and_without_it():
    """Issue 10: each budget after dense and after sparse prefill, same budget and θ; sub-chunks
    that fit the local window (the plugin refuses --tokenselect-prefill-chunk > n_local)."""
    configs = acc.tokenselect_configs(2048, True, "sparse-prefill")
    assert set(configs) == {"ts5_t0.9", "ts5_t0.9_sp", "ts15_t0.9", "ts15_t0.9_sp"}
    for pct in (5, 15):
        dense_prefill, sparse = configs[f"ts{pct}_t0.9"], configs[f"ts{pct}_t0.9_sp"]
        assert sparse[:len(dense_prefill)] == dense_prefill and "--tokenselect-sparse-prefill" not in dense_prefill
        n_local = int(sparse[sparse.index("--tokenselect-n-local") + 1])
        chunk = int(sparse[sparse.index("--tokenselect-prefill-chunk") + 1])
        assert chunk == min(512, n_local) and "--tokenselect-sparse-prefill" in sparse
    big = acc.tokenselect_configs(65536, False, "sparse-prefill")["ts15_t0.9_sp"]
    assert big[big.index("--tokenselect-prefill-chunk") + 1] == "512"
    for length in (2048, 4096, 8000, 65536):  # the plugin's own parser and validation accept each run
        for flags in acc.tokenselect_configs(length, True, "sparse-prefill").values():
            cfg = _plugin_config(flags)
            assert cfg.cache_threshold == 0.9 and cfg.sparse_prefill == ("--tokenselect-sparse-prefill" in flags)


def _plugin_config(flags):
    import argparse

    from sglang_tokenselect.server_args import add_tokenselect_args, config_from_namespace

    parser = argparse.ArgumentParser()
    add_tokenselect_args(parser)
    return config_from_namespace(parser.parse_args(flags))


def test_hit_rate_from_the_last_cumulative_stats_line(tmp_path):
    log = tmp_path / "server.log"
    log.write_text(
        "[TP0] TokenSelect stats: decode_steps=8 selections=60 hits=15 misses=45 dense=0 overflow=0 hit_rate=0.2500\n"
        "unrelated line\n"
        "[TP0] TokenSelect stats: decode_steps=16 selections=120 hits=42 misses=78 dense=6 overflow=0 hit_rate=0.3500\n")
    stats = acc.selection_cache_stats(SimpleNamespace(log_path=str(log)))
    assert stats["hits"] == 42 and stats["misses"] == 78 and abs(stats["hit_rate"] - 0.35) < 1e-12


def test_no_stats_line_or_no_log_gives_none(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("server started\n")
    assert acc.selection_cache_stats(SimpleNamespace(log_path=str(log))) is None
    assert acc.selection_cache_stats(SimpleNamespace(log_path=str(tmp_path / "missing.log"))) is None


def test_summary_reports_hit_rate_by_length():
    cell = dict(task="passkey", length=4096, depth=0.5, correct=True, answer="123", error=None)
    results = {"runs": {
        "dense": {"cells": [cell]},
        "ts5_t0.9": {"cells": [cell], "selection_cache": {"4096": {"hit_rate": 0.25}, "8000": None}},
    }}
    summary = acc.summarize(results)
    assert summary["ts5_t0.9"]["hit_rate_by_length"] == {"4096": 0.25, "8000": None}
    assert "hit rate" in acc.format_summary(summary, acc.TASKS)


def test_extrapolation_runs_context_length_and_summary(tmp_path):
    """benchmarks/extrapolation_gpu.py: the servers' context holds the longest prompt and its
    answer; the three runs' flags; its summary goes through accuracy_gpu's."""
    import extrapolation_gpu as xg

    assert xg.context_length([8000, 65536]) == 66560 and xg.context_length([8000]) == 8192
    assert "--tokenselect-extrapolate" in xg.RUNS["ts_extrapolate"] and "--tokenselect-extrapolate" not in xg.RUNS["ts"]
    assert "--tokenselect-sparse-prefill" in xg.RUNS["ts_extrapolate"]
    cells = [{"task": "passkey", "length": 16384, "depth": 0.5, "correct": c, "answer": a, "error": None}
             for c, a in ((False, "1"), (True, "2"))]
    results = {"runs": {"dense": {"cells": cells[:1], "selection_cache": {}},
                        "ts_extrapolate": {"cells": cells[1:], "selection_cache": {"all": {"hit_rate": 0.5}}}}}
    summary = acc.summarize(results)
    assert summary["ts_extrapolate"]["same_answer_as_dense"] == 0.0
    assert summary["ts_extrapolate"]["hit_rate_by_length"] == {"all": 0.5}
    table = acc.format_summary(summary, xg.TASKS)
    assert table.splitlines()[0].split()[2:4] == list(xg.TASKS) and " kv" not in table
    acc.plot({"tasks": list(xg.TASKS), **results}, tmp_path / "x.png")  # one heatmap column per task
    assert (tmp_path / "x.png").stat().st_size > 0
    log = tmp_path / "s.log"
    log.write_text("INFO TokenSelect: length extrapolation in effect: pre-RoPE keys ...\n")
    assert xg.extrapolation_logged(SimpleNamespace(log_path=str(log)))
