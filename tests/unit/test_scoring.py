"""The method's pure functions, pinned by hand-worked numbers (SPEC.md §2, §3, §5, §6)."""
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from workers.method.scoring import (balanced_accuracy, calibrated_scores, correlation_score, expected_value,
                             normalize_activations, roc_auc, split_records, undefined_reason)

# --- normalize_activations (SPEC §3) ---------------------------------------------------------------------


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


# --- split_records (SPEC §2) -----------------------------------------------------------------------------
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


# --- expected_value (SPEC §5) ----------------------------------------------------------------------------
def test_expected_value_renormalizes_over_numeric_tokens_only():
    top = {"unknown": math.log(0.5), "3": math.log(0.125), "7": math.log(0.125), "the": math.log(0.25)}
    assert expected_value(top) == pytest.approx(5.0)


def test_expected_value_hand_worked():
    # p(0) = 0.5, p(10) = 0.3, p(4) = 0.2 -> 0 + 3 + 0.8 = 3.8
    assert expected_value({"0": math.log(0.5), "10": math.log(0.3), "4": math.log(0.2)}) == pytest.approx(3.8)


def test_tokens_with_surrounding_whitespace_count_but_others_do_not():
    top = {" 5": math.log(0.4), "\t10": math.log(0.4), "11": 0.0, "-1": 0.0, "05": 0.0, "5.": 0.0, "1 0": 0.0}
    assert expected_value(top) == pytest.approx(7.5)


def test_no_numeric_token_predicts_zero():
    assert expected_value({"unknown": -0.1, "x": -3.0}) == 0.0
    assert expected_value({}) == 0.0


def test_all_numeric_probabilities_underflowing_is_nan():
    assert math.isnan(expected_value({"3": -1000.0, "4": -2000.0, "word": -0.01}))


def test_one_surviving_probability_is_enough():
    assert expected_value({"3": -1000.0, "6": -700.0}) == pytest.approx(6.0)


# --- correlation_score (SPEC §6) -------------------------------------------------------------------------
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
    ([[0, 1, 2]], [[0, float("nan"), 1]], "NaN in simulated values"),
    ([[0, float("nan"), 2]], [[0, 1, 1]], "NaN in true activations"),
])
def test_undefined_correlation_is_none_with_a_reason(true, sim, reason):
    assert correlation_score(true, sim) is None
    assert undefined_reason(true, sim).startswith(reason)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
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


# --- calibrated_scores (SPEC §6) -------------------------------------------------------------------------
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
    assert calibrated_scores([[0, 1]], [[0, float("nan")]], [[1, 2]], [[1, 2]])["r2"] is None
    assert calibrated_scores([], [], [[1, 2]], [[1, 2]])["null_reason"] == "no calibration tokens"


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
