"""Segmentation metrics, streamed: per class IoU, Dice, pixel precision and pixel recall over a split's pixels, and the
image-level decision the use case derives from the mask (an image is defective when at least `defect_pixels` of its
pixels are predicted a class other than class 0, the background), with its recall on defective images and its false
alarms on defect-free ones.

`SegmentationTally.update` keeps per image only its true positive, false positive and false negative pixel counts
per class and its two image-level bits (predicted and truly defective: at least one true defect pixel); never a
mask. A split's IoU of class c is the ratio of sums over its images, TP / (TP + FP + FN) (the dataset IoU, not a mean
of per-image IoUs: an image without the class does not count as 0 or 1), Dice 2 TP / (2 TP + FP + FN).

Intervals: IoU, Dice and the pixel rates by the Poisson bootstrap over images (pixels of one image are not
independent: a defect is missed whole), each image's weights from (seed, check, image id, "bootstrap")
(`measurement.bootstrap_weights`: the same interval at any batch size, order or shard count), the replicate the same
ratio of weighted sums; the image-level rates by Clopper-Pearson (`measurement.proportion`). Every figure is also
measured per value of each categorical ODD descriptor read from the items' metadata (e.g. the defect type).
"""

from __future__ import annotations

import warnings

import numpy as np

from trustcase.measurement import bootstrap_interval, bootstrap_weights, estimate, proportion
from trustcase.schemas import Measurement, PerturbationScope, Scope

PIXEL_METRICS = ("iou", "dice", "pixel_precision", "pixel_recall")


def segmentation_metrics(class_names: list[str]) -> list[str]:
    """The metric names `SegmentationTally.compute` emits (what a check built on it declares it produces)."""
    return ["mean_iou", "mean_dice", "image_recall", "image_false_alarm_rate",
            *(f"{f}:{c}" for c in class_names for f in PIXEL_METRICS)]


def image_decisions(pred, defect_pixels: int):
    """The segmenter's image-level rule, the one place it is written: (B,) True where at least `defect_pixels` of an
    image's predicted classes (B, H, W) are a defect class (not 0, the background). A numpy array or a torch tensor
    alike (the attacks read it from logits)."""
    return (pred != 0).sum(tuple(range(1, pred.ndim))) >= defect_pixels  # per image: its pixels summed


def pixel_counts(pred: np.ndarray, true: np.ndarray, n_classes: int, confusion: np.ndarray | None = None) \
        -> np.ndarray:
    """One image's (K, 3) pixel counts per class: true positives, false positives, false negatives (its confusion
    matrix added to `confusion` when given)."""
    cm = np.bincount(true.astype(np.int64).ravel() * n_classes + pred.astype(np.int64).ravel(),
                     minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    if confusion is not None:
        confusion += cm
    tp = np.diag(cm)
    return np.stack([tp, cm.sum(0) - tp, cm.sum(1) - tp], axis=1)


def _ratios(counts: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Numerator and denominator of each pixel metric per class, from (..., K, 3) summed counts."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    return {"iou": (tp, tp + fp + fn), "dice": (2 * tp, 2 * tp + fp + fn),
            "pixel_precision": (tp, tp + fp), "pixel_recall": (tp, tp + fn)}


UNDEFINED = {"iou": "class {c} is neither in the true masks nor predicted",
             "dice": "class {c} is neither in the true masks nor predicted",
             "pixel_precision": "no pixel is predicted class {c}",
             "pixel_recall": "no true pixel of class {c}"}


class SegmentationTally:
    """Streams a split's predicted masks against its true ones; `compute` gives the measurements."""

    def __init__(self, class_names: list[str], defect_pixels: int, check: str, seed: int,
                 subgroups: list[str] | None = None):
        self.class_names, self.defect_pixels, self.check, self.seed = class_names, defect_pixels, check, seed
        self.subgroups = list(subgroups or [])
        self.ids: list[str] = []
        self.counts: list[np.ndarray] = []  # per image (K, 3)
        self.predicted: list[bool] = []  # per image: decided defective by the operating rule
        self.defective: list[bool] = []  # per image: at least one true defect pixel
        self.meta: dict[str, list[str]] = {name: [] for name in self.subgroups}
        self.pixels = np.zeros((len(class_names), len(class_names)), np.int64)  # rows true, columns predicted

    def update(self, pred: np.ndarray, masks, ids: list[str], meta: dict[str, list[str]] | None = None) -> np.ndarray:
        """One batch: predicted classes (B, H, W) and true masks (B of (H, W)); returns each image's decision."""
        k = len(self.class_names)
        decisions = image_decisions(pred, self.defect_pixels).astype(np.int64)
        for b, (p, t, item) in enumerate(zip(pred, masks, ids, strict=True)):
            self.ids.append(str(item))
            self.counts.append(pixel_counts(p, t, k, self.pixels))
            self.predicted.append(bool(decisions[b]))
            self.defective.append(bool(np.any(t)))
        for name in self.subgroups:
            values = (meta or {}).get(name, [""] * len(ids))
            self.meta[name] += [str(v) for v in values]
        return decisions

    def compute(self, split: str, confidence: float, replicates: int, perturbation: str | None = None,
                amplitude: float | None = None) -> list[Measurement]:
        pscope = None if perturbation is None else PerturbationScope(name=perturbation, max_amplitude=amplitude)
        counts = np.array(self.counts, np.float64).reshape(len(self.ids), len(self.class_names), 3)
        weights = bootstrap_weights(self.seed, self.check, self.ids, replicates).astype(np.float64)
        every = np.ones(len(self.ids), bool)
        out = self._group(every, counts, weights, Scope(split=split, perturbation=pscope), confidence, amplitude)
        for name in self.subgroups:
            values = np.array(self.meta[name])
            for v in sorted(set(values) - {""}):
                scope = Scope(split=split, subgroup={name: v}, perturbation=pscope)
                out += self._group(values == v, counts, weights, scope, confidence, amplitude)
        return out

    def _group(self, sel: np.ndarray, counts: np.ndarray, weights: np.ndarray, scope: Scope, confidence: float,
               amplitude: float | None) -> list[Measurement]:
        n = int(sel.sum())
        common = dict(scope=scope, amplitude=amplitude)
        total = counts[sel].sum(0)  # (K, 3)
        boot = np.einsum("ir,ikj->rkj", weights[sel], counts[sel])  # (R, K, 3) per replicate
        out: list[Measurement] = []
        means: dict[str, tuple[list[float], list[np.ndarray]]] = {"iou": ([], []), "dice": ([], [])}
        point, replicate = _ratios(total), _ratios(boot)
        for metric in PIXEL_METRICS:
            num, den = point[metric]
            bnum, bden = replicate[metric]
            for c, name in enumerate(self.class_names):
                if den[c] == 0:
                    out.append(estimate(self.check, f"{metric}:{name}", None, n, None, **common,
                                        details={"undefined": UNDEFINED[metric].format(c=name)}))
                    continue
                with np.errstate(invalid="ignore", divide="ignore"):  # a replicate that drew no such pixel
                    reps = bnum[:, c] / bden[:, c]
                value = float(num[c] / den[c])
                out.append(estimate(self.check, f"{metric}:{name}", value, n, bootstrap_interval(reps, confidence),
                                    **common, details={"pixels": int(den[c]), "tp": int(total[c, 0]),
                                                       "fp": int(total[c, 1]), "fn": int(total[c, 2])}))
                if metric in means:
                    means[metric][0].append(value)
                    means[metric][1].append(reps)
        for metric, (values, reps) in means.items():
            if not values:
                out.append(estimate(self.check, f"mean_{metric}", None, n, None, **common,
                                    details={"undefined": "no class in the true masks or predicted"}))
                continue
            with warnings.catch_warnings():  # a replicate where no class is defined has no mean
                warnings.simplefilter("ignore", RuntimeWarning)
                iv = bootstrap_interval(np.nanmean(np.stack(reps), axis=0), confidence)
            out.append(estimate(self.check, f"mean_{metric}", float(np.mean(values)), n, iv, **common,
                                details={"classes": len(values)}))
        predicted, defective = np.array(self.predicted, bool)[sel], np.array(self.defective, bool)[sel]
        rule = {"defect_pixels": self.defect_pixels}
        out.append(proportion(self.check, "image_recall", int((predicted & defective).sum()), int(defective.sum()),
                              confidence, scope, amplitude, undefined="no defective image (none with a true defect "
                              "pixel)", **rule))
        out.append(proportion(self.check, "image_false_alarm_rate", int((predicted & ~defective).sum()),
                              int((~defective).sum()), confidence, scope, amplitude,
                              undefined="no defect-free image (every one has a true defect pixel)", **rule))
        return out
