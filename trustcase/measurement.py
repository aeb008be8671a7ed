"""The three kinds of figure and their intervals: claims are judged on bounds, not on lucky point estimates.

A figure is a census (exact over the whole split: a count), an estimate (a sampling estimate, with its
interval: Clopper-Pearson for a proportion, a per-item Poisson bootstrap for ECE and cost) or a bound (a
certificate); one function makes each kind.
"""

from __future__ import annotations

import csv
import functools

import numpy as np
from scipy import stats

from trustcase.schemas import Curve, Interval, Measurement, PerturbationScope, Scope, Series
from trustcase.seeding import item_seed

BOOTSTRAP_REPLICATES = 1000


def census(check: str, metric: str, value: float | None, n: int | None, **fields) -> Measurement:
    """A figure exact over the whole split (a count, a share of all its items, a test over all of them): a claim
    is judged on its value. Over a split capped by data.max_samples it is not one (`over_sample`)."""
    return Measurement(check=check, metric=metric, kind="census", value=value, n=n, **fields)


def estimate(check: str, metric: str, value: float | None, n: int | None, interval: Interval | None,
             **fields) -> Measurement:
    """A sampling estimate with its interval: a claim passes only on the interval's pessimistic end. Without an
    interval (none could be made) a claim on it is INCONCLUSIVE, with that reason."""
    return Measurement(check=check, metric=metric, kind="estimate", value=value, n=n, interval=interval, **fields)


def bound(check: str, metric: str, value: float | None, n: int | None = None, **fields) -> Measurement:
    """A certified bound (a certificate: a proof, or a counterexample re-checked): a claim is judged on the bound."""
    return Measurement(check=check, metric=metric, kind="bound", value=value, n=n, **fields)


def over_sample(m: Measurement, why: str) -> Measurement:
    """A count read on a split capped by data.max_samples (`why`: DataSource.sampled) is no census: an estimate
    without an interval, so no claim passes on it, and `why` says so. Unchanged when `why` is empty."""
    if not why or m.kind != "census":
        return m
    return m.model_copy(update={"kind": "estimate", "interval": None, "details": {**m.details, "no_interval": why}})


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Exact two-sided binomial interval (conservative: coverage >= confidence for every p)."""
    if n <= 0:
        return Interval(lower=0.0, upper=1.0, confidence=confidence, method="clopper-pearson")
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return Interval(lower=lo, upper=hi, confidence=confidence, method="clopper-pearson")


def proportion(check: str, metric: str, k: int, n: int, confidence: float, scope: Scope | None = None,
               amplitude: float | None = None, undefined: str = "", **details) -> Measurement:
    """'k of n' as a measurement with its exact interval: the one rule for every proportion. n = 0 measured
    nothing: no value, no interval, and the reason in `details["undefined"]`, so a claim on it is
    INCONCLUSIVE with that reason, never a measured 0%."""
    common = dict(check=check, metric=metric, n=max(int(n), 0), scope=scope or Scope(), amplitude=amplitude)
    if n <= 0:
        return estimate(**common, value=None, interval=None,
                        details={**details, "undefined": undefined or "no item (n = 0)"})
    return estimate(**common, value=k / n, interval=clopper_pearson(int(k), int(n), confidence), details=details)


@functools.lru_cache(maxsize=8192)  # a sweep resamples the same items at every amplitude
def _poisson(seed: int, check: str, item: str, replicates: int) -> np.ndarray:
    # the package's one per-item seeding rule, stream "bootstrap"
    w = np.random.default_rng(item_seed(seed, check, item, "bootstrap")).poisson(1.0, replicates).astype(np.uint8)
    w.flags.writeable = False
    return w


def bootstrap_weights(seed: int, check: str, ids, replicates: int = BOOTSTRAP_REPLICATES) -> np.ndarray:
    """Poisson bootstrap weights (items, replicates): item i counts w[i, r] times in replicate r. Each item's row
    comes from its own seed, so the replicates, and the interval, are the same whatever the batch size, the item
    order or the shards (the Poisson bootstrap of streams: Hanley & MacGibbon 2006, Chamandy et al. 2012)."""
    return np.stack([_poisson(int(seed), check, str(i), replicates) for i in ids]) if len(ids) else \
        np.zeros((0, replicates), np.uint8)


def bootstrap_interval(replicates: np.ndarray, confidence: float) -> Interval | None:
    """The percentile interval of a statistic's bootstrap replicates (those with no item drawn left out)."""
    r = np.asarray(replicates, np.float64)
    r = r[np.isfinite(r)]
    if not len(r):
        return None
    a = (1.0 - confidence) / 2
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return Interval(lower=float(lo), upper=float(hi), confidence=confidence,
                    method=f"poisson bootstrap over items ({len(r)} replicates, percentile)")


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


def accuracy_curve(check: str, metric: str, split: str, radii_grid: list[float], radius: np.ndarray,
                   correct: np.ndarray, confidence: float, title: str) -> tuple[list[Measurement], Curve, list[float]]:
    """Certified accuracy at each radius (correct and certified at r), as measurements and one curve."""
    n = len(radius)
    ms, values, lo, hi = [], [], [], []
    for r in radii_grid:
        m = proportion(check, metric, int((correct & (radius >= r)).sum()), n, confidence,
                       Scope(split=split, perturbation=PerturbationScope(name="l2_radius", max_amplitude=r)), r,
                       undefined=f"no readable item in split {split!r}")
        ms.append(m)
        values.append(float("nan") if m.value is None else m.value)
        lo.append(m.interval.lower if m.interval else float("nan"))
        hi.append(m.interval.upper if m.interval else float("nan"))
    curve = Curve(id=f"{check}-certified-accuracy", title=title, x_label="L2 radius (input scaled to [0, 1])",
                  y_label="certified accuracy", x=radii_grid,
                  series={"certified accuracy": Series(y=values, lower=lo, upper=hi)})
    return ms, curve, values


def write_items(path, ids: list[str], labels, preds, radii) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "label", "prediction", "radius"])
        w.writerows(zip(ids, np.asarray(labels).tolist(), np.asarray(preds).tolist(), np.asarray(radii).tolist(),
                        strict=True))


def radius_grid(params_radii: list[float] | None, claimed: list[float], radius: np.ndarray,
                correct: np.ndarray) -> list[float]:
    if params_radii is not None:
        grid = list(params_radii)
    else:
        finite = radius[correct & np.isfinite(radius)]
        top = float(finite.max()) if finite.size else 0.0
        grid = np.linspace(0.0, top, 21).tolist() if top > 0 else [0.0]
    return sorted({0.0, *grid, *claimed})


def median_radius(radius: np.ndarray, correct: np.ndarray) -> float | None:
    """The median certified radius, 0 for an item classified wrong (or abstained); None without items."""
    return float(np.median(np.where(correct, radius, 0.0))) if len(radius) else None


def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve = P(a positive scores above a negative), ties counting half (Mann-Whitney U
    over both sizes); NaN when either side is empty."""
    if not len(negatives) or not len(positives):
        return float("nan")
    neg = np.sort(np.asarray(negatives, np.float64))
    pos = np.asarray(positives, np.float64)
    below = np.searchsorted(neg, pos, side="left")
    ties = np.searchsorted(neg, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(neg) * len(pos)))
