"""Server side of the end-to-end benchmark (``e2e_bench.py``).

Backend labels and server command lines (``@nocg``, ``@t<float>`` variants), free
ports, ``ServerProcess`` (one server in its own process group, stopped by PID),
``wait_ready`` and ``/server_info``, and the server log: TokenSelect Selection Cache
stats lines, Traceback / Error counts, size cap and tail.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

from e2e_client import HttpClient, _public, generate_once
from e2e_util import PROMPT_ID_LO, Budget, _round

# SGLang 0.5.17 refuses --context-length above the model config's length unless this is
# set (sglang/srt/configs/model_config.py, _derive_context_length); the RoPE cache is then
# extended to the server's context length (reserve_rope_cache_for_long_sequences).
ALLOW_LONGER_CONTEXT_ENV = "SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"

SERVER_INFO_KEYS = (
    "attention_backend",
    "prefill_attention_backend",
    "decode_attention_backend",
    "sampling_backend",
    "mem_fraction_static",
    "chunked_prefill_size",
    "max_running_requests",
    "context_length",
    "max_total_num_tokens",
    "max_req_input_len",
    "page_size",
    "disable_radix_cache",
    "disable_cuda_graph",
    "cuda_graph_max_bs",
    "cuda_graph_bs",
    "dtype",
    "kv_cache_dtype",
    "tp_size",
    "version",
    "load_format",
)


# --------------------------------------------------------------------------
# backend labels, server command lines, ports, the server process
# --------------------------------------------------------------------------


BACKEND_VARIANTS = {"nocg": ["--disable-cuda-graph"]}
TOKENSELECT_VARIANTS = {  # issue 10's sparse prefill; issue 11's extrapolation (which needs it)
    "sp": ["--tokenselect-sparse-prefill"],
    "x": ["--tokenselect-sparse-prefill", "--tokenselect-extrapolate"],
}
THRESHOLD_FLAG = "--tokenselect-cache-threshold"
_THRESHOLD_RE = re.compile(r"^t([-+]?(?:\d+\.?\d*|\.\d+))$")


def variant_args(base: str, variant: str, label: str = "") -> List[str]:
    """Server flags of one ``@variant`` of backend ``base``.

    ``nocg`` -> ``--disable-cuda-graph``; tokenselect only: ``t<float>`` ->
    ``--tokenselect-cache-threshold=<float>`` (the ``=`` form keeps ``-1`` a value), ``sp`` ->
    sparse prefill, ``x`` -> sparse prefill with length extrapolation.
    """
    if variant in BACKEND_VARIANTS:
        return list(BACKEND_VARIANTS[variant])
    m = _THRESHOLD_RE.match(variant)
    if m or variant in TOKENSELECT_VARIANTS:
        if base != "tokenselect":
            raise ValueError(f"variant {variant!r} in {label!r} needs the tokenselect backend")
        return [f"{THRESHOLD_FLAG}={m.group(1)}"] if m else list(TOKENSELECT_VARIANTS[variant])
    raise ValueError(f"unknown backend variant {variant!r} in {label!r}; known: "
                     f"{sorted(BACKEND_VARIANTS)}, and for tokenselect {sorted(TOKENSELECT_VARIANTS)} "
                     f"and t<float> (cache threshold)")


def split_backend(label: str) -> Tuple[str, List[str]]:
    """``tokenselect@t0.9@nocg`` -> (``tokenselect``, [threshold flag, ``--disable-cuda-graph``])."""
    base, *variants = label.split("@")
    if not base:
        raise ValueError(f"backend label {label!r} has no backend name")
    args: List[str] = []
    for v in variants:
        args += variant_args(base, v, label)
    return base, args


def server_env(context_length: Optional[int]) -> Dict[str, str]:
    """Extra environment of every server: a ``--context-length`` may exceed the model config's."""
    return {ALLOW_LONGER_CONTEXT_ENV: "1"} if context_length else {}


def build_server_cmd(label: str, model_dir: str, host: str, port: int, python: str,
                     common_args: str, extra_args: str, tokenselect_args: str,
                     template: Optional[str] = None, context_length: Optional[int] = None) -> List[str]:
    """Command line of one server.  ``template`` (tests) replaces the launcher.

    Order: launcher, model/host/port, ``common_args``, ``--context-length``, the
    tokenselect args (tokenselect only), the label's variant flags (so ``@t0.9``
    wins over a threshold in ``tokenselect_args``), ``extra_args``.
    """
    backend, var_args = split_backend(label)
    if template:
        cmd = shlex.split(template.format(python=python, backend=backend, model=model_dir,
                                          host=host, port=port))
    elif backend == "tokenselect":
        cmd = [python, "-m", "sglang_tokenselect.launch_server"]
    else:
        cmd = [python, "-m", "sglang.launch_server", "--attention-backend", backend]
    if not template:
        cmd += ["--model-path", model_dir, "--load-format", "dummy",
                "--host", host, "--port", str(port)]
    cmd += shlex.split(common_args or "")
    if context_length:
        cmd += ["--context-length", str(int(context_length))]
    if backend == "tokenselect":
        cmd += shlex.split(tokenselect_args or "")
    cmd += var_args
    cmd += shlex.split(extra_args or "")
    return cmd


def with_min_running_requests(server_args: str, n: int) -> str:
    """``server_args`` with ``--max-running-requests`` raised to at least ``n``."""
    parts = shlex.split(server_args or "")
    for i, a in enumerate(parts):
        if a == "--max-running-requests" and i + 1 < len(parts):
            if int(parts[i + 1]) < n:
                parts[i + 1] = str(n)
            return shlex.join(parts)
        if a.startswith("--max-running-requests="):
            if int(a.split("=", 1)[1]) < n:
                parts[i] = f"--max-running-requests={n}"
            return shlex.join(parts)
    return shlex.join(parts + ["--max-running-requests", str(n)])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def pick_port(host: str, port: int, tries: int = 20) -> int:
    for p in range(port, port + tries):
        if port_is_free(host, p):
            return p
    return port


class ServerProcess:
    """One server subprocess in its own process group, logging to a file."""

    def __init__(self, cmd: List[str], log_path: str, env: Optional[Dict[str, str]] = None,
                 cwd: Optional[str] = None):
        self.cmd = cmd
        self.log_path = log_path
        self.env = env
        # ``python -m`` puts the cwd first on sys.path: started from the repo root,
        # the source tree's ``sglang_tokenselect`` (no ``kernels`` subpackage there)
        # would shadow the installed package.  So servers run from ``cwd``.
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self._log_f = None

    def start(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._log_f = open(self.log_path, "ab", buffering=0)
        self._log_f.write(("$ " + shlex.join(self.cmd) + "\n").encode())
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, cwd=self.cwd,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def stop(self, grace_s: float = 8.0) -> Dict[str, Any]:
        """SIGTERM the process group, SIGKILL it after ``grace_s``."""
        info: Dict[str, Any] = {}
        if self.proc is None:
            return info
        pgid = self.proc.pid  # start_new_session => pgid == pid
        t0 = time.monotonic()
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                break
            end = time.monotonic() + wait_s
            while time.monotonic() < end:
                if self.proc.poll() is not None and not _pgid_alive(pgid):
                    break
                time.sleep(0.1)
            if self.proc.poll() is not None and not _pgid_alive(pgid):
                info["signal"] = sig.name
                break
            info["signal"] = sig.name
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        info["returncode"] = self.proc.poll()
        info["stop_s"] = _round(time.monotonic() - t0, 2)
        info["group_alive_after_stop"] = _pgid_alive(pgid)
        if self._log_f is not None:
            try:
                self._log_f.close()
            except Exception:
                pass
            self._log_f = None
        return info


def _pgid_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def wait_ready(client: HttpClient, server: ServerProcess, budget: Budget) -> Dict[str, Any]:
    """Poll ``/health`` until 200, then send a tiny ``/generate``."""
    t0 = time.monotonic()
    res: Dict[str, Any] = {"ready": False}
    last_err = ""
    while budget.remaining() > 0:
        if not server.alive():
            res["error"] = f"server exited with code {server.returncode()} before becoming healthy"
            return res
        try:
            status, _ = client.get("/health", timeout=budget.timeout(5.0))
            if status == 200:
                break
            last_err = f"/health HTTP {status}"
        except Exception as e:
            last_err = f"{type(e).__name__}"
        time.sleep(0.5)
    else:
        res["error"] = f"/health not ready within the time limit ({last_err})"
        return res
    res["health_s"] = _round(time.monotonic() - t0, 2)
    r = generate_once(client, [PROMPT_ID_LO + i for i in range(8)], 4, timeout=budget.timeout(120.0))
    res["tiny_generate"] = _public({k: v for k, v in r.items() if k != "output_logprobs"})
    if not r.get("ok"):
        res["error"] = f"tiny /generate failed: {r.get('error')}"
        return res
    res["ready"] = True
    res["ready_s"] = _round(time.monotonic() - t0, 2)
    return res


def fetch_server_info(client: HttpClient, timeout: float = 10.0) -> Dict[str, Any]:
    for path in ("/server_info", "/get_server_info"):
        try:
            status, body = client.get(path, timeout=timeout)
        except Exception:
            continue
        if status != 200:
            continue
        try:
            info = json.loads(body)
        except ValueError:
            continue
        if not isinstance(info, dict):
            continue
        out = {k: info.get(k) for k in SERVER_INFO_KEYS if k in info}
        for k, v in info.items():
            if ("tokenselect" in k.lower() or "cuda_graph" in k.lower()) and k not in out:
                if isinstance(v, (int, float, str, bool, type(None), list)) and len(str(v)) < 300:
                    out[k] = v
        return out
    return {}


def server_max_input(si: Dict[str, Any]) -> Optional[int]:
    """Longest prompt the server takes: min of max_req_input_len, context_length, max_total_num_tokens."""
    vals = [si[k] for k in ("max_req_input_len", "context_length", "max_total_num_tokens")
            if isinstance(si.get(k), int) and si[k] > 0]
    return min(vals) if vals else None


# --------------------------------------------------------------------------
# server log parsing
# --------------------------------------------------------------------------

_STATS_RE = re.compile(r"TokenSelect stats", re.IGNORECASE)
_KV_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)")


def parse_stats_lines(text: str) -> Optional[Dict[str, Any]]:
    """Selection Cache stats from ``TokenSelect stats: ... hits=H misses=M ...`` lines.

    Uses the last line that has both ``hits=`` and ``misses=`` (counters
    cumulative since server start).  If the counters look per-interval
    (``decode_steps`` -- or ``hits+misses`` without it -- not strictly increasing,
    or ``hits``/``misses`` decreasing) the lines are summed instead.  Returns None when no such line exists.
    """
    lines = []
    for line in text.splitlines():
        if not _STATS_RE.search(line):
            continue
        kv: Dict[str, float] = {}
        for k, v in _KV_RE.findall(line):
            try:
                kv[k] = float(v)
            except ValueError:
                continue
        if "hits" in kv and "misses" in kv:
            lines.append((line.strip(), kv))
    if not lines:
        return None

    def key(kv: Dict[str, float]) -> float:
        return kv.get("decode_steps", kv["hits"] + kv["misses"])

    seq = [key(kv) for _, kv in lines]
    cumulative = all(b > a for a, b in zip(seq, seq[1:])) and all(
        b[1][k] >= a[1][k] for a, b in zip(lines, lines[1:]) for k in ("hits", "misses")
    )
    last_line, last_kv = lines[-1]
    if cumulative:
        agg = dict(last_kv)
    else:
        agg = {}
        for _, kv in lines:
            for k, v in kv.items():
                if k in ("hit_rate",):
                    continue
                agg[k] = agg.get(k, 0.0) + v
    hits, misses = agg["hits"], agg["misses"]
    out: Dict[str, Any] = {
        "n_lines": len(lines),
        "counters": "cumulative" if cumulative else "per_interval_summed",
        "hits": int(hits),
        "misses": int(misses),
        "hit_rate": _round(hits / (hits + misses), 4) if hits + misses > 0 else None,
        "reported_hit_rate": _round(last_kv.get("hit_rate"), 4),
        "last_line": last_line[-400:],
    }
    for k in ("decode_steps", "selections", "dense"):
        if k in agg:
            out[k] = int(agg[k])
    return out


def scan_log_errors(text: str, max_examples: int = 5) -> Dict[str, Any]:
    tb = 0
    err_lines: List[str] = []
    for line in text.splitlines():
        if "Traceback" in line:
            tb += 1
        if "Error" in line or "Traceback" in line:
            err_lines.append(line.strip()[:300])
    return {
        "traceback_count": tb,
        "error_line_count": sum(1 for l in err_lines if "Error" in l),
        "examples": err_lines[:max_examples],
    }


def analyze_log(path: str) -> Dict[str, Any]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        return {"error": f"cannot read log: {e}"}
    res: Dict[str, Any] = {"log_bytes": len(text)}
    res.update(scan_log_errors(text))
    res["selection_cache"] = parse_stats_lines(text)
    return res


def cap_file_size(path: str, max_bytes: int = 8 << 20, head: int = 2 << 20, tail: int = 4 << 20) -> bool:
    """Keep a log under ``max_bytes`` (first ``head`` + last ``tail`` bytes); True if cut."""
    try:
        size = os.path.getsize(path)
        if size <= max_bytes:
            return False
        with open(path, "rb") as f:
            a = f.read(head)
            f.seek(size - tail)
            b = f.read(tail)
        with open(path, "wb") as f:
            f.write(a + f"\n... [{size - head - tail} bytes cut by e2e_bench] ...\n".encode() + b)
        return True
    except OSError:
        return False


def tail_file(path: str, n: int = 30) -> List[str]:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return [l.rstrip("\n")[:400] for l in f.readlines()[-n:]]
    except OSError:
        return []
