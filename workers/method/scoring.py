"""The method's arithmetic as small pure functions (docs/method.md §2, §3, §5, §6).

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
DIGITS = "0123456789"
TOP_SPLITS = ("train", "calibration", "valid", "test")
RANDOM_SPLITS = ("calibration", "valid", "test")


# --- docs/method.md §3: what the prompts show -----------------------------------------------------------------------
def normalize_activations(records: list[list[float]]) -> list[list[int]]:
    """Raw activations -> integers 0..10 for a prompt, with the max taken over *all* the given records.

    m = max(0, max x); each x becomes min(10, floor((10 * max(0, x)) / m)), in that order in double
    precision (so x = 1.77, m = 2.95 gives 5, not 6). If m <= 0 every value is 0. A non-finite value (NaN,
    +inf, -inf) carries no usable magnitude: it shows as 0 and stays out of the max (the scorers report such a
    neuron's scores as null, `non_finite_activations`).
    """
    clean = [[float(x) if math.isfinite(float(x)) else 0.0 for x in rec] for rec in records]
    m = max([0.0] + [x for rec in clean for x in rec])
    if m <= 0:
        return [[0 for _ in rec] for rec in clean]
    return [[min(10, math.floor((10.0 * max(0.0, x)) / m)) for x in rec] for rec in clean]


# --- docs/method.md §2: splits --------------------------------------------------------------------------------------
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


# --- docs/method.md §5: a prediction from next-token log-probabilities ---------------------------------------------
def numeric_value(token: str, *, spaced: bool = False) -> int | None:
    """0..10 if the token is exactly one of "0".."10", else None. With `spaced`, surrounding whitespace is
    stripped first (" 9" counts as 9); the contract counts exact strings only, so it is off by default."""
    return ALLOWED_VALUES.get(token.strip() if spaced else token)


def _probability(logprob: float) -> float:
    """exp(logprob); a log-probability a little above 0 (rounding) is 0, and NaN stays NaN."""
    return math.exp(min(logprob, 0.0)) if not math.isnan(logprob) else math.nan


def value_probabilities(top_logprobs: Mapping[str, float], after_one: Mapping[str, float] | None = None, *,
                        spaced: bool = False) -> dict[int, float]:
    """Probability of each value string "0".."10" at one position, unnormalized (only the numeric part of a
    top-k distribution is known).

    Where the tokenizer writes "10" as "1" + "0", the token "1" starts both the value 1 and the value 10;
    `after_one` is then the top-k next-token distribution after that "1", and its mass is split:

        P(10) += P("1") * P("0" | ..."1")        P(1) += P("1") * (1 - P(a digit | ..."1"))

    where "a digit" is every token of `after_one` whose text starts with 0-9 (tokens outside its top-k count as
    not a digit). The rest, "1" followed by another digit (11, 12, ...), is no value and is dropped. A token
    "10" (tokenizers that keep it whole) counts as 10 directly. Without `after_one`, "1" counts as 1.
    """
    probs: dict[int, float] = {}
    for tok, lp in top_logprobs.items():
        value = numeric_value(tok, spaced=spaced)
        if value is None:
            continue
        p = _probability(lp)
        if value == 1 and tok == "1" and after_one is not None:
            zero = math.fsum(_probability(q) for t, q in after_one.items() if t == "0")
            digit = math.fsum(_probability(q) for t, q in after_one.items() if t and t[0] in DIGITS)
            probs[10] = probs.get(10, 0.0) + p * zero
            probs[1] = probs.get(1, 0.0) + p * max(0.0, 1.0 - digit)
        else:
            probs[value] = probs.get(value, 0.0) + p
    return probs


def expected_value(top_logprobs: Mapping[str, float], after_one: Mapping[str, float] | None = None, *,
                   spaced: bool = False) -> float:
    """Expected activation under the numeric part of a top-k next-token distribution (`value_probabilities`,
    renormalized to sum to 1). No value string present -> 0.0; every kept probability underflowing to 0, or a
    NaN log-probability among them -> NaN (the score is then undefined)."""
    probs = value_probabilities(top_logprobs, after_one, spaced=spaced)
    if not probs:
        return 0.0
    total = math.fsum(probs.values())
    if not total > 0.0:  # underflow, or NaN
        return float("nan")
    return math.fsum(value * p for value, p in probs.items()) / total


# --- docs/method.md §6: scores --------------------------------------------------------------------------------------
NON_FINITE_ACTIVATIONS = "non_finite_activations"  # NaN or an infinity among the true activations
NON_FINITE_SIMULATION = "non_finite_simulation"  # NaN or an infinity among the simulated values


def _flat(records: Sequence[Sequence[float]]) -> np.ndarray:
    return np.asarray([float(x) for rec in records for x in rec], dtype=np.float64)


def non_finite_reason(values: np.ndarray, what: str, code: str) -> str | None:
    """`code (k of n <what> are NaN or infinite)`, or None when every value is finite."""
    bad = int(np.count_nonzero(~np.isfinite(values)))
    return f"{code} ({bad} of {values.size} {what} are NaN or infinite)" if bad else None


def _correlation(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]
                 ) -> tuple[float | None, str | None]:
    if [len(r) for r in true] != [len(r) for r in simulated]:
        raise ValueError("true and simulated records differ in shape "
                         f"({[len(r) for r in true]} vs {[len(r) for r in simulated]} tokens)")
    t, s = _flat(true), _flat(simulated)
    if t.size == 0:
        return None, "no records"
    if t.size < 2:
        return None, "a single token"
    reason = (non_finite_reason(t, "true activations", NON_FINITE_ACTIVATIONS)
              or non_finite_reason(s, "simulated values", NON_FINITE_SIMULATION))
    if reason:
        return None, reason
    if t.min() == t.max():
        return None, "constant true activations"
    if s.min() == s.max():
        return None, "constant simulated values"
    t, s = t / np.abs(t).max(), s / np.abs(s).max()  # r is scale-free; scaled, no sum or square can overflow
    dt, ds = t - t.mean(), s - s.mean()
    r = float(np.dot(dt, ds) / math.sqrt(float(np.dot(dt, dt)) * float(np.dot(ds, ds))))
    return max(-1.0, min(1.0, r)), None


def undefined_reason(true: Sequence[Sequence[float]], simulated: Sequence[Sequence[float]]) -> str | None:
    """Why the correlation of these two (concatenated) series is undefined, or None if it is defined."""
    return _correlation(true, simulated)[1]


def correlation_score(true: list[list[float]], simulated: list[list[float]]) -> float | None:
    """Pearson correlation over the concatenation of the records (one correlation over all tokens, not the
    mean of per-record correlations), clipped to [-1, 1]. None when undefined (see `undefined_reason`): never
    NaN, and never a number made from a NaN or an infinity."""
    return _correlation(true, simulated)[0]


def calibrated_scores(cal_true, cal_sim, valid_true, valid_sim) -> dict:
    """Fit true ~ a * simulated + b by least squares on the calibration split, then score the calibrated
    predictions on the valid split:

        r2     = 1 - mean((true - pred)^2) / mean(true^2)
        absdev = 1 - mean(|true - pred|)   / mean(|true|)

    (denominators as in the reference method, not the variance). A constant calibration simulation fits
    a = 0, b = mean(true), as ordinary least squares does. Returns {"r2", "absdev", "a", "b", "null_reason"};
    a null always comes with its reason, and no value is NaN or infinite.
    """
    ct, cs, vt, vs = _flat(cal_true), _flat(cal_sim), _flat(valid_true), _flat(valid_sim)
    if ct.size != cs.size or vt.size != vs.size:
        raise ValueError(f"true and simulated differ in length (calibration {ct.size} vs {cs.size}, "
                         f"valid {vt.size} vs {vs.size})")
    out: dict = {"r2": None, "absdev": None, "a": None, "b": None, "null_reason": None}
    for name, arr, what, code in (
            ("calibration", ct, "calibration true activations", NON_FINITE_ACTIVATIONS),
            ("calibration simulated", cs, "calibration simulated values", NON_FINITE_SIMULATION),
            ("valid", vt, "valid true activations", NON_FINITE_ACTIVATIONS),
            ("valid simulated", vs, "valid simulated values", NON_FINITE_SIMULATION)):
        if arr.size == 0:
            out["null_reason"] = f"no {name} tokens"
            return out
        if reason := non_finite_reason(arr, what, code):
            out["null_reason"] = reason
            return out
    with np.errstate(over="ignore", invalid="ignore"):
        var_s = float(np.mean((cs - cs.mean()) ** 2))
        if var_s == 0.0:
            a, b = 0.0, float(ct.mean())
        else:
            a = float(np.mean((cs - cs.mean()) * (ct - ct.mean()))) / var_s
            b = float(ct.mean()) - a * float(cs.mean())
        if not (math.isfinite(a) and math.isfinite(b)):
            out["null_reason"] = "the calibration fit overflows double precision (values too large)"
            return out
        out["a"], out["b"] = a, b
        pred = a * vs + b
        mean_sq, mean_abs = float(np.mean(vt ** 2)), float(np.mean(np.abs(vt)))
        r2 = 1.0 - float(np.mean((vt - pred) ** 2)) / mean_sq if mean_sq != 0.0 else None
        absdev = 1.0 - float(np.mean(np.abs(vt - pred))) / mean_abs if mean_abs != 0.0 else None
    reasons = []
    for name, value, denominator in (("r2", r2, "mean(true^2)"), ("absdev", absdev, "mean(|true|)")):
        if value is None:
            reasons.append(f"{name}: valid true activations are all 0")
        elif not math.isfinite(value):
            reasons.append(f"{name}: overflows double precision ({denominator} or the error is too large)")
        else:
            out[name] = value
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


def f1_score(labels: Sequence[int], predictions: Sequence[int]) -> float | None:
    """2 TP / (2 TP + FP + FN) with 1 as the positive class; None when there is no positive label or answer."""
    tp = sum(1 for y, p in zip(labels, predictions, strict=True) if y and p)
    wrong = sum(1 for y, p in zip(labels, predictions, strict=True) if bool(y) != bool(p))
    return 2 * tp / (2 * tp + wrong) if 2 * tp + wrong else None


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half); None without
    both classes or with NaN scores."""
    pos = [s for y, s in zip(labels, scores, strict=True) if y]
    neg = [s for y, s in zip(labels, scores, strict=True) if not y]
    if not pos or not neg or any(math.isnan(s) for s in (*pos, *neg)):
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))
