"""The demo's config (examples/demo.yaml) on the embedded SmolLM2 as an ordinary laptop runs it: PyTorch's AVX2
kernels and float32 for the subject model and the local explainer/simulator, stdout a file. A slice of it
(one layer, three neurons, fewer windows) keeps the test to minutes. The machine must fail no neuron (no
request timed out, no neuron ran past its deadline), and the output must say where the results are, what to
run next, what the local model's speed predicts, and how far the sweep got at every progress interval. This is
also the README's main job end to end: the embedded model as subject, explainer and simulator, through the CLI
and in-process Ray, and `status` after it."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore

ROOT = Path(__file__).resolve().parents[2]
FLOAT32 = ["--set", "model.dtype=float32", "--set", "explainer.dtype=float32", "--set", "simulator.dtype=float32"]


@pytest.mark.real_model
@pytest.mark.slow
def test_the_demo_config_finishes_on_a_float32_avx2_cpu(tmp_path, record_property):
    run = tmp_path / "demo"
    args = [sys.executable, "-m", "orchestrator.cli.app", "sweep", "--config", str(ROOT / "examples" / "demo.yaml"),
            "--out", str(run), "--layers", "12", "--neurons", "0-2", "--set", "corpus.max_windows=120",
            "--set", "metrics_port=0", "--set", "progress_interval_s=10", *FLOAT32]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    started = time.monotonic()
    with open(tmp_path / "stdout.log", "w") as stdout:
        proc = subprocess.run(args, stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, timeout=1800,
                              cwd=ROOT)
    wall = time.monotonic() - started
    text = (tmp_path / "stdout.log").read_text()
    assert proc.returncode == 0, (text + proc.stderr)[-3000:]

    store = RunReader(RunStore.open(str(run))).store
    ledger = store.read_table("ledger").to_pylist()
    assert len(ledger) == 3
    # the machine never fails a neuron: no request timed out, no neuron ran past its deadline; what is not done
    # is skipped with its reason, or (at most one) failed for what the small model answered three times over
    assert all(r["status"] == "done" or (r["status"] == "skipped" and r["error"])
               or (r["status"] == "failed" and r["reason"] == "malformed") for r in ledger), ledger
    assert sum(r["status"] == "done" for r in ledger) >= 2, ledger
    record_property("measured", f"demo slice (3 neurons, float32, AVX2 kernels): {wall:.0f} s, "
                                f"{sum(r['status'] == 'done' for r in ledger)}/3 done")
    done = {r["neuron"] for r in ledger if r["status"] == "done"}
    scores = [s for s in store.read_table("scores").to_pylist() if s["scorer"] == "correlation"]
    assert {s["neuron"] for s in scores} == done
    assert all(s["simulator_mode"] == "prompt_logprob" and s["simulator_model"] == "smollm2-135m" for s in scores)
    assert all(e.strip() for e in store.read_table("explanations").column("explanation").to_pylist())
    assert f"results in {run}" in text and f"neuronsweep show {run}" in text  # where, and what next
    assert re.search(r"^local model smollm2-135m: [\d,]+ prompt tokens/s; .* per neuron", text, re.M)  # the estimate
    assert re.search(r"^\[\s*[\dhms]+\] neurons \d+/3: ", text, re.M)  # progress lines, stdout being a file
    status = subprocess.run([sys.executable, "-m", "orchestrator.cli.app", "status", str(run)], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert status.returncode == 0 and re.search(rf"done\s+{len(done)}\b", status.stdout), status.stdout
