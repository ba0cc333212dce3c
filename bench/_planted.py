"""Planted neurons with one true and three false explanations each, for the benchmarks that run the real
simulator on them (bench/discrimination.py, bench/cost.py). Not a benchmark itself.

A planted neuron fires (2.0-4.0) on the tokens that match a rule (digits, closing parentheses, the word "the",
...) of the default corpus (the standard library's help topics) and sits slightly below 0 elsewhere
(testing/stubs.py `planted_neuron`); its valid split is n top + n random records, dealt as the method deals
them (workers/method/scoring.py `split_records`).
"""
from __future__ import annotations

import os
import sys

# `make bench` runs every bench/*.py as a script, this one too (it does nothing then): the project's packages
# must be importable either way
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testing.stubs import planted_neuron  # noqa: E402
from workers.method.scoring import split_records  # noqa: E402

# rule -> (the true explanation, false ones); the wording is the benchmarks' own, not the stub's vocabulary
NEURONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "digits": ("numbers written with digits, such as counts, sizes and years",
               ("closing parentheses", 'the word "the"', "words that start with a capital letter")),
    "closing_paren": ("the closing parenthesis that ends a call or a group",
                      ("opening parentheses", "commas between items of a list", "numbers written with digits")),
    "opening_paren": ("the opening parenthesis after a function name",
                      ("closing parentheses", "colons", 'the word "of"')),
    "the": ('the word "the"', ('the word "of"', "periods at the end of a sentence", "commas")),
    "of": ('the word "of"', ('the word "the"', "colons", "numbers written with digits")),
    "comma": ("commas", ("periods at the end of a sentence", "colons", "opening parentheses")),
    "period": ("the period that ends a sentence", ("commas", 'the word "the"', "closing parentheses")),
    "colon": ("colons, such as after a block header or a label", ("commas", "periods", "opening parentheses")),
    "capitalized": ("words that start with a capital letter",
                    ("numbers written with digits", 'the word "of"', "commas")),
}


def planted_valid(rule: str, windows: list[list[str]], n: int, *, seed: int = 0
                  ) -> tuple[list[list[str]], list[list[float]]]:
    """The tokens and true activations of a planted neuron's valid split (n top + n random records); `seed`
    draws its random records."""
    records = planted_neuron(rule, windows, top_k=4 * n, n_random=3 * n, seed=seed)
    valid = split_records(records.top, records.random, n)["valid"]
    return [r.tokens for r in valid], [r.activations for r in valid]


def fmt_score(x: float | None) -> str:
    return "  null" if x is None else f"{x:+.3f}"


def true_first(true: float | None, false: list[float | None]) -> bool:
    """The true explanation scores strictly highest (a null score is below every number)."""
    return true is not None and all(f is None or true > f for f in false)
