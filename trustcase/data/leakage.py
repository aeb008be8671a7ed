"""Near duplicates across splits in the model's feature space: an item of a split whose penultimate features point
the same way as a reference (training) item's, similarity at least a threshold, is leakage evidence: the model is
assessed on what it has, in its own eyes, already seen. The threshold is calibrated on the reference itself: the
similarity of each distinct reference item to its nearest other one (perceptual duplicates excluded: they are the
same image again) is what a distinct item reaches by chance. (Pixel-level near duplicates are the perceptual hashes
of `data.quality`, reported beside each pair.)"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

RANK_TOL = 1e-6  # principal directions below this share of the largest singular value are rounding, not variance
CHUNK = 512  # query rows per (rows x reference) product: memory bound of a query


def unit_rows(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.where(norm > 0, norm, 1.0)


class NearestReference:
    """The reference items' feature vectors (one row of d floats per item), and for each queried item its most
    similar reference item. Similarity is the cosine of features whitened on the reference: centred on its mean and
    scaled to unit variance along each of its principal directions. Centring because features after a ReLU lie in one
    orthant, where raw cosines of distinct items sit near 1; whitening because a few directions can carry nearly all
    the variance (91% in one direction for the demo's interval-trained CNN), so that the cosine of distinct items sits
    near 1 again and tells nothing apart. Exact (no approximate index): a query costs one (batch x reference)
    product."""

    def __init__(self):
        self._rows, self._ids = [], []
        self._ref: np.ndarray | None = None
        self._mean = self._project = None

    def add(self, ids, features: np.ndarray) -> None:
        self._rows.append(np.asarray(features, np.float64))
        self._ids += [str(i) for i in ids]
        self._ref = None

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def rank(self) -> int:
        """The number of directions the reference's features vary in (0: every item the same to the model)."""
        if not self._ids:
            return 0
        self._reference()
        return self._project.shape[1]

    def _reference(self) -> np.ndarray:
        if self._ref is None:
            raw = np.concatenate(self._rows)
            self._rows, self._mean = [raw], raw.mean(axis=0)
            _, s, vt = np.linalg.svd(raw - self._mean, full_matrices=False)
            keep = s > RANK_TOL * s[0] if len(s) and s[0] > 0 else np.zeros(len(s), bool)
            self._project = vt[keep].T / s[keep]
            self._ref = self._whiten(raw)
        return self._ref

    def _whiten(self, features: np.ndarray) -> np.ndarray:
        return unit_rows((np.asarray(features, np.float64) - self._mean) @ self._project)

    def nearest(self, features: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(similarity to the nearest reference item, its id) per row; ties go to the first reference item, so the
        answer does not depend on how the queries are batched."""
        if not self._ids:
            return np.full(len(features), -np.inf), [""] * len(features)
        ref = self._reference()
        sim = self._whiten(features) @ ref.T
        j = sim.argmax(axis=1)
        return sim[np.arange(len(j)), j], [self._ids[k] for k in j]

    def nearest_other(self, rows: np.ndarray, hashes: np.ndarray, distinct: int) -> np.ndarray:
        """For reference items at positions `rows`: the similarity to the nearest reference item that is another
        image, i.e. neither itself nor a perceptual duplicate of it (64-bit hashes at most `distinct` bits apart);
        -inf when there is none. The hashes are `data.quality.perceptual_hash`'s."""
        ref = self._reference()
        out = np.full(len(rows), -np.inf)
        for lo in range(0, len(rows), CHUNK):
            r = np.asarray(rows[lo:lo + CHUNK])
            sim = ref[r] @ ref.T
            same = np.bitwise_count(np.bitwise_xor(hashes[r][:, None], hashes[None, :])) <= distinct
            same[np.arange(len(r)), r] = True
            sim[same] = -np.inf
            out[lo:lo + len(r)] = sim.max(axis=1) if ref.shape[0] else -np.inf
        return out


@dataclass(frozen=True)
class Threshold:
    """A similarity threshold calibrated on `n` distinct items' nearest-neighbour similarities: the `k`-th smallest
    of them. A new item exchangeable with them (a distinct item, not a copy) reaches it with a probability that is
    itself random: Beta(n + 1 - k, k) over the calibration draw (the order statistic's coverage), whose mean and
    quantiles are the false-positive rate and its interval."""
    value: float
    k: int
    n: int

    def false_positive_rate(self) -> float:
        return (self.n + 1 - self.k) / (self.n + 1)

    def false_positive_interval(self, confidence: float) -> tuple[float, float]:
        a = (1 - confidence) / 2
        dist = stats.beta(self.n + 1 - self.k, self.k)
        return float(dist.ppf(a)), float(dist.ppf(1 - a))


def _rank(rate: float, n: int) -> int:
    return math.ceil((1 - rate) * (n + 1) - 1e-9)  # the conformal order statistic (the tolerance: 1 / 0.005 - 1)


def calibrate(similarities: np.ndarray, rate: float) -> Threshold | None:
    """The smallest threshold whose false-positive rate on distinct items is at most `rate` in expectation: the
    ceil((1 - rate)(n + 1))-th smallest similarity (conformal quantile); None when n is too small for that rate
    (fewer than `fewest_items(rate)`: n + 1 < 1 / rate)."""
    s = np.sort(np.asarray(similarities, np.float64)[np.isfinite(similarities)])
    n = len(s)
    k = _rank(rate, n)
    if n == 0 or k > n:
        return None
    return Threshold(float(s[k - 1]), k, n)


def fewest_items(rate: float) -> int:
    """The fewest distinct items that calibrate a threshold at `rate` (`calibrate` is None below it)."""
    n = max(1, math.floor(1 / rate) - 2)
    while _rank(rate, n) > n:
        n += 1
    return n
