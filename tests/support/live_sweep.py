"""A real sweep running in its own process, serving its driver metrics on loopback: tiny subject model, real
extraction, the method through the OpenAI-compatible test server: 8 neurons in 4 shards, one at a time, so a
scrape every second sees several values. The real-Prometheus tests (test_prometheus.py) check what a running
sweep actually exports."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from support.localnet import free_port, scrape
from support.system_tools import prometheus_path
from testing.stubs import RuleResponder
from testing.testserver import TestServer, fixed_latency

SHIPPED_PROMETHEUS_CONFIG = Path(__file__).resolve().parents[2] / "cluster" / "prometheus.yml"


def scrape_config_for(target_url: str, workdir: Path) -> dict:
    """cluster/prometheus.yml pointed at one target: the driver job's static target, and Ray's file_sd file
    (written here in Ray's own format) listing it too; scraped every second so the test is quick."""
    config = yaml.safe_load(SHIPPED_PROMETHEUS_CONFIG.read_text())
    url = urllib.parse.urlsplit(target_url)
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"neuronsweep-driver", "ray"}
    jobs["neuronsweep-driver"]["static_configs"] = [{"targets": [url.netloc]}]
    sd_file = workdir / "prom_metrics_service_discovery.json"
    sd_file.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [url.netloc]}]))
    jobs["ray"]["file_sd_configs"] = [{"files": [str(sd_file)]}]
    for job in jobs.values():
        job["metrics_path"] = url.path
    return config


def start_prometheus(target_url: str, workdir: Path) -> tuple[subprocess.Popen | None, str | None]:
    """Debian's prometheus on loopback scraping `target_url` with the shipped config; (None, None) if absent."""
    binary = prometheus_path()
    if binary is None:
        return None, None
    config_file = workdir / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(scrape_config_for(target_url, workdir)))
    port = free_port()
    with open(workdir / "prometheus.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


@dataclass
class LiveSweep:
    url: str
    proc: subprocess.Popen
    log: str
    prometheus: subprocess.Popen | None = None
    prometheus_url: str | None = None
    workdir: Path | None = None

    def prometheus_log(self) -> str:
        return (self.workdir / "prometheus.log").read_text()

    def samples(self) -> dict[tuple[str, frozenset], float]:
        return scrape(self.url)

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
    """Prometheus first (when installed), so it watches the sweep from its start."""
    server = TestServer(responder=RuleResponder(), latency=fixed_latency(0.05)).start()
    port = free_port()
    prometheus, prometheus_url = start_prometheus(f"http://127.0.0.1:{port}/metrics", workdir)
    backend = {"kind": "openai", "model": "rule-stub", "base_url": server.base_url, "api_key_env": "NS_LIVE_KEY",
               "concurrency": 4, "price_input_per_mtok": 0.15, "price_output_per_mtok": 0.6}
    cfg = {"model": {"name": "tiny-gpt2"}, "corpus": {"seq_len": 16, "max_windows": 120}, "layers": "0-1",
           "neurons": "0-3", "shard_size": 2, "max_inflight_shards": 1, "output": str(workdir / "run"),
           "metrics_port": port, "explainer": {**backend, "capabilities": "chat"},
           "simulator": {**backend, "capabilities": "chat_logprobs"}}
    (workdir / "sweep.yaml").write_text(yaml.safe_dump(cfg))
    log = str(workdir / "sweep.log")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli.app", "sweep", "-c", str(workdir / "sweep.yaml"),
                             "--metrics-linger", "900"], env={**os.environ, "NS_LIVE_KEY": "sk-live"},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    live = LiveSweep(f"http://127.0.0.1:{port}/metrics", proc, log, prometheus, prometheus_url, workdir)
    try:
        live.wait_started()
    except BaseException:  # a sweep that never came up must not leave Prometheus and the driver running
        stop_live_sweep(live, server)
        raise
    return live, server


def stop_live_sweep(live: LiveSweep, server: TestServer) -> None:
    if live.prometheus is not None:
        live.prometheus.terminate()
        live.prometheus.wait(timeout=20)
    live.proc.terminate()
    try:
        live.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        live.proc.kill()
        live.proc.wait()
    server.stop()
