"""Object detection: the model's output contract, the label of an item (its true boxes) and loading.

Output contract (one for TorchScript, ONNX and black boxes): the model maps a normalised batch (B, C, H, W) to
one float tensor (B, D, 6), each row a detection (x1, y1, x2, y2, score, class) in pixels of the input image,
class an index into `model.class_names`, score in [0, 1]; a row with score < 0 is padding (D is the most
detections any image of the batch has; a fixed D with padding is what an exported graph can return). An item's label
is its true boxes, `data.streaming.Boxes` (K, 5) rows (x1, y1, x2, y2, class), K >= 0.
"""

from __future__ import annotations

import numpy as np
import torch

from trustcase.data.streaming import judge_boxes
from trustcase.measurement import BOOTSTRAP_REPLICATES
from trustcase.models.classifier import Classifier, ModelError, NonFiniteOutput
from trustcase.models.loading import load_classifier
from trustcase.schemas import ModelSpec
from trustcase.tasks import Task
from trustcase.tasks.detection_metrics import DetectionTally, detection_metrics

ROW = 6  # x1, y1, x2, y2, score, class


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


class Detection(Task):
    name = "detection"
    subgroups = False  # per ODD subgroup comes next (issue 26)
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
    """AP, mAP, recall and false indications at the operating threshold (`detection_metrics.DetectionTally`)."""

    def __init__(self, use_case, check: str, seed: int):
        self.threshold = use_case.model.score_threshold
        self.tally = DetectionTally(use_case.model.class_names, self.threshold, check, seed)

    def update(self, model: Detector, batch) -> np.ndarray:
        """Per image its decision: the set of classes it indicates at the operating threshold (a bit mask)."""
        dets = model.detect(batch.images, batch.ids)
        self.tally.update(dets, batch.labels, batch.ids)
        return np.array([sum(1 << c for c in {int(k) for k in d[d[:, 4] >= self.threshold, 5]}) for d in dets],
                        np.int64)

    def compute(self, split, confidence, perturbation=None, amplitude=None):
        return self.tally.compute(split, confidence, BOOTSTRAP_REPLICATES, perturbation, amplitude)

    def figures(self, split, measurements):
        return []

    def validity(self, split, confidence):
        return (f"measured on the {split} split ({len(self.tally.ids)} images); AP as COCO computes it (greedy "
                "matching by score, 101-point interpolation, at most 100 detections per image and class, IoU 0.5 "
                f"and 0.5:0.95); recall and false indications at the operating score threshold {self.threshold:g} "
                f"and IoU 0.5; {confidence:.0%} intervals: Clopper-Pearson for recall, for AP, mAP and false "
                f"indications per image the percentile interval of a Poisson bootstrap over images "
                f"({BOOTSTRAP_REPLICATES} replicates, each image's weights drawn from its id)")
