"""bench/cost.py's arithmetic: the rank correlation that decides whether a cheaper simulation schedule agrees
with one record per call, the prompt-cache count, and the choice of schedule behind its last line."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.cost import average_ranks, cheapest_agreeing, rank_correlation, shared_prefix_tokens

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_benchmark_leaves_the_torch_kernels_alone():
    # the bench pins ATEN_CPU_CAPABILITY only when it runs as a script: imported (as here), it must not choose
    # the kernels of whatever loads torch afterwards in the same process
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", "import os, bench.cost; print(os.environ.get('ATEN_CPU_CAPABILITY'))"],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"


def test_ties_share_the_mean_of_their_ranks():
    assert average_ranks([5.0, 1.0, 5.0, 3.0]) == [3.5, 1.0, 3.5, 2.0]
    assert average_ranks([2.0, 2.0, 2.0]) == [2.0, 2.0, 2.0]


def test_rank_correlation_by_hand():
    # ranks of b: 1, 3, 2, 4; sum of squared rank differences 2; rho = 1 - 6 * 2 / (4 * (16 - 1)) = 0.8
    rho, dropped = rank_correlation([0.1, 0.2, 0.3, 0.4], [-0.5, 0.9, 0.2, 1.0])
    assert rho == pytest.approx(0.8) and dropped == 0


def test_rank_correlation_leaves_out_pairs_with_a_null_and_counts_them():
    rho, dropped = rank_correlation([0.1, None, 0.3, 0.2, 0.0], [0.5, 0.7, None, 0.6, 0.1])
    assert rho == pytest.approx(1.0) and dropped == 2
    assert rank_correlation([0.1, None], [None, 0.2]) == (None, 2)
    assert rank_correlation([0.1, 0.2, 0.3], [0.5, 0.5, 0.5]) == (None, 0)  # one side constant: undefined


@given(st.lists(st.integers(-30, 30), min_size=3, max_size=30, unique=True))
def test_rank_correlation_sees_only_the_order(xs):
    # a strictly increasing (and far from linear) transform keeps every rank; reversing the order flips the sign
    assert rank_correlation(xs, [math.exp(x) for x in xs])[0] == pytest.approx(1.0)
    assert rank_correlation(xs, [-x for x in xs])[0] == pytest.approx(-1.0)


def test_shared_prefix_tokens_by_hand():
    # 0 (first), 2 with [1, 2, 3], 0, 3 with [1, 2, 3] (longer than the 2 shared with [1, 2, 4])
    assert shared_prefix_tokens([[1, 2, 3], [1, 2, 4], [5], [1, 2, 3, 9]]) == 5
    assert shared_prefix_tokens([[7, 7], [7, 7]]) == 2


@given(st.lists(st.lists(st.integers(0, 2), max_size=6), max_size=12))
def test_shared_prefix_tokens_is_the_longest_prefix_shared_with_any_earlier_prompt(prompts):
    def common(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    expected = sum(max((common(p, q) for q in prompts[:i]), default=0) for i, p in enumerate(prompts))
    assert shared_prefix_tokens(prompts) == expected


def test_the_cheapest_schedule_that_keeps_the_rank_correlation_wins():
    tokens = {1: 9000.0, 5: 3000.0, 10: 2000.0}
    assert cheapest_agreeing(tokens, {1: 1.0, 5: 0.95, 10: 0.85}) == 5
    assert cheapest_agreeing(tokens, {1: 1.0, 5: 0.9, 10: 0.91}) == 10
    assert cheapest_agreeing(tokens, {1: 1.0, 5: 0.89, 10: None}) == 1  # none agrees: one record per call
