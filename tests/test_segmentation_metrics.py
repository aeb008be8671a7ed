"""Segmentation metrics against hand-computed confusion counts, their intervals and measurement kinds."""

from __future__ import annotations

import numpy as np
import pytest

from trustcase.measurement import bootstrap_interval, bootstrap_weights, clopper_pearson
from trustcase.tasks.segmentation_metrics import SegmentationTally, pixel_counts, segmentation_metrics

CLASSES = ["background", "defect"]


def _three():
    """Three 4x4 images. a: 4 true defect pixels, 3 found and 2 false; b: defect-free, 1 false pixel; c: 2 true
    defect pixels, none found."""
    true = np.zeros((3, 4, 4), np.uint8)
    pred = np.zeros((3, 4, 4), np.int64)
    true[0, 0, :4] = 1
    pred[0, 0, :3] = 1
    pred[0, 3, :2] = 1
    pred[1, 2, 2] = 1
    true[2, 1, 1:3] = 1
    return pred, true, ["a", "b", "c"], {"type": ["x", "y", "x"]}


def test_pixel_counts_by_hand():
    pred, true, _, _ = _three()
    # rows: background, defect; columns: true positives, false positives, false negatives
    assert pixel_counts(pred[0], true[0], 2).tolist() == [[10, 1, 2], [3, 2, 1]]
    assert pixel_counts(pred[1], true[1], 2).tolist() == [[15, 0, 1], [0, 1, 0]]
    assert pixel_counts(pred[2], true[2], 2).tolist() == [[14, 2, 0], [0, 0, 2]]


def _measure(defect_pixels=2, batches=1):
    pred, true, ids, meta = _three()
    tally = SegmentationTally(CLASSES, defect_pixels, "performance", seed=3, subgroups=["type"])
    for part in np.array_split(np.arange(3), batches):
        tally.update(pred[part], list(true[part]), [ids[i] for i in part], {"type": [meta["type"][i] for i in part]})
    return tally.compute("test", 0.95, 200)


def test_the_figures_are_the_hand_computed_ones():
    ms = {(m.metric, tuple(m.scope.subgroup.items())): m for m in _measure()}
    whole = {k[0]: m.value for k, m in ms.items() if not k[1]}
    # defect over the split: TP 3, FP 3, FN 3; background: TP 39, FP 3, FN 3
    assert whole["iou:defect"] == pytest.approx(3 / 9, abs=1e-15)
    assert whole["dice:defect"] == pytest.approx(6 / 12, abs=1e-15)
    assert whole["pixel_precision:defect"] == pytest.approx(3 / 6, abs=1e-15)
    assert whole["pixel_recall:defect"] == pytest.approx(3 / 6, abs=1e-15)
    assert whole["iou:background"] == pytest.approx(39 / 45, abs=1e-15)
    assert whole["mean_iou"] == pytest.approx((3 / 9 + 39 / 45) / 2, abs=1e-15)
    assert whole["mean_dice"] == pytest.approx((6 / 12 + 78 / 84) / 2, abs=1e-15)
    # the rule "at least 2 defect pixels": a is found, c (true defect, nothing predicted) missed, b (1 pixel) quiet
    assert whole["image_recall"] == 1 / 2 and whole["image_false_alarm_rate"] == 0
    # per subgroup: type x is a and c; type y is b alone (no true defect pixel: recall and pixel recall undefined)
    assert ms[("iou:defect", (("type", "x"),))].value == pytest.approx(3 / (3 + 2 + 3), abs=1e-15)
    y = {k[0]: m for k, m in ms.items() if k[1] == (("type", "y"),)}
    assert y["iou:defect"].value == 0 and y["pixel_precision:defect"].value == 0
    assert y["pixel_recall:defect"].value is None and "no true pixel of class defect" in \
        y["pixel_recall:defect"].details["undefined"]
    assert y["image_recall"].value is None and y["image_false_alarm_rate"].value == 0
    assert {m.metric for m in _measure() if not m.scope.subgroup} == set(segmentation_metrics(CLASSES))


def test_the_operating_rule_decides_the_image():
    whole = {m.metric: m.value for m in _measure(defect_pixels=1) if not m.scope.subgroup}
    assert whole["image_false_alarm_rate"] == 1  # b's one pixel is enough at the rule "at least 1"
    whole = {m.metric: m.value for m in _measure(defect_pixels=6) if not m.scope.subgroup}
    assert whole["image_recall"] == 0  # a's 5 predicted pixels are not


def test_kinds_and_intervals():
    ms = {m.metric: m for m in _measure() if not m.scope.subgroup}
    # IoU: an estimate whose interval is the percentile interval of the same ratio of weighted sums per replicate
    w = bootstrap_weights(3, "performance", ["a", "b", "c"], 200).astype(float)
    tp, fp, fn = w.T @ [3, 0, 0], w.T @ [2, 1, 0], w.T @ [1, 0, 2]
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = bootstrap_interval(tp / (tp + fp + fn), 0.95)
    iou = ms["iou:defect"]
    assert iou.kind == "estimate" and iou.n == 3 and "bootstrap" in iou.interval.method
    assert (iou.interval.lower, iou.interval.upper) == pytest.approx((expected.lower, expected.upper), abs=1e-12)
    assert iou.details == {"pixels": 9, "tp": 3, "fp": 3, "fn": 3}
    # image-level rates: Clopper-Pearson on images, 1 of 2 defective found
    recall = ms["image_recall"]
    assert recall.kind == "estimate" and recall.n == 2 and recall.interval == clopper_pearson(1, 2, 0.95)
    assert recall.details["defect_pixels"] == 2


def test_the_same_evidence_at_any_batch_size():
    one, three = _measure(batches=1), _measure(batches=3)
    assert [m.model_dump() for m in one] == [m.model_dump() for m in three]


def test_an_empty_split_is_undefined_not_zero():
    ms = SegmentationTally(CLASSES, 1, "performance", 0).compute("test", 0.95, 50)
    assert all(m.value is None and m.details.get("undefined") for m in ms)
