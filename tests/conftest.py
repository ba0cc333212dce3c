import os
from pathlib import Path

import pytest

# Keep Ray quiet and small in tests; never touch a user's cluster.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("RAY_ADDRESS", None)
# The `tiny-` test models (testing/models.py) for every process a test starts: CLI subprocesses and local Ray
# workers inherit this, and the model loader imports the module before its first lookup.
os.environ.setdefault("NEURONSWEEP_MODEL_SOURCES", "testing.models")


TIERS = ("unit", "integration", "system")  # the folders under tests/, each also a marker (`pytest -m unit`)


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier; a test module outside the tier folders is a usage error, so that a run
    by tier (`make test` runs tests/unit tests/integration tests/system) cannot leave it out unnoticed.

    Under pytest-xdist (`make test` runs two workers) also order the modules: see `_heavy_modules_first`."""
    here = Path(__file__).parent
    for item in items:
        path = Path(item.path)
        if here not in path.parents:
            continue
        tier = path.relative_to(here).parts[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{path.relative_to(here.parent)}: test modules belong in tests/unit, "
                                    f"tests/integration or tests/system")
        item.add_marker(getattr(pytest.mark, tier))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = _heavy_modules_first(items)


def _heavy_modules_first(items: list) -> list:
    """`make test` hands each worker whole modules (`--dist loadfile`: a module's fixtures, such as its local
    Ray, start once) in the order collected (`--no-loadscope-reorder`). Modules with a slow test (or the live
    sweep) come first, then those loading the embedded model, then the rest, each in collection order: the last
    modules handed out are short, so no worker waits minutes at the end for the other to finish a long one."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)

    def weight(module: str) -> int:
        tests = modules[module]
        if any(t.get_closest_marker("slow") or "live_sweep" in t.fixturenames for t in tests):
            return 2
        return int(any(t.get_closest_marker("real_model") for t in tests))
    return [item for module in sorted(modules, key=weight, reverse=True) for item in modules[module]]


_MEASURED: list[str] = []


def pytest_runtest_logreport(report):
    """Collect the figures tests report with `record_property("measured", line)` (under xdist too: the
    reports reach the controlling process with their properties)."""
    if report.when == "call":
        _MEASURED.extend(v for k, v in report.user_properties if k == "measured")


def pytest_terminal_summary(terminalreporter):
    """Print those figures after the run, e.g. the fault campaign's repeated calls and the demo slice's time."""
    if _MEASURED:
        terminalreporter.section("measured")
        for line in _MEASURED:
            terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def ray_local():
    """An in-process local Ray (2 CPUs, no dashboard) for the module that asks for it, shut down after it.

    Module scope, not session: the product's own code starts and stops Ray when none is running and changes
    behaviour when one is (e.g. the LLM client shares a Ray rate limiter), so Ray must not stay up into modules
    that did not ask for it. `address="local"` never joins a cluster a developer happens to run."""
    import ray

    if ray.is_initialized():  # left over by a test that started Ray itself: fail here, not somewhere obscure
        raise RuntimeError("Ray is already initialized before the ray_local fixture; a test did not shut it down")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_gpt2():
    from testing.models import tiny_model
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def tiny_llama():
    from testing.models import tiny_model
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
