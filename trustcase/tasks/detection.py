"""Object detection: the model's output contract, the label of an item (its true boxes) and loading.

Output contract (one for TorchScript, ONNX and black boxes): the model maps a normalised batch (B, C, H, W) to
one float tensor (B, D, 6), each row a detection (x1, y1, x2, y2, score, class) in pixels of the input image,
class an index into `model.class_names`, score in [0, 1]; a row with score < 0 is padding (D is the most
detections any image of the batch has; a fixed D with padding is what an exported graph can return). An item's label
is its true boxes, `data.streaming.Boxes` (K, 5) rows (x1, y1, x2, y2, class), K >= 0.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch

from trustcase.data.streaming import judge_boxes
from trustcase.measurement import BOOTSTRAP_REPLICATES
from trustcase.models.classifier import Classifier, ModelError, NonFiniteOutput
from trustcase.models.loading import load_classifier
from trustcase.schemas import Curve, ModelSpec, Series, UseCase
from trustcase.tasks import Task
from trustcase.tasks.detection_metrics import RECALL_POINTS, DetectionTally, detection_metrics

ROW = 6  # x1, y1, x2, y2, score, class
SUBGROUP_BANDS = 3  # an image descriptor's ODD range is cut in three equal bands for per-subgroup figures
OPERATING_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)  # score thresholds of the operating curves


class Detector(Classifier):
    """A detector seen through the use case's contract: pixel-space images in, detections per image out."""

    def __init__(self, inner: Classifier):
        super().__init__(inner.spec, module=inner.module, session=inner.session)
        self._inner = inner  # a black box keeps its own forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._inner.forward(x)

    def check_output(self, out: torch.Tensor, ids: list[str] | None = None) -> None:
        judge_output(out, len(self.spec.class_names), tuple(self.spec.input_shape[1:]), ids)

    def detect(self, images: np.ndarray, ids: list[str] | None = None) -> list[np.ndarray]:
        """One (K, 6) float64 array per image, padding rows removed, sorted by decreasing score."""
        out = self.logits(images, ids).astype(np.float64)
        dets = []
        for rows in out:
            rows = rows[rows[:, 4] >= 0]
            dets.append(rows[np.argsort(-rows[:, 4], kind="stable")])
        return dets


def judge_output(out: torch.Tensor, n_classes: int, image_hw: tuple[int, ...], ids: list[str] | None = None) -> None:
    """`ModelError` naming the first item whose detections break the contract (structure, NaN, x2 < x1, class)."""
    if not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[2] != ROW:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"detector output is {shape}, expected one tensor (batch, detections, 6) of rows (x1, y1, x2, "
                         "y2, score, class), padding rows with score < 0")
    rows = out.detach().double()
    real = rows[..., 4] >= 0
    name = (lambda b: f"item {ids[b]}" if ids else f"item {b} of the batch")
    bad_score = torch.isnan(rows[..., 4]) | (rows[..., 4] > 1)
    problems = [
        (bad_score, "a score that is NaN or above 1 (scores are in [0, 1]; padding rows < 0)"),
        (real & ~torch.isfinite(rows[..., :4]).all(-1), "a non-finite box coordinate"),
        (real & ((rows[..., 2] < rows[..., 0]) | (rows[..., 3] < rows[..., 1])), "a box with x2 < x1 or y2 < y1"),
        (real & ((rows[..., 5] != rows[..., 5].round()) | (rows[..., 5] < 0) | (rows[..., 5] >= n_classes)),
         f"a class that is not an index 0..{n_classes - 1}"),
    ]
    for mask, what in problems:
        hit = mask.any(-1)
        if hit.any():
            b = int(torch.nonzero(hit)[0])
            d = int(torch.nonzero(mask[b])[0])
            error = NonFiniteOutput if "NaN" in what or "finite" in what else ModelError
            raise error(f"detector output for {name(b)}, detection {d}: {what} "
                        f"(row {[round(float(v), 4) for v in rows[b, d]]}; {int(hit.sum())} item(s) of the batch)")


def subgroups_of(use_case: UseCase, images: np.ndarray, meta: dict[str, list[str]]) -> list[dict[str, str]]:
    """Each image's ODD subgroups: a categorical metadata descriptor's value, and an image descriptor with a range
    (brightness, contrast, ...) as the third of its ODD range the image falls in ("30-103"; "below 30" and
    "above 250" outside it). Equal thirds of the declared range, not of the data: the same bands for every split
    and model."""
    from trustcase.odd.descriptors import DESCRIPTORS, Views

    groups: list[dict[str, str]] = [{} for _ in range(len(images))]
    views = Views(images, use_case.model.value_range)
    for d in use_case.odd.descriptors:
        if d.categorical and d.source == "metadata":
            for g, v in zip(groups, meta.get(d.name, [None] * len(groups)), strict=True):
                if v is not None:
                    g[d.name] = str(v)
        elif d.source == "image" and d.name in DESCRIPTORS and d.min is not None and d.max is not None:
            edges = np.linspace(d.min, d.max, SUBGROUP_BANDS + 1)
            values = DESCRIPTORS[d.name].fn(views)
            for g, v in zip(groups, values, strict=True):
                if v < d.min:
                    g[d.name] = f"below {d.min:g}"
                elif v > d.max:
                    g[d.name] = f"above {d.max:g}"
                else:
                    k = min(int(np.searchsorted(edges, v, side="right")) - 1, SUBGROUP_BANDS - 1)
                    g[d.name] = f"{edges[k]:.4g}-{edges[k + 1]:.4g}"
    return groups


def example_image(images: np.ndarray, detections: list[np.ndarray], truths: list[np.ndarray], captions: list[str],
                  class_names: list[str], threshold: float, value_range: tuple[float, float],
                  min_side: int = 200) -> np.ndarray:
    """One row of tiles (BGR uint8): true boxes in green, the detections at or above the operating threshold in
    red with their class and score, each tile captioned."""
    from trustcase.robustness.sweep import strip_image

    strip = strip_image(list(images), captions, value_range, min_side)
    h, w = images.shape[1:3]
    f = max(1, math.ceil(min_side / min(h, w)))
    for k, (truth, dets) in enumerate(zip(truths, detections, strict=True)):
        left = k * (w * f + 4)
        corners = (lambda r, left=left: ((left + round(r[0] * f), round(r[1] * f)),
                                         (left + round(r[2] * f), round(r[3] * f))))
        for row in truth:
            cv2.rectangle(strip, *corners(row), (0, 170, 0), 2)
        for row in dets[dets[:, 4] >= threshold]:
            (x, y), _ = corners(row)
            cv2.rectangle(strip, *corners(row), (0, 0, 220), 1)
            cv2.putText(strip, f"{class_names[int(row[5])][:12]} {row[4]:.2f}", (x + 2, y + 11),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 220), 1, cv2.LINE_AA)
    return strip


class Detection(Task):
    name = "detection"
    perturbed_subgroups = False  # per subgroup on the clean split only: each subgroup costs another bootstrap
    label_properties = ("box_width", "box_height", "boxes_per_image")
    rejected_labels = "bad_boxes"  # items whose boxes are degenerate, outside the image or of an unknown class
    output = "detections (batch, D, 6): x1, y1, x2, y2 (pixels), score in [0, 1], class; padding score < 0"

    def load_model(self, spec: ModelSpec) -> Detector:
        return load_classifier(spec, wrap=Detector)

    def judge_label(self, label, n_classes, image_hw=None):
        return judge_boxes(label, n_classes, image_hw)  # a class index is refused: the label must be its boxes

    def metrics(self, use_case, calibration=True):
        return detection_metrics(use_case.model.class_names)

    def scorer(self, use_case, check, seed, calibration_bins=15, calibration=True):
        return DetectionScorer(use_case, check, seed)

    def label_stats(self, labels, n_classes):
        """Boxes per class; box widths and heights (pixels, one value per box) and boxes per image."""
        boxes = np.concatenate([np.zeros((0, 5)), *labels])
        return (np.bincount(boxes[:, 4].astype(int), minlength=n_classes),
                {"box_width": boxes[:, 2] - boxes[:, 0], "box_height": boxes[:, 3] - boxes[:, 1],
                 "boxes_per_image": np.array([len(b) for b in labels], np.float64)})


class DetectionScorer:
    """AP, mAP, recall and false indications at the operating threshold (`detection_metrics.DetectionTally`), per
    ODD subgroup on a clean split; the precision-recall curve of each class, recall and false indications against
    the score threshold, and one example image per class with its true and predicted boxes."""

    def __init__(self, use_case, check: str, seed: int):
        self.uc = use_case
        self.threshold = use_case.model.score_threshold
        self.tally = DetectionTally(use_case.model.class_names, self.threshold, check, seed)
        self.examples: dict[int, tuple] = {}  # class -> (image, detections, true boxes, id): the first with a box

    def update(self, model: Detector, batch) -> np.ndarray:
        """Per image its decision: the set of classes it indicates at the operating threshold (a bit mask)."""
        dets = model.detect(batch.images, batch.ids)
        self.tally.update(dets, batch.labels, batch.ids, subgroups_of(self.uc, batch.images, batch.meta))
        for image, d, truth, item in zip(batch.images, dets, batch.labels, batch.ids, strict=True):
            for c in {int(k) for k in truth[:, 4]} - set(self.examples):
                self.examples[c] = (image.copy(), d, truth, item)  # a copy: a view would keep its batch
        return np.array([sum(1 << c for c in {int(k) for k in d[d[:, 4] >= self.threshold, 5]}) for d in dets],
                        np.int64)

    def compute(self, split, confidence, perturbation=None, amplitude=None):
        return self.tally.compute(split, confidence, BOOTSTRAP_REPLICATES, perturbation, amplitude,
                                  subgroups=perturbation is None)

    def figures(self, split, measurements):
        """The precision-recall curves and the operating curves (figures and curves both: `Curve` records)."""
        pr = self.tally.precision_recall()
        claims = {r.metric: r.threshold for r in self.uc.requirements if not r.scope.perturbation}
        out = []
        if pr:
            out.append(Curve(id="precision_recall", title=f"Precision against recall per class, IoU 0.5 ({split})",
                             x_label="recall", y_label="precision (interpolated, COCO)", x=RECALL_POINTS.tolist(),
                             series={c: Series(y=v.tolist()) for c, v in pr.items()},
                             illustrates=["map50", "ap50", "map", "ap"]))
        if self.tally.ids:
            t = OPERATING_GRID
            at = self.tally.at_thresholds(t, self.uc.plan.confidence, BOOTSTRAP_REPLICATES)
            mark = {f"operating threshold {self.threshold:g}": self.threshold}
            per_class = {k.partition(":")[2]: Series(y=v.tolist()) for k, v in at.items() if k.startswith("recall:")}
            out.append(Curve(
                id="recall_threshold", title=f"Indications found against the score threshold ({split})",
                x_label="score threshold", y_label="recall of true indications (IoU 0.5)", x=t.tolist(),
                series={"indication recall": Series(y=at["recall"].tolist(), lower=at["recall_lower"].tolist(),
                                                    upper=at["recall_upper"].tolist()),
                        **per_class},
                x_marks=mark, y_marks={f"claim {v:g}": v for k, v in claims.items() if k == "indication_recall"},
                illustrates=["indication_recall", "recall"]))
            out.append(Curve(
                id="false_indications_threshold", title=f"False indications against the score threshold ({split})",
                x_label="score threshold", y_label="false indications per image", x=t.tolist(),
                series={"false indications per image": Series(y=at["false"].tolist(), lower=at["false_lower"].tolist(),
                                                              upper=at["false_upper"].tolist())},
                x_marks=mark,
                y_marks={f"claim {v:g}": v for k, v in claims.items() if k == "false_indications_per_image"},
                illustrates=["false_indications_per_image"]))
        return out

    def example(self) -> np.ndarray | None:
        """One tile per class (its first image with a true box of the class): true boxes green, indications red."""
        if not self.examples:
            return None
        picked = [self.examples[c] for c in sorted(self.examples)]
        names = self.uc.model.class_names
        return example_image(np.stack([p[0] for p in picked]), [p[1] for p in picked], [p[2] for p in picked],
                             [f"{names[c]}: {p[3]}"[:28] for c, p in zip(sorted(self.examples), picked, strict=True)],
                             names, self.threshold, self.uc.model.value_range)

    def validity(self, split, confidence):
        return (f"measured on the {split} split ({len(self.tally.ids)} images); AP as COCO computes it (greedy "
                "matching by score, 101-point interpolation, at most 100 detections per image and class, IoU 0.5 "
                f"and 0.5:0.95); recall and false indications at the operating score threshold {self.threshold:g} "
                f"and IoU 0.5; {confidence:.0%} intervals: Clopper-Pearson for recall, for AP, mAP and false "
                f"indications per image the percentile interval of a Poisson bootstrap over images "
                f"({BOOTSTRAP_REPLICATES} replicates, each image's weights drawn from its id)")
