"""The system programs some tests drive for real (a Prometheus server, promtool, a headless Chromium).

`make test` (and so CI) sets NEURONSWEEP_REQUIRE_SYSTEM_TOOLS=1: there a missing program fails the test that
needs it, naming the program and how to install it, so a CI machine without it cannot pass by skipping.
Elsewhere (a plain `pytest`) the test is skipped with the same words.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REQUIRE_VAR = "NEURONSWEEP_REQUIRE_SYSTEM_TOOLS"
# scripts/system-deps.sh installs all of them (Debian's promtool comes in the prometheus package).
INSTALL = {
    "prometheus": "apt-get install prometheus (or: bash scripts/system-deps.sh)",
    "promtool": "apt-get install prometheus, which ships promtool (or: bash scripts/system-deps.sh)",
    "chromium": "apt-get install chromium (or: bash scripts/system-deps.sh)",
}


def prometheus_path() -> str | None:
    return os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")


def promtool_path() -> str | None:
    """promtool beside the prometheus binary in use (same release), else on PATH."""
    prometheus = prometheus_path()
    beside = Path(prometheus).with_name("promtool") if prometheus else None
    return str(beside) if beside and beside.exists() else shutil.which("promtool")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


FINDERS = {"prometheus": prometheus_path, "promtool": promtool_path, "chromium": chromium_path}


def require_tool(name: str) -> str:
    """The path of system program `name`; when it is missing, a failure under REQUIRE_VAR=1, else a skip."""
    path = FINDERS[name]()
    if path:
        return path
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{name} is not installed and {REQUIRE_VAR}=1 (make test, CI) requires it; "
                    f"install it: {INSTALL[name]}", pytrace=False)
    pytest.skip(f"{name} is not installed; install it to run this test: {INSTALL[name]}")
