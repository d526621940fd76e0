"""The statistics behind the report: bootstrap confidence intervals, expected best-of-n, robustness.

Kept free of pandas and plotting so each estimator can be checked against hand-computed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["bootstrap_ci", "expected_best_of_n", "robust_range", "robust_range_decades", "t_interval", "welch"]


def t_interval(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] | None = None
) -> tuple[float, float]:
    """Student-t confidence interval of the mean: mean +- t_{(1+c)/2, n-1} * sd / sqrt(n) (scipy.stats.t).

    With 3 seeds the percentile bootstrap can only return [min, max]; the t-interval widens with few seeds
    as it should. One value (or identical values) gives a degenerate interval; none gives (nan, nan).

    The interval is symmetric about the mean, so for a bounded quantity (a test error lies in [0, 1]) a row with
    few seeds and one outlier can reach past a bound; `bounds=(low, high)` clips the ends to the values the
    mean can take (the true mean lies within them, so clipping never drops it: the coverage is unchanged).

    >>> [round(v, 4) for v in t_interval([0.068, 0.068, 0.064])]
    [0.0609, 0.0724]
    >>> [round(v, 4) for v in t_interval([0.01, 0.01, 0.2], bounds=(0.0, 1.0))]  # unclipped: [-0.1992, 0.3458]
    [0.0, 0.3458]
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), but got {confidence}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if x.size > 1 else 0.0
    if sd == 0.0:
        return (mean, mean)
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, x.size - 1)) * sd / math.sqrt(x.size)
    low, high = mean - half, mean + half
    if bounds is not None:
        if not bounds[0] <= bounds[1]:
            raise ValueError(f"`bounds` must be (low, high) with low <= high, but got {bounds}")
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return (low, high)


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of `a` minus mean of `b` and the two-sided p-value of Welch's t-test (scipy.stats.ttest_ind).

    p is nan when either side has fewer than two values; 0 or 1 when both have zero variance (the means
    differ or not: with no spread there is no noise to be within).
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        return (math.nan, math.nan)
    diff = float(x.mean() - y.mean())
    if x.size < 2 or y.size < 2:
        return (diff, math.nan)
    if x.std() == 0.0 and y.std() == 0.0:
        return (diff, 1.0 if diff == 0.0 else 0.0)
    return (diff, float(stats.ttest_ind(x, y, equal_var=False).pvalue))


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean of `values`.

    Resamples `values` with replacement `n_resamples` times (seeded, so a report is reproducible) and returns
    the (1 - confidence)/2 and (1 + confidence)/2 percentiles of the resampled means. One value gives a
    degenerate interval at that value; no values give (nan, nan).

    >>> bootstrap_ci([0.5, 0.5])
    (0.5, 0.5)
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), but got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"`n_resamples` must be >= 1, but got {n_resamples}")
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_resamples, x.size))
    means = x[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.percentile(means, [100.0 * alpha, 100.0 * (1.0 - alpha)])
    return (float(lo), float(hi))


def expected_best_of_n(values: Sequence[float], n: int, rank_by: Sequence[float] | None = None) -> float:
    """Expected value of the best of `n` trials drawn with replacement from the observed trials.

    Dodge et al. (2019), "Show Your Work", estimate the expected best validation score of n random
    hyperparameter trials exactly from the empirical CDF. Here lower is better: with trials sorted by
    `rank_by` (default: `values` themselves) ascending, the best of n draws is trial i with probability
    ((N - i + 1)/N)^n - ((N - i)/N)^n, and the result is the sum of `values[i]` weighted by it. With
    `rank_by` = validation errors and `values` = test errors this is the expected test error of the
    configuration a tuner would pick after n trials.

    >>> expected_best_of_n([4.0, 2.0], n=1)  # one draw: the mean
    3.0
    >>> expected_best_of_n([4.0, 2.0], n=2)  # two draws miss the 2.0 with probability 1/4
    2.5
    """
    if n < 1:
        raise ValueError(f"`n` must be >= 1, but got {n}")
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    key = v if rank_by is None else np.asarray(rank_by, dtype=np.float64)
    if key.shape != v.shape:
        raise ValueError(f"`rank_by` must have one entry per value ({v.size}), but got {key.size}")
    # A stable sort keeps ties in input order; ties in `values` themselves do not change the sum.
    order = np.argsort(key, kind="stable")
    total = v.size
    worse_or_equal = (total - np.arange(total)) / total  # P(one draw is not better than the i-th best)
    strictly_worse = (total - np.arange(1, total + 1)) / total
    weights = worse_or_equal**n - strictly_worse**n
    return float(np.dot(weights, v[order]))


def robust_range_decades(
    step_sizes: Sequence[float], errors: Sequence[float], reference: float, tolerance: float
) -> tuple[float, int]:
    """(decades, points) of `robust_range`: the widest contiguous run of step sizes within tolerance."""
    decades, n, _, _ = robust_range(step_sizes, errors, reference, tolerance)
    return decades, n


def robust_range(
    step_sizes: Sequence[float], errors: Sequence[float], reference: float, tolerance: float
) -> tuple[float, int, float, float]:
    """Widest contiguous range of initial step sizes, in decades, whose error is within `tolerance` of `reference`.

    The grid points are sorted by step size; a point qualifies when its (mean) error is <= reference +
    tolerance. Returns (log10(largest / smallest) over the longest run of neighbouring qualifying points,
    number of points in that run, its smallest and largest step size). No qualifying point gives
    (nan, 0, nan, nan); a single one gives (0.0, 1, s, s): the figure is measured between grid points, so it
    is a lower bound of the true range.

    >>> robust_range([1e-3, 1e-2, 1e-1, 1.0], [0.3, 0.1, 0.12, 0.6], reference=0.1, tolerance=0.02)
    (1.0, 2, 0.01, 0.1)
    """
    s = np.asarray(step_sizes, dtype=np.float64)
    e = np.asarray(errors, dtype=np.float64)
    if s.shape != e.shape:
        raise ValueError(f"`errors` must have one entry per step size ({s.size}), but got {e.size}")
    if np.any(s <= 0):
        raise ValueError(f"`step_sizes` must be positive, but got {s[s <= 0].tolist()}")
    order = np.argsort(s, kind="stable")
    s, e = s[order], e[order]
    # NaN errors (no finite result) never qualify.
    ok = np.nan_to_num(e, nan=np.inf) <= reference + tolerance
    best: tuple[float, int, float, float] = (math.nan, 0, math.nan, math.nan)
    i = 0
    while i < s.size:
        if not ok[i]:
            i += 1
            continue
        j = i
        while j + 1 < s.size and ok[j + 1]:
            j += 1
        span = (float(np.log10(s[j] / s[i])), j - i + 1, float(s[i]), float(s[j]))
        if best[1] == 0 or span[0] > best[0]:
            best = span
        i = j + 1
    return best
