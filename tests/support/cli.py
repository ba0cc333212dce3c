"""Running the `neuronsweep` command line in a child process, as a user would (exit code, stdout, stderr)."""
from __future__ import annotations

import os
import subprocess
import sys

CLI = [sys.executable, "-m", "orchestrator.cli.app"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    """`neuronsweep ARGS...`; `env` is added to this process's environment."""
    return subprocess.run([*CLI, *args], env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, check=check)
