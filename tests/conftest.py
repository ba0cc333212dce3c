import os

import pytest

# Keep Ray quiet and small in tests; never touch a user's cluster.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from workers.models.loading import tiny_model
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    from workers.models.loading import tiny_model
    return tiny_model("llama")


@pytest.fixture(scope="session")
def default_model():
    """The real embedded SmolLM2-135M (converted once into the cache, ~20 s the first time)."""
    from workers.models.loading import load_model
    return load_model()


@pytest.fixture(scope="session")
def live_sweep(tmp_path_factory):
    """A real sweep in its own process, serving metrics (see tests/support/live_sweep.py)."""
    from support.live_sweep import start_live_sweep, stop_live_sweep

    live, server = start_live_sweep(tmp_path_factory.mktemp("live-sweep"))
    yield live
    stop_live_sweep(live, server)
