"""Calibration of the learned monitor: conformal thresholds at declared false-alarm rates (a generalised
Pareto tail beyond the data)."""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from trustcase.odd.learned import LearnedMonitor


def conformal_threshold(scores: np.ndarray, rate: float) -> tuple[float, str]:
    """Smallest t with P(fresh score > t) <= rate for exchangeable scores: the ceil((n+1)(1-rate))-th
    smallest calibration score. Beyond the data (n + 1 < 1 / rate), a generalised Pareto fit of the top
    10% extrapolates the tail (an estimate, not a guarantee)."""
    s = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(s)
    if n == 0:
        raise ValueError("no calibration scores")
    k = math.ceil((n + 1) * (1 - rate))
    if k <= n:
        return float(s[k - 1]), "conformal"
    tail = max(10, n // 10)
    if n < 50:
        return float(s[-1]), f"largest calibration score (n = {n}: false-alarm rate only bounded by 1/(n+1))"
    u = s[-tail - 1]
    exceed = s[-tail:] - u
    c, _, scale = stats.genpareto.fit(exceed, floc=0.0)
    t = u + stats.genpareto.ppf(1 - rate * (n + 1) / tail, c, loc=0.0, scale=scale)
    return float(max(t, s[-1])), f"generalised Pareto tail (top {tail} of {n})"


class Calibration:
    """Collects the raw scores of held-out in-ODD items (one scalar per score and item), then sets the
    standardisation and the NEAR/OUT thresholds at the declared false-alarm rates."""

    def __init__(self):
        self.raw: dict[str, list[np.ndarray]] = {}

    def update(self, raw: dict[str, np.ndarray]) -> None:
        for k, v in raw.items():
            self.raw.setdefault(k, []).append(np.asarray(v, dtype=np.float64))

    def finish(self, monitor: LearnedMonitor, near_rate: float, out_rate: float) -> LearnedMonitor:
        raw = {k: np.concatenate(v) for k, v in self.raw.items()}
        n = len(next(iter(raw.values()))) if raw else 0
        if n < 2:
            raise ValueError(f"need at least 2 in-ODD calibration items, got {n}")
        for k, v in raw.items():
            q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
            monitor.centre[k] = float(med)
            monitor.scale[k] = float(q3 - q1) if q3 > q1 else float(np.std(v) or 1.0)
        stat = monitor.statistic(raw)
        monitor.near, near_how = conformal_threshold(stat, near_rate)
        monitor.out, out_how = conformal_threshold(stat, out_rate)
        monitor.out = max(monitor.out, monitor.near)
        monitor.info.update(n_calibration=n, near_rate=near_rate, out_rate=out_rate, near_method=near_how,
                            out_method=out_how, quantiles={k: np.quantile(v, [0.5, 0.95, 0.999]).tolist()
                                                           for k, v in raw.items()})
        return monitor

