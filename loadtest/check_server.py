"""After a load test: is the server healthy, drained, and are the TokenSelect counters consistent?

    python loadtest/check_server.py --url http://127.0.0.1:30000 --tokenselect --out results/after.json

Checks ``/health`` is 200; from ``/metrics`` (``--enable-metrics``) that ``sglang:num_running_reqs``,
``sglang:num_queue_reqs`` and ``sglang:token_usage`` are 0 (waits up to ``--wait`` seconds for the
drain); with ``--tokenselect``, that ``/tokenselect/stats`` says tokenselect serves decode and that
its counters match the requests served (read after its reader settled). Writes what it read to
``--out``; prints one line per failed check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.error
import urllib.request

logger = logging.getLogger("loadtest.check_server")

DRAINED = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage")


def get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def gauges(metrics_text: str) -> dict[str, float]:
    """Sum over labels of each sample name in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums


def check(url: str, tokenselect: bool, wait: float, poll: float = 2.0) -> tuple[list[str], dict]:
    failures: list[str] = []
    seen: dict = {}
    status, _ = get(url + "/health")
    seen["health"] = status
    if status != 200:
        failures.append(f"/health returned {status}")
    deadline = time.monotonic() + wait
    while True:
        status, text = get(url + "/metrics")
        if status != 200:
            failures.append(f"/metrics returned {status} (start the server with --enable-metrics)")
            break
        values = gauges(text)
        seen["metrics"] = {name: values.get(name) for name in DRAINED}
        seen["tokenselect_metrics"] = {k: v for k, v in values.items() if k.startswith("sglang:tokenselect_")}
        busy = [name for name in DRAINED if values.get(name) not in (0.0, None)]
        missing = [name for name in DRAINED if name not in values]
        if not busy or time.monotonic() >= deadline:
            failures += [f"{name} is {values[name]} after the drain, expected 0" for name in busy]
            failures += [f"{name} missing from /metrics" for name in missing]
            break
        time.sleep(poll)
    if tokenselect:
        time.sleep(min(wait, 3.0))  # the counters' reader settles about a second after the last step
        status, text = get(url + "/tokenselect/stats")
        body = json.loads(text) if status == 200 else {}
        seen["tokenselect_stats"] = body
        if status != 200:
            failures.append(f"/tokenselect/stats returned {status}")
        elif not body.get("serving_decode"):
            failures.append(f"tokenselect is not serving decode: {body.get('reason')}")
        elif not body.get("counts_match_requests"):
            failures.append("tokenselect counters do not match the requests served "
                            f"(layer_steps {body.get('layer_steps')}, request_steps {body.get('request_steps')})")
    return failures, seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--tokenselect", action="store_true", help="also check /tokenselect/stats")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the drain")
    parser.add_argument("--out", help="write what was read (JSON) here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    failures, seen = check(args.url.rstrip("/"), args.tokenselect, args.wait)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(seen, handle, indent=1, sort_keys=True)
    stats = seen.get("tokenselect_stats") or {}
    logger.info("health %s, drained %s, hit rate %s, attended fraction %s", seen.get("health"),
                seen.get("metrics"), stats.get("hit_rate"), stats.get("attended_fraction"))
    for failure in failures:
        logger.error("check_server: %s", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
