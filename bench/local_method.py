"""The demo's neurons through the real method on the embedded model: strictly one call at a time vs the
batched scheduler of the local backend, side by side in one run.

- **One at a time** (the simplest correct schedule): `LocalBackend(max_batch=1)` without prefix reuse. The
  model serves one request at a time and every prompt runs through it in full; a chat request decodes alone.
- **Batched**: the default `LocalBackend`. Prompt-logprob requests that wait together share one forward;
  chat requests generate together (continuous batching); prompt prefixes shared with other requests (the
  instructions and worked examples) run through the model once.

Both sides serve the same neurons' records with the same model weights in this process, through the LLM client
and `explain_and_score` with the demo's config, up to `shard_size` neurons in flight (as a shard actor runs
them); by default ATEN_CPU_CAPABILITY=avx2 and float32, a CPU without AVX-512 or bf16 units (--native: what
this CPU offers, the model's `auto` dtype). The records come from an extraction of the demo's config in this
process (or --run DIR, a run directory that has them). For each side it prints neurons/min, the tokens run
through the model per neuron (after prefix reuse), the billed-equivalent tokens per neuron (prompt + completion
tokens of every call, as an API would bill them), and, for both, the model's plain forward tokens/s measured in
the same run. It also checks that both sides wrote the same explanations (greedy decoding: they must).

    .venv/bin/python bench/local_method.py [--neurons 12] [--run runs/demo] [--native]

Last line: local_neurons_per_min_ratio=<batched neurons/min / one-at-a-time neurons/min> (target >= 1.5 on a
2-core CPU).
"""
from __future__ import annotations

import os
import sys

if "--native" not in sys.argv:  # before torch is imported: its kernels are chosen when it loads
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.plan import Shard  # noqa: E402
from orchestrator.shards import StoreRecordSource  # noqa: E402
from orchestrator.store import RunStore  # noqa: E402
from schemas.config import SweepConfig  # noqa: E402
from workers.llm.backends.local import LocalBackend  # noqa: E402
from workers.llm.client import LLMClient  # noqa: E402
from workers.method.neuron import explain_and_score  # noqa: E402
from workers.models.loading import load_model  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "examples" / "demo.yaml"


def demo_records(cfg: SweepConfig, run: str | None, limit: int) -> list:
    """The records of the demo's first `limit` neurons, extracted here unless `run` holds them."""
    from orchestrator.extraction import run_extraction
    from workers.models.loading import model_info

    if run is None:
        run = tempfile.mkdtemp(prefix="bench-local-")
        cfg = cfg.model_copy(update={"output": run})
        t0 = time.monotonic()
        run_extraction(cfg, RunStore.open(run, create=True), use_ray=False)
        print(f"extracted the demo's records in {time.monotonic() - t0:.0f}s -> {run}")
    info = model_info(cfg.model.name)
    source = StoreRecordSource(RunStore.open(run))
    records = []
    for layer in cfg.layer_list(info.n_layers):
        neurons = tuple(cfg.neuron_list(info.n_neurons))
        loaded = source.load(Shard(layer, neurons))
        records += [loaded[n] for n in neurons]
    return [r for r in records if r.top and max(x.max_activation for x in r.top) > 0][:limit]


def forward_tokens_per_s(model, repeats: int = 3, n: int = 512) -> float:
    x = torch.randint(100, 1000, (1, n))
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return repeats * n / (time.perf_counter() - t0)


def run_side(name: str, backend: LocalBackend, cfg: SweepConfig, records: list) -> dict:
    explainer = LLMClient(backend, role="explainer", timeout_s=cfg.explainer.timeout_s)
    simulator = LLMClient(backend, role="simulator", timeout_s=cfg.simulator.timeout_s)
    slots = asyncio.Semaphore(cfg.shard_size)

    async def one(r):
        async with slots:
            return await explain_and_score(r, explainer, simulator, cfg)

    async def all_of():
        return await asyncio.gather(*(one(r) for r in records))

    t0 = time.perf_counter()
    results = asyncio.run(all_of())
    wall = time.perf_counter() - t0
    n = len(records)
    billed = sum(u.prompt_tokens + u.completion_tokens for res in results for u in res.usage.values())
    s = backend.stats
    side = {"name": name, "wall_s": wall, "neurons_per_min": n / wall * 60, "model_tokens": s.model_tokens / n,
            "billed_tokens": billed / n, "explanations": [res.explanation for res in results],
            "failed": sum(1 for res in results if res.error), "mean_batch": s.step_rows / s.steps if s.steps else 0,
            "forward_batch": sum(s.batch_sizes) / len(s.batch_sizes) if s.batch_sizes else 0}
    print(f"{name:>13}: {side['neurons_per_min']:.2f} neurons/min ({n} neurons in {wall:.0f}s, {side['failed']} "
          f"failed); {side['model_tokens']:,.0f} tokens through the model per neuron, {side['billed_tokens']:,.0f} "
          f"billed-equivalent tokens per neuron; mean generation batch {side['mean_batch']:.1f}, prompt-logprob "
          f"batch {side['forward_batch']:.1f}", flush=True)
    return side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--neurons", type=int, default=12, help="neurons of the demo to run (default: all 12)")
    ap.add_argument("--run", help="a run directory holding the demo's records (default: extract them here)")
    ap.add_argument("--native", action="store_true", help="this CPU's own kernels and the auto dtype")
    args = ap.parse_args()

    dtype = "auto" if args.native else "float32"
    cfg = SweepConfig.load(DEMO, {"model.dtype": dtype, "explainer.dtype": dtype, "simulator.dtype": dtype})
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, dtype {dtype}", flush=True)
    records = demo_records(cfg, args.run, args.neurons)
    lm = load_model(cfg.explainer.model, dtype=dtype)
    print(f"model {cfg.explainer.model} ({lm.info.dtype}); {len(records)} neurons", flush=True)

    before = forward_tokens_per_s(lm.model)
    batched = run_side("batched", LocalBackend(lm.model, lm.tokenizer, name=cfg.explainer.model), cfg, records)
    one = run_side("one at a time", LocalBackend(lm.model, lm.tokenizer, name=cfg.explainer.model, max_batch=1,
                                                 min_prefix_tokens=10**9), cfg, records)
    after = forward_tokens_per_s(lm.model)
    print(f"plain forward (batch 1, 512 tokens): {before:,.0f} tokens/s before, {after:,.0f} after")
    same = sum(a == b for a, b in zip(batched["explanations"], one["explanations"]))
    print(f"same explanations on both sides: {same}/{len(records)}")
    print(f"local_neurons_per_min_ratio={batched['neurons_per_min'] / one['neurons_per_min']:.2f}")


if __name__ == "__main__":
    main()
