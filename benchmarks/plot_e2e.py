#!/usr/bin/env python3
"""Plot decode ms/token against context length from ``e2e_bench.py`` results.

One line per backend label (``flashinfer``, ``tokenselect@t1``, ...), log-scale x
(context tokens), bs=1 median inter-token latency on y.  ``e2e_bench.py`` calls
``plot_decode`` after every run (``e2e_decode.png`` next to ``e2e.json``); from
the command line several e2e.json files can be merged (a label in a later file
replaces the same label of an earlier one), and the ratio-to-flashinfer table of
the merge is printed:

    python benchmarks/plot_e2e.py E2E_JSON [E2E_JSON ...] OUT_PNG

matplotlib (Agg backend) is optional: without it nothing is drawn and the
result says so.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_report as rep  # noqa: E402  (sibling file)


def _context_tick(n: int) -> str:
    """4096 -> ``4K``, 262144 -> ``256K``, 1000 -> ``1000``."""
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def plot_order(results: Dict[str, Any]) -> List[str]:
    """Labels in comparison order (``config.compare_order``), then any others."""
    cfg = results.get("config", {})
    backends = results.get("backends", {})
    order = [b for b in (cfg.get("compare_order") or cfg.get("backends") or []) if b in backends]
    return order + [b for b in backends if b not in order]


def plot_decode(results: Dict[str, Any], out_png: str, title: Optional[str] = None) -> Dict[str, Any]:
    """Write the decode ms/token vs context PNG; returns ``{"path", "labels", "contexts"}``
    or ``{"skipped": reason}`` (matplotlib missing, no long-context results)."""
    series = rep.decode_series(results.get("backends", {}), plot_order(results))
    if not series:
        return {"skipped": "no long_context results"}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return {"skipped": f"matplotlib not importable ({type(e).__name__})"}
    contexts = sorted({L for pts in series.values() for L, _ in pts})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    try:
        for label, pts in series.items():
            ax.plot([L for L, _ in pts], [ms for _, ms in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(contexts)
        ax.set_xticklabels([_context_tick(L) for L in contexts])
        ax.minorticks_off()
        ax.set_xlabel("context (prompt tokens)")
        ax.set_ylabel("decode ms/token (bs=1, median)")
        dev = (results.get("device") or {}).get("name") or "unknown device"
        ax.set_title(title or f"Decode latency vs context, {dev}")
        ax.grid(True, which="major", alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        d = os.path.dirname(os.path.abspath(out_png))
        os.makedirs(d, exist_ok=True)
        fig.savefig(out_png, dpi=120)
    finally:
        plt.close(fig)
    return {"path": os.path.abspath(out_png), "labels": list(series), "contexts": contexts}


def merge_results(paths: Sequence[str]) -> Dict[str, Any]:
    """Several e2e.json files as one results dict (later files win per label), summarized."""
    merged: Dict[str, Any] = {}
    order: List[str] = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            r = json.load(f)
        if not merged:
            merged = {k: v for k, v in r.items() if k not in ("backends", "comparison", "summary")}
            merged["backends"] = {}
            merged["config"] = dict(r.get("config", {}))
        for b in plot_order(r):
            merged["backends"][b] = r["backends"][b]
            if b in order:
                order.remove(b)
            order.append(b)
    merged["config"]["compare_order"] = order
    merged["config"]["contexts"] = sorted({L for b in order
                                           for L in rep._long_entries(merged["backends"], b)})
    merged["merged_from"] = [os.path.abspath(p) for p in paths]
    return rep.summarize(merged)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = any(a in ("-h", "--help") for a in argv)
    if len(argv) < 2 or wants_help:
        print(__doc__.strip().splitlines()[0] + "\nusage: plot_e2e.py E2E_JSON [E2E_JSON ...] OUT_PNG")
        return 0 if wants_help else 2
    *paths, out_png = argv
    results = merge_results(paths)
    res = plot_decode(results, out_png)
    lines = rep.format_ratio_lines(results["comparison"].get("ratio_to_flashinfer"))
    lines += rep.format_throughput_lines(results["comparison"].get("throughput") or [])
    print("\n".join(lines) if lines else "no flashinfer reference / throughput results to compare")
    print(f"plot: {res.get('path') or 'skipped (' + str(res.get('skipped')) + ')'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
