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


def paired_difference(arm: dict[int, float], against: dict[int, float]) -> Interval | None:
    """arm - against over the seeds both have, with the interval of the differences."""
    seeds = sorted(s for s in arm if s in against and arm[s] is not None and against[s] is not None)
    return mean_interval([arm[s] - against[s] for s in seeds])
