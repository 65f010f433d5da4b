"""The statistics of a sweep's comparisons, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from cifar_exp.tracking.comparison import compare, paired, seeds_needed, spread, welch

# Student t's 0.975 quantiles from a printed table, by degrees of freedom.
T_TABLE = {1: 12.7062, 2: 4.3027, 4: 2.7764, 5: 2.5706, 6: 2.4469}
Z_SUM = 1.959964 + 0.841621  # z_0.975 + z_0.8


def test_the_mean_of_a_configuration_gets_a_student_t_interval():
    found = spread([0.5, 0.7, 0.6, math.nan])  # nan: a run that gave no precision
    half = T_TABLE[2] * 0.1 / math.sqrt(3)
    assert (found.n, found.mean, found.std) == (3, pytest.approx(0.6), pytest.approx(0.1))
    assert (found.low, found.high) == (pytest.approx(0.6 - half, abs=1e-4),
                                       pytest.approx(0.6 + half, abs=1e-4))
    alone = spread([0.5])
    assert alone.mean == 0.5 and math.isnan(alone.std) and math.isnan(alone.low)


def test_paired_t_on_five_seeds():
    # Per-seed differences 0.03 0.02 0.01 0.03 0.02: mean 0.022, sd sqrt(0.00007).
    found = paired([0.63, 0.64, 0.62, 0.66, 0.61], [0.60, 0.62, 0.61, 0.63, 0.59])
    sd = math.sqrt(0.00007)
    half = T_TABLE[4] * sd / math.sqrt(5)  # 0.010388
    assert found.test == "paired" and found.n == 5
    assert found.difference == pytest.approx(0.022)
    assert found.sd == pytest.approx(sd)
    assert found.low == pytest.approx(0.022 - half, abs=1e-5)
    assert found.high == pytest.approx(0.022 + half, abs=1e-5)
    assert found.verdict == "better"


def test_welch_with_unequal_numbers_of_runs():
    # Means 0.72 (n=3, variance 0.0004) and 0.62 (n=5, variance 0.001): the standard error
    # is sqrt(0.0004/3 + 0.001/5), and Welch-Satterthwaite gives 100/17 = 5.88 degrees of
    # freedom, whose quantile lies between the table's for 5 and 6.
    found = welch([0.70, 0.72, 0.74], [0.60, 0.64, 0.62, 0.66, 0.58])
    se = math.sqrt(0.0004 / 3 + 0.001 / 5)
    assert found.test == "Welch" and (found.n, found.n_baseline) == (3, 5)
    assert found.difference == pytest.approx(0.1)
    quantile = (found.high - found.difference) / se
    assert T_TABLE[6] < quantile < T_TABLE[5]
    assert quantile == pytest.approx(2.4588, abs=1e-3)  # interpolated in 1/df: 2.4593
    assert found.verdict == "better"
    assert found.sd == pytest.approx(math.sqrt((0.0004 + 0.001) / 2))


def test_welch_with_equal_variances_and_n_has_2n_minus_2_degrees_of_freedom():
    found = welch([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    half = T_TABLE[4] * math.sqrt(2 / 3)
    assert (found.low, found.high) == (pytest.approx(-1 - half, abs=1e-3),
                                       pytest.approx(-1 + half, abs=1e-3))
    assert found.verdict == "no difference shown at n=3"


def test_seeds_needed_for_80_percent_power_at_the_5_percent_level():
    # A difference of half a std: 2 * (2.8016 / 0.5)^2 = 62.8 seeds each, the textbook 63.
    assert seeds_needed(0.01, 0.02, paired=False) == 63
    assert seeds_needed(-0.01, 0.02, paired=True) == math.ceil((Z_SUM * 2) ** 2) == 32
    assert seeds_needed(0.1, 0.001, paired=True) == 2  # never fewer than a std needs
    assert seeds_needed(0.0, 0.02, paired=True) is None  # no difference: no number shows it


def test_compare_pairs_by_seed_only_where_both_ran_the_same_seeds():
    base = [("0", 0.60), ("1", 0.62), ("2", 0.61)]
    same_seeds = compare([("2", 0.64), ("0", 0.62), ("1", 0.63)], base)
    assert same_seeds.test == "paired"
    assert same_seeds.difference == pytest.approx((0.02 + 0.01 + 0.03) / 3)
    assert compare([("0", 0.62), ("1", 0.63), ("3", 0.64)], base).test == "Welch"
    assert compare([("0", 0.62), ("0", 0.63), ("1", 0.64)], base).test == "Welch"
    # A run without a precision leaves its seed out, and with it the pairing.
    assert compare([("0", 0.62), ("1", 0.63), ("2", math.nan)], base).test == "Welch"
    assert compare([("0", 0.62), ("1", math.nan)], base) is None  # one run: nothing to say


def test_the_verdict_says_worse_and_names_unequal_n():
    worse = welch([0.50, 0.51, 0.52], [0.60, 0.61, 0.62, 0.63])
    assert worse.verdict == "worse"
    unclear = welch([0.50, 0.70, 0.60], [0.60, 0.55, 0.65, 0.62])
    assert unclear.verdict == "no difference shown at n=3 and 4"
