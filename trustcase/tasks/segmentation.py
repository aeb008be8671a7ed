"""Semantic segmentation: the model's output contract, the label of an item (its mask) and loading.

Output contract (one for TorchScript, ONNX and black boxes): the model maps a normalised batch (B, C, H, W) to one
float tensor of per-pixel logits (B, K, H, W), K = len(model.class_names), H and W those of `model.input_shape`;
a pixel's predicted class is its argmax. Class 0 is the background, every other class a defect: the image-level
decision is "defective" when at least `model.defect_pixels` pixels are predicted a defect class. An item's label is
its mask, `data.streaming.Mask`: an (H, W) array of class indices the size of its image (`data.masks` reads mask
files and brings images and masks of any size to the model's, the mask following the image exactly).
"""

from __future__ import annotations

import numpy as np
import torch

from trustcase.data.streaming import judge_mask
from trustcase.measurement import BOOTSTRAP_REPLICATES
from trustcase.models.classifier import Classifier, ModelError, NonFiniteOutput
from trustcase.models.loading import load_classifier
from trustcase.schemas import ConfusionMatrix, ModelSpec
from trustcase.tasks import Task
from trustcase.tasks.segmentation_metrics import SegmentationTally, segmentation_metrics


class Segmenter(Classifier):
    """A segmenter seen through the use case's contract: pixel-space images in, per-pixel logits out."""

    def __init__(self, inner: Classifier):
        super().__init__(inner.spec, module=inner.module, session=inner.session)
        self._inner = inner  # a black box keeps its own forward, and answers per pixel
        if hasattr(inner, "pixels"):
            inner.pixels = tuple(inner.spec.input_shape[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._inner.forward(x)

    def check_output(self, out: torch.Tensor, ids: list[str] | None = None) -> None:
        judge_output(out, self.n_classes, tuple(self.spec.input_shape[1:]), ids)

    def segment(self, images: np.ndarray, ids: list[str] | None = None) -> np.ndarray:
        """The predicted class of every pixel, (B, H, W) int64."""
        return self.logits(images, ids).argmax(axis=1)


def judge_output(out: torch.Tensor, n_classes: int, image_hw: tuple[int, ...], ids: list[str] | None = None) -> None:
    """`ModelError` naming what breaks the contract: the structure, the number of classes or the spatial size;
    `NonFiniteOutput` naming the items with a NaN/inf logit."""
    expected = f"(batch, {n_classes}, {', '.join(map(str, image_hw))})"
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"segmenter output is {shape}, expected one tensor of per-pixel logits {expected}")
    if out.shape[1] != n_classes:
        raise ModelError(f"segmenter output has {out.shape[1]} classes (shape {tuple(out.shape)}), expected "
                         f"{expected}: one logit per class of model.class_names")
    if tuple(out.shape[2:]) != tuple(image_hw):
        raise ModelError(f"segmenter output is {out.shape[3]}x{out.shape[2]} px (shape {tuple(out.shape)}), its input "
                         f"{image_hw[1]}x{image_hw[0]}: expected {expected}, one logit per class and input pixel")
    bad = ~torch.isfinite(out).flatten(1).all(dim=1)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        where = [ids[i] for i in rows][:5] if ids else rows[:5]
        raise NonFiniteOutput(f"segmenter produced NaN/inf logits for {len(rows)} input(s), e.g. "
                              f"{'items' if ids else 'batch positions'} {where}")


class Segmentation(Task):
    name = "segmentation"
    output = "per-pixel logits (batch, classes, H, W); class 0 the background"
    label_properties = ("defect_share",)  # per image: the share of its pixels of a defect class
    rejected_labels = "bad_masks"  # items whose mask differs from the image in size or holds a value that is no class
    label_flags = ("empty_masks", "full_masks")  # masks without a defect pixel, masks of defect pixels only

    def load_model(self, spec: ModelSpec) -> Segmenter:
        return load_classifier(spec, wrap=Segmenter)

    def judge_label(self, label, n_classes, image_hw=None):
        return judge_mask(label, n_classes, image_hw)

    def metrics(self, use_case, calibration=True):
        return segmentation_metrics(use_case.model.class_names)

    def scorer(self, use_case, check, seed, calibration_bins=15, calibration=True):
        return SegmentationScorer(use_case, check, seed)

    def label_stats(self, labels, n_classes):
        """Pixels per class; per image the share of its pixels of a defect class."""
        counts = sum((np.bincount(m.ravel().astype(np.int64), minlength=n_classes) for m in labels),
                     np.zeros(n_classes, np.int64))
        return counts, {"defect_share": np.array([np.count_nonzero(m) / m.size for m in labels], np.float64)}

    def count_flags(self, labels) -> dict[str, int]:
        """Masks without a defect pixel, and masks of defect pixels only."""
        share = [np.count_nonzero(m) / m.size for m in labels]
        return {"empty_masks": sum(s == 0 for s in share), "full_masks": sum(s == 1 for s in share)}


class SegmentationScorer:
    """IoU, Dice, pixel precision and recall per class, and the image-level rates at the operating rule
    (`segmentation_metrics.SegmentationTally`), per categorical ODD value too; and the few defective images whose
    defect pixels it marks worst and best (by Dice), for the report's overlays."""

    EXAMPLES = 3  # the worst and the best this many

    def __init__(self, use_case, check: str, seed: int):
        self.rule, self.value_range = use_case.model.defect_pixels, use_case.model.value_range
        subgroups = [d.name for d in use_case.odd.descriptors if d.categorical and d.source == "metadata"]
        self.tally = SegmentationTally(use_case.model.class_names, self.rule, check, seed, subgroups)
        self.examples: list[tuple[float, str, np.ndarray, np.ndarray, np.ndarray]] = []  # dice, id, image, true, pred
        self.tiling = None

    def update(self, model: Segmenter, batch) -> np.ndarray:
        """Per image its decision: 1 defective (at least `defect_pixels` pixels of a defect class), else 0."""
        self.tiling = getattr(model, "tiling", None)  # fit: tiles (`segmentation_tiles.TiledSegmenter`), for the words
        pred = model.segment(batch.images, batch.ids)
        for image, true, p, item in zip(batch.images, batch.labels, pred, batch.ids, strict=True):
            if true.any():  # a defective image: its Dice of defect pixels (any defect class)
                dice = 2 * np.count_nonzero((p > 0) & (true > 0)) / (np.count_nonzero(p) + np.count_nonzero(true))
                self.examples.append((float(dice), str(item), image, true, p.astype(np.uint8)))
        self.examples.sort(key=lambda e: (e[0], e[1]))  # a bounded list: the worst and the best so far
        k = self.EXAMPLES
        self.examples = self.examples if len(self.examples) <= 2 * k else self.examples[:k] + self.examples[-k:]
        return self.tally.update(pred, batch.labels, batch.ids, batch.meta)

    def example(self) -> np.ndarray | None:
        """The kept examples side by side (BGR uint8): the worst first, predicted defect pixels tinted red and the
        true defect outlined in green, each captioned with its Dice. None without a defective image."""
        if not self.examples:
            return None
        return overlays([e[2] for e in self.examples], [e[3] for e in self.examples], [e[4] for e in self.examples],
                        [f"Dice {e[0]:.2f}" for e in self.examples], self.value_range)

    def compute(self, split, confidence, perturbation=None, amplitude=None):
        return self.tally.compute(split, confidence, BOOTSTRAP_REPLICATES, perturbation, amplitude)

    def figures(self, split, measurements):
        """The pixels' confusion matrix (for the IoU, Dice and pixel-rate claims) and the images' at the operating
        rule (for the image-level claims)."""
        t = self.tally
        predicted, defective = np.array(t.predicted, bool), np.array(t.defective, bool)
        images = [[int((~defective & ~predicted).sum()), int((~defective & predicted).sum())],
                  [int((defective & ~predicted).sum()), int((defective & predicted).sum())]]
        pixel_metrics = ["iou", "dice", "pixel_precision", "pixel_recall", "mean_iou", "mean_dice"]
        return [ConfusionMatrix(title=f"Pixels ({split})", classes=t.class_names, counts=t.pixels.tolist(),
                                illustrates=pixel_metrics),
                ConfusionMatrix(title=f"Images at the rule >= {self.rule} defect pixels ({split})",
                                classes=["defect-free", "defective"], counts=images,
                                illustrates=["image_recall", "image_false_alarm_rate"])]

    def validity(self, split, confidence):
        t = self.tiling
        fitted = (f"each at its own size, on its whole mask: the model's tiles of {t.tile[1]}x{t.tile[0]} px "
                  f"overlapping by {t.overlap[1]}x{t.overlap[0]} px, each pixel the mean logits of the tiles covering "
                  "it, padding never scored" if t is not None else
                  "each brought to the model's input size as the use case's loader states, masks by nearest neighbour")
        return (f"measured on the {split} split ({len(self.tally.ids)} images, {fitted}); IoU, Dice, pixel precision "
                "and recall over the split's pixels (ratios of sums over images); an image is decided defective when "
                f"at least {self.rule} pixel(s) are predicted a defect class, and is truly defective when its mask has "
                f"a defect pixel; {confidence:.0%} intervals: the percentile interval of a Poisson bootstrap over "
                f"images ({BOOTSTRAP_REPLICATES} replicates, each image's weights drawn from its id) for the pixel "
                "figures, Clopper-Pearson for the image-level rates")


def overlays(images: list[np.ndarray], true: list[np.ndarray], pred: list[np.ndarray], captions: list[str],
             value_range: tuple[float, float]) -> np.ndarray:
    """Images (H, W, C) in a row, each with its predicted defect pixels tinted red and its true defect outlined in
    green (BGR uint8), captioned underneath."""
    import cv2

    from trustcase.robustness.sweep import strip_image

    lo, hi = value_range
    tiles = []
    for image, t, p in zip(images, true, pred, strict=True):
        u8 = np.rint(np.clip((image.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        bgr = cv2.cvtColor(u8, cv2.COLOR_RGB2BGR) if u8.shape[-1] == 3 else np.repeat(u8[..., :1], 3, axis=2)
        bgr[p > 0] = (0.5 * bgr[p > 0] + 0.5 * np.array([0, 0, 255])).astype(np.uint8)
        outline, _ = cv2.findContours((t > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(bgr, outline, -1, (0, 255, 0), 1)
        tiles.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)  # whole images of several sizes (tiles):
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    return strip_image(tiles, captions, (0, 255))  # each drawn at its own scale on a white margin, never stretched
