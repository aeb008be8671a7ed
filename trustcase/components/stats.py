"""Confidence intervals for proportions: claims are judged on bounds, not on lucky point estimates."""

from __future__ import annotations

import numpy as np
from scipy import stats

from trustcase.schemas import Interval


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Exact two-sided binomial interval (conservative: coverage >= confidence for every p)."""
    if n <= 0:
        return Interval(lower=0.0, upper=1.0, confidence=confidence, method="clopper-pearson")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return Interval(lower=lo, upper=hi, confidence=confidence, method="clopper-pearson")


def clopper_pearson_lower(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided lower bound at level alpha, vectorised over counts k (randomized smoothing)."""
    k = np.asarray(k)
    out = stats.beta.ppf(alpha, np.maximum(k, 1), n - k + 1)
    return np.where(k == 0, 0.0, out)


def wilson(k: int, n: int, confidence: float = 0.95) -> Interval:
    if n <= 0:
        return Interval(lower=0.0, upper=1.0, confidence=confidence, method="wilson")
    z = float(stats.norm.ppf(1 - (1 - confidence) / 2))
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return Interval(lower=max(0.0, mid - half), upper=min(1.0, mid + half), confidence=confidence, method="wilson")
