"""A real sweep running in its own process, serving its driver metrics on loopback: tiny subject model, real
extraction, the method through the OpenAI-compatible test server. Shared (session scope) by the dashboard and
real-Prometheus tests, so they check what a running sweep actually exports."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import yaml
from prometheus_client.parser import text_string_to_metric_families

from workers.stub_backends import RuleResponder
from workers.testserver import TestServer, fixed_latency


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveSweep:
    url: str
    proc: subprocess.Popen
    log: str

    def samples(self) -> dict[tuple[str, frozenset], float]:
        with urllib.request.urlopen(self.url, timeout=10) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    def value(self, name: str, **labels) -> float | None:
        try:
            return self.samples().get((name, frozenset(labels.items())))
        except OSError:
            return None

    def wait(self, predicate, timeout: float = 240, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self._serving():
                raise RuntimeError(f"the sweep exited ({self.proc.returncode}); log:\n{open(self.log).read()[-3000:]}")
            if predicate(self):
                return
            time.sleep(0.2)
        raise TimeoutError(f"live sweep: {what}; log:\n{open(self.log).read()[-3000:]}")

    def _serving(self) -> bool:
        try:
            self.samples()
            return True
        except OSError:
            return False

    def wait_started(self) -> None:
        self.wait(lambda s: (s.value("neuronsweep_neurons_planned") or 0) > 0, what="metrics endpoint up")

    def wait_finished(self) -> None:
        def finished(s):
            planned, committed = s.value("neuronsweep_shards_planned"), s.value("neuronsweep_shards_committed_total")
            return planned and committed == planned
        self.wait(finished, what="all shards committed")


def start_live_sweep(workdir) -> tuple[LiveSweep, TestServer]:
    server = TestServer(responder=RuleResponder(), latency=fixed_latency(0.05)).start()
    port = free_port()
    backend = {"kind": "openai", "model": "rule-stub", "base_url": server.base_url, "api_key_env": "NS_LIVE_KEY",
               "concurrency": 4, "price_input_per_mtok": 0.15, "price_output_per_mtok": 0.6}
    cfg = {"model": {"name": "tiny-gpt2"}, "corpus": {"seq_len": 16, "max_windows": 120}, "layers": "0-1",
           "neurons": "0-7", "shard_size": 2, "max_inflight_shards": 1, "output": str(workdir / "run"),
           "metrics_port": port, "explainer": {**backend, "capabilities": "chat"},
           "simulator": {**backend, "capabilities": "chat_logprobs"}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    log = str(workdir / "sweep.log")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "sweep", "-c", str(workdir / "sweep.yaml"),
                             "--metrics-linger", "900"], env={**os.environ, "NS_LIVE_KEY": "sk-live"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    live = LiveSweep(f"http://127.0.0.1:{port}/metrics", proc, log)
    live.wait_started()
    return live, server


def stop_live_sweep(live: LiveSweep, server: TestServer) -> None:
    live.proc.terminate()
    try:
        live.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        live.proc.kill()
        live.proc.wait()
    server.stop()
