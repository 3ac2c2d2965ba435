"""Paired tests of per-image outcomes, checked against brute-force enumeration and scipy."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from scipy import stats as sps

from pipeline.stats import (
    discordant,
    mcnemar_exact,
    pack_bits,
    paired_difference,
    sign_test,
    unpack_bits,
)


@pytest.mark.parametrize("a,b", [(0, 0), (3, 0), (0, 5), (7, 3), (12, 30), (50, 49)])
def test_mcnemar_matches_scipy_binomtest(a, b):
    n = a + b
    for alt in ("two-sided", "greater", "less"):
        expected = 1.0 if n == 0 else sps.binomtest(a, n, 0.5, alternative=alt).pvalue
        assert mcnemar_exact(a, b, alt) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_one_sided_tail_by_enumeration():
    # P(only_a >= 6 | 9 discordant pairs, fair coin) by listing all 2^9 outcomes.
    count = sum(1 for flips in itertools.product((0, 1), repeat=9) if sum(flips) >= 6)
    assert mcnemar_exact(6, 3, "greater") == pytest.approx(count / 2**9)


def test_paired_difference_and_sign_test():
    rng = random.Random(1)
    a = [rng.random() < 0.6 for _ in range(500)]
    b = [rng.random() < 0.5 for _ in range(500)]
    d = paired_difference(a, b)
    assert d["diff"] == pytest.approx((sum(a) - sum(b)) / 500)
    assert d["lo"] < d["diff"] < d["hi"]
    assert (d["only_a"], d["only_b"]) == discordant(a, b)
    assert d["p"] == sign_test(a, b)
    # Identical outcomes: no difference, p = 1.
    same = paired_difference(a, a)
    assert same["diff"] == 0 and same["p"] == 1.0


def test_paired_interval_covers_at_nominal_rate():
    # The true paired difference is 0.05; the 95% interval should cover it about 95% of the time.
    rng = random.Random(2)
    covered = 0
    reps = 300
    for _ in range(reps):
        a, b = [], []
        for _ in range(400):
            u = rng.random()
            a.append(u < 0.55)
            b.append(u < 0.50 if rng.random() < 0.8 else rng.random() < 0.5)
        d = paired_difference(a, b)
        covered += d["lo"] <= 0.05 <= d["hi"]
    assert 0.88 <= covered / reps <= 0.99


def test_lengths_must_match():
    with pytest.raises(ValueError, match="equal lengths"):
        discordant([True], [True, False])


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 300])
def test_pack_round_trip(n):
    rng = random.Random(n)
    bits = [rng.random() < 0.5 for _ in range(n)]
    packed = pack_bits(bits)
    assert packed["n"] == n and len(packed["b64"]) <= 4 * math.ceil(math.ceil(n / 8) / 3)
    assert unpack_bits(packed) == bits
