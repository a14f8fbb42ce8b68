"""What the installed distribution holds: the runtime package SGLang loads (with its kernels
inside), the evaluation tools beside it, and no top-level ``kernels`` to shadow SGLang's."""

from __future__ import annotations

import importlib.metadata
import importlib.util


def installed_files() -> list:
    """The files pip installed. From the repository root a build's ``*.egg-info`` (the source
    list) is on sys.path too: take the distribution an installer recorded."""
    for dist in importlib.metadata.distributions(name="sglang-tokenselect"):
        if dist.read_text("INSTALLER"):
            return list(dist.files or [])
    raise AssertionError("sglang-tokenselect is not installed (pip install --no-deps .)")


def installed_top_level_names() -> set[str]:
    return {f.parts[0] for f in installed_files() if not f.parts[0].endswith((".dist-info", ".egg-info"))}


def test_installed_packages():
    tops = installed_top_level_names()
    assert {"sglang_tokenselect", "sglang_tokenselect_eval"} <= tops
    assert "kernels" not in tops


def test_runtime_package_holds_only_what_sglang_loads():
    runtime = {f.name for f in installed_files() if f.parts[0] == "sglang_tokenselect" and f.suffix == ".py"}
    for tool in ("tasks.py", "hf_attention.py", "smollm2.py", "demo.py"):
        assert tool not in runtime
    assert importlib.util.find_spec("sglang_tokenselect.kernels.reference") is not None
    assert importlib.util.find_spec("sglang_tokenselect_eval.demo") is not None
