"""Detection metrics against exact answers and against pycocotools' COCOeval on the same detections."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

from trustcase.tasks.detection_metrics import DetectionTally, average_precision, iou, match

CLASSES = ["crazing", "inclusion", "scratches"]


def _scene(rng, n_images=40):
    """Random true boxes and detections near them (some shifted, some spurious), float coordinates."""
    truths, dets = [], []
    for _ in range(n_images):
        g = []
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 150, 2)
            w, h = rng.uniform(8, 50, 2)
            g.append((x, y, x + w, y + h, rng.integers(0, len(CLASSES))))
        g = np.array(g, np.float64).reshape(-1, 5)
        d = []
        for box in g:
            for _ in range(rng.integers(0, 3)):
                jitter = rng.normal(0, 4, 4)
                x1, y1 = box[0] + jitter[0], box[1] + jitter[1]
                d.append((x1, y1, max(box[2] + jitter[2], x1 + 1), max(box[3] + jitter[3], y1 + 1),
                          rng.uniform(0, 1), box[4] if rng.uniform() < 0.85 else rng.integers(0, len(CLASSES))))
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 150, 2)
            d.append((x, y, x + rng.uniform(5, 40), y + rng.uniform(5, 40), rng.uniform(0, 1),
                      rng.integers(0, len(CLASSES))))
        truths.append(g)
        dets.append(np.array(d, np.float64).reshape(-1, 6))
    return truths, dets


def _cocoeval(truths, dets):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images = [{"id": i + 1, "width": 200, "height": 200, "file_name": f"{i}.jpg"} for i in range(len(truths))]
    anns, results = [], []
    for i, (g, d) in enumerate(zip(truths, dets)):
        for x1, y1, x2, y2, c in g:
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
        for x1, y1, x2, y2, s, c in d:
            results.append({"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": s})
    gt = COCO()
    gt.dataset = {"info": {}, "images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K) at area "all", 100 detections
    per_class = [precision[:, :, k][precision[:, :, k] > -1].mean() for k in range(len(CLASSES))]
    per_class50 = [precision[0, :, k][precision[0, :, k] > -1].mean() for k in range(len(CLASSES))]
    return ev.stats[0], ev.stats[1], per_class, per_class50


def _ours(truths, dets, replicates=20, batch=7):
    tally = DetectionTally(CLASSES, 0.5, "performance", seed=0)
    ids = [f"{i}.jpg" for i in range(len(truths))]
    for s in range(0, len(ids), batch):
        tally.update(dets[s:s + batch], truths[s:s + batch], ids[s:s + batch])
    return {(m.metric): m for m in tally.compute("test", 0.95, replicates)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ap_and_map_agree_with_pycocotools(seed):
    truths, dets = _scene(np.random.default_rng(seed))
    coco_map, coco_map50, per_class, per_class50 = _cocoeval(truths, dets)
    ours = _ours(truths, dets)
    # both sum the same float64 terms in the same order but for the IoU's x + w; 1e-6 is far above that rounding
    assert ours["map"].value == pytest.approx(coco_map, abs=1e-6)
    assert ours["map50"].value == pytest.approx(coco_map50, abs=1e-6)
    for k, name in enumerate(CLASSES):
        assert ours[f"ap:{name}"].value == pytest.approx(per_class[k], abs=1e-6)
        assert ours[f"ap50:{name}"].value == pytest.approx(per_class50[k], abs=1e-6)


def test_same_evidence_at_any_batch_size():
    truths, dets = _scene(np.random.default_rng(5))
    a, b = _ours(truths, dets, batch=3), _ours(truths, dets, batch=40)
    assert {k: (m.value, m.interval) for k, m in a.items()} == {k: (m.value, m.interval) for k, m in b.items()}
    assert a["map50"].interval.lower <= a["map50"].value <= a["map50"].interval.upper


def test_exact_answers_on_a_hand_made_image():
    # two true boxes of class 0; detections: a perfect hit (0.9), a miss elsewhere (0.8), a hit of the second (0.3)
    g = np.array([[0, 0, 10, 10, 0], [20, 20, 30, 30, 0]], np.float64)
    d = np.array([[0, 0, 10, 10, 0.9, 0], [50, 50, 60, 60, 0.8, 0], [20, 20, 30, 31, 0.3, 0]], np.float64)
    assert iou(d[:, :4], g[:, :4])[2, 1] == pytest.approx(100 / 110)
    tp = match(d, g)
    assert tp[:, 0].tolist() == [True, False, True]  # at IoU 0.5
    assert tp[2].sum() == 9  # 100/110 = 0.909: a match at the 9 thresholds 0.5 .. 0.9
    # precision envelope: 1 up to recall 0.5, then 2/3 up to recall 1: 51 points of 1, 50 points of 2/3
    assert average_precision(tp[:, 0], 2) == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)
    tally = DetectionTally(["defect", "other"], 0.5, "performance", seed=0)
    tally.update([d], [g], ["a.jpg"])
    ms = {m.metric: m for m in tally.compute("test", 0.95, 10)}
    assert ms["recall:defect"].value == 0.5 and ms["recall:defect"].n == 2  # the 0.3 hit is below the threshold
    assert ms["false_indications_per_image"].value == 1.0  # the 0.8 detection
    assert ms["ap50:other"].value is None and "no true box" in ms["ap50:other"].details["undefined"]
    assert ms["map50"].value == pytest.approx((51 + 50 * 2 / 3) / 101, abs=1e-12)  # 'other' has no box: left out


def test_a_bootstrap_replicate_is_the_ap_of_the_images_drawn():
    """Weights w per detection (its image drawn w times, 0 included) give the AP of the list with each detection
    repeated w times: the replicate's AP is an AP, whatever the shortcut through the true positives."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        k = int(rng.integers(1, 40))
        tp = rng.uniform(size=k) < 0.4
        w = rng.integers(0, 4, size=k)
        n_true = int(w[tp].sum()) + int(rng.integers(0, 3))
        expanded = np.repeat(tp, w)
        want = average_precision(expanded, n_true) if len(expanded) else (0.0 if n_true else np.nan)
        got = average_precision(tp, np.array([n_true]), w[:, None].astype(float))[0]
        assert got == pytest.approx(want, abs=1e-12, nan_ok=True)


def test_recall_interval_accounts_for_boxes_clustered_in_images():
    """10 images of 50 boxes: 8 images found whole, 2 missed whole. Clopper-Pearson over the 500 boxes would say
    about [0.76, 0.83]; the images are the sampling unit, so the interval must be much wider (the bootstrap over
    images: roughly [0.5, 1]); and it never gets narrower than Clopper-Pearson over boxes."""
    from trustcase.measurement import clopper_pearson
    from trustcase.tasks.detection_metrics import DetectionTally

    t = DetectionTally(["defect"], operating_threshold=0.5, check="performance", seed=0)
    dets, gts, ids = [], [], []
    for i in range(10):
        boxes = np.array([[5 * k, 0, 5 * k + 4, 4, 0] for k in range(50)], float)
        found = boxes[:, :4] if i < 8 else np.zeros((0, 4))
        dets.append(np.column_stack([found, np.full(len(found), 0.9), np.zeros(len(found))]))
        gts.append(boxes)
        ids.append(f"img{i}")
    t.update(dets, gts, ids)
    m = next(x for x in t.compute("test", 0.95, 1000) if x.metric == "indication_recall")
    assert m.value == pytest.approx(0.8)
    cp = clopper_pearson(400, 500, 0.95)
    assert m.interval.lower <= cp.lower and m.interval.upper >= cp.upper
    assert m.interval.lower < 0.6 and m.interval.upper == pytest.approx(1.0)  # two whole images can be missed or not
