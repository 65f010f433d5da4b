"""Whether a difference of precision between configurations is real: the mean of each with
its 95% confidence interval (Student t), and the difference of a configuration from a
baseline with its interval, paired by seed where both ran the same seeds (paired t), else
Welch's t; and how many seeds would show the observed difference (5% level, 80% power)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Literal

CONFIDENCE = 0.95
POWER = 0.8


def t_quantile(df: float) -> float:
    """Student t's two-sided CONFIDENCE quantile at `df` degrees of freedom (real for
    Welch's)."""
    # Imported here: scipy.stats takes a second to import, and only reports need it (every
    # run's start imports the report's module through the sweep callback).
    from scipy.stats import t

    return float(t.ppf((1 + CONFIDENCE) / 2, df))


def _z(probability: float) -> float:
    return statistics.NormalDist().inv_cdf(probability)


@dataclass(frozen=True)
class Spread:
    """n values' mean, sample std and the CONFIDENCE interval of the mean (nan where
    n < 2: one value gives no spread)."""

    n: int
    mean: float
    std: float
    low: float
    high: float


def spread(values: list[float]) -> Spread:
    known = [value for value in values if not math.isnan(value)]
    if len(known) < 2:
        mean = known[0] if known else math.nan
        return Spread(len(known), mean, math.nan, math.nan, math.nan)
    mean, std = statistics.mean(known), statistics.stdev(known)
    half = t_quantile(len(known) - 1) * std / math.sqrt(len(known))
    return Spread(len(known), mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """A configuration's mean minus the baseline's, with its CONFIDENCE interval."""

    test: Literal["paired", "Welch"]
    n: int  # the configuration's runs (pairs, where paired)
    n_baseline: int
    difference: float
    low: float
    high: float
    sd: float  # paired: the per-seed differences' std; Welch: the pooled std of both
    seeds_needed: int | None  # None: no difference observed, no number of seeds shows it

    @property
    def verdict(self) -> str:
        if self.low > 0:
            return "better"
        if self.high < 0:
            return "worse"
        runs = self.n if self.n == self.n_baseline else f"{self.n} and {self.n_baseline}"
        return f"no difference shown at n={runs}"


def compare(runs: list[tuple[str | None, float]], baseline: list[tuple[str | None, float]]
            ) -> Difference | None:
    """`runs` against `baseline`, each a list of (seed, precision) (nan: the run gave none,
    left out). Paired where both ran the same seeds, each once, else Welch's; None where
    either has fewer than two precisions."""
    runs, baseline = _known(runs), _known(baseline)
    if len(runs) < 2 or len(baseline) < 2:
        return None
    by_seed, baseline_by_seed = _by_seed(runs), _by_seed(baseline)
    if by_seed is not None and baseline_by_seed is not None and (
            by_seed.keys() == baseline_by_seed.keys()):
        return paired([by_seed[seed] for seed in baseline_by_seed],
                      list(baseline_by_seed.values()))
    return welch([value for _, value in runs], [value for _, value in baseline])


def _by_seed(runs: list[tuple[str | None, float]]) -> dict[str, float] | None:
    """Precision by seed; None where a run has no seed or a seed ran twice (no pairs)."""
    seeds = [seed for seed, _ in runs]
    if None in seeds or len(set(seeds)) < len(seeds):
        return None
    return dict(runs)  # type: ignore[arg-type]  # no seed is None here


def _known(runs: list[tuple[str | None, float]]) -> list[tuple[str | None, float]]:
    return [(seed, value) for seed, value in runs if not math.isnan(value)]


def paired(runs: list[float], baseline: list[float]) -> Difference:
    """Paired t on the per-seed differences (runs[i] and baseline[i] of the same seed)."""
    differences = [a - b for a, b in zip(runs, baseline, strict=True)]
    n = len(differences)
    mean, sd = statistics.mean(differences), statistics.stdev(differences)
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Difference("paired", n, n, mean, mean - half, mean + half, sd,
                      seeds_needed(mean, sd, paired=True))


def welch(runs: list[float], baseline: list[float]) -> Difference:
    """Welch's t: unequal variances and unequal numbers of runs allowed."""
    n_a, n_b = len(runs), len(baseline)
    var_a, var_b = statistics.variance(runs) / n_a, statistics.variance(baseline) / n_b
    mean = statistics.mean(runs) - statistics.mean(baseline)
    se = math.sqrt(var_a + var_b)
    # Welch-Satterthwaite degrees of freedom; no spread at all leaves the interval a point.
    half = 0.0
    if se > 0:
        df = (var_a + var_b) ** 2 / (var_a**2 / (n_a - 1) + var_b**2 / (n_b - 1))
        half = t_quantile(df) * se
    pooled = math.sqrt((statistics.variance(runs) + statistics.variance(baseline)) / 2)
    return Difference("Welch", n_a, n_b, mean, mean - half, mean + half, pooled,
                      seeds_needed(mean, pooled, paired=False))


def seeds_needed(difference: float, sd: float, paired: bool) -> int | None:
    """Seeds (per configuration) that would show `difference` at the 5% level (two-sided)
    with 80% power, normal approximation: ((z_0.975 + z_0.8) * sd / difference)^2, paired
    (sd of the per-seed differences), twice that unpaired (sd of each configuration's
    runs); rounded up, at least 2 (a std needs two). None where the difference is 0."""
    if difference == 0 or math.isnan(difference) or math.isnan(sd):
        return None
    z = _z((1 + CONFIDENCE) / 2) + _z(POWER)
    needed = (z * sd / difference) ** 2 * (1 if paired else 2)
    return max(2, math.ceil(needed - 1e-9))  # 1e-9: a float error must not add a seed
