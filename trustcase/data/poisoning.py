"""A poisoning screen of training items, in the model's feature space, one class at a time: items a backdoor
relabelled into a class keep features of their own (the trigger), which stand out.

- Spectral signatures (Tran et al. 2018): each item's squared projection on the top singular vector of the class's
  centred features; poisoned items score highest.
- Activation clustering (Chen et al. 2018): the class's centred features reduced to at most 10 principal
  components, split in two by k-means; a small, well separated cluster (relative size at most `max_share`,
  silhouette at least `min_silhouette`) is an alarm, its items the suspects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_ITEMS = 20  # per class: fewer makes two clusters and a top direction mean little


@dataclass(frozen=True)
class ClassScreen:
    spectral: np.ndarray  # (n,) score per item, higher is more suspect
    cluster_share: float  # relative size of the smaller cluster
    silhouette: float
    alarm: bool
    suspects: np.ndarray  # indices of the smaller cluster's items when alarmed, else empty


def screen(features: np.ndarray, seed: int, max_share: float = 0.15, min_silhouette: float = 0.15) -> ClassScreen:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    f = np.asarray(features, np.float64)
    if len(f) < MIN_ITEMS:
        raise ValueError(f"the screen needs at least {MIN_ITEMS} items of a class, got {len(f)}")
    c = f - f.mean(axis=0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    z = c @ vt[:min(10, len(s))].T
    km = KMeans(2, n_init=10, random_state=seed % 2**32).fit(z)
    sizes = np.bincount(km.labels_, minlength=2)
    small = int(sizes.argmin())
    share = float(sizes[small] / len(f))
    sil = float(silhouette_score(z, km.labels_)) if sizes.min() > 1 else 0.0
    alarm = share <= max_share and sil >= min_silhouette
    return ClassScreen((c @ vt[0]) ** 2, share, sil, alarm,
                       np.flatnonzero(km.labels_ == small) if alarm else np.zeros(0, np.int64))


def precision_recall(flagged: np.ndarray, planted: np.ndarray) -> tuple[int, int, int]:
    """(planted items flagged, items flagged, items planted)."""
    f, p = set(map(int, flagged)), set(map(int, planted))
    return len(f & p), len(f), len(p)
