"""Planted neurons, real simulator: how often does the simulator rank a neuron's true explanation above wrong ones?

Each planted neuron fires on a rule (digits, closing parentheses, the word "the", ...) over the default corpus
(the standard library's help topics, cut by a simple word/punctuation tokenizer). Its valid split is simulated
under the true explanation and under wrong ones, and the correlation scores are compared. This *reports*; it
asserts nothing (tests/integration/test_planted.py asserts the same with the rule-following stub).

    .venv/bin/python bench/planted.py                       # embedded SmolLM2-135M, prompt-logprob mode
    .venv/bin/python bench/planted.py --mode logprob_free   # the chat format instead (slow on CPU)
    .venv/bin/python bench/planted.py --backend stub        # the rule-following stub (sanity check: always 100%)
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from schemas.config import Simulator as SimulatorConfig  # noqa: E402
from testing.stubs import RULES, RuleStubBackend, planted_neuron, pydoc_windows  # noqa: E402
from workers.method.scoring import correlation_score, split_records  # noqa: E402
from workers.method.simulator import NeuronSimulator  # noqa: E402

DEFAULT_RULES = "digits,closing_paren,the,comma,of"


def make_backend(name: str, model: str):
    if name == "stub":
        return RuleStubBackend()
    from workers.llm.backends.local import LocalBackend
    return LocalBackend.from_name(model)


def _fmt(x: float | None) -> str:
    return "  null" if x is None else f"{x:+.3f}"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["local", "stub"], default="local")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--mode", default="auto", choices=["auto", "prompt_logprob", "generated_logprob", "logprob_free"])
    ap.add_argument("--rules", default=DEFAULT_RULES, help=f"planted rules (of {', '.join(RULES)})")
    ap.add_argument("--wrong", type=int, default=2, help="wrong explanations per neuron")
    ap.add_argument("--n", type=int, default=5, help="records per split (valid = n top + n random)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--records-per-call", type=int, default=1)
    args = ap.parse_args()

    t0 = time.perf_counter()
    backend = make_backend(args.backend, args.model)
    sim = NeuronSimulator(backend, SimulatorConfig(mode=args.mode, records_per_call=args.records_per_call))
    print(f"simulator: {backend.provider}/{backend.model}, mode {sim.mode}, loaded in {time.perf_counter() - t0:.1f}s")
    windows = pydoc_windows(seq_len=args.seq_len)
    names = list(RULES)
    wins = total = 0
    sims = 0
    t1 = time.perf_counter()
    for rule in args.rules.split(","):
        records = planted_neuron(rule, windows, top_k=4 * args.n, n_random=3 * args.n)
        valid = split_records(records.top, records.random, args.n)["valid"]
        tokens, true = [r.tokens for r in valid], [r.activations for r in valid]
        start = names.index(rule)
        wrong_rules = [names[(start + k) % len(names)] for k in range(1, args.wrong + 1)]
        scores = {}
        for name in [rule] + wrong_rules:
            result = await sim.simulate(RULES[name].phrase, tokens)
            scores[name] = correlation_score(true, result.values)
            sims += 1
        ranked = [(w, scores[rule] is not None and (scores[w] is None or scores[rule] > scores[w]))
                  for w in wrong_rules]
        wins += sum(ok for _, ok in ranked)
        total += len(ranked)
        print(f"  {rule:14s} true {RULES[rule].phrase!r}: {_fmt(scores[rule])}   " +
              "   ".join(f"{w}: {_fmt(scores[w])}{'' if ok else ' (not below)'}" for w, ok in ranked))
    elapsed = time.perf_counter() - t1
    print(f"true explanation ranked above the wrong one in {wins} of {total} comparisons "
          f"({100 * wins / max(total, 1):.0f}%); {sims} simulations of {2 * args.n} records in {elapsed:.1f}s "
          f"({elapsed / max(sims, 1):.1f}s each); usage {sim.usage}")
    await backend.aclose()


if __name__ == "__main__":
    asyncio.run(main())
