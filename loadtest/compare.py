"""Side-by-side table and plot of Locust runs (e.g. tokenselect vs flashinfer).

    python loadtest/compare.py --run tokenselect=results/ts --run flashinfer=results/fi \\
        --out results/compare

reads each run's ``<prefix>_stats.csv`` (Locust's ``--csv <prefix>``), writes
``<out>.md`` (a Markdown table: requests, failures and p50/p90/p99 of TTFT, TPOT, ITL, E2E per
scenario, with the ratio of the first run to the second) and ``<out>.png`` (matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("loadtest.compare")

METRICS = ("TTFT", "TPOT", "ITL", "E2E")
PERCENTILES = ("50%", "90%", "99%")


@dataclass(frozen=True)
class Row:
    kind: str
    name: str
    count: int
    failures: int
    average: float
    percentiles: dict[str, float]


def load_stats(prefix: str) -> dict[tuple[str, str], Row]:
    """Rows of ``<prefix>_stats.csv`` keyed by (type, name), the custom metrics only."""
    path = Path(prefix + "_stats.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Locust stats (run locust with --csv {prefix})")
    rows = {}
    with path.open(newline="") as handle:
        for rec in csv.DictReader(handle):
            if rec["Type"] not in METRICS + ("DISCONNECT",):
                continue
            pct = {}
            for p in PERCENTILES:
                value = rec.get(p, "N/A")
                pct[p] = float(value) if value not in ("N/A", "") else float("nan")
            rows[(rec["Type"], rec["Name"])] = Row(rec["Type"], rec["Name"], int(rec["Request Count"]),
                                                   int(rec["Failure Count"]),
                                                   float(rec["Average Response Time"] or "nan"), pct)
    return rows


def table(runs: list[tuple[str, dict]]) -> str:
    """Markdown: one line per (metric, scenario), p50/p90/p99 (ms) of each run, then ratios."""
    names = [n for n, _ in runs]
    keys = sorted({k for _, rows in runs for k in rows},
                  key=lambda k: ((METRICS + ("DISCONNECT",)).index(k[0]), k[1]))
    head = ["metric", "scenario"]
    for n in names:
        head += [f"{n} n", f"{n} fail"] + [f"{n} p{p[:-1]} ms" for p in PERCENTILES]
    if len(runs) == 2:
        head += [f"p{p[:-1]} {names[0]}/{names[1]}" for p in PERCENTILES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in keys:
        cells = [key[0], key[1]]
        found = [rows.get(key) for _, rows in runs]
        for row in found:
            if row is None:
                cells += ["-"] * (2 + len(PERCENTILES))
            else:
                cells += [str(row.count), str(row.failures)] + [f"{row.percentiles[p]:.1f}" for p in PERCENTILES]
        if len(runs) == 2:
            a, b = found
            for p in PERCENTILES:
                ok = a is not None and b is not None and b.percentiles[p] > 0
                cells.append(f"{a.percentiles[p] / b.percentiles[p]:.2f}" if ok else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[tuple[str, dict]], path: str) -> None:
    """One panel per metric: grouped bars (p50, p90, p99) per run, all scenarios of a metric pooled
    by the request-count-weighted mean of their percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.6))
    width = 0.8 / max(1, len(runs))
    for ax, metric in zip(axes, METRICS):
        for i, (name, rows) in enumerate(runs):
            chosen = [r for (kind, _), r in rows.items() if kind == metric and r.count]
            total = sum(r.count for r in chosen)
            values = [sum(r.percentiles[p] * r.count for r in chosen) / total if total else 0.0
                      for p in PERCENTILES]
            ax.bar([j + i * width for j in range(len(PERCENTILES))], values, width, label=name)
        ax.set_xticks([j + width * (len(runs) - 1) / 2 for j in range(len(PERCENTILES))])
        ax.set_xticklabels([f"p{p[:-1]}" for p in PERCENTILES])
        ax.set_title(metric)
        ax.set_ylabel("ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_run(text: str) -> tuple[str, str]:
    name, sep, prefix = text.partition("=")
    if not sep or not name or not prefix:
        raise argparse.ArgumentTypeError(f"--run must be NAME=CSV_PREFIX, got {text!r}")
    return name, prefix


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True,
                        help="NAME=CSV_PREFIX of a Locust run (give two: tokenselect and flashinfer).")
    parser.add_argument("--out", required=True, help="Output prefix: writes <out>.md and <out>.png.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        runs = [(name, load_stats(prefix)) for name, prefix in args.run]
    except (OSError, KeyError, ValueError) as exc:
        logger.error("compare: %s", exc)
        return 1
    text = table(runs)
    Path(args.out + ".md").write_text(text)
    plot(runs, args.out + ".png")
    logger.info("%s", text)
    logger.info("wrote %s.md and %s.png", args.out, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
