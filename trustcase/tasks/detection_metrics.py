"""Detection metrics, streamed: per-class AP and mAP at IoU 0.5 and over IoU 0.5:0.95 (COCO's rule: greedy matching
by decreasing score, 101-point interpolated precision, at most 100 detections per image and class, every box of
area "all"), and at the operating score threshold the recall of true indications and the false indications per
image.

`DetectionTally.update` matches one batch's detections to its true boxes image by image and keeps, per detection,
only its class, score, image and whether it is a true positive at each IoU threshold; `compute` sorts them once.
Intervals: AP and false indications per image by the Poisson bootstrap over images (each image's weights from
(seed, check, image id, "bootstrap"), `measurement.bootstrap_weights`: the same interval at any batch size, order
or shard count); recall by the wider of Clopper-Pearson over boxes and that bootstrap over images (boxes of one
image are not independent: an image missed whole misses all its boxes; `box_recall`). The AP agrees with pycocotools'
COCOeval on the same detections (tests/test_detection_metrics.py).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse

from trustcase.measurement import bootstrap_interval, bootstrap_weights, estimate, proportion
from trustcase.schemas import Interval, Measurement, PerturbationScope, Scope

# COCO's thresholds, written as pycocotools writes them (the same floats, so the same matches at a tie)
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
MAX_DETECTIONS = 100  # per image and class, as COCO's AP
# what a detection leaves behind (30 bytes): its image, class, score, rank in its image and class, match per IoU
ROW = np.dtype([("image", np.int32), ("cls", np.int16), ("score", np.float64), ("rank", np.int32),
                ("tp", np.bool_, (len(IOU_THRESHOLDS),))])


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of `a` (N, 4) with every box of `b` (M, 4), x1 y1 x2 y2 in pixels (areas w * h)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nan_to_num(inter / (area_a[:, None] + area_b[None, :] - inter))


def match(dets: np.ndarray, gts: np.ndarray, thresholds: np.ndarray = IOU_THRESHOLDS) -> np.ndarray:
    """COCO's greedy matching of one image and one class: detections (K, 6) sorted by decreasing score, true boxes
    (G, 5); (K, T) True where detection k matches a box not matched before at IoU >= threshold t (the best such
    box, the later one on a tie, as pycocotools)."""
    tp = np.zeros((len(dets), len(thresholds)), bool)
    if not len(dets) or not len(gts):
        return tp
    ious = iou(dets[:, :4], gts[:, :4])
    for t, threshold in enumerate(thresholds):
        taken = np.zeros(len(gts), bool)
        for k in range(len(dets)):
            best, m = min(threshold, 1 - 1e-10), -1
            for g in range(len(gts)):
                if not taken[g] and ious[k, g] >= best:
                    best, m = ious[k, g], g
            if m >= 0:
                taken[m], tp[k, t] = True, True
    return tp


def average_precision(tp: np.ndarray, n_true: float | np.ndarray, weights: np.ndarray | None = None,
                      seen: np.ndarray | None = None) -> np.ndarray:
    """COCO's 101-point interpolated AP of one class's detections sorted by decreasing score, `tp` (K,) their
    matches; with `weights` (K, R) (each detection counted as often as its image is drawn) one AP per bootstrap
    replicate, `n_true` (R,) then, and `seen` (K, R) their cumulative sum if already made (shared by the IoU
    thresholds). NaN where there is no true box.

    Only the true positives matter: precision rises only at one, so the envelope (the best precision at any
    recall >= r) and the first detection reaching recall r are both found among them."""
    n_true = np.asarray(n_true, np.float64).reshape(-1)
    w = np.ones((len(tp), 1)) if weights is None else np.asarray(weights, np.float64)
    hit = np.flatnonzero(tp)
    out = np.zeros(w.shape[1])
    if len(hit):
        tps = np.cumsum(w[hit], axis=0)
        counted = (np.cumsum(w, axis=0) if seen is None else seen)[hit]  # detections so far, true or false
        with np.errstate(invalid="ignore", divide="ignore"):
            recall = tps / n_true
            precision = tps / (counted + np.spacing(1))
        precision = np.flip(np.maximum.accumulate(np.flip(precision, 0), axis=0), 0)
        for j in range(w.shape[1]):  # recall is non-decreasing down each column
            at = np.searchsorted(recall[:, j], RECALL_POINTS, side="left")
            out[j] = np.where(at < len(hit), precision[np.minimum(at, len(hit) - 1), j], 0.0).mean()
    out = np.where(np.broadcast_to(n_true, out.shape) > 0, out, np.nan)
    return out if weights is not None else out[0]


def precision_envelope(tp: np.ndarray, n_true: float) -> np.ndarray:
    """COCO's interpolated precision at the 101 recall points (0 past the highest recall reached) of one class's
    detections sorted by decreasing score: the precision-recall curve whose mean is `average_precision`."""
    hit = np.flatnonzero(tp)
    if not len(hit) or n_true <= 0:
        return np.zeros(len(RECALL_POINTS))
    recall = np.arange(1, len(hit) + 1) / n_true
    precision = np.arange(1, len(hit) + 1) / (hit + 1 + np.spacing(1))
    precision = np.flip(np.maximum.accumulate(np.flip(precision)))
    at = np.searchsorted(recall, RECALL_POINTS, side="left")
    return np.where(at < len(hit), precision[np.minimum(at, len(hit) - 1)], 0.0)


class DetectionTally:
    """Streams a split's detections against its true boxes; `compute` gives the measurements."""

    def __init__(self, class_names: list[str], operating_threshold: float, check: str, seed: int):
        self.class_names, self.threshold, self.check, self.seed = class_names, operating_threshold, check, seed
        self.ids: list[str] = []
        self.n_true: list[np.ndarray] = []  # per image: true boxes per class
        self.rows: list[np.ndarray] = []  # per detection a `ROW`: AP needs every scored detection, compactly
        self.found_at_threshold: list[np.ndarray] = []  # per image: true boxes found above the threshold, per class
        self.groups: list[dict[str, str]] = []  # per image: its ODD subgroups

    def update(self, detections: list[np.ndarray], boxes: list[np.ndarray], ids: list[str],
               groups: list[dict[str, str]] | None = None) -> None:
        """One batch: per image its detections (K, 6), its true boxes (G, 5) and optionally its ODD subgroups
        ({descriptor: value}), each measured apart by `compute(subgroups=True)`."""
        n_classes = len(self.class_names)
        for j, (dets, gts, item) in enumerate(zip(detections, boxes, ids, strict=True)):
            image = len(self.ids)
            self.ids.append(str(item))
            self.groups.append(groups[j] if groups else {})
            self.n_true.append(np.bincount(gts[:, 4].astype(int), minlength=n_classes))
            found = np.zeros(n_classes, int)
            for c in range(n_classes):
                d = dets[dets[:, 5] == c]
                d = d[np.argsort(-d[:, 4], kind="mergesort")][:MAX_DETECTIONS]
                g = gts[gts[:, 4] == c]
                tp = match(d, g)
                if len(d):
                    r = np.empty(len(d), ROW)
                    r["image"], r["cls"], r["score"], r["rank"], r["tp"] = image, c, d[:, 4], np.arange(len(d)), tp
                    self.rows.append(r)
                above = d[d[:, 4] >= self.threshold]
                found[c] = int(match(above, g, IOU_THRESHOLDS[:1])[:, 0].sum())
            self.found_at_threshold.append(found)

    def compute(self, split: str, confidence: float, replicates: int, perturbation: str | None = None,
                amplitude: float | None = None, subgroups: bool = False) -> list[Measurement]:
        """Every metric over the split, and with `subgroups` the same per ODD subgroup the images were given
        (per-class figures only for the classes that have a true box in the subgroup)."""
        pscope = None if perturbation is None else PerturbationScope(name=perturbation, max_amplitude=amplitude)
        rows = self._sorted_rows()
        weights = bootstrap_weights(self.seed, self.check, self.ids, replicates).astype(np.float64)
        everything = np.ones(len(self.ids), bool)
        out = self._measure(Scope(split=split, perturbation=pscope), amplitude, confidence, rows, weights, everything)
        if subgroups:
            for (name, value) in sorted({kv for g in self.groups for kv in g.items()}):
                members = np.array([g.get(name) == value for g in self.groups], bool)
                scope = Scope(split=split, subgroup={name: value}, perturbation=pscope)
                out += self._measure(scope, amplitude, confidence, rows, weights, members)
        return out

    def precision_recall(self) -> dict[str, np.ndarray]:
        """Per class with a true box, its precision at `RECALL_POINTS` at IoU 0.5 (`precision_envelope`)."""
        rows = self._sorted_rows()
        n_true = np.array(self.n_true).reshape(-1, len(self.class_names)).sum(0)
        return {name: precision_envelope(rows["tp"][rows["cls"] == c, 0], float(n_true[c]))
                for c, name in enumerate(self.class_names) if n_true[c]}

    def at_thresholds(self, thresholds: np.ndarray, confidence: float, replicates: int) -> dict[str, np.ndarray]:
        """Recall of the true boxes and false indications per image if the operating threshold were each of
        `thresholds`, with their intervals (rows 'recall', 'recall_lower', ..., 'false', 'false_lower', ...), and
        each class's recall ('recall:<class>', for the classes with a true box).
        COCO's greedy matching goes by decreasing score, so the detections above a threshold are matched exactly
        as the full list's prefix: a box counts as found at t when the detection that takes it scores >= t (the
        operating point's `recall` matches the detections above it alone: the same, up to the 100 detections
        per image and class kept here)."""
        rows = self._sorted_rows()
        n_true = int(np.array(self.n_true).sum())
        n_images = len(self.ids)
        weights = bootstrap_weights(self.seed, self.check, self.ids, replicates).astype(np.float64)
        boot_true = weights.T @ np.array(self.n_true).reshape(n_images, -1).sum(1) if n_images else None
        per_class = np.array(self.n_true).reshape(n_images, -1).sum(0)
        out: dict[str, list[float]] = {k: [] for k in ("recall", "recall_lower", "recall_upper", "false",
                                                      "false_lower", "false_upper")}
        for t in thresholds:
            above = rows[rows["score"] >= t]
            tp = above["tp"][:, 0]
            hits = np.bincount(above["cls"][tp], minlength=len(self.class_names))
            for c, name in enumerate(self.class_names):
                if per_class[c]:
                    out.setdefault(f"recall:{name}", []).append(float(hits[c] / per_class[c]))
            found = np.bincount(above["image"][tp], minlength=n_images).astype(float)
            false = np.bincount(above["image"][~tp], minlength=n_images).astype(float)
            with np.errstate(invalid="ignore", divide="ignore"):
                r = proportion(self.check, "indication_recall", int(found.sum()), n_true, confidence)
                rb = bootstrap_interval((weights.T @ found) / boot_true, confidence) if n_images else None
                fb = bootstrap_interval(weights.T @ false / weights.sum(axis=0), confidence) if n_images else None
            lo = min(r.interval.lower, rb.lower) if r.interval and rb else np.nan
            hi = max(r.interval.upper, rb.upper) if r.interval and rb else np.nan
            for k, v in (("recall", r.value if r.value is not None else np.nan), ("recall_lower", lo),
                         ("recall_upper", hi), ("false", false.sum() / max(n_images, 1)),
                         ("false_lower", fb.lower if fb else np.nan), ("false_upper", fb.upper if fb else np.nan)):
                out[k].append(float(v))
        return {k: np.array(v) for k, v in out.items()}

    def _sorted_rows(self) -> np.ndarray:
        rows = np.concatenate(self.rows) if self.rows else np.zeros(0, ROW)
        # one order for every split and batch size: score, then image, then rank in the image (COCO's at a tie)
        return rows[np.lexsort((rows["rank"], rows["image"], -rows["score"]))]

    def _measure(self, scope: Scope, amplitude: float | None, confidence: float, rows: np.ndarray,
                 weights: np.ndarray, members: np.ndarray) -> list[Measurement]:
        """The metrics over the images in `members` (the split, or one subgroup)."""
        n_classes = len(self.class_names)
        n_images = int(members.sum())
        rows = rows[members[rows["image"]]]
        n_true = np.array(self.n_true).reshape(-1, n_classes) * members[:, None]
        weights = weights * members[:, None]  # an image outside the subgroup is never drawn
        common = dict(scope=scope, amplitude=amplitude)
        whole = members.all()
        out: list[Measurement] = []
        ap50, ap, ap50_boot, ap_boot = [], [], [], []
        found_per_image = np.array(self.found_at_threshold).reshape(-1, n_classes).astype(float) * members[:, None]
        for c, name in enumerate(self.class_names):
            r = rows[rows["cls"] == c]
            tp = r["tp"]
            total = float(n_true[:, c].sum())
            if total == 0 and not whole:  # a subgroup without this class: nothing to say about it
                continue
            boot_true = weights.T @ n_true[:, c]
            per_t = np.array([average_precision(tp[:, t], total) for t in range(len(IOU_THRESHOLDS))])
            # the replicates see only the detections that are a true positive at some IoU (`average_precision`
            # reads no other), each with the weighted count of detections up to it: memory in true positives
            kept, seen = _seen_at_hits(tp.any(axis=1), r["image"], weights)
            drawn = weights[r["image"][kept]]
            boot = np.array([average_precision(tp[kept, t], boot_true, drawn, seen)
                             for t in range(len(IOU_THRESHOLDS))])
            ap50.append(per_t[0])
            ap.append(per_t.mean())
            ap50_boot.append(boot[0])
            ap_boot.append(boot.mean(axis=0))
            why = {"undefined": f"no true box of class {name}"} if total == 0 else {}
            for metric, value, b in ((f"ap50:{name}", per_t[0], boot[0]), (f"ap:{name}", per_t.mean(), boot.mean(0))):
                out.append(estimate(self.check, metric, None if total == 0 else float(value), n_images,
                                    None if total == 0 else bootstrap_interval(b, confidence), details=why, **common))
            out.append(box_recall(self.check, f"recall:{name}", found_per_image[:, c], n_true[:, c], weights,
                               confidence, scope, amplitude, undefined=f"no true box of class {name}",
                               threshold=self.threshold, iou=0.5))
        for metric, values, boot in (("map50", ap50, ap50_boot), ("map", ap, ap_boot)):
            defined = ~np.isnan(values)
            value = float(np.mean(np.array(values)[defined])) if defined.any() else None
            iv = None
            if defined.any():
                with warnings.catch_warnings():  # a replicate that drew no box of any class has no mAP
                    warnings.simplefilter("ignore", RuntimeWarning)
                    iv = bootstrap_interval(np.nanmean(np.array(boot)[defined], axis=0), confidence)
            out.append(estimate(self.check, metric, value, n_images, iv, **common,
                                details={} if value is not None else {"undefined": "no true box in the split"}))
        out.append(box_recall(self.check, "indication_recall", found_per_image.sum(1), n_true.sum(1).astype(float),
                           weights, confidence, scope, amplitude, undefined="no true box in the split",
                           threshold=self.threshold, iou=0.5))
        # false indications: detections above the threshold that match no true box of their class at IoU 0.5
        above = rows[rows["score"] >= self.threshold]
        false_per_image = np.bincount(above["image"][~above["tp"][:, 0]], minlength=len(members))
        iv = None
        if n_images:
            with np.errstate(invalid="ignore", divide="ignore"):
                iv = bootstrap_interval(weights.T @ false_per_image / weights.sum(axis=0), confidence)
        out.append(estimate(self.check, "false_indications_per_image",
                            float(false_per_image.sum() / n_images) if n_images else None, n_images, iv,
                            unit="per image", details={"threshold": self.threshold, "iou": 0.5} if n_images else
                            {"undefined": "no image in the split"}, **common))
        return out

def _seen_at_hits(hit: np.ndarray, image: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of `hit` in a class's sorted detections and, per bootstrap replicate, the weighted count of
    detections up to each (their images' weights summed): the cumulative sum of `weights[image]` read at the hits,
    without the (detections x replicates) array. A sparse matrix gives each detection to the first hit at or after
    it; the rows after the last hit count for nothing."""
    kept = np.flatnonzero(hit)
    if not len(kept):
        return kept, np.zeros((0, weights.shape[1]))
    upto = image[:kept[-1] + 1]
    segment = np.searchsorted(kept, np.arange(len(upto)), side="left")  # the hit each detection counts towards
    per_segment = sparse.csr_matrix((np.ones(len(upto)), (segment, upto)), shape=(len(kept), len(weights)))
    return kept, np.cumsum(per_segment @ weights, axis=0)


def box_recall(check: str, metric: str, found: np.ndarray, true: np.ndarray, weights: np.ndarray, confidence: float,
            scope: Scope, amplitude: float | None, undefined: str, **details) -> Measurement:
    """Recall of true boxes, found / true summed over the images, with an interval that holds whether the boxes
    behave independently or cluster by image: the union of Clopper-Pearson over boxes and the Poisson bootstrap
    over images (the ratio of weighted sums per replicate). Either alone understates the uncertainty in one of the
    two cases (few images, many boxes each: the bootstrap; everything found: Clopper-Pearson's floor)."""
    m = proportion(check, metric, int(found.sum()), int(true.sum()), confidence, scope, amplitude,
                   undefined=undefined, **details)
    if m.interval is None:
        return m
    with np.errstate(invalid="ignore", divide="ignore"):
        boot = bootstrap_interval((weights.T @ found) / (weights.T @ true), confidence)
    if boot is None:
        return m
    iv = Interval(lower=min(m.interval.lower, boot.lower), upper=max(m.interval.upper, boot.upper),
                  confidence=confidence, method=f"wider of {m.interval.method} over boxes and {boot.method} "
                                                f"over images")
    return m.model_copy(update={"interval": iv})


def detection_metrics(class_names: list[str]) -> list[str]:
    """The metric names `DetectionTally.compute` emits (what a check built on it declares it produces)."""
    return ["map50", "map", "indication_recall", "false_indications_per_image",
            *(f"{f}:{c}" for c in class_names for f in ("ap50", "ap", "recall"))]
