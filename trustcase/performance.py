"""Performance evidence: accuracy, per-class precision/recall with exact intervals, cost, calibration.

`Tally` streams (update per batch, compute at the end) like a torchmetrics metric; the sweep
reuses it per amplitude so that clean and perturbed numbers are computed the same way. ECE and cost are
estimates whose interval comes from a Poisson bootstrap over items: each item's resampling weights follow
its id (`measurement.bootstrap_weights`), and the tally keeps one weighted confusion matrix and calibration
bins per replicate, so the interval streams and merges like the figure itself.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy.special import softmax

from trustcase.measurement import BOOTSTRAP_REPLICATES, bootstrap_interval, bootstrap_weights, estimate, proportion
from trustcase.schemas import Measurement, PerturbationScope, Scope, UseCase


def confusion(labels: np.ndarray, predicted: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)


def rates(cm: np.ndarray, use_case: UseCase, scope: Scope, check: str, confidence: float,
          amplitude: float | None = None, boot: np.ndarray | None = None) -> list[Measurement]:
    """Proportion metrics of one confusion matrix (rows: truth, columns: prediction), and the cost per item;
    `boot` (replicates, classes x classes): the bootstrap's weighted confusion matrices, for the cost's interval."""
    names = use_case.model.class_names
    total = int(cm.sum())

    def m(metric: str, k: int, n: int, **details) -> Measurement:
        return proportion(check, metric, k, n, confidence, scope, amplitude, **details)

    out = [m("accuracy", int(np.trace(cm)), total)]
    for i, c in enumerate(names):
        out.append(m(f"recall:{c}", int(cm[i, i]), int(cm[i].sum())))
        out.append(m(f"precision:{c}", int(cm[i, i]), int(cm[:, i].sum())))
    ci = use_case.critical_index
    crit = names[ci]
    out.append(m(f"false_negative_rate:{crit}", int(cm[ci].sum() - cm[ci, ci]), int(cm[ci].sum())))
    cost = use_case.plan.cost_matrix
    if cost is not None and total:
        c = np.asarray(cost, np.float64).ravel()
        with np.errstate(invalid="ignore", divide="ignore"):  # a replicate that drew no item has no cost
            iv = None if boot is None else bootstrap_interval(boot @ c / boot.sum(axis=1), confidence)
        out.append(estimate(check, "cost", float(cm.ravel() @ c / total), total, iv, scope=scope, amplitude=amplitude,
                            unit="per item"))
    return out


def rate_metrics(use_case: UseCase) -> list[str]:
    """The names `rates` emits for this use case (what a check built on `Tally` declares it produces)."""
    names = use_case.model.class_names
    return (["accuracy", *(f"{f}:{c}" for c in names for f in ("recall", "precision")),
             f"false_negative_rate:{use_case.model.critical_class}"] + (["cost"] if use_case.plan.cost_matrix else []))


class Tally:
    """Streaming confusion matrices (overall and per categorical ODD value) and calibration bins, each also per
    bootstrap replicate (weights from (seed, check, item id): `measurement.bootstrap_weights`). Fed without item
    ids, it cannot resample: ECE and cost then come without an interval (a claim on them is INCONCLUSIVE)."""

    def __init__(self, use_case: UseCase, bins: int = 15, *, check: str = "", seed: int = 0,
                 replicates: int = BOOTSTRAP_REPLICATES):
        self.uc, self.n = use_case, len(use_case.model.class_names)
        self.check, self.seed, self.replicates = check, seed, replicates
        self.cm = np.zeros((self.n, self.n), dtype=np.int64)
        self.groups: dict[tuple[str, str], np.ndarray] = defaultdict(lambda: np.zeros((self.n, self.n), np.int64))
        self.edges = np.linspace(0, 1, bins + 1)
        self.bin_count = np.zeros(bins, np.int64)
        self.bin_conf = np.zeros(bins)
        self.bin_correct = np.zeros(bins)
        self.subgroups = [d.name for d in use_case.odd.descriptors if d.categorical and d.source == "metadata"]
        # per replicate: weighted confusion cells (for the cost) and weighted (count, confidence, correct) per bin
        self.boot_cm = np.zeros((replicates, self.n * self.n))
        self.boot_groups: dict[tuple[str, str], np.ndarray] = defaultdict(
            lambda: np.zeros((replicates, self.n * self.n)))
        self.boot_bins = np.zeros((3, replicates, bins))
        self.resampled = True  # every item so far came with its id

    def update(self, logits: np.ndarray, labels: np.ndarray, meta: dict[str, list[str]] | None = None,
               ids: list[str] | None = None) -> np.ndarray:
        pred = logits.argmax(axis=1)
        self.cm += confusion(labels, pred, self.n)
        self.resampled &= ids is not None
        w = bootstrap_weights(self.seed, self.check, ids, self.replicates).astype(np.float64) if self.resampled \
            else None  # (items, replicates)
        cells = np.eye(self.n * self.n)[labels * self.n + pred]
        if w is not None:
            self.boot_cm += w.T @ cells
        for name in self.subgroups:
            values = np.asarray((meta or {}).get(name, []))
            for v in np.unique(values):
                sel = values == v
                self.groups[(name, str(v))] += confusion(labels[sel], pred[sel], self.n)
                if w is not None:
                    self.boot_groups[(name, str(v))] += w[sel].T @ cells[sel]
        conf = softmax(logits.astype(np.float64), axis=1).max(axis=1)
        b = np.clip(np.digitize(conf, self.edges[1:-1]), 0, len(self.bin_count) - 1)
        self.bin_count += np.bincount(b, minlength=len(self.bin_count))
        self.bin_conf += np.bincount(b, weights=conf, minlength=len(self.bin_count))
        self.bin_correct += np.bincount(b, weights=(pred == labels), minlength=len(self.bin_count))
        if w is not None:
            in_bin = np.eye(len(self.bin_count))[b]
            self.boot_bins += np.stack([w.T @ in_bin, w.T @ (in_bin * conf[:, None]),
                                        w.T @ (in_bin * (pred == labels)[:, None])])
        return pred

    def compute(self, check: str, split: str, confidence: float, perturbation: str | None = None,
                amplitude: float | None = None, calibration: bool = True) -> list[Measurement]:
        pscope = None if perturbation is None else PerturbationScope(name=perturbation, max_amplitude=amplitude)
        scope = Scope(split=split, perturbation=pscope)
        boot = self.resampled
        out = rates(self.cm, self.uc, scope, check, confidence, amplitude, self.boot_cm if boot else None)
        if out:
            out[0].details["confusion"] = self.cm.tolist()
        for (name, value), cm in sorted(self.groups.items()):
            sub = Scope(split=split, subgroup={name: value}, perturbation=pscope)
            out += rates(cm, self.uc, sub, check, confidence, amplitude,
                         self.boot_groups[(name, value)] if boot else None)
        if calibration and self.bin_count.sum():
            # ECE = sum over bins of |correct - confidence| / items: the same formula on each replicate
            total = self.bin_count.sum()
            ece = float(np.abs(self.bin_correct - self.bin_conf).sum() / total)
            count, conf_sum, correct = self.boot_bins
            with np.errstate(invalid="ignore", divide="ignore"):  # a replicate that drew no item has no ECE
                iv = bootstrap_interval(np.abs(correct - conf_sum).sum(axis=1) / count.sum(axis=1), confidence) \
                    if boot else None
            out.append(estimate(
                check, "ece", ece, int(total), iv, scope=scope, amplitude=amplitude,
                details={"bins": self.edges.tolist(), "count": self.bin_count.tolist(),
                         "confidence": (self.bin_conf / np.maximum(self.bin_count, 1)).tolist(),
                         "accuracy": (self.bin_correct / np.maximum(self.bin_count, 1)).tolist()},
            ))
        return out




