"""The method's arithmetic as small pure functions (SPEC.md §2, §3, §5, §6).

Researchers can import these directly; the tests pin each one with hand-worked numbers:

    from workers.method.scoring import normalize_activations, split_records, expected_value
    from workers.method.scoring import correlation_score, calibrated_scores

Everything is computed in double precision. An undefined score is `None` (never 0 and never NaN), and
`undefined_reason` says why, so callers can store the reason next to the null.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

ALLOWED_VALUES = {str(i): i for i in range(11)}  # the only tokens that count as a prediction, "0" .. "10"
TOP_SPLITS = ("train", "calibration", "valid", "test")
RANDOM_SPLITS = ("calibration", "valid", "test")


# --- SPEC §3: what the prompts show -----------------------------------------------------------------------
def normalize_activations(records: list[list[float]]) -> list[list[int]]:
    """Raw activations -> integers 0..10 for a prompt, with the max taken over *all* the given records.

    m = max(0, max x); each x becomes min(10, floor((10 * max(0, x)) / m)), in that order in double
    precision (so x = 1.77, m = 2.95 gives 5, not 6). If m <= 0 every value is 0. NaN counts as 0.
    """
    clean = [[0.0 if math.isnan(float(x)) else float(x) for x in rec] for rec in records]
    m = max([0.0] + [x for rec in clean for x in rec])
    if m <= 0:
        return [[0 for _ in rec] for rec in clean]
    return [[min(10, math.floor((10.0 * max(0.0, x)) / m)) for x in rec] for rec in clean]


# --- SPEC §2: splits --------------------------------------------------------------------------------------
def split_records(top: list, random: list, n: int) -> dict[str, list]:
    """Deal records into the train / calibration / valid / test splits of `n` records each.

    Top record of rank r goes to TOP_SPLITS[r % 4], random record of rank r to RANDOM_SPLITS[r % 3]; each split
    keeps its first n, top records first. `random` may be empty (a sweep with n_random = 0); otherwise it
    needs at least 3n records, and `top` always needs at least 4n. Too few raises ValueError with the counts.
    """
    if n < 1:
        raise ValueError(f"records per split must be at least 1, got {n}")
    if len(top) < 4 * n or (random and len(random) < 3 * n):
        raise ValueError(
            f"too few records for {n} per split: have {len(top)} top and {len(random)} random, "
            f"need at least {4 * n} top and either 0 or at least {3 * n} random")
    splits: dict[str, list] = {name: [] for name in TOP_SPLITS}
    for rank, rec in enumerate(top):
        splits[TOP_SPLITS[rank % 4]].append(rec)
    tops = {name: recs[:n] for name, recs in splits.items()}
    randoms: dict[str, list] = {name: [] for name in RANDOM_SPLITS}
    for rank, rec in enumerate(random):
        randoms[RANDOM_SPLITS[rank % 3]].append(rec)
    return {name: tops[name] + randoms.get(name, [])[:n] for name in TOP_SPLITS}


# --- SPEC §5: a prediction from next-token log-probabilities ---------------------------------------------
def numeric_value(token: str) -> int | None:
    """0..10 if the token is exactly one of "0".."10" once surrounding whitespace is stripped, else None."""
    return ALLOWED_VALUES.get(token.strip())


def expected_value(top_logprobs: Mapping[str, float]) -> float:
    """Expected activation under the numeric part of a top-k next-token distribution.

    Keeps only tokens that are exactly "0".."10" (after stripping whitespace, since tokenizers decode " 5"),
    renormalizes their probabilities and returns the mean. None of them present -> 0.0; every kept
    probability underflowing to 0 -> NaN (the score is then undefined).
    """
    kept = [(value, math.exp(lp)) for tok, lp in top_logprobs.items() if (value := numeric_value(tok)) is not None]
    if not kept:
        return 0.0
    total = math.fsum(p for _, p in kept)
    if total == 0.0:
        return float("nan")
    return math.fsum(value * p for value, p in kept) / total


# --- SPEC §6: scores --------------------------------------------------------------------------------------
def _flat(records: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray([float(x) for rec in records for x in rec], dtype=np.float64)


def undefined_reason(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]) -> str | None:
    """Why the correlation of these two (concatenated) series is undefined, or None if it is defined."""
    if [len(r) for r in true] != [len(r) for r in simulated]:
        raise ValueError("true and simulated records differ in shape "
                         f"({[len(r) for r in true]} vs {[len(r) for r in simulated]} tokens)")
    t, s = _flat(true), _flat(simulated)
    if t.size == 0:
        return "no records"
    if t.size < 2:
        return "a single token"
    if np.isnan(t).any():
        return "NaN in true activations"
    if np.isnan(s).any():
        return "NaN in simulated values (every numeric probability underflowed)"
    if t.min() == t.max():
        return "constant true activations"
    if s.min() == s.max():
        return "constant simulated values"
    return None


def correlation_score(true: list[list[float]], simulated: list[list[float]]) -> float | None:
    """Pearson correlation over the concatenation of the records (one correlation over all tokens, not the
    mean of per-record correlations). None when undefined (see `undefined_reason`)."""
    if undefined_reason(true, simulated) is not None:
        return None
    t, s = _flat(true), _flat(simulated)
    dt, ds = t - t.mean(), s - s.mean()
    r = float(np.dot(dt, ds) / math.sqrt(float(np.dot(dt, dt)) * float(np.dot(ds, ds))))
    return max(-1.0, min(1.0, r))


def calibrated_scores(cal_true, cal_sim, valid_true, valid_sim) -> dict:
    """Fit true ~ a * simulated + b by least squares on the calibration split, then score the calibrated
    predictions on the valid split:

        r2     = 1 - mean((true - pred)^2) / mean(true^2)
        absdev = 1 - mean(|true - pred|)   / mean(|true|)

    (denominators as in the reference method, not the variance). A constant calibration simulation fits
    a = 0, b = mean(true), as ordinary least squares does. Returns {"r2", "absdev", "a", "b", "null_reason"}.
    """
    ct, cs, vt, vs = _flat(cal_true), _flat(cal_sim), _flat(valid_true), _flat(valid_sim)
    if ct.size != cs.size or vt.size != vs.size:
        raise ValueError(f"true and simulated differ in length (calibration {ct.size} vs {cs.size}, "
                         f"valid {vt.size} vs {vs.size})")
    out: dict = {"r2": None, "absdev": None, "a": None, "b": None, "null_reason": None}
    for name, arr in (("calibration", ct), ("calibration simulated", cs), ("valid", vt), ("valid simulated", vs)):
        if arr.size == 0:
            out["null_reason"] = f"no {name} tokens"
            return out
        if np.isnan(arr).any():
            out["null_reason"] = f"NaN in {name} values"
            return out
    var_s = float(np.mean((cs - cs.mean()) ** 2))
    if var_s == 0.0:
        a, b = 0.0, float(ct.mean())
    else:
        a = float(np.mean((cs - cs.mean()) * (ct - ct.mean()))) / var_s
        b = float(ct.mean()) - a * float(cs.mean())
    out["a"], out["b"] = a, b
    pred = a * vs + b
    reasons = []
    mean_sq, mean_abs = float(np.mean(vt ** 2)), float(np.mean(np.abs(vt)))
    if mean_sq == 0.0:
        reasons.append("r2: valid true activations are all 0")
    else:
        out["r2"] = 1.0 - float(np.mean((vt - pred) ** 2)) / mean_sq
    if mean_abs == 0.0:
        reasons.append("absdev: valid true activations are all 0")
    else:
        out["absdev"] = 1.0 - float(np.mean(np.abs(vt - pred))) / mean_abs
    out["null_reason"] = "; ".join(reasons) or None
    return out


# --- detection / fuzzing / embedding (EleutherAI-style scorers) ------------------------------------------
def balanced_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float | None:
    """(true-positive rate + true-negative rate) / 2; None without both classes."""
    pos = [p for y, p in zip(labels, predictions, strict=True) if y]
    neg = [p for y, p in zip(labels, predictions, strict=True) if not y]
    if not pos or not neg:
        return None
    return (sum(1 for p in pos if p) / len(pos) + sum(1 for p in neg if not p) / len(neg)) / 2


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half); None without
    both classes or with NaN scores."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg or any(math.isnan(s) for s in (*pos, *neg)):
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))
