"""Scorers (SPEC.md §6). Each returns the scorer-specific columns of one `scores` row (a dict) plus the
usage it spent; `workers.method.neuron` adds the neuron's identity and writes the row.

- correlation: simulated vs true activations on the valid split (overall, top part, random part, per record)
  with r2/absdev calibrated on the calibration split;
- detection: does the explanation tell activating windows from non-activating ones? (balanced accuracy, and
  AUC when the backend gives logprobs);
- fuzzing: does the explanation tell truly active tokens from randomly highlighted ones? (balanced accuracy,
  AUC with logprobs);
- embedding: cosine similarity of explanation and window embeddings, AUC (no LLM call).
Non-activating windows are the neuron's random records on which it stays at or below 0 everywhere.
An undefined score is None with a `null_reason`.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from workers.llm.backends.base import LLMBackend, TokenAlternatives, Usage
from workers.method.prompts import (DETECTION_SYSTEM, FUZZING_SYSTEM, MalformedAnswerError, judge_messages,
                             parse_binary_list, window_text)
from workers.method.records import ActivationRecord
from workers.method.scoring import (balanced_accuracy, calibrated_scores, correlation_score, normalize_activations,
                             roc_auc, undefined_reason)
from workers.method.simulator import MALFORMED_ATTEMPTS, malformed_retrying, sample_settings

FUZZ_ACTIVE_LEVEL = 4  # a token counts as active for fuzzing at >= 4 on its window's 0-10 scale
NO_NEGATIVES = "no non-activating windows (every random record has an activation > 0)"


def _reasons(**named: str | None) -> str | None:
    return "; ".join(f"{k}: {v}" for k, v in named.items() if v) or None


def non_activating(records: Sequence[ActivationRecord]) -> list[ActivationRecord]:
    """Windows where the neuron stays at or below 0 on every token (taken from its random records)."""
    return [r for r in records if r.activations and max(r.activations) <= 0]


# --- correlation ------------------------------------------------------------------------------------------
def correlation_columns(valid: list[ActivationRecord], simulated: list[list[float]],
                        calibration: list[ActivationRecord], cal_simulated: list[list[float]]) -> dict:
    """score (one correlation over the concatenated valid split), score_top, score_random, per_sequence,
    r2 and absdev (calibrated on the calibration split), with a null_reason naming every null column."""
    true = [r.activations for r in valid]

    def part(kind: str) -> tuple[float | None, str | None]:
        idx = [i for i, r in enumerate(valid) if r.kind == kind]
        if not idx:
            return None, f"no {kind} records in the split"
        t, s = [true[i] for i in idx], [simulated[i] for i in idx]
        return correlation_score(t, s), undefined_reason(t, s)

    top, top_reason = part("top")
    rnd, rnd_reason = part("random")
    cal = calibrated_scores([r.activations for r in calibration], cal_simulated, true, simulated)
    cal_reason = cal["null_reason"]
    return {
        "score": correlation_score(true, simulated),
        "score_top": top, "score_random": rnd,
        "r2": cal["r2"], "absdev": cal["absdev"],
        "per_sequence": [correlation_score([t], [s]) for t, s in zip(true, simulated, strict=True)],
        "seq_ids": [r.seq_id for r in valid],
        "simulated": [[float(x) for x in s] for s in simulated],
        "null_reason": _reasons(score=undefined_reason(true, simulated),
                                score_top=top_reason if top is None else None,
                                score_random=rnd_reason if rnd is None else None,
                                calibration=cal_reason),
        "_calibration": {"a": cal["a"], "b": cal["b"]},
    }


# --- detection and fuzzing --------------------------------------------------------------------------------
def _binary_probability(tok: TokenAlternatives, answer: int) -> float:
    """P(1) from a 0/1 answer token's alternatives (renormalized over '0' and '1'); the answer itself if
    neither shows up."""
    probs = {"0": 0.0, "1": 0.0}
    for text, lp in (tok.top or {tok.token: tok.logprob}).items():
        key = text.strip(" [],\n\t")
        if key in probs:
            probs[key] += math.exp(lp)
    total = probs["0"] + probs["1"]
    return probs["1"] / total if total > 0 else float(answer)


async def _judge(backend: LLMBackend, system: str, explanation: str, snippets: list[str], *,
                 top_logprobs: int, attempts: int, spent: list[Usage] | None
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
            if want_logprobs and resp.logprobs:
                text = "".join(t.token for t in resp.logprobs)
                parsed = parse_binary_list(text, len(snippets))
                probs = [_binary_probability(_covering(resp.logprobs, p.offset), p.value) for p in parsed]
            else:
                parsed, probs = parse_binary_list(resp.text, len(snippets)), None
    return [p.value for p in parsed], probs, usage


def _covering(tokens: list[TokenAlternatives], offset: int) -> TokenAlternatives:
    pos = 0
    for tok in tokens:
        if pos <= offset < pos + len(tok.token):
            return tok
        pos += len(tok.token)
    raise MalformedAnswerError(f"no generated token covers answer offset {offset}")


def _judged_columns(labels: list[int], answers: list[int], probs: list[float] | None, settings: dict) -> dict:
    score = balanced_accuracy(labels, answers)
    auc = roc_auc(labels, probs) if probs is not None else None
    settings = {**settings, "n_positive": sum(labels), "n_negative": len(labels) - sum(labels)}
    return {"score": score, "auc": auc,
            "null_reason": None if score is not None else "needs both kinds of windows", "settings": settings}


async def detection_columns(backend: LLMBackend, explanation: str, activating: list[ActivationRecord],
                            quiet: list[ActivationRecord], *, seed: int, top_logprobs: int = 15,
                            attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                            ) -> tuple[dict, Usage]:
    """Balanced accuracy of the model telling activating windows from non-activating ones (shuffled)."""
    settings = {"windows": "valid top records vs random records with max <= 0", "prompt": "detection"}
    if not quiet:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}, Usage()
    quiet = quiet[:len(activating)]
    items = [(1, r) for r in activating] + [(0, r) for r in quiet]
    random.Random(seed).shuffle(items)
    answers, probs, usage = await _judge(backend, DETECTION_SYSTEM, explanation,
                                         [window_text(r.tokens) for _, r in items],
                                         top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    cols = _judged_columns([y for y, _ in items], answers, probs, settings)
    cols["seq_ids"] = [r.seq_id for _, r in items]
    return cols, usage


def active_positions(record: ActivationRecord, level: int = FUZZ_ACTIVE_LEVEL) -> set[int]:
    """Tokens at or above `level` on the window's own 0-10 scale (SPEC §3)."""
    return {i for i, v in enumerate(normalize_activations([record.activations])[0]) if v >= level}


async def fuzzing_columns(backend: LLMBackend, explanation: str, correct: list[ActivationRecord],
                          decoys: list[ActivationRecord], *, seed: int, top_logprobs: int = 15,
                          attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                          ) -> tuple[dict, Usage]:
    """Balanced accuracy of the model telling truly active tokens (highlighted in `correct` windows) from the
    same number of random tokens highlighted in `decoys` windows (activating windows of another split)."""
    rng = random.Random(seed)
    settings = {"active_level": FUZZ_ACTIVE_LEVEL, "windows": "valid top (true highlights) vs calibration top "
                "(random highlights)", "prompt": "fuzzing"}
    items: list[tuple[int, ActivationRecord, set[int]]] = []
    for rec in correct:
        if hits := active_positions(rec):
            items.append((1, rec, hits))
    for rec in decoys:
        hits = active_positions(rec)
        others = [i for i in range(len(rec.tokens)) if i not in hits]
        if hits and others:
            items.append((0, rec, set(rng.sample(others, min(len(hits), len(others))))))
    if not any(y for y, *_ in items) or all(y for y, *_ in items):
        return {"score": None, "null_reason": "needs windows with active tokens for both kinds",
                "settings": settings}, Usage()
    rng.shuffle(items)
    answers, probs, usage = await _judge(backend, FUZZING_SYSTEM, explanation,
                                         [window_text(r.tokens, hl) for _, r, hl in items],
                                         top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    cols = _judged_columns([y for y, *_ in items], answers, probs, settings)
    cols["seq_ids"] = [r.seq_id for _, r, _ in items]
    return cols, usage


# --- embedding --------------------------------------------------------------------------------------------
class Embedder(Protocol):
    name: str

    def embed(self, texts: list[str]) -> np.ndarray: ...  # (n, d), rows of unit length


async def embedding_columns(embedder: Embedder, explanation: str, activating: list[ActivationRecord],
                            quiet: list[ActivationRecord]) -> dict:
    """AUC of cosine(explanation, window) separating activating from non-activating windows."""
    settings = {"embedder": embedder.name, "windows": "valid top records vs random records with max <= 0"}
    if not quiet:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}
    windows = activating + quiet
    vectors = await asyncio.to_thread(embedder.embed, [explanation] + ["".join(r.tokens) for r in windows])
    sims = [float(x) for x in vectors[1:] @ vectors[0]]
    labels = [1] * len(activating) + [0] * len(quiet)
    score = roc_auc(labels, sims)
    return {"score": score, "null_reason": None if score is not None else "needs both kinds of windows",
            "settings": settings, "seq_ids": [r.seq_id for r in windows]}


def settings_json(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, default=float)
