"""The method's pure functions, pinned by hand-worked numbers (docs/method.md §2, §3, §5, §6)."""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from workers.method.scoring import (
    balanced_accuracy,
    calibrated_scores,
    correlation_score,
    expected_value,
    normalize_activations,
    roc_auc,
    split_records,
    undefined_reason,
    value_probabilities,
)

LN = math.log

# --- normalize_activations (docs/method.md §3) ---------------------------------------------------------------------


def test_operation_order_case_from_the_spec():
    # (10 * 1.77) / 2.95 = 5.999999999999999 in double precision -> 5; 1.77 / 2.95 * 10 would give 6
    assert normalize_activations([[1.77, 2.95]]) == [[5, 10]]


def test_max_is_taken_over_all_records_together():
    assert normalize_activations([[1.0, 2.0], [4.0]]) == [[2, 5], [10]]


def test_negative_activations_show_as_zero():
    assert normalize_activations([[-3.0, 0.5, 1.0, -0.1]]) == [[0, 5, 10, 0]]


def test_all_negative_or_zero_gives_all_zero():
    assert normalize_activations([[-1.0, -2.0], [0.0]]) == [[0, 0], [0]]


def test_constant_positive_is_all_ten():
    assert normalize_activations([[2.5, 2.5, 2.5]]) == [[10, 10, 10]]


def test_nan_counts_as_zero_and_empty_records_survive():
    assert normalize_activations([[float("nan"), 2.0], []]) == [[0, 10], []]


def test_infinities_show_as_zero_and_stay_out_of_the_max():
    # an inf used to become the max: (10 * 2) / inf = 0 and inf / inf = NaN, which floor() cannot convert
    inf = float("inf")
    assert normalize_activations([[inf, 1.0, 2.0], [-inf]]) == [[0, 5, 10], [0]]
    assert normalize_activations([[inf, -1.0]]) == [[0, 0]]


@given(st.lists(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8), min_size=1, max_size=4))
def test_normalized_values_are_integers_0_to_10_and_monotone(records):
    out = normalize_activations(records)
    flat_in = [x for r in records for x in r]
    flat_out = [v for r in out for v in r]
    assert all(isinstance(v, int) and 0 <= v <= 10 for v in flat_out)
    for (x, vx) in zip(flat_in, flat_out):
        for (y, vy) in zip(flat_in, flat_out):
            if x <= y:
                assert vx <= vy
    if max(flat_in) > 0:  # the max itself maps to 10, or to 9 where (10 * m) / m rounds below 10
        assert max(flat_out) in (9, 10)


def test_the_spec_order_can_put_the_max_itself_at_9():
    # (10 * m) / m is 9.999... for this m in double precision; the spec's order (and the reference's) keeps it
    m = 838860.9566394486
    assert (10.0 * m) / m < 10
    assert normalize_activations([[m]]) == [[9]]


# --- split_records (docs/method.md §2) -----------------------------------------------------------------------------
def _ranked(kind, n):
    return [f"{kind}{r}" for r in range(n)]


def test_splits_follow_the_round_robin_of_the_spec():
    s = split_records(_ranked("t", 20), _ranked("r", 15), 5)
    assert s["train"] == ["t0", "t4", "t8", "t12", "t16"]
    assert s["calibration"] == ["t1", "t5", "t9", "t13", "t17", "r0", "r3", "r6", "r9", "r12"]
    assert s["valid"] == ["t2", "t6", "t10", "t14", "t18", "r1", "r4", "r7", "r10", "r13"]
    assert s["test"] == ["t3", "t7", "t11", "t15", "t19", "r2", "r5", "r8", "r11", "r14"]


def test_each_split_keeps_its_first_n_records():
    s = split_records(_ranked("t", 30), _ranked("r", 20), 2)
    assert s["train"] == ["t0", "t4"]
    assert s["valid"] == ["t2", "t6", "r1", "r4"]


def test_no_random_records_is_allowed():
    s = split_records(_ranked("t", 8), [], 2)
    assert s["calibration"] == ["t1", "t5"] and s["test"] == ["t3", "t7"]


@pytest.mark.parametrize("n_top,n_random", [(19, 15), (20, 14), (3, 0)])
def test_too_few_records_is_an_error_naming_the_counts(n_top, n_random):
    with pytest.raises(ValueError) as e:
        split_records(_ranked("t", n_top), _ranked("r", n_random), 5)
    assert f"{n_top} top" in str(e.value) and f"{n_random} random" in str(e.value)
    assert "20 top" in str(e.value) and "15 random" in str(e.value)


# --- expected_value (docs/method.md §5) ----------------------------------------------------------------------------
def test_expected_value_renormalizes_over_numeric_tokens_only():
    top = {"unknown": math.log(0.5), "3": math.log(0.125), "7": math.log(0.125), "the": math.log(0.25)}
    assert expected_value(top) == pytest.approx(5.0)


def test_expected_value_hand_worked():
    # p(0) = 0.5, p(10) = 0.3, p(4) = 0.2 -> 0 + 3 + 0.8 = 3.8
    assert expected_value({"0": math.log(0.5), "10": math.log(0.3), "4": math.log(0.2)}) == pytest.approx(3.8)


def test_only_exact_value_strings_count_by_default():
    # the contract: exactly "0".."10"; " 5" and "\t10" are other tokens, so only "2" and "4" count here
    top = {" 5": math.log(0.4), "\t10": math.log(0.4), "2": math.log(0.1), "4": math.log(0.1), "11": 0.0,
           "-1": 0.0, "05": 0.0, "5.": 0.0, "1 0": 0.0}
    assert expected_value(top) == pytest.approx(3.0)


def test_spaced_digits_is_an_opt_in_that_strips_whitespace():
    top = {" 5": math.log(0.4), "\t10": math.log(0.4), "11": 0.0, "-1": 0.0, "05": 0.0, "5.": 0.0, "1 0": 0.0}
    assert expected_value(top, spaced=True) == pytest.approx(7.5)
    assert expected_value(top) == 0.0  # none of them is exactly a value string


def test_no_numeric_token_predicts_zero():
    assert expected_value({"unknown": -0.1, "x": -3.0}) == 0.0
    assert expected_value({}) == 0.0


def test_all_numeric_probabilities_underflowing_is_nan():
    assert math.isnan(expected_value({"3": -1000.0, "4": -2000.0, "word": -0.01}))


def test_one_surviving_probability_is_enough():
    assert expected_value({"3": -1000.0, "6": -700.0}) == pytest.approx(6.0)


def test_a_nan_logprob_among_the_values_is_nan_and_a_tiny_positive_one_is_probability_one():
    assert math.isnan(expected_value({"3": float("nan"), "6": -0.1}))
    assert expected_value({"4": 1e-9, "x": -3.0}) == pytest.approx(4.0)


# --- "10" written as "1" + "0" (docs/method.md §5) -------------------------------------------------------
def test_the_mass_of_1_is_split_by_the_distribution_after_it():
    # P("0") .5, P("1") .4, then after "1": "0" .75, "\n" .25 -> P(10) = .3, P(1) = .1; total .9
    top = {"0": LN(0.5), "1": LN(0.4), "unknown": LN(0.1)}
    after_one = {"0": LN(0.75), "\n": LN(0.25)}
    assert value_probabilities(top, after_one) == {0: pytest.approx(0.5), 10: pytest.approx(0.3),
                                                   1: pytest.approx(0.1)}
    assert expected_value(top, after_one) == pytest.approx(3.1 / 0.9)
    assert expected_value(top) == pytest.approx(0.4 / 0.9)  # the first token alone reads every 10 as 1


def test_1_followed_by_another_digit_is_no_value_and_is_dropped():
    # after "1": "0" .5, "5" .25 (15: no value), "\n" .25 -> P(10) = .2, P(1) = .1; total .5 + .2 + .1 = .8
    top = {"0": LN(0.5), "1": LN(0.4)}
    assert expected_value(top, {"0": LN(0.5), "5": LN(0.25), "\n": LN(0.25)}) == pytest.approx(2.1 / 0.8)


def test_mass_outside_the_continuations_top_k_counts_as_not_a_digit():
    # after "1" only "0" .6 is known: P(10) = .24, P(1) = .4 * (1 - .6) = .16; total .9
    top = {"0": LN(0.5), "1": LN(0.4)}
    assert expected_value(top, {"0": LN(0.6)}) == pytest.approx(2.56 / 0.9)


def test_a_whole_10_token_and_a_spaced_1_are_not_split():
    # "10" is 10 directly; " 1" (spaced_digits) counts as 1: only the exact token "1" has a continuation
    top = {"10": LN(0.2), "1": LN(0.2), " 1": LN(0.2)}
    assert expected_value(top, {"0": LN(0.5), "\n": LN(0.5)}, spaced=True) == pytest.approx(
        (10 * 0.2 + 10 * 0.1 + 1 * 0.1 + 1 * 0.2) / 0.6)


_planted = st.lists(st.floats(0.0, 1.0), min_size=12, max_size=12).filter(lambda ps: sum(ps[:11]) > 1e-3)


@settings(max_examples=80, deadline=None)
@given(_planted, st.floats(0.0, 1.0))
def test_the_same_planted_distribution_gives_the_same_value_whole_or_split(ps, teen):
    """p(0..10) and some non-numeric mass, written with "10" as one token or as "1" + "0" (with part of the
    "1" continuation going to 11..19 in the split writing, which is no value): the same expected value."""
    norm = sum(ps) + teen * (ps[1] + ps[10])  # probabilities: the teens' share comes on top in the split writing
    values, other = [p / norm for p in ps[:11]], ps[11] / norm
    whole = {str(v): math.log(p) for v, p in enumerate(values) if p > 0}
    if other > 0:
        whole["unknown"] = math.log(other)
    ones = values[1] + values[10]
    # the split writing: "1" carries P(1) + P(10) (+ the teens' share); after it "0" -> 10, "\n" -> 1
    teens = teen * ones
    split = {k: v for k, v in whole.items() if k not in ("1", "10")}
    if ones + teens > 0:
        split["1"] = math.log(ones + teens)
    after = {t: math.log(p / (ones + teens)) for t, p in (("0", values[10]), ("\n", values[1]), ("3", teens))
             if p > 0} if ones + teens > 0 else {}
    expected = sum(v * p for v, p in enumerate(values)) / sum(values)
    assert expected_value(whole) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert expected_value(split, after) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert 0.0 <= expected_value(split, after) <= 10.0


# --- correlation_score (docs/method.md §6) -------------------------------------------------------------------------
def test_correlation_hand_worked():
    # deviations t: [-1, 0, 1], s: [-4/3, -1/3, 5/3]; cov 3, var 2 and 42/9 -> 9 / sqrt(84)
    assert correlation_score([[1, 2, 3]], [[1, 2, 4]]) == pytest.approx(9 / math.sqrt(84))


def test_correlation_is_over_the_concatenation_not_the_mean_of_records():
    true, sim = [[0, 1], [10, 11]], [[0, 1], [2, 3]]
    per_record = [correlation_score([t], [s]) for t, s in zip(true, sim)]
    assert per_record == [pytest.approx(1.0), pytest.approx(1.0)]
    assert correlation_score(true, sim) == pytest.approx(21 / math.sqrt(505))  # 0.934..., not 1.0


def test_negative_activations_are_used_raw():
    assert correlation_score([[-2.0, -1.0, 0.0]], [[0.0, 5.0, 10.0]]) == pytest.approx(1.0)


@pytest.mark.parametrize("true,sim,reason", [
    ([[1, 1, 1]], [[0, 5, 10]], "constant true activations"),
    ([[0, 1, 2]], [[3, 3, 3]], "constant simulated values"),
    ([[1.0]], [[2.0]], "a single token"),
    ([], [], "no records"),
    ([[0, 1, 2]], [[0, float("nan"), 1]], "non_finite_simulation (1 of 3 simulated values are NaN or infinite)"),
    ([[0, float("nan"), 2]], [[0, 1, 1]], "non_finite_activations (1 of 3 true activations are NaN or infinite)"),
    ([[0, 1, float("inf")]], [[10, 5, 0]], "non_finite_activations"),
    ([[0, 1, 2]], [[0, float("-inf"), 1]], "non_finite_simulation"),
])
def test_undefined_correlation_is_none_with_a_reason(true, sim, reason):
    assert correlation_score(true, sim) is None
    assert undefined_reason(true, sim).startswith(reason)


def test_an_infinity_never_reads_as_a_perfect_correlation():
    # the simulation is anti-correlated; inf - mean(inf) is NaN, and clamping a NaN into [-1, 1] gave 1.0
    assert correlation_score([[0.0, 1.0, float("inf")]], [[10.0, 5.0, 0.0]]) is None


def test_huge_finite_activations_still_correlate():
    # t = [1e200, -1e200, 0] (deviations overflow when squared unscaled); s = [1, 2, 3]: r = -1e200 / 2e200
    assert correlation_score([[1e200, -1e200, 0.0]], [[1.0, 2.0, 3.0]]) == pytest.approx(-0.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match=r"differ in shape \(\[3\] vs \[2\] tokens\)"):
        correlation_score([[1, 2, 3]], [[1, 2]])


_series = st.lists(st.floats(-100, 100, allow_nan=False), min_size=3, max_size=20)


@settings(max_examples=60, deadline=None)
@given(_series, st.data(), st.floats(0.01, 50), st.floats(-50, 50), st.booleans())
def test_correlation_invariant_under_positive_affine_maps_of_either_side(true, data, a, b, map_true):
    sim = data.draw(st.lists(st.floats(-100, 100, allow_nan=False), min_size=len(true), max_size=len(true)))
    assume(max(true) - min(true) > 1e-3 and max(sim) - min(sim) > 1e-3)
    base = correlation_score([true], [sim])
    if map_true:
        mapped = correlation_score([[a * x + b for x in true]], [sim])
    else:
        mapped = correlation_score([true], [[a * x + b for x in sim]])
    assert mapped == pytest.approx(base, abs=1e-6)
    assert correlation_score([true], [[-x for x in sim]]) == pytest.approx(-base, abs=1e-9)
    assert correlation_score([sim], [true]) == pytest.approx(base, abs=1e-12)
    assert -1.0 <= base <= 1.0


# --- calibrated_scores (docs/method.md §6) -------------------------------------------------------------------------
def test_calibrated_scores_hand_worked():
    # calibration fit: true = 2 * sim + 0; valid predictions [2, 6] against true [2, 4]
    out = calibrated_scores([[0, 2, 4]], [[0, 1, 2]], [[2, 4]], [[1, 3]])
    assert (out["a"], out["b"]) == (pytest.approx(2.0), pytest.approx(0.0))
    assert out["r2"] == pytest.approx(1 - 2 / 10)  # mean sq err 2, mean(true^2) 10 (not the variance)
    assert out["absdev"] == pytest.approx(1 - 1 / 3)  # mean abs err 1, mean(|true|) 3
    assert out["null_reason"] is None


def test_constant_calibration_simulation_fits_the_mean():
    out = calibrated_scores([[1, 2, 3]], [[5, 5, 5]], [[2, 4]], [[0, 9]])
    assert (out["a"], out["b"]) == (0.0, pytest.approx(2.0))
    assert out["r2"] == pytest.approx(0.8) and out["absdev"] == pytest.approx(2 / 3)


def test_calibrated_scores_undefined_when_valid_true_is_all_zero():
    out = calibrated_scores([[0, 2, 4]], [[0, 1, 2]], [[0, 0]], [[1, 3]])
    assert out["r2"] is None and out["absdev"] is None
    assert "r2" in out["null_reason"] and "absdev" in out["null_reason"]


def test_calibrated_scores_undefined_with_nan_or_no_tokens():
    out = calibrated_scores([[0, 1]], [[0, float("nan")]], [[1, 2]], [[1, 2]])
    assert (out["r2"], out["absdev"], out["a"], out["b"]) == (None, None, None, None)
    assert out["null_reason"] == "non_finite_simulation (1 of 2 calibration simulated values are NaN or infinite)"
    assert calibrated_scores([], [], [[1, 2]], [[1, 2]])["null_reason"] == "no calibration tokens"


@pytest.mark.parametrize("where", range(4))
def test_calibrated_scores_with_an_infinity_anywhere_are_null_with_a_reason(where):
    args = [[[0.0, 1.0, 2.0]], [[0.0, 1.0, 2.0]], [[1.0, 2.0]], [[1.0, 2.0]]]
    args[where][0][0] = float("inf")
    out = calibrated_scores(*args)
    assert out["r2"] is None and out["absdev"] is None
    assert out["null_reason"].startswith("non_finite_activations" if where % 2 == 0 else "non_finite_simulation")


def test_a_calibrated_score_that_overflows_is_null_with_a_reason_not_nan():
    # fit true = -5e199 * sim + 1e200 is finite, but mean(true^2) over [1e200, 1] overflows to inf
    out = calibrated_scores([[1e200, -1e200, 0.0]], [[1.0, 2.0, 3.0]], [[1e200, 1.0]], [[1.0, 2.0]])
    assert out["r2"] is None and out["null_reason"].startswith("r2: overflows double precision")
    assert out["absdev"] == pytest.approx(0.5)  # mean|err| = (0 + 1e200 - 1) / 2, mean|true| = 1e200 / 2


@settings(max_examples=40, deadline=None)
@given(_series, st.floats(0.1, 10), st.floats(-10, 10))
def test_a_perfect_affine_simulation_calibrates_to_r2_one(true, a, b):
    assume(max(true) - min(true) > 1e-3 and any(abs(x) > 1e-3 for x in true))
    sim = [(x - b) / a for x in true]
    out = calibrated_scores([true], [sim], [true], [sim])
    assert out["r2"] == pytest.approx(1.0, abs=1e-6) and out["absdev"] == pytest.approx(1.0, abs=1e-6)


# --- balanced accuracy and AUC ---------------------------------------------------------------------------
def test_balanced_accuracy_hand_worked():
    # positives: 2 of 3 right; negatives: 1 of 1 right -> (2/3 + 1) / 2
    assert balanced_accuracy([1, 1, 1, 0], [1, 1, 0, 0]) == pytest.approx(5 / 6)
    assert balanced_accuracy([1, 1], [1, 0]) is None


def test_auc_hand_worked_with_ties():
    # pairs (pos, neg): (0.9,0.1) win, (0.9,0.5) win, (0.5,0.1) win, (0.5,0.5) tie -> 3.5 / 4
    assert roc_auc([1, 1, 0, 0], [0.9, 0.5, 0.1, 0.5]) == pytest.approx(0.875)
    assert roc_auc([1, 1], [0.2, 0.3]) is None
