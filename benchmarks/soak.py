#!/usr/bin/env python3
"""GPU soak: one SGLang server (tokenselect or flashinfer) under the Locust load test.

    python3 benchmarks/soak.py --backend tokenselect --time 5m --users 32 --out-dir $OUT
    python3 benchmarks/soak.py --backend flashinfer --out-dir $OUT
    python3 benchmarks/soak.py --backend tokenselect --name tokenselect_retract \\
        --extra-server-args="--max-total-tokens 200000" --out-dir $OUT

Steps, all within ``--time-budget`` seconds (the run fits one 10-minute device command):

1. writes the Llama-3-8B-shaped dummy model (``dummy_model.py``) unless it exists;
2. starts the server (``--load-format dummy --enable-metrics``, ``--context-length`` that
   holds the longest prompt) from a work folder, waits for ``/health`` and a tiny ``/generate``
   (``e2e_server.wait_ready``), bounded by ``--start-timeout``;
3. runs ``locust -f loadtest/locustfile.py --headless`` for ``--time`` (shortened, and
   recorded, if the start left too little of the budget), sampling ``/metrics`` and (tokenselect)
   ``/tokenselect/stats`` every ``--sample-interval`` seconds; the sample past the middle of the
   run is also kept raw (``metrics_mid.prom``, ``tokenselect_stats_mid.json``);
4. after Locust stopped, ``loadtest/check_server.py`` (drained, healthy, counters consistent);
5. stops the server by its process id (also on SIGTERM and errors) and writes exactly two files
   to ``--out-dir``: ``soak_<name>.tar.gz`` (folder ``soak_<name>/``: Locust's CSVs and HTML,
   its log, the server log, ``check.json``, ``samples.json``, the mid-run samples and
   ``summary.json``) and ``soak_<name>.json`` (the summary).

Prompt lengths with the dummy tokenizer: ``loadtest/prompts.py`` counts words, ~1 token each with
Llama-3's tokenizer; the dummy tokenizer (byte-level BPE of 2- and 3-byte merges) makes ~2.5
tokens of a word. So the 64K-word top of the long mix is ~165K tokens (hence the default
``--context-length`` 172032, with SGLang's longer-context override), and the cross-budget
scenario gets ``--budget 1075 --past-budget 1250`` (words): prompts of 537-1010 words are
1.4K-2.6K tokens, below tokenselect's 2,688-token budget, and decode at least ~500 tokens past it.

Compare two unpacked runs here (see benchmarks/README.md):
``python loadtest/compare.py --run tokenselect=<dir>/soak_tokenselect/locust --run flashinfer=<dir>/soak_flashinfer/locust --out <prefix>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADTEST = os.path.join(ROOT, "loadtest")
sys.path[:0] = [HERE, LOADTEST]

from e2e_client import HttpClient  # noqa: E402
from e2e_report import _atomic_write_json, device_info, package_versions  # noqa: E402
from e2e_server import (ServerProcess, analyze_log, build_server_cmd, cap_file_size,  # noqa: E402
                        fetch_server_info, pick_port, server_env, wait_ready)
from e2e_util import Budget, _on_sigterm, _round, _Terminated, now_iso  # noqa: E402

DEFAULT_MODEL_DIR = "/tmp/sglang_tokenselect_dummy_llama3_8b"  # the folder e2e_bench.py uses
DEFAULT_CONTEXT_LENGTH = 172032  # 168K: 64K words of the dummy tokenizer (~165K tokens) + output
DEFAULT_SCENARIO = "long:3,shared-prefix:1,cross-budget:1"
DEFAULT_LOCUST_ARGS = "--budget 1075 --past-budget 1250"  # cross-budget in dummy-tokenizer words
# /metrics samples kept in the summary (sums over labels); all sglang:tokenselect_* are kept too.
SAMPLED = ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
           "sglang:gen_throughput", "sglang:cache_hit_rate", "sglang:num_requests_total",
           "sglang:num_aborted_requests_total", "sglang:num_retracted_reqs",
           "sglang:num_retracted_requests_total", "sglang:prompt_tokens_total",
           "sglang:generation_tokens_total", "sglang:cached_tokens_total")
TS_STATS_KEYS = ("serving_decode", "sparse_decode_seen", "ranks", "hit_rate", "attended_fraction",
                 "attended_tokens", "context_tokens", "decode_steps", "request_steps", "layer_steps",
                 "counts_match_requests", "reason")
RESERVE_S = 30.0  # after Locust and the drain check: server stop (~10-15 s), packing, summary
LOCUST_SLACK_S = 30.0  # Locust's own start and report writing, on top of -t and --stop-timeout
MIN_RUN_S = 10.0


def log(msg: str) -> None:
    try:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)
    except OSError:  # stdout's reader (tee) is gone, e.g. after a SIGTERM to the command: carry on
        pass


def parse_duration(text: str) -> float:
    """``300``, ``300s``, ``5m``, ``1m30s``, ``1h`` -> seconds (Locust's ``-t`` forms)."""
    t = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", t)
    if not t or not parts:
        raise argparse.ArgumentTypeError(f"duration {text!r}: use e.g. 300, 300s, 5m, 1m30s")
    h, m, s = (int(x or 0) for x in parts.groups())
    return float(h * 3600 + m * 60 + s)


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backend", default="tokenselect",
                    help="tokenselect or flashinfer (labels as in e2e_bench.py: tokenselect@t0.9, ...@nocg)")
    ap.add_argument("--name", default=None, help="run name (files soak_<name>.*); default: the backend label")
    ap.add_argument("--out-dir", required=True, help="gets soak_<name>.tar.gz and soak_<name>.json only")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default /tmp/soak/<name>, emptied first)")
    ap.add_argument("--time", type=parse_duration, default=parse_duration("5m"), help="Locust run time")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--spawn-rate", type=float, default=4.0)
    ap.add_argument("--scenario", default=DEFAULT_SCENARIO)
    ap.add_argument("--disconnect-fraction", type=float, default=0.25)
    ap.add_argument("--locust-args", default=DEFAULT_LOCUST_ARGS,
                    help="more arguments of loadtest/locustfile.py (one string; use --locust-args=...)")
    ap.add_argument("--stop-timeout", type=float, default=20.0,
                    help="Locust --stop-timeout: seconds running requests get to finish after --time")
    ap.add_argument("--drain-wait", type=float, default=60.0, help="check_server.py --wait")
    ap.add_argument("--sample-interval", type=float, default=60.0, help="seconds between mid-run samples")
    ap.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT_LENGTH,
                    help="server --context-length (0: the model's); set with SGLang's longer-context override")
    ap.add_argument("--extra-server-args", default="", help="appended to the server command (use --extra-server-args=...)")
    ap.add_argument("--tokenselect-args", default="", help="appended for tokenselect only")
    ap.add_argument("--model-dir", default=DEFAULT_MODEL_DIR)
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds for everything")
    ap.add_argument("--start-timeout", type=float, default=300.0,
                    help="seconds the server may take to become ready (first tokenselect start ~145 s)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000, help="first port tried")
    ap.add_argument("--python", default=sys.executable, help="python of the server, Locust and the check")
    ap.add_argument("--pid-file", default=None, help="holds the server's process id while it runs")
    ap.add_argument("--stop-grace", type=float, default=8.0, help="seconds between SIGTERM and SIGKILL")
    # Test hook: a command template replacing the launcher ({python} {backend} {model} {host} {port}).
    ap.add_argument("--server-cmd", default=None, help=argparse.SUPPRESS)
    return ap


# --------------------------------------------------------------------------
# mid-run samples of /metrics and /tokenselect/stats
# --------------------------------------------------------------------------


def metric_sums(text: str) -> Dict[str, float]:
    """The ``SAMPLED`` and ``sglang:tokenselect_*`` sums of a /metrics text ({} if unparsable)."""
    try:
        from check_server import gauges

        values = gauges(text)
    except Exception as e:  # noqa: BLE001 (no prometheus_client, odd text: keep the raw text only)
        return {"parse_error": f"{type(e).__name__}: {e}"[:200]}
    keep = {k: v for k, v in values.items() if k in SAMPLED}
    keep.update({k: v for k, v in values.items()
                 if k.startswith("sglang:tokenselect_") and not k.endswith(("_bucket", "_created"))})
    return keep


class Sampler(threading.Thread):
    """Samples the server every ``interval`` s until stopped; keeps the first sample at or past
    ``mid_s`` raw in the work folder."""

    def __init__(self, url: str, tokenselect: bool, interval: float, mid_s: float, work: str):
        super().__init__(daemon=True)
        self.client = HttpClient(url)
        self.tokenselect, self.interval, self.mid_s, self.work = tokenselect, interval, mid_s, work
        self.samples: List[Dict[str, Any]] = []
        self.mid_saved = False
        self.stopped = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        rec: Dict[str, Any] = {"t_s": _round(t, 1)}
        raw_metrics = raw_stats = None
        try:
            status, raw_metrics = self.client.get("/metrics", timeout=10.0)
            rec["metrics"] = metric_sums(raw_metrics) if status == 200 else {"http_status": status}
        except Exception as e:  # noqa: BLE001
            rec["metrics"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        if self.tokenselect:
            try:
                status, raw_stats = self.client.get("/tokenselect/stats", timeout=10.0)
                body = json.loads(raw_stats) if status == 200 else {"http_status": status}
                rec["tokenselect_stats"] = {k: body.get(k) for k in TS_STATS_KEYS if k in body}
            except Exception as e:  # noqa: BLE001
                rec["tokenselect_stats"] = {"error": f"{type(e).__name__}: {e}"[:200]}
        self.samples.append(rec)
        if not self.mid_saved and t >= self.mid_s:
            self.mid_saved = True
            rec["mid"] = True
            if raw_metrics is not None:
                with open(os.path.join(self.work, "metrics_mid.prom"), "w") as f:
                    f.write(raw_metrics)
            if raw_stats is not None:
                with open(os.path.join(self.work, "tokenselect_stats_mid.json"), "w") as f:
                    f.write(raw_stats)

    def run(self) -> None:
        times = sorted({self.mid_s} | {k * self.interval for k in range(1, int(2 * self.mid_s / self.interval) + 1)})
        for t in times:
            if self.stopped.wait(max(0.0, self.t0 + t - time.monotonic())):
                return
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=25)
        self.client.close()


# --------------------------------------------------------------------------
# Locust stats and the tarball
# --------------------------------------------------------------------------


def _num(rec: Dict[str, str], key: str) -> Optional[float]:
    try:
        value = float(rec.get(key) or "nan")
    except ValueError:  # "N/A"
        return None
    return None if value != value else _round(value, 1)


def locust_summary(prefix: str) -> Dict[str, Any]:
    """Per (type, scenario) counts and percentiles of ``<prefix>_stats.csv``; the aggregated row."""
    path = prefix + "_stats.csv"
    if not os.path.isfile(path):
        return {"error": f"no {os.path.basename(path)}"}
    rows: Dict[str, Any] = {}
    aggregated: Dict[str, Any] = {}
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            entry = {"n": int(rec["Request Count"]), "fail": int(rec["Failure Count"]),
                     "avg_ms": _num(rec, "Average Response Time"),
                     "p50_ms": _num(rec, "50%"), "p90_ms": _num(rec, "90%"), "p99_ms": _num(rec, "99%")}
            if rec["Name"] == "Aggregated":
                aggregated = entry
            else:
                rows[f"{rec['Type']} {rec['Name']}"] = entry
    return {"rows": rows, "aggregated": aggregated}


def pack(work: str, out_dir: str, name: str) -> str:
    """``<out_dir>/soak_<name>.tar.gz`` of the work folder's files under ``soak_<name>/``."""
    path = os.path.join(out_dir, f"soak_{name}.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        for fn in sorted(os.listdir(work)):
            full = os.path.join(work, fn)
            if os.path.isfile(full):
                tar.add(full, arcname=f"soak_{name}/{fn}")
    return path


# --------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------


def run_locust(args, url: str, work: str, run_s: float, budget: Budget, result: Dict[str, Any]) -> None:
    prefix = os.path.join(work, "locust")
    cmd = [args.python, "-m", "locust", "-f", os.path.join(LOADTEST, "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{int(run_s)}s",
           "--stop-timeout", str(int(args.stop_timeout)), "--host", url,
           "--scenario", args.scenario, "--disconnect-fraction", str(args.disconnect_fraction),
           "--csv", prefix, "--csv-full-history", "--html", prefix + ".html", "--only-summary"]
    cmd += shlex.split(args.locust_args or "")
    rec: Dict[str, Any] = {"cmd": shlex.join(cmd), "run_s": run_s}
    result["locust"] = rec
    sampler = Sampler(url, args.backend.startswith("tokenselect"), args.sample_interval, run_s / 2, work)
    t0 = time.monotonic()
    log(f"locust for {run_s:.0f} s: {shlex.join(cmd)}")
    with open(os.path.join(work, "locust.log"), "wb") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work)
        sampler.start()
        try:
            proc.wait(timeout=budget.timeout(run_s + args.stop_timeout + LOCUST_SLACK_S))
        except subprocess.TimeoutExpired:
            rec["error"] = "locust ran past its time limit: stopped"
        finally:  # also on SIGTERM: what Locust and the sampler have so far is kept
            if proc.poll() is None:
                proc.terminate()  # Locust writes its CSVs and HTML report on SIGTERM
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
            sampler.stop()
            rec["rc"] = proc.returncode
            rec["elapsed_s"] = _round(time.monotonic() - t0, 1)
            rec.update(locust_summary(prefix))
            result["samples"] = sampler.samples
            with open(os.path.join(work, "samples.json"), "w") as f:
                json.dump(sampler.samples, f, indent=1)
    log(f"locust rc={proc.returncode} in {rec['elapsed_s']} s; aggregated {rec.get('aggregated')}")


def run_check(args, url: str, work: str, budget: Budget, result: Dict[str, Any]) -> None:
    cmd = [args.python, os.path.join(LOADTEST, "check_server.py"), "--url", url,
           "--wait", str(args.drain_wait), "--out", os.path.join(work, "check.json")]
    if args.backend.startswith("tokenselect"):
        cmd.append("--tokenselect")
    rec: Dict[str, Any] = {"cmd": shlex.join(cmd)}
    result["check"] = rec
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=work,
                           timeout=budget.timeout(args.drain_wait + 30))
        rec["rc"] = p.returncode
        output = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rec["rc"] = None
        output = f"check_server.py timed out after {e.timeout} s"
    with open(os.path.join(work, "check.log"), "w") as f:
        f.write(output)
    rec["failures"] = [line.split("check_server: ", 1)[1] for line in output.splitlines() if "check_server: " in line]
    try:
        with open(os.path.join(work, "check.json")) as f:
            seen = json.load(f)
        rec["metrics"] = seen.get("metrics")
        rec["tokenselect_stats"] = {k: (seen.get("tokenselect_stats") or {}).get(k) for k in TS_STATS_KEYS}
    except (OSError, ValueError):
        pass
    log(f"check_server rc={rec['rc']}: {rec['failures'] or 'all checks passed'}")


def summarize(result: Dict[str, Any]) -> None:
    problems = []
    server = result.get("server", {})
    if not server.get("ready"):
        problems.append(f"server not ready: {server.get('error')}")
    loc = result.get("locust")
    if loc is None:
        problems.append("locust did not run")
    elif loc.get("error"):
        problems.append(loc["error"])
    elif loc.get("rc") != 0:
        problems.append(f"locust exited {loc.get('rc')} (1: some requests failed; see locust_failures.csv)")
    elif not (loc.get("aggregated") or {}).get("n"):
        problems.append("locust made no requests")
    chk = result.get("check")
    if chk is None:
        problems.append("check_server.py did not run")
    elif chk.get("rc") != 0:
        problems.append(f"check_server.py: {chk.get('failures') or chk.get('rc')}")
    if (result.get("server_log") or {}).get("traceback_count"):
        problems.append(f"{result['server_log']['traceback_count']} Traceback(s) in the server log")
    if result.get("error"):
        problems.append(result["error"])
    result["ok"] = not problems
    result["problems"] = problems


def main(argv: Optional[List[str]] = None) -> int:
    args = build_arg_parser().parse_args(argv)
    budget = Budget(args.time_budget)
    name = args.name or re.sub(r"[^A-Za-z0-9_.-]", "_", args.backend)
    out_dir = os.path.abspath(args.out_dir)
    work = os.path.abspath(args.work_dir or os.path.join("/tmp/soak", name))
    os.makedirs(out_dir, exist_ok=True)
    if os.path.isdir(work):
        for fn in os.listdir(work):
            if os.path.isfile(os.path.join(work, fn)):
                os.remove(os.path.join(work, fn))
    os.makedirs(work, exist_ok=True)
    result: Dict[str, Any] = {"benchmark": "sglang-tokenselect soak (Locust)", "name": name,
                              "backend": args.backend, "date": now_iso(),
                              "command": shlex.join([sys.executable, sys.argv[0] if argv is None else __file__]
                                                 + (sys.argv[1:] if argv is None else list(argv)))}
    prev_handler = None
    if threading.current_thread() is threading.main_thread():
        prev_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    server = None
    try:
        result["device"] = device_info()
        result["versions"] = package_versions()
        try:
            from importlib import metadata
            result["versions"]["locust"] = metadata.version("locust")
        except Exception:  # noqa: BLE001
            result["versions"]["locust"] = None
        model_dir = os.path.abspath(args.model_dir)
        import dummy_model

        if not dummy_model.is_model_dir(model_dir):
            dummy_model.write_model_dir(model_dir)
        port = pick_port(args.host, args.port)
        url = f"http://{args.host}:{port}"
        cmd = build_server_cmd(args.backend, model_dir, args.host, port, args.python, "--enable-metrics",
                               args.extra_server_args, args.tokenselect_args, template=args.server_cmd,
                               context_length=args.context_length or None)
        env = server_env(args.context_length or None)
        result["config"] = {"users": args.users, "spawn_rate": args.spawn_rate, "time_s": args.time,
                            "scenario": args.scenario, "disconnect_fraction": args.disconnect_fraction,
                            "locust_args": args.locust_args, "stop_timeout_s": args.stop_timeout,
                            "context_length": args.context_length, "extra_server_args": args.extra_server_args,
                            "server_cmd": shlex.join(cmd), "server_env": env, "time_budget_s": args.time_budget}
        result["server"] = {"port": port}
        server = ServerProcess(cmd, os.path.join(work, "server.log"), env={**os.environ, **env}, cwd=work)
        log(f"starting {args.backend}: {shlex.join(cmd)}")
        server.start()
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{server.proc.pid}\n")
        client = HttpClient(url)
        try:
            ready = wait_ready(client, server, budget.sub(args.start_timeout))
            result["server"].update({k: v for k, v in ready.items() if k != "tiny_generate"})
            if ready.get("ready"):
                info = fetch_server_info(client)
                result["server"]["server_info"] = {k: info.get(k) for k in (
                    "attention_backend", "decode_attention_backend", "context_length", "max_total_num_tokens",
                    "max_running_requests", "chunked_prefill_size", "cuda_graph_max_bs", "version") if k in info}
        finally:
            client.close()
        if not result["server"].get("ready"):
            log(f"server not ready: {result['server'].get('error')}")
        else:
            log(f"server ready in {result['server'].get('ready_s')} s; {budget.remaining():.0f} s left")
            run_s = int(min(args.time, budget.remaining() - args.stop_timeout - LOCUST_SLACK_S
                            - args.drain_wait - RESERVE_S))
            if run_s < min(args.time, MIN_RUN_S):
                result["error"] = f"no time left for Locust ({budget.remaining():.0f} s left after the start)"
            else:
                if run_s < args.time:
                    log(f"Locust time shortened to {run_s} s (asked {args.time:.0f} s) to fit the budget")
                run_locust(args, url, work, float(run_s), budget, result)
                run_check(args, url, work, budget, result)
    except (_Terminated, KeyboardInterrupt) as e:
        result["error"] = f"interrupted: {e}"
    except Exception as e:  # noqa: BLE001
        import traceback

        result["error"] = traceback.format_exc()[-2000:]
    finally:
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the stop finish (<= ~15 s)
        if server is not None:
            alive = server.alive()
            result.setdefault("server", {})["stop"] = {**server.stop(grace_s=args.stop_grace),
                                                       "alive_before_stop": alive}
            log(f"server stopped: {result['server']['stop']}")
        if args.pid_file and os.path.exists(args.pid_file):
            os.remove(args.pid_file)
        if prev_handler is not None:
            signal.signal(signal.SIGTERM, prev_handler)
        log_path = os.path.join(work, "server.log")
        if os.path.exists(log_path):
            result["server_log"] = analyze_log(log_path)
            result["server_log"].pop("selection_cache", None)
            cap_file_size(log_path)
        summarize(result)
        result["elapsed_s"] = _round(budget.elapsed(), 1)
        result["tarball"] = f"soak_{name}.tar.gz"
        _atomic_write_json(os.path.join(work, "summary.json"), result)
        pack(work, out_dir, name)
        _atomic_write_json(os.path.join(out_dir, f"soak_{name}.json"), result)
        log(f"ok={result['ok']} problems={result['problems']}; wrote {out_dir}/soak_{name}.tar.gz and .json")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
