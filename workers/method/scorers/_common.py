"""Helpers shared by the judged scorers (detection, fuzzing) and by the window-based ones."""
from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from workers.llm.backends.base import LLMBackend, TokenAlternatives, Usage
from workers.llm.verdict import judged
from workers.method.prompts import MalformedAnswerError, judge_messages, parse_binary_list
from workers.method.records import ActivationRecord
from workers.method.retrying import MALFORMED_ATTEMPTS, malformed_retrying, sample_settings
from workers.method.scoring import NON_FINITE_ACTIVATIONS, balanced_accuracy, f1_score, roc_auc

NO_NEGATIVES = "no non-activating windows (no window stays below classifier.non_activating_below x the neuron's max)"

T = TypeVar("T")


def non_finite_windows(records: list[ActivationRecord]) -> str | None:
    """The null_reason of a scorer that reads these windows' activations when one holds a NaN or an infinity
    (a window with no usable activations can be neither labelled nor ranked), else None."""
    bad = [r.seq_id for r in records if not all(math.isfinite(x) for x in r.activations)]
    if not bad:
        return None
    shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
    return f"{NON_FINITE_ACTIVATIONS} (NaN or infinite activations in window{'s' if len(bad) > 1 else ''} {shown})"


def binary_probability(tok: TokenAlternatives, answer: int) -> float:
    """P(1) from a 0/1 answer token's alternatives (renormalized over '0' and '1'); the answer itself if
    neither shows up."""
    probs = {"0": 0.0, "1": 0.0}
    for text, lp in (tok.top or {tok.token: tok.logprob}).items():
        key = text.strip(" [],\n\t")
        if key in probs:
            probs[key] += math.exp(lp)
    total = probs["0"] + probs["1"]
    return probs["1"] / total if total > 0 else float(answer)


def _covering(tokens: list[TokenAlternatives], offset: int) -> TokenAlternatives:
    pos = 0
    for tok in tokens:
        if pos <= offset < pos + len(tok.token):
            return tok
        pos += len(tok.token)
    raise MalformedAnswerError(f"no generated token covers answer offset {offset}")


async def judge(backend: LLMBackend, system: str, explanation: str, snippets: list[str], *,
                top_logprobs: int, attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                ) -> tuple[list[int], list[float] | None, Usage]:
    """Ask for a 0/1 per snippet; returns answers, P(1) per snippet when logprobs exist, and usage. Every
    call's usage also goes to `spent` (failed attempts too)."""
    spent = [] if spent is None else spent
    usage = Usage()
    want_logprobs = backend.capabilities.chat_logprobs
    async for attempt in malformed_retrying(attempts):
        with attempt:
            temperature, seed = sample_settings(0.0, attempt.retry_state.attempt_number)
            resp = await backend.chat(judge_messages(system, explanation, snippets),
                                      max_tokens=4 * len(snippets) + 16, temperature=temperature,
                                      top_logprobs=top_logprobs if want_logprobs else None, seed=seed)
            usage += resp.usage
            spent.append(resp.usage)
            async with judged(resp):  # the journal keeps an answer only if it parses
                if want_logprobs and resp.logprobs:
                    text = "".join(t.token for t in resp.logprobs)
                    parsed = parse_binary_list(text, len(snippets))
                    probs = [binary_probability(_covering(resp.logprobs, p.offset), p.value) for p in parsed]
                else:
                    parsed, probs = parse_binary_list(resp.text, len(snippets)), None
    return [p.value for p in parsed], probs, usage


async def judge_batched(backend: LLMBackend, system: str, explanation: str, batches: list[list[str]], *,
                        top_logprobs: int, attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                        ) -> tuple[list[int], list[float] | None, Usage]:
    """`judge` once per batch of snippets, concurrently; answers (and P(1) only when every batch gave
    probabilities) in the order of the batches' snippets, concatenated."""
    parts = await asyncio.gather(*(
        judge(backend, system, explanation, batch, top_logprobs=top_logprobs, attempts=attempts, spent=spent)
        for batch in batches if batch))
    answers = [a for part, _, _ in parts for a in part]
    probs = None if any(p is None for _, p, _ in parts) else [x for _, p, _ in parts for x in (p or [])]
    return answers, probs, sum((u for _, _, u in parts), Usage())


def batched(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive batches of `size` items (the last may be shorter)."""
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def spread(items: Sequence[T], size: int, key: Callable[[T], Hashable]) -> list[list[T]]:
    """`items` in batches of at most `size` with no two items of the same key in one batch: each item goes into
    the first batch that has room and lacks its key (greedy, keeping the given order otherwise)."""
    batches: list[list[T]] = []
    keys: list[set] = []
    for item in items:
        k = key(item)
        i = next((i for i, b in enumerate(batches) if len(b) < size and k not in keys[i]), None)
        if i is None:
            batches.append([])
            keys.append(set())
            i = len(batches) - 1
        batches[i].append(item)
        keys[i].add(k)
    return batches


def judged_columns(labels: list[int], answers: list[int], probs: list[float] | None, settings: dict) -> dict:
    """score (balanced accuracy), f1, auc (with probabilities) and the settings with the window counts."""
    score = balanced_accuracy(labels, answers)
    auc = roc_auc(labels, probs) if probs is not None else None
    settings = {**settings, "n_positive": sum(labels), "n_negative": len(labels) - sum(labels)}
    return {"score": score, "f1": f1_score(labels, answers), "auc": auc,
            "null_reason": None if score is not None else "needs both kinds of windows", "settings": settings}
