"""Cost at equal agreement: what the cheaper simulation schedules spend, and what they do to the scores.

Planted neurons (bench/_planted.py: each fires on a rule over the default corpus, with one true and three false
explanations) have their valid split (5 top + 5 random records of 64 tokens) simulated under every explanation
by the embedded SmolLM2-135M in the default simulator mode (prompt_logprob), through `NeuronSimulator`, once
per schedule: `simulator.records_per_call` 1 (each record in its own call), 5 and 10. The explanations are
fixed (no explainer calls), so only the schedule varies. Each explanation gets its correlation score.

For each schedule it prints, per neuron (one explanation's valid split, what the method spends on a neuron's
scored explanation; the calibration split scales the same way):

- billed tokens: prompt + completion tokens of the simulation calls, as a provider bills them without caching;
- of the prompt tokens, those a call shares as a prefix with an earlier call of the same schedule (the fixed
  instruction and worked examples, the explanation line): what a provider's prompt cache could serve at its
  discount, counted with the simulator's tokenizer and no minimum prefix length;
- tokens through the model: what the local backend actually ran after reusing cached prompt prefixes (its
  prefix caching);

and the Spearman rank correlation of all the explanations' scores with the one-record-per-call scores (pairs
where either score is null are left out and counted), the mean absolute score change, and how often the true
explanation scores strictly highest. By default ATEN_CPU_CAPABILITY=avx2 and float32, as on a CPU without
AVX-512 or bf16 units (--native: what this CPU offers, the model's `auto` dtype).

    .venv/bin/python bench/cost.py                 # 3 planted neurons x 4 explanations, schedules 1, 5, 10
    .venv/bin/python bench/cost.py --neurons 9     # one neuron per rule: more scores to rank, three times as long

Every neuron costs its 4 explanations' valid splits under each schedule: the default of 3 neurons is meant to
keep a run on a 2-core CPU near ten minutes (docs/benchmarks.md has the measured times, and the caveat that
12 scores are few to rank).

Last line: tokens_per_neuron_ratio=<billed tokens per neuron of the cheapest schedule whose rank correlation
with one record per call is >= 0.9, divided by those of one record per call> (1.000: no cheaper schedule
agrees).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "--native" not in sys.argv:  # before torch is imported: it picks kernels on load
    os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import bisect  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, cast  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._planted import NEURONS, fmt_score, planted_valid, true_first  # noqa: E402
from schemas.config import Simulator as SimulatorConfig  # noqa: E402
from testing.stubs import pydoc_windows  # noqa: E402
from workers.llm.backends.base import Capabilities, LLMBackend, PromptLogprobsResponse, Usage  # noqa: E402
from workers.method.scoring import correlation_score  # noqa: E402
from workers.method.simulator import NeuronSimulator  # noqa: E402

BASELINE = 1  # records per call of the reference schedule
AGREEMENT = 0.9  # the rank correlation with the baseline's scores a cheaper schedule must keep


def average_ranks(xs: list[float]) -> list[float]:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def rank_correlation(a: list[float | None], b: list[float | None]) -> tuple[float | None, int]:
    """Spearman's rho (Pearson correlation of average ranks) over the pairs where both scores are numbers, and
    how many pairs were left out for a null; rho is None when it is undefined (fewer than two pairs, or one
    side constant)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    dropped = len(a) - len(pairs)
    if len(pairs) < 2:
        return None, dropped
    return correlation_score([average_ranks([x for x, _ in pairs])], [average_ranks([y for _, y in pairs])]), dropped


def shared_prefix_tokens(prompts: list[list[int]]) -> int:
    """Summed over the prompts in order: the longest prefix each shares with any earlier one (what a prompt
    cache that keeps everything could serve). The longest common prefix with a set is that with one of the
    new prompt's neighbours in sorted order, so it is kept sorted."""
    seen: list[tuple[int, ...]] = []
    total = 0
    for ids in prompts:
        key = tuple(ids)
        at = bisect.bisect_left(seen, key)
        total += max((len(os.path.commonprefix([key, seen[j]])) for j in (at - 1, at) if 0 <= j < len(seen)),
                     default=0)
        seen.insert(at, key)
    return total


def cheapest_agreeing(tokens: dict[int, float], agreement: dict[int, float | None]) -> int:
    """The schedule (records per call) with the fewest tokens among the baseline and those whose rank
    correlation with the baseline is at least AGREEMENT."""
    keeps = [k for k in tokens if k == BASELINE or (agreement.get(k) or -1.0) >= AGREEMENT]
    return min(keeps, key=lambda k: (tokens[k], k))


class PromptRecorder:
    """The local backend as the simulator sees it, keeping the token ids of every prompt-logprobs prompt (for
    `shared_prefix_tokens`)."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.prompts: list[list[int]] = []

    @property
    def provider(self) -> str:
        return cast(str, self.backend.provider)

    @property
    def model(self) -> str:
        return cast(str, self.backend.model)

    @property
    def capabilities(self) -> Capabilities:
        return cast(Capabilities, self.backend.capabilities)

    async def tokenize(self, text: str) -> list[str]:
        return cast(list[str], await self.backend.tokenize(text))

    async def chat(self, messages: list[dict], **kw: Any) -> Any:
        return await self.backend.chat(messages, **kw)

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int,
                              branch: str | None = None) -> PromptLogprobsResponse:
        # tokenized as the local backend tokenizes it (special tokens included), so the counts add up to its usage
        self.prompts.append(list(self.backend.tokenizer(prompt, add_special_tokens=True)["input_ids"]))
        return cast(PromptLogprobsResponse,
                    await self.backend.prompt_logprobs(prompt, offsets, top_k=top_k, branch=branch))

    async def aclose(self) -> None:
        return None


@dataclass
class ScheduleRun:
    records_per_call: int
    scores: list[list[float | None]] = field(default_factory=list)  # per neuron: true explanation, then false
    usage: Usage = field(default_factory=Usage)
    calls: int = 0
    shared_prefix: int = 0
    model_tokens: int = 0
    wall_s: float = 0.0
    settings: dict = field(default_factory=dict)

    def per_neuron(self, total: float) -> float:
        """Per neuron: per simulated explanation (one valid split)."""
        return total / max(sum(len(s) for s in self.scores), 1)

    @property
    def billed(self) -> float:
        return self.per_neuron(self.usage.prompt_tokens + self.usage.completion_tokens)


async def run_schedule(backend: Any, records_per_call: int, neurons: list[tuple[str, list[list[str]],
                       list[list[float]]]]) -> ScheduleRun:
    """Every neuron's valid split under every one of its explanations, `records_per_call` records a call; a
    neuron's explanations are simulated concurrently (the local backend batches their calls)."""
    recorder = PromptRecorder(backend)
    sim = NeuronSimulator(cast(LLMBackend, recorder), SimulatorConfig(records_per_call=records_per_call))
    run = ScheduleRun(records_per_call)
    model_tokens = backend.stats.model_tokens
    t0 = time.perf_counter()
    for rule, tokens, true in neurons:
        true_text, false_texts = NEURONS[rule]
        sims = await asyncio.gather(*(sim.simulate(text, tokens) for text in (true_text, *false_texts)))
        run.scores.append([correlation_score(true, s.values) for s in sims])
        run.calls += sum(s.calls for s in sims)
        print(f"  {records_per_call}/call {rule:14s} {' '.join(fmt_score(x) for x in run.scores[-1])}  "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    run.wall_s = time.perf_counter() - t0
    run.usage = sim.usage
    run.model_tokens = backend.stats.model_tokens - model_tokens
    run.shared_prefix = shared_prefix_tokens(recorder.prompts)
    run.settings = sim.settings()
    return run


def planted_neurons(count: int, windows: list[list[str]], n: int) -> list[tuple[str, list[list[str]],
                                                                                 list[list[float]]]]:
    """`count` planted neurons: the rules in order, then again with other random records (seed 1, 2, ...)."""
    rules = list(NEURONS)
    return [(rules[i % len(rules)], *planted_valid(rules[i % len(rules)], windows, n, seed=i // len(rules)))
            for i in range(count)]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--neurons", type=int, default=3,
                    help=f"planted neurons, the rules in order ({', '.join(NEURONS)}); more than "
                         f"{len(NEURONS)} repeat them with other random records")
    ap.add_argument("--schedules", default="1,5,10", help="records per call to compare (1 is always included)")
    ap.add_argument("--n", type=int, default=5, help="records per split (valid = n top + n random)")
    ap.add_argument("--native", action="store_true", help="this CPU's own kernels and the auto dtype")
    args = ap.parse_args()
    # the baseline first (every other schedule is compared with it), then the others in the order given
    schedules = list(dict.fromkeys([BASELINE, *(int(k) for k in args.schedules.split(","))]))
    if args.neurons < 1 or min(schedules) < 1:
        ap.error("--neurons and every schedule must be at least 1")

    import torch

    from workers.llm.backends.local import LocalBackend

    dtype = "auto" if args.native else "float32"
    t0 = time.perf_counter()
    backend = LocalBackend.from_name(args.model, dtype=dtype)
    print(f"simulator: local/{args.model} ({dtype}), torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; loaded in "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    neurons = planted_neurons(args.neurons, pydoc_windows(), args.n)
    n_expl = 1 + len(NEURONS[neurons[0][0]][1])
    print(f"{len(neurons)} planted neurons ({', '.join(r for r, *_ in neurons)}), {n_expl} explanations each "
          f"(1 true), {2 * args.n} valid records each; schedules (records per call): "
          f"{', '.join(map(str, schedules))}; per neuron = one explanation's valid split; rank correlation over "
          f"{len(neurons) * n_expl} scores", flush=True)

    # each schedule's line as soon as it is done: a run cut short still tells what it measured
    runs: dict[int, ScheduleRun] = {}
    agreement: dict[int, float | None] = {}
    for k in schedules:
        r = runs[k] = await run_schedule(backend, k, neurons)
        base = [s for scores in runs[BASELINE].scores for s in scores]
        flat = [s for scores in r.scores for s in scores]
        rho, dropped = rank_correlation(base, flat)
        agreement[k] = rho
        diffs = [abs(a - b) for a, b in zip(base, flat) if a is not None and b is not None]
        firsts = sum(true_first(s[0], s[1:]) for s in r.scores)
        prompt, completion = r.per_neuron(r.usage.prompt_tokens), r.per_neuron(r.usage.completion_tokens)
        print(f"records_per_call={k:<2d}: {r.billed:,.0f} billed tokens/neuron (prompt {prompt:,.0f} + completion "
              f"{completion:,.0f}), of which {r.per_neuron(r.shared_prefix):,.0f} prefix shared with an earlier "
              f"call; {r.per_neuron(r.model_tokens):,.0f} through the model; {r.per_neuron(r.calls):.1f} "
              f"calls/neuron; rank correlation with 1/call {fmt_score(rho)} ({dropped} null pairs left out), mean "
              f"|score change| {sum(diffs) / max(len(diffs), 1):.3f}; true explanation first "
              f"{firsts}/{len(neurons)}; {r.wall_s:.0f}s; settings {r.settings}", flush=True)
    await backend.aclose()

    width = 7 * n_expl - 1  # n_expl scores of 6 characters, one space apart
    print(f"\n{'neuron':14s} " + " | ".join(f"{f'{k}/call: true, {n_expl - 1} false':{width}s}" for k in schedules))
    for i, (rule, *_) in enumerate(neurons):
        print(f"{rule:14s} " + " | ".join(" ".join(fmt_score(s) for s in runs[k].scores[i]) for k in schedules))
    best = cheapest_agreeing({k: runs[k].billed for k in schedules}, agreement)
    print(f"cheapest schedule with rank correlation >= {AGREEMENT} against one record per call: "
          f"records_per_call={best}")
    print(f"tokens_per_neuron_ratio={runs[best].billed / runs[BASELINE].billed:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
