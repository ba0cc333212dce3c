"""Does the simulator tell a neuron's true explanation from false ones, before and after reading "10" right?

Synthetic neurons: each fires (2.0-4.0) on the tokens that match a rule (digits, closing parentheses, the word
"the", ...) of the default corpus (the standard library's help topics) and sits slightly below 0 elsewhere
(testing/stubs.py `planted_neuron`). Each has one true explanation and three false ones (bench/_planted.py). The
valid split (5 top + 5 random records of 64 tokens) is simulated under every explanation by the embedded
SmolLM2-135M in the default mode (prompt_logprob), and each explanation gets its correlation score.

One forward per record and explanation gives both readings of the same distributions (docs/method.md §5):

- before: the first token alone, "1" read as 1, whitespace stripped (the code before the fix);
- after:  P(10) = P("1") * P("0" | ..."1") from the branch after "1", exact value strings (the default now).

It reports, for each reading, the share of neurons whose true explanation scores strictly highest. It asserts
nothing. The last line is `true_explanation_first=<share after the fix>`.

    .venv/bin/python bench/discrimination.py                 # all nine neurons
    .venv/bin/python bench/discrimination.py --rules digits,comma
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._planted import NEURONS, fmt_score, planted_valid, true_first  # noqa: E402
from testing.stubs import pydoc_windows  # noqa: E402
from workers.method.prompts import simulator_completion_prompt  # noqa: E402
from workers.method.scoring import correlation_score, expected_value  # noqa: E402
from workers.method.simulator.values import BRANCH  # noqa: E402

READINGS = ("before", "after")


async def simulate_both(backend, explanation: str, token_lists: list[list[str]], top_k: int
                        ) -> dict[str, list[list[float]]]:
    """Both readings of one prompt_logprob simulation (one forward per record, gathered into batches)."""
    async def one(tokens: list[str]):
        prompt, offsets = simulator_completion_prompt(explanation, [tokens])
        resp = await backend.prompt_logprobs(prompt, offsets, top_k=top_k, branch=BRANCH)
        before = [expected_value(top, spaced=True) for top in resp.positions]
        after = [expected_value(top, after_one) for top, after_one in zip(resp.positions, resp.branches)]
        return before, after

    results = await asyncio.gather(*(one(tokens) for tokens in token_lists))
    return {"before": [b for b, _ in results], "after": [a for _, a in results]}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rules", default=",".join(NEURONS), help=f"planted neurons (of {', '.join(NEURONS)})")
    ap.add_argument("--n", type=int, default=5, help="records per split (valid = n top + n random)")
    ap.add_argument("--top-k", type=int, default=15, help="simulator.top_logprobs")
    args = ap.parse_args()

    from workers.llm.backends.local import LocalBackend

    t0 = time.perf_counter()
    backend = LocalBackend.from_name(args.model)
    print(f"simulator: local/{args.model}, prompt_logprob, top_k {args.top_k}, "
          f"loaded in {time.perf_counter() - t0:.1f}s")
    windows = pydoc_windows()
    firsts = {r: 0 for r in READINGS}
    rules = args.rules.split(",")
    t1 = time.perf_counter()
    print(f"{'neuron':14s} {'reading':7s} {'true':>7s} {'best false':>11s}  first")
    for rule in rules:
        true_text, false_texts = NEURONS[rule]
        tokens, true = planted_valid(rule, windows, args.n)
        scores: dict[str, dict[str, float | None]] = {r: {} for r in READINGS}
        for text in (true_text, *false_texts):
            sims = await simulate_both(backend, text, tokens, args.top_k)
            for reading in READINGS:
                scores[reading][text] = correlation_score(true, sims[reading])
        for reading in READINGS:
            false = [scores[reading][t] for t in false_texts]
            first = true_first(scores[reading][true_text], false)
            firsts[reading] += first
            best = max((f for f in false if f is not None), default=None)
            print(f"{rule:14s} {reading:7s} {fmt_score(scores[reading][true_text]):>7s} {fmt_score(best):>11s}  "
                  f"{'yes' if first else 'no'}")
    elapsed = time.perf_counter() - t1
    n = len(rules)
    print(f"true explanation strictly highest: before the fix {firsts['before']}/{n}, "
          f"after {firsts['after']}/{n}; {n * 4 * 2 * args.n} simulated records in {elapsed:.0f}s")
    await backend.aclose()
    print(f"true_explanation_first_before={firsts['before'] / n:.3f}")
    print(f"true_explanation_first={firsts['after'] / n:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
