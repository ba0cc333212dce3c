"""Starting or joining Ray for a driver (the sweep's and the extraction stage's): the one place that calls
`ray.init`."""
from __future__ import annotations

import os
from typing import Any

from schemas.config import SweepConfig


def init_ray(cfg: SweepConfig) -> bool:
    """Join `cfg.ray_address` (the CLI fills it from --address or RAY_ADDRESS) or start Ray in this process;
    returns whether it started Ray (False: already running here).

    Without an address Ray's own `ray.init()` would join the cluster that `ray start` (or
    `ray.cluster_utils.Cluster`) last started on this machine, named in /tmp/ray/ray_current_cluster: a sweep
    would then run on somebody else's cluster, or on one that has no CPUs for its actors. `address="local"`
    always starts a fresh one, as the CLI's help promises."""
    import ray

    from workers.models import MODEL_SOURCES_ENV

    if ray.is_initialized():
        return False
    kw: dict[str, Any] = dict(address=cfg.ray_address, log_to_driver=False) if cfg.ray_address else dict(
        address="local", include_dashboard=False, log_to_driver=False)
    if cfg.ray_address and os.environ.get(MODEL_SOURCES_ENV):
        # a cluster's workers do not inherit this process's environment (a local one's do): hand them the
        # model source modules so they load the same subject model as the driver planned with
        kw["runtime_env"] = {"env_vars": {MODEL_SOURCES_ENV: os.environ[MODEL_SOURCES_ENV]}}
    ray.init(**kw)
    return True
