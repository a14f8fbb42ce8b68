"""benchmarks/soak.py against the fake server (tests/fake_openai.py run as a process, 127.0.0.1,
a free port): a short headless Locust run gives one tarball and one summary; SIGTERM stops the
server and still packs what was measured. Needs locust (``pip install '.[loadtest]'``)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

# Not imported here: locust's gevent patches ssl, which pytest's process has loaded already.
if importlib.util.find_spec("locust") is None:
    pytest.skip("needs locust (pip install '.[loadtest]')", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"
FAKE = ROOT / "tests" / "fake_openai.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "loadtest"))

import compare  # noqa: E402
import soak  # noqa: E402

SMALL_PROMPTS = "--max-prompt-words 1500 --prefix-words 200 --budget 300 --past-budget 8 --max-tokens 12"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def soak_cmd(tmp: Path, run_time: str, name: str = "tokenselect") -> list[str]:
    return [sys.executable, str(SOAK), "--backend", "tokenselect", "--name", name, "--time", run_time,
            "--users", "3", "--spawn-rate", "3", "--sample-interval", "1", "--stop-timeout", "2",
            "--drain-wait", "5", "--time-budget", "120", "--start-timeout", "30",
            "--port", str(free_port()), "--out-dir", str(tmp / "out"), "--work-dir", str(tmp / "work"),
            "--model-dir", str(tmp / "model"), "--pid-file", str(tmp / "server.pid"),
            f"--locust-args={SMALL_PROMPTS}", "--extra-server-args=--max-total-tokens 200000",
            "--server-cmd", f"{{python}} {FAKE} --host {{host}} --port {{port}}"]


def unpack(tmp: Path, name: str) -> tuple[Path, dict]:
    with tarfile.open(tmp / "out" / f"soak_{name}.tar.gz") as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    return tmp / "unpacked" / f"soak_{name}", json.loads((tmp / "out" / f"soak_{name}.json").read_text())


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_parse_duration():
    assert [soak.parse_duration(t) for t in ("300", "300s", "5m", "1m30s", "1h")] == [300, 300, 300, 90, 3600]
    with pytest.raises(Exception, match="duration"):
        soak.parse_duration("5 minutes")


def test_soak_run_packs_one_tarball_and_a_summary(tmp_path):
    proc = subprocess.run(soak_cmd(tmp_path, "4s"), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "out")) == ["soak_tokenselect.json", "soak_tokenselect.tar.gz"]
    run, summary = unpack(tmp_path, "tokenselect")
    for name in ("locust_stats.csv", "locust_stats_history.csv", "locust.html", "locust.log", "server.log",
                 "check.json", "check.log", "samples.json", "metrics_mid.prom", "tokenselect_stats_mid.json",
                 "summary.json"):
        assert (run / name).is_file(), name
    assert summary["ok"], summary["problems"]
    assert "--enable-metrics" in summary["config"]["server_cmd"]
    assert "--max-total-tokens 200000" in summary["config"]["server_cmd"]
    assert summary["locust"]["rc"] == 0 and summary["locust"]["aggregated"]["n"] > 0
    assert summary["locust"]["rows"]["TTFT long"]["n"] > 0
    assert summary["check"]["rc"] == 0 and summary["check"]["tokenselect_stats"]["counts_match_requests"]
    mid = [s for s in summary["samples"] if s.get("mid")]
    assert len(mid) == 1 and mid[0]["metrics"]["sglang:num_running_reqs"] >= 0
    assert summary["server"]["stop"]["group_alive_after_stop"] is False
    assert not (tmp_path / "server.pid").exists()
    # the documented local comparison of two unpacked runs
    out = tmp_path / "cmp"
    assert compare.main(["--run", f"tokenselect={run}/locust", "--run", f"flashinfer={run}/locust",
                         "--out", str(out)]) == 0
    assert "| TTFT | long |" in (tmp_path / "cmp.md").read_text()


def test_sigterm_stops_the_server_and_still_packs(tmp_path):
    proc = subprocess.Popen(soak_cmd(tmp_path, "60s", name="term"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        pid_file = tmp_path / "server.pid"
        history = tmp_path / "work" / "locust_stats_history.csv"
        while not (pid_file.exists() and history.exists()) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert history.exists(), "locust did not start"
        server_pid = int(pid_file.read_text())
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    assert gone(server_pid)
    run, summary = unpack(tmp_path, "term")
    assert any(p.startswith("interrupted") for p in summary["problems"]), summary["problems"]
    assert summary["server"]["stop"]["group_alive_after_stop"] is False
    assert (run / "locust_stats.csv").is_file() and summary["locust"]["aggregated"]["n"] > 0  # Locust's SIGTERM report
