"""The extraction actor: a thin Ray wrapper around `workers.extract.worker.ExtractWorker`.

It loads the subject model once, takes corpus chunks one at a time, and checkpoints its collector into the
run store after each; for quantile records it then re-runs the chunks holding picked windows.
`max_restarts=-1, max_task_retries=-1`: a restarted actor re-runs `__init__`, which reloads its slot's
checkpoint, and a retried chunk it already covers is skipped (docs/design.md, "Ray patterns").
"""
from __future__ import annotations

import ray

from workers.extract.collectors import CollectorSpec
from workers.extract.worker import ChunkResult, ExtractWorker


@ray.remote(max_restarts=-1, max_task_retries=-1)
class ExtractActor:
    def __init__(self, model_name: str, spec: CollectorSpec, store, slot: int, batch_size: int, dtype: str,
                 device: str, compile: bool | None = None):
        self.worker = ExtractWorker(model_name, spec, store, slot, batch_size=batch_size, dtype=dtype,
                                    device=device, compile=compile)

    def done_chunks(self) -> list[int]:
        return self.worker.done_chunks()

    def process(self, chunk: int) -> ChunkResult:
        return self.worker.process(chunk)

    def process_quantiles(self, chunk: int) -> ChunkResult:
        return self.worker.process_quantiles(chunk)


def actor_options(n_gpus_in_cluster: float) -> dict:
    """One GPU per actor where the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1, "num_cpus": 1} if n_gpus_in_cluster >= 1 else {"num_cpus": 1}
