"""Means with Student-t confidence intervals, and paired differences, for a study's few seeds.

The t quantile is computed here from the exact distribution function for integer degrees of
freedom, so the report needs no statistics package.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def _t_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer `df` degrees of freedom, in closed form
    (Abramowitz & Stegun 26.7.3-4): a finite series in cos(theta), theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 0:  # sin(theta) (1 + 1/2 c^2 + 1.3/(2.4) c^4 + ... up to c^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    # 2/pi (theta + sin(theta) (cos + 2/3 cos^3 + ... up to cos^(df-2))); df = 1 has no series.
    term = total = math.cos(theta) if df > 1 else 0.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * total)


def t_quantile(df: int, coverage: float = 0.95) -> float:
    """The t with P(|T| < t) = coverage (12.706 for df = 1 at 95%), by bisection."""
    low, high = 0.0, 1e4
    for _ in range(200):
        middle = (low + high) / 2
        low, high = (middle, high) if _t_mass(middle, df) < coverage else (low, middle)
    return (low + high) / 2


@dataclasses.dataclass(frozen=True)
class Interval:
    mean: float
    low: float | None  # None with a single value: no interval.
    high: float | None
    n: int

    def text(self, digits: int = 3, signed: bool = False) -> str:
        fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
        if self.low is None:
            return f"{fmt.format(self.mean)} (n = {self.n})"
        return f"{fmt.format(self.mean)} ({fmt.format(self.low)} to {fmt.format(self.high)}, n = {self.n})"


def mean_interval(values) -> Interval | None:
    """Mean and 95% Student-t interval: mean +- t(n-1) s / sqrt(n), s the sample deviation."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if len(values) == 0:
        return None
    mean = float(values.mean())
    if len(values) == 1:
        return Interval(mean, None, None, 1)
    half = t_quantile(len(values) - 1) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values))


def paired_values(arm: dict[int, float], against: dict[int, float]) -> list[float]:
    """arm - against for each seed both have, in seed order."""
    seeds = sorted(s for s in arm if s in against and arm[s] is not None and against[s] is not None)
    return [arm[s] - against[s] for s in seeds]


def paired_difference(arm: dict[int, float], against: dict[int, float]) -> Interval | None:
    """arm - against over the seeds both have, with the interval of the differences."""
    return mean_interval(paired_values(arm, against))


def lowest_upper_end(values, missing: int) -> float | None:
    """The lowest upper end of the 95% interval of `values` and `missing` more, over every value
    the missing ones could take; None when it has no lower bound (then the missing values can
    still bring the interval anywhere).

    Giving the missing values their mean leaves the sample mean and lowers the deviation, so the
    lowest end has them equal, at some x. With n = len(values) + missing and c = t(n-1) / sqrt(n),
    the end mean(x) + c s(x) is convex in x (s is a norm of residuals affine in x), its slope
    towards x = -inf is -missing/n + c sqrt(missing (n - missing) / (n (n - 1))), and it is found
    by a golden-section search where that slope makes it grow on both sides.
    """
    values = np.asarray(values, np.float64)
    if missing == 0:
        found = mean_interval(values)
        return None if found is None else found.high
    n = len(values) + missing
    if n < 2:
        return None
    c = t_quantile(n - 1) / math.sqrt(n)
    if c * math.sqrt(missing * (n - missing) / (n * (n - 1))) <= missing / n:
        return None

    def end(x: float) -> float:
        every = np.concatenate([values, np.full(missing, x)])
        return float(every.mean() + c * every.std(ddof=1))

    spread = float(np.ptp(values)) if len(values) else 0.0
    # Past this reach on either side the end only grows: the linear growth dominates the spread.
    reach = 1e4 * (spread + float(np.abs(values).max(initial=0.0)) + 1.0)
    low, high = float(values.min(initial=0.0)) - reach, float(values.max(initial=0.0)) + reach
    golden = (math.sqrt(5) - 1) / 2
    for _ in range(300):
        a, b = high - golden * (high - low), low + golden * (high - low)
        low, high = (low, b) if end(a) < end(b) else (a, high)
    return end((low + high) / 2)
