"""A poisoning screen of training items, in the model's feature space, one class at a time: items a backdoor
relabelled into a class keep features of their own (the trigger), which stand out.

- Spectral signatures (Tran et al. 2018): each item's squared projection on the top singular vector of the class's
  centred features; poisoned items score highest.
- Activation clustering (Chen et al. 2018): the class's centred features reduced to at most 10 principal
  components, split in two by k-means; a small, well separated cluster (relative size at most `max_share`,
  silhouette at least `min_silhouette`) is a candidate.
- The candidate is an alarm only if clean data does not hold it as well: the held-out items of the class (not
  poisoned: the assessor's own split), put in the same two clusters, must fill the small one significantly less
  often than the training items (one-sided Fisher exact test at `level`). Clean classes have small, well separated
  clusters of their own (the demo's interval-trained CNN: 12% of functional and 5% of defective training cells,
  silhouettes 0.66 and 0.82); a natural sub-population is in both splits, a backdoor's items only in training.
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
    candidate: bool  # small and well separated
    held_out_share: float  # the share of the held-out items in the smaller cluster
    pvalue: float  # one-sided Fisher exact: training items fill the smaller cluster more often than held-out ones
    alarm: bool  # a candidate that clean data does not explain (pvalue < level)
    suspects: np.ndarray  # indices of the smaller cluster's items when alarmed, else empty


def screen(features: np.ndarray, held_out: np.ndarray, seed: int, max_share: float = 0.15,
           min_silhouette: float = 0.15, level: float = 0.01) -> ClassScreen:
    """One class: `features` of its training items, `held_out` of its items in a split not trained on."""
    from scipy.stats import fisher_exact
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    f, h = np.asarray(features, np.float64), np.asarray(held_out, np.float64)
    if len(f) < MIN_ITEMS or len(h) < MIN_ITEMS:
        raise ValueError(f"the screen needs at least {MIN_ITEMS} items of a class in each split, got {len(f)} "
                         f"and {len(h)} held out")
    mean = f.mean(axis=0)
    c = f - mean
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    z = c @ vt[:min(10, len(s))].T
    km = KMeans(2, n_init=10, random_state=seed % 2**32).fit(z)
    sizes = np.bincount(km.labels_, minlength=2)
    small = int(sizes.argmin())
    share = float(sizes[small] / len(f))
    sil = float(silhouette_score(z, km.labels_)) if sizes.min() > 1 else 0.0
    candidate = share <= max_share and sil >= min_silhouette
    held = int((km.predict((h - mean) @ vt[:min(10, len(s))].T) == small).sum())
    pvalue = float(fisher_exact([[int(sizes[small]), len(f) - int(sizes[small])], [held, len(h) - held]],
                                alternative="greater").pvalue)
    alarm = candidate and pvalue < level
    return ClassScreen((c @ vt[0]) ** 2, share, sil, candidate, held / len(h), pvalue, alarm,
                       np.flatnonzero(km.labels_ == small) if alarm else np.zeros(0, np.int64))


def precision_recall(flagged: np.ndarray, planted: np.ndarray) -> tuple[int, int, int]:
    """(planted items flagged, items flagged, items planted)."""
    f, p = set(map(int, flagged)), set(map(int, planted))
    return len(f & p), len(f), len(p)
