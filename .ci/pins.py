"""Write .ci/requirements-sglang-VERSION.txt: the versions `pip install sglang==VERSION` gives
users today, for the packages CI installs (those of the 0.5.17 file, the template).

    python .ci/pins.py 0.5.23

pip resolves SGLang's full requirements without installing anything (``--dry-run --report``);
packages users do not get from SGLang (the test tools) keep the template's versions.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "requirements-sglang-0.5.17.txt"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(version: str) -> dict[str, str]:
    """Package -> version of pip's resolution of ``sglang==version`` (nothing installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        run = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                              "--quiet", "--report", str(report), f"sglang=={version}"],
                             capture_output=True, text=True)
        if run.returncode:
            sys.exit(run.stdout + run.stderr)
        installs = json.loads(report.read_text())["install"]
    return {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}


def main(version: str) -> None:
    resolved = resolve(version)
    lines = TEMPLATE.read_text().splitlines()
    today = time.strftime("%Y-%m-%d")
    header = [re.sub(r"\d{4}-\d\d-\d\d", today, line.replace("0.5.17", version))
              for line in lines if line.startswith("#")]
    header[0] = header[0].replace(" (the GPU-verified release)", "")
    pins = []
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        name, old = line.split("==")
        pins.append(f"{name}=={resolved.get(canonical(name), old)}")
    out = HERE / f"requirements-sglang-{version}.txt"
    out.write_text("\n".join(header + pins) + "\n")
    print(out)


if __name__ == "__main__":
    main(sys.argv[1])
