"""Power-law fits of stage times against the number of samples (pure; numpy and scipy).

For one stage and one worker count with cells ``(N_i, t_i)``, ``i = 1..n``, the model is

    t = a N^b,   i.e.   y = ln t = ln a + b ln N = alpha + b x

fitted by ordinary least squares on ``(x_i, y_i) = (ln N_i, ln t_i)``:

    b = S_xy / S_xx,  alpha = ybar - b xbar,  s^2 = sum_i (y_i - alpha - b x_i)^2 / (n - 2),
    se(b) = s / sqrt(S_xx),   CI_95(b) = b -+ t_{0.975, n-2} se(b)

(``S_xx = sum (x_i - xbar)^2``, ``S_xy = sum (x_i - xbar)(y_i - ybar)``). With two points the line
is exact and no interval exists (``None``). Extrapolation to ``N_0`` uses the same model,
``t_0 = exp(alpha + b ln N_0)``, with the 95% prediction interval of a new observation in log
space, ``y_0 -+ t_{0.975, n-2} s sqrt(1 + 1/n + (x_0 - xbar)^2 / S_xx)`` (the errors are assumed
independent, homoscedastic and normal in log t; on a shared machine they are not quite).

Parallel efficiency of W workers at size N: ``E = t_1(N) / (W t_W(N))`` (1 = perfect scaling).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from dist_fair.errors import DataError

CONFIDENCE = 0.95


@dataclass(frozen=True)
class PowerLawFit:
    """``t = a N^b`` fitted on ``points`` cells; ``b_low``/``b_high`` the 95% interval (None for 2 points)."""

    a: float
    b: float
    b_se: float | None
    b_low: float | None
    b_high: float | None
    points: int
    r2: float | None
    residual_sd: float | None
    x_mean: float
    sxx: float

    def predict(self, n: float) -> float:
        """``a n^b``."""
        return float(self.a * float(n) ** self.b)

    def prediction_interval(self, n: float, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
        """The interval for a new measurement at ``n`` (module docstring), or None with 2 points."""
        if self.residual_sd is None:
            return None
        from scipy import stats

        x0 = math.log(float(n))
        half = stats.t.ppf(0.5 + confidence / 2, self.points - 2) * self.residual_sd * math.sqrt(
            1 + 1 / self.points + (x0 - self.x_mean) ** 2 / self.sxx)
        centre = math.log(self.a) + self.b * x0
        return float(math.exp(centre - half)), float(math.exp(centre + half))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_power_law(sizes: Sequence[float], seconds: Sequence[float], confidence: float = CONFIDENCE) -> PowerLawFit:
    """Least-squares fit of ``ln t = ln a + b ln N`` (module docstring).

    Raises:
        DataError: fewer than two distinct sizes, or a size or time that is not positive.
    """
    n_arr = np.asarray(sizes, dtype=np.float64)
    t_arr = np.asarray(seconds, dtype=np.float64)
    if n_arr.shape != t_arr.shape or n_arr.ndim != 1:
        raise DataError(f"power-law fit: sizes {n_arr.shape} and times {t_arr.shape} must be 1-D of the same length")
    if (n_arr <= 0).any() or (t_arr <= 0).any() or not (np.isfinite(n_arr).all() and np.isfinite(t_arr).all()):
        raise DataError("power-law fit: every size and time must be positive and finite (a stage that took 0 s "
                        "cannot be fitted in log-log)")
    if np.unique(n_arr).size < 2:
        raise DataError(f"power-law fit: needs at least two distinct sizes, got {sorted(set(n_arr.tolist()))}")
    x, y = np.log(n_arr), np.log(t_arr)
    xbar, ybar = float(x.mean()), float(y.mean())
    sxx = float(((x - xbar) ** 2).sum())
    sxy = float(((x - xbar) * (y - ybar)).sum())
    b = sxy / sxx
    alpha = ybar - b * xbar
    points = int(x.size)
    if points < 3:
        return PowerLawFit(a=math.exp(alpha), b=b, b_se=None, b_low=None, b_high=None, points=points, r2=None,
                           residual_sd=None, x_mean=xbar, sxx=sxx)
    from scipy import stats

    residuals = y - (alpha + b * x)
    sse = float((residuals ** 2).sum())
    s = math.sqrt(sse / (points - 2))
    se = s / math.sqrt(sxx)
    half = float(stats.t.ppf(0.5 + confidence / 2, points - 2)) * se
    syy = float(((y - ybar) ** 2).sum())
    r2 = 1.0 - sse / syy if syy > 0 else 1.0
    return PowerLawFit(a=math.exp(alpha), b=b, b_se=se, b_low=b - half, b_high=b + half, points=points, r2=r2,
                       residual_sd=s, x_mean=xbar, sxx=sxx)


def parallel_efficiency(t1: float, tw: float, workers: int) -> float:
    """``t_1 / (W t_W)``."""
    if workers < 1 or t1 <= 0 or tw <= 0:
        raise DataError(f"parallel efficiency needs positive times and workers (got t1={t1}, tW={tw}, W={workers})")
    return float(t1 / (workers * tw))
