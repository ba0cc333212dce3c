"""The two ways to run the workers' chunk tasks: one in-process worker (`LocalPool`) or Ray actors, one
checkpoint slot each (`RayPool`). Both have `map(method, chunks, on_result)` and `close()`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from orchestrator.store import RunStore
from workers.extract.checkpoint import slot_heads
from workers.extract.worker import ExtractWorker


def _first_free_slot(store: RunStore) -> int:
    heads = slot_heads(store)
    return min(heads) if heads else 0


class LocalPool:
    """One in-process worker (created on first use) that runs chunk tasks: `map("process", chunks, on_result)`."""

    def __init__(self, cfg, store, spec, *, n_actors=None, compile=None):
        self.cfg, self.store, self.spec, self.compile = cfg, store, spec, compile
        self.worker: ExtractWorker | None = None

    def map(self, method: str, chunks: list[int], on_result: Callable) -> None:
        if self.worker is None:
            cfg = self.cfg
            self.worker = ExtractWorker(cfg.model.name, self.spec, self.store, _first_free_slot(self.store),
                                        batch_size=cfg.model.batch_size, dtype=cfg.model.dtype,
                                        device=cfg.model.device, compile=self.compile)
        for chunk in chunks:
            on_result(getattr(self.worker, method)(chunk), self.worker.slot)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.extractor.close()


class RayPool:
    """Extraction actors (started on first use, kept for every later stage), one checkpoint slot each; chunks
    go to whichever actor is free."""

    def __init__(self, cfg, store, spec, *, n_actors=None, compile=None):
        self.cfg, self.store, self.spec, self.n_actors, self.compile = cfg, store, spec, n_actors, compile
        self.actors: list | None = None
        self.started_ray = False

    def _start(self, n_tasks: int) -> None:
        import ray

        from orchestrator.ray_session import init_ray
        from workers.extract.actor import ExtractActor, actor_options

        cfg = self.cfg
        self.started_ray = init_ray(cfg)
        gpus = ray.cluster_resources().get("GPU", 0)
        n = max(1, min(self.n_actors or (int(gpus) or 1), n_tasks))
        # @ray.remote turns the class into a Ray ActorClass (with .options); mypy still sees the plain class
        actor_class: Any = ExtractActor
        self.actors = [actor_class.options(**actor_options(gpus)).remote(
            cfg.model.name, self.spec, self.store, slot, cfg.model.batch_size, cfg.model.dtype, cfg.model.device,
            self.compile) for slot in range(n)]

    def map(self, method: str, chunks: list[int], on_result: Callable) -> None:
        import ray

        if self.actors is None:
            self._start(len(chunks))
        actors = self.actors
        assert actors is not None  # set by _start
        queue = list(chunks)
        inflight = {}
        for slot, actor in enumerate(actors):
            if queue:
                inflight[getattr(actor, method).remote(queue.pop(0))] = slot
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot = inflight.pop(ready[0])
            on_result(ray.get(ready[0]), slot)
            if queue:
                inflight[getattr(actors[slot], method).remote(queue.pop(0))] = slot

    def close(self) -> None:
        import ray

        for a in self.actors or []:
            ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()
