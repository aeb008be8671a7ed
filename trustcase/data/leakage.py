"""Near duplicates across splits in the model's feature space: an item of a split whose penultimate features
point the same way as a reference (training) item's, cosine similarity at least a threshold, is leakage
evidence: the model is assessed on what it has, in its own eyes, already seen. (Pixel-level near duplicates are
the data-quality check's perceptual hashes.)"""

from __future__ import annotations

import numpy as np


def unit_rows(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, np.float64)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return f / np.where(norm > 0, norm, 1.0)


class NearestReference:
    """The reference items' feature vectors (one row of d floats per item), and for each queried item its most
    similar reference item. Similarity is the cosine of features centred on the reference's mean: features after a
    ReLU all lie in one orthant, where raw cosines of distinct items sit near 1. Exact (no approximate index): a
    query costs one (batch x reference) product."""

    def __init__(self):
        self._rows, self._ids = [], []
        self._ref: np.ndarray | None = None
        self._mean: np.ndarray | None = None

    def add(self, ids, features: np.ndarray) -> None:
        self._rows.append(np.asarray(features, np.float64))
        self._ids += [str(i) for i in ids]
        self._ref = None

    def __len__(self) -> int:
        return len(self._ids)

    def nearest(self, features: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(cosine similarity to the nearest reference item, its id) per row; ties go to the first reference
        item, so the answer does not depend on how the queries are batched."""
        if not self._ids:
            return np.full(len(features), -np.inf), [""] * len(features)
        if self._ref is None:
            raw = np.concatenate(self._rows)
            self._rows, self._mean = [raw], raw.mean(axis=0)
            self._ref = unit_rows(raw - self._mean)
        sim = unit_rows(np.asarray(features, np.float64) - self._mean) @ self._ref.T
        j = sim.argmax(axis=1)
        return sim[np.arange(len(j)), j], [self._ids[k] for k in j]
