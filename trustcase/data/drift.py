"""Drift in the model's feature space: a two-sample test of maximum mean discrepancy (Gretton et al. 2012) with a
Gaussian kernel whose bandwidth is the median distance between the pooled items (the median heuristic), its
p-value by permutation; and which image descriptors moved most (two-sample Kolmogorov-Smirnov statistics).

Each side is a seeded sample of at most `max_items` items, chosen by the one seeding rule (the items of
smallest `item_seed(seed, check, item, "sample")`), so memory stays flat in the number of items and the sample,
hence the test, is the same whatever the batch size or order. The quadratic statistic on the sample costs
O(n^2 (permutations + d)).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from scipy import stats

from trustcase.errors import UserError
from trustcase.seeding import item_seed


class DriftError(UserError):
    """A batch the drift test cannot judge: not the model's input, or too few items."""


MIN_ITEMS = 10  # per side: fewer gives too few distinct permutations and an unstable median bandwidth


class Sample:
    """At most `k` items of a stream (their feature and descriptor rows), the same ones whatever the order they
    arrive in: those of smallest seed under (seed, check, item, "sample")."""

    def __init__(self, k: int, seed: int, check: str):
        self.k, self.seed, self.check, self.seen = k, seed, check, 0
        self._heap: list = []  # max-heap on the item's seed, by negation

    def update(self, ids, features: np.ndarray, descriptors: dict[str, np.ndarray] | None = None) -> None:
        names = sorted(descriptors or {})
        for j, i in enumerate(ids):
            self.seen += 1
            key = -item_seed(self.seed, self.check, str(i), "sample")
            row = (np.array(features[j], np.float64), np.array([descriptors[n][j] for n in names], np.float64))
            if len(self._heap) < self.k:
                heapq.heappush(self._heap, (key, str(i), names, row))
            elif key > self._heap[0][0]:
                heapq.heapreplace(self._heap, (key, str(i), names, row))

    def __len__(self) -> int:
        return len(self._heap)

    def _rows(self) -> list:
        return sorted(self._heap, key=lambda t: (-t[0], t[1]))

    def ids(self) -> list[str]:
        """The sampled items' ids, in the order of `arrays`."""
        return [r[1] for r in self._rows()]

    def arrays(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(features (n, d), descriptors by name), in seed order."""
        rows = self._rows()
        if not rows:
            return np.zeros((0, 0)), {}
        feats = np.stack([r[3][0] for r in rows])
        names = rows[0][2]
        desc = np.stack([r[3][1] for r in rows]) if names else np.zeros((len(rows), 0))
        return feats, {n: desc[:, k] for k, n in enumerate(names)}


@dataclass(frozen=True)
class MMDTest:
    mmd: float  # the shift's size: sqrt of the (biased) squared MMD, in the kernel's feature space (0 to sqrt 2)
    pvalue: float
    bandwidth: float
    n_reference: int
    n_other: int
    permutations: int
    exceeding: int = 0  # permuted statistics reaching the observed one: pvalue = (1 + exceeding) / (1 + permutations)


def _sq_distances(z: np.ndarray) -> np.ndarray:
    sq = (z * z).sum(axis=1)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0.0)


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int, check: str = "feature_drift") -> MMDTest:
    """MMD^2 = w' K w with w = 1/n on the reference, -1/m on the other; its permutation p-value
    (1 + #{permuted >= observed}) / (1 + permutations), valid at every sample size."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n, m = len(x), len(y)
    if min(n, m) < MIN_ITEMS:
        raise ValueError(f"the MMD test needs at least {MIN_ITEMS} items per side, got {n} and {m}")
    z = np.concatenate([x, y])
    # features on one scale: a unit of one feature weighs like a unit of any other
    z = (z - z.mean(axis=0)) / np.where(z.std(axis=0) > 0, z.std(axis=0), 1.0)
    d2 = _sq_distances(z)
    off = d2[np.triu_indices(len(z), 1)]
    med = float(np.median(off[off > 0])) if (off > 0).any() else 1.0
    k = np.exp(-d2 / med)  # exp(-|a-b|^2 / (2 h^2)) with h^2 = median / 2
    w = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    observed = float(w @ k @ w)
    rng = np.random.default_rng(item_seed(seed, check, "permutations", "mmd"))
    ws = np.stack([rng.permutation(w) for _ in range(permutations)], axis=1)  # (n + m, B)
    null = np.einsum("ib,ib->b", ws, k @ ws)
    # a permuted statistic equal to the observed one up to rounding counts as reaching it (conservative)
    tol = 1e-12 * max(1.0, abs(observed))
    exceeding = int((null >= observed - tol).sum())
    return MMDTest(float(np.sqrt(max(observed, 0.0))), (1 + exceeding) / (1 + permutations), float(np.sqrt(med / 2)),
                   n, m, permutations, exceeding)


def moved(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], top: int = 3) -> list[dict]:
    """The descriptors whose distribution moved most, by the two-sample KS statistic, largest first."""
    out = []
    for name in sorted(set(reference) & set(other)):
        a, b = reference[name], other[name]
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
        if len(a) and len(b):
            r = stats.ks_2samp(a, b)
            out.append({"descriptor": name, "ks": float(r.statistic), "pvalue": float(r.pvalue),
                        "median_reference": float(np.median(a)), "median_other": float(np.median(b))})
    return sorted(out, key=lambda d: (-d["ks"], d["descriptor"]))[:top]


def features_and_descriptors(extract, images: np.ndarray, value_range, image_like: bool):
    """One forward pass's penultimate features, and the image descriptors of the same batch (none for rows)."""
    from trustcase.odd.descriptors import DESCRIPTORS, Views

    feats, _ = extract(images)
    if not image_like:
        return feats, {}
    views = Views(images, value_range)
    return feats, {k: np.asarray(d.fn(views), np.float64) for k, d in DESCRIPTORS.items()}


def compare(reference: Sample, other: Sample, permutations: int, seed: int, check: str) -> dict:
    """The MMD test between two samples and the descriptors that moved most, as one JSON-ready record."""
    fx, dx = reference.arrays()
    fy, dy = other.arrays()
    t = mmd_test(fx, fy, permutations, seed, check)
    return {"pvalue": t.pvalue, "mmd": t.mmd, "bandwidth": t.bandwidth, "n_reference": t.n_reference,
            "n_other": t.n_other, "permutations": t.permutations, "exceeding": t.exceeding, "moved": moved(dx, dy),
            "seen_reference": reference.seen, "seen_other": other.seen}


def batch_drift(use_case, model, paths, reference: str = "validation", resize: bool = False, max_items: int = 500,
                permutations: int = 200, seed: int = 0, check: str = "drift") -> dict:
    """A batch of production inputs (image or .npy files, folders of them) against the `reference` split of the
    use case, in the model's feature space. Every file is read and judged against the model's input contract
    before any feature is computed: one bad file, or fewer than MIN_ITEMS inputs, is a DriftError naming it."""
    from types import SimpleNamespace

    from trustcase.data.streaming import DataSource
    from trustcase.odd import MonitorError, input_files, read_input
    from trustcase.odd.features import FeatureExtractor
    from trustcase.odd.monitor import Monitor

    if reference not in use_case.data.splits:
        raise DriftError(f"reference split {reference!r} is not in data.splits {list(use_case.data.splits)}")
    contract = SimpleNamespace(model_spec=use_case.model)
    contract.batch = lambda x: Monitor.batch(contract, x)  # the monitor's one reading of the input contract
    try:
        files = input_files(paths)
        inputs = [(f, read_input(f, contract, resize)) for f in files]
    except MonitorError as e:
        raise DriftError(str(e).replace("does not fit the monitor", "does not fit the model's input")) from None
    n = sum(len(x) for _, x in inputs)
    if n < MIN_ITEMS:
        raise DriftError(f"the batch holds {n} input(s): the drift test needs at least {MIN_ITEMS}")
    extract = FeatureExtractor(model)
    image_like = len(use_case.model.input_shape) == 3
    vr = tuple(use_case.model.value_range)
    ref, other = Sample(max_items, seed, check), Sample(max_items, seed, check)
    for b in DataSource(use_case.data, seed, use_case.model).stream(reference).batches():
        ref.update([f"{reference}/{i}" for i in b.ids], *features_and_descriptors(extract, b.images, vr, image_like))
    for f, x in inputs:
        ids = [str(f)] if len(x) == 1 else [f"{f}[{i}]" for i in range(len(x))]
        other.update(ids, *features_and_descriptors(extract, x.astype(np.float32), vr, image_like))
    if len(ref) < MIN_ITEMS:
        raise DriftError(f"the {reference} split holds {len(ref)} readable item(s): the test needs {MIN_ITEMS}")
    return {**compare(ref, other, permutations, seed, check), "features": extract.mode, "reference": reference}
