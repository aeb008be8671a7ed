"""Label errors by confident learning (Northcutt et al. 2021, with cleanlab): an item is suspected when the
out-of-sample probabilities of a model put it, with confidence, in another class than its label. The per-class
thresholds are the mean self-confidence of each class, so a model's overall over- or under-confidence does not
decide; the suspected share of a split estimates its noise rate.

Out of sample: a held-out split's probabilities from the assessed model, or the training split's out of fold
(`OutOfFold`: k models, each trained without one fold, the fold of an item's near-duplicate group fixed by the
one seeding rule: `fold_groups`).
Memory is bounded: a split is screened on a seeded sample of at most `max_items` items (`drift.Sample`)."""

from __future__ import annotations

import heapq
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from trustcase.measurement import clopper_pearson
from trustcase.seeding import item_seed


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def fold_of(seed: int, item: str, folds: int) -> int:
    """The cross-validation fold of an item, or of a group's key (stream "fold" of the one seeding rule): the same
    fold whatever the batch size, the order or the shards, and about n / folds items in each."""
    return item_seed(seed, "label_issues", str(item), "fold") % folds


def fold_groups(ids: list[str], pairs: np.ndarray) -> list[str]:
    """Each item's group key: the least id of its connected component under `pairs` (index pairs of near-duplicates).
    Folds by group keep an item and its near-copies in one fold, so no item is scored by a model trained on its
    near-copy (which would repeat its label); the key does not depend on the order the items came in."""
    parent = list(range(len(ids)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    least: dict[int, str] = {}
    for i, name in enumerate(ids):
        r = root(i)
        least[r] = min(least.get(r, name), name)
    return [least[root(i)] for i in range(len(ids))]


class OutOfFold:
    """Each item's probabilities from the model of its fold (`folds`: item id -> fold), trained without that fold."""

    def __init__(self, models: list, folds: dict[str, int]):
        self.models, self.folds = models, folds

    def __call__(self, images: np.ndarray, ids: list[str]) -> np.ndarray:
        fold = np.array([self.folds[i] for i in ids])
        out = None
        for f in np.unique(fold):
            rows = np.flatnonzero(fold == f)
            pr = softmax(self.models[f].logits(images[rows], [ids[j] for j in rows]))
            out = np.zeros((len(ids), pr.shape[1])) if out is None else out
            out[rows] = pr
        return out


@dataclass
class LabelIssues:
    suspected: np.ndarray  # (n,) bool
    quality: np.ndarray  # (n,) self-confidence: the probability of the given label
    suggested: np.ndarray  # (n,) the most probable class
    warnings: list[str] = field(default_factory=list)


def find(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """cleanlab's `find_label_issues` (pruning by the estimated noise rate of each class pair, one process: the
    same answer on every run) on out-of-sample `probs` (n, classes)."""
    from cleanlab.filter import find_label_issues

    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if len(labels) == 0:
        return LabelIssues(np.zeros(0, bool), np.zeros(0), np.zeros(0, np.int64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    return LabelIssues(np.asarray(mask, bool), probs[np.arange(len(labels)), labels], probs.argmax(axis=1),
                       sorted({str(w.message) for w in caught}))


class LowestConfidence:
    """The `k` items of lowest self-confidence seen so far (their images kept for thumbnails): memory bounded by
    k whatever the split's size; ties broken by item id, so the selection does not depend on the batch order."""

    def __init__(self, k: int):
        self.k, self._heap = k, []  # max-heap on (quality, id) through negation

    def update(self, quality: np.ndarray, ids: list[str], images: np.ndarray) -> None:
        for q, i, x in zip(quality, ids, images):
            key = (-float(q), _neg(str(i)))
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, (key, str(i), np.array(x)))
            elif self.k and key > self._heap[0][0]:
                heapq.heapreplace(self._heap, (key, str(i), np.array(x)))

    def items(self) -> list[tuple[float, str, np.ndarray]]:
        """(quality, id, image), least confident first."""
        return sorted(((-key[0], i, x) for key, i, x in self._heap), key=lambda t: (t[0], t[1]))


def _neg(s: str) -> tuple[int, ...]:
    # orders ids descending inside the max-heap, so the smaller id wins a tie of quality
    return tuple(-ord(c) for c in s) + (1,)


def risk_ratio(a: int, n1: int, c: int, n0: int, confidence: float) -> tuple[float, float, float]:
    """(a / n1) / (c / n0) with Katz's log interval; a zero cell gets 0.5 in every cell (Haldane), so the ratio
    stays finite and the interval wide."""
    if 0 in (a, c, n1 - a, n0 - c):
        a, c, n1, n0 = a + 0.5, c + 0.5, n1 + 1, n0 + 1
    rr = (a / n1) / (c / n0)
    se = math.sqrt(1 / a - 1 / n1 + 1 / c - 1 / n0)
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    return rr, rr * math.exp(-z * se), rr * math.exp(z * se)


def plant_flips(eligible: np.ndarray, share: float, seed: int) -> np.ndarray:
    """Indices of `share` of the `eligible` items, whose label a validation flips to another class."""
    pool = np.flatnonzero(eligible)
    k = max(1, int(round(share * len(pool))))
    return np.sort(np.random.default_rng(seed).choice(pool, size=min(k, len(pool)), replace=False))


def flipped(labels: np.ndarray, idx: np.ndarray, classes: int, seed: int) -> np.ndarray:
    """The labels with each item of `idx` moved to another class (uniformly among the others)."""
    out = np.array(labels, np.int64)
    shift = np.random.default_rng(seed + 1).integers(1, classes, size=len(idx))
    out[idx] = (out[idx] + shift) % classes
    return out


def validate(labels: np.ndarray, probs: np.ndarray, uncertain: np.ndarray, share: float, seed: int,
             confidence: float) -> dict:
    """The method's two validations on one set of out-of-sample probabilities. Enrichment: how much more often
    an item whose label is known to be uncertain (`uncertain`, e.g. an expert's hesitant rating) is suspected
    than a certain one (risk ratio, Katz interval). Planted flips: `share` of the certain items get another
    label; recall is the share of them suspected, precision the share of planted items among all suspected
    (items suspected before the flips count against it), each with its Clopper-Pearson interval."""
    labels, uncertain = np.asarray(labels, np.int64), np.asarray(uncertain, bool)
    found = find(labels, probs).suspected
    a, n1 = int((found & uncertain).sum()), int(uncertain.sum())
    c, n0 = int((found & ~uncertain).sum()), int((~uncertain).sum())
    rr, lo, hi = risk_ratio(a, n1, c, n0, confidence)
    planted = plant_flips(~uncertain, share, seed)
    after = find(flipped(labels, planted, probs.shape[1], seed), probs).suspected
    hit = int(after[planted].sum())
    flagged = int(after.sum())
    return {"items": len(labels), "suspected": int(found.sum()), "uncertain": n1,
            "suspected_uncertain": a, "suspected_certain": c,
            "enrichment": rr, "enrichment_interval": [lo, hi],
            "planted": len(planted), "planted_found": hit, "flagged_after": flagged,
            "recall": hit / len(planted), "recall_interval": _ends(clopper_pearson(hit, len(planted), confidence)),
            "precision": hit / flagged if flagged else None,
            "precision_interval": _ends(clopper_pearson(hit, flagged, confidence)) if flagged else None}


def _ends(iv) -> list[float]:
    return [iv.lower, iv.upper]
