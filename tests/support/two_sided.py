"""A planted neuron with both signs (docs/method.md §1 "Both signs"): it fires on the tokens of one rule of the
rule stub (testing/stubs.py RULES) and goes negative on those of another, with top, bottom and random records
chosen as extraction chooses them (docs/method.md §2).

    records = two_sided_neuron("digits", "comma", pydoc_windows(), negative_peak=4.0)
"""
from __future__ import annotations

import random
import zlib

from testing.stubs import RULES
from workers.method.records import ActivationRecord, NeuronRecords


def _jitter(seq_id: int, pos: int) -> float:
    return (zlib.crc32(f"two-sided:{seq_id}:{pos}".encode()) % 1000) / 1000.0


def two_sided_neuron(positive: str, negative: str, windows: list[list[str]], *, layer: int = 0, neuron: int = 0,
                     positive_peak: float = 4.0, negative_peak: float = 4.0, top_k: int = 20, bottom_k: int = 20,
                     n_random: int = 15, seed: int = 0) -> NeuronRecords:
    """Activations: between positive_peak / 2 and positive_peak on tokens matching `positive`; between
    -negative_peak and -negative_peak / 2 on tokens matching `negative` (and not `positive`); slightly below 0
    elsewhere. Top records: the windows of largest maximum; bottom records: of most negative minimum (ties to
    the lower seq_id); random records: a seeded sample."""
    up, down = RULES[positive].match, RULES[negative].match

    def acts(seq_id: int, tokens: list[str]) -> list[float]:
        out = []
        for i, t in enumerate(tokens):
            j = _jitter(seq_id, i)
            if up(t):
                out.append(positive_peak * (0.5 + 0.5 * j))
            elif down(t):
                out.append(-negative_peak * (0.5 + 0.5 * j))
            else:
                out.append(-0.02 - 0.05 * j)
        return out

    all_acts = [acts(i, w) for i, w in enumerate(windows)]
    top = sorted(range(len(windows)), key=lambda i: (-max(all_acts[i]), i))[:top_k]
    bottom = sorted(range(len(windows)), key=lambda i: (min(all_acts[i]), i))[:bottom_k]
    picks = random.Random(seed).sample(range(len(windows)), n_random)

    def records(ids: list[int], kind: str) -> list[ActivationRecord]:
        return [ActivationRecord(i, windows[i], all_acts[i], kind, rank) for rank, i in enumerate(ids)]
    return NeuronRecords(layer, neuron, top=records(top, "top"), random=records(picks, "random"),
                         bottom=records(bottom, "bottom"))
