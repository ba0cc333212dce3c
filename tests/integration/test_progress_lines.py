"""A sweep whose output is a file (RayJob logs, CI, nohup, `make demo > log`) prints one plain progress line
every `progress_interval_s`, through extraction and the explain stage: a real `neuronsweep sweep` in its own
process, the tiny model as subject, explainer and simulator, stdout and stderr redirected to files."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

LINE = re.compile(r"^\[\s*(?:(\d+)h)?(?:(\d+)m)?(\d+)s\] (starting|extract|neurons)(.*)$")


def seconds(m: re.Match) -> int:
    h, mins, s = (int(g) if g else 0 for g in m.groups()[:3])
    return 3600 * h + 60 * mins + s


@pytest.mark.slow
def test_a_sweep_writing_to_a_file_prints_progress_lines_at_the_interval(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "orchestrator.cli.app", "sweep", "--model", "tiny-llama", "--layers", "0",
            "--neurons", "0-3", "--out", str(run), "--set", "corpus.max_windows=96", "--set", "metrics_port=0",
            "--set", "explainer.model=tiny-llama", "--set", "simulator.model=tiny-llama",
            "--set", "explainer.max_tokens=8", "--set", "shard_size=2", "--set", "progress_interval_s=1",
            "--set", "records.negative=off"]  # the positive sides are enough to watch the lines
    env = {**os.environ, "COLUMNS": "200"}
    started = time.monotonic()
    with open(tmp_path / "stdout.log", "w") as stdout, open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.run(args, stdout=stdout, stderr=stderr, env=env, timeout=600,
                              cwd=Path(__file__).resolve().parents[2])
    wall = time.monotonic() - started
    text = (tmp_path / "stdout.log").read_text()
    assert proc.returncode == 0, (text + (tmp_path / "stderr.log").read_text())[-3000:]
    lines = [m for m in map(LINE.match, text.splitlines()) if m]
    stamps = [seconds(m) for m in lines]
    # one line a second for as long as the sweep ran (the process's start-up and end aside)
    assert len(lines) >= (wall - 15) * 0.6 and len(lines) >= 3
    # (a gap of a few seconds when a loaded 2-core machine leaves the printing thread waiting)
    assert stamps == sorted(stamps) and max(b - a for a, b in zip(stamps, stamps[1:])) <= 5
    assert "\x1b[" not in text  # plain text: no terminal control codes in a log
    neurons = [m.group(5) for m in lines if m.group(4) == "neurons"]
    assert neurons and all(re.match(r" \d+/4: \d+ done, \d+ failed, \d+ skipped \| .* tokens, \$[\d.]+ \| queue \d+ "
                                    r"shards?$", n) for n in neurons)
    assert "neurons: " in text and "of 4" in text  # the summary after the last line
