"""Detection benchmark (issue 26): the bundled detector's test mAP@0.5 with its interval, and trustcase's COCO
evaluation against pycocotools' COCOeval on the same detections (time ratio, and that the figures agree).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py            # evaluation ratio on the test split
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection.py --train    # also trains (train.py, ~10 min idle)

Without a trained model (use_cases/steel_defects/artefacts/steel_detector.pt) the evaluation runs on a seeded,
untrained network's detections, which still compares the two implementations.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

STEEL = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects"
sys.path.insert(0, str(STEEL))
from neu import CLASSES  # noqa: E402
from train import CenterNet, evaluate, normalise, read, train  # noqa: E402

from trustcase.tasks.detection_metrics import DetectionTally  # noqa: E402


def detections(model, images: np.ndarray) -> list[np.ndarray]:
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), 32):
            out += [rows[rows[:, 4] >= 0] for rows in model(normalise(images[s:s + 32])).double().numpy()]
    return out


def ours(dets, boxes, names, replicates: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    tally = DetectionTally(CLASSES, 0.3, "performance", seed=0)
    tally.update(dets, boxes, names)
    ms = {m.metric: m for m in tally.compute("test", 0.95, replicates)}
    return time.perf_counter() - t, ms["map50"].value, ms["map"].value


def coco(dets, boxes) -> tuple[float, float, float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    t = time.perf_counter()
    images = [{"id": i + 1, "width": 200, "height": 200} for i in range(len(boxes))]
    anns = [{"id": k + 1, "image_id": i + 1, "category_id": int(c) + 1, "iscrowd": 0,
             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
            for k, (i, (x1, y1, x2, y2, c)) in enumerate((i, b) for i, g in enumerate(boxes) for b in g)]
    res = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
           for i, d in enumerate(dets) for x1, y1, x2, y2, s, c in d]
    gt = COCO()
    gt.dataset = {"info": {}, "images": images, "annotations": anns,
                  "categories": [{"id": k + 1, "name": n} for k, n in enumerate(CLASSES)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return time.perf_counter() - t, ev.stats[1], ev.stats[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", action="store_true", help="train the bundled detector first (train.py defaults)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads 1")
    path = STEEL / "artefacts" / "steel_detector.pt"
    if a.train:
        result = train(out=path)
        print(f"training: {result['train_seconds']:.0f} s; test mAP@0.5 {result['map50']:.3f} "
              f"(95% interval {result['map50_interval'][0]:.3f}-{result['map50_interval'][1]:.3f})")
    if path.is_file():
        model = torch.jit.load(str(path))
        r = evaluate(model)
        print(f"bundled detector, test split: mAP@0.5 {r['map50']:.3f} (95% interval {r['map50_interval'][0]:.3f}-"
              f"{r['map50_interval'][1]:.3f}), mAP@[0.5:0.95] {r['map']:.3f}, recall of indications "
              f"{r['indication_recall']:.3f}, false indications per image {r['false_indications_per_image']:.2f}")
    else:
        torch.manual_seed(0)
        model = torch.jit.script(CenterNet().eval())
        print("no trained detector: comparing on a seeded untrained network's detections")
    images, boxes, names = read("test", 0)
    dets = detections(model, images)
    n = sum(len(d) for d in dets)
    t_coco, coco50, coco_all = coco(dets, boxes)
    t_ours, ours50, ours_all = ours(dets, boxes, names, 1)
    t_boot, _, _ = ours(dets, boxes, names, 1000)
    print(f"{len(images)} images, {n} detections, {sum(len(b) for b in boxes)} true boxes")
    print(f"mAP@0.5 ours {ours50:.6f} pycocotools {coco50:.6f}; mAP@[0.5:0.95] ours {ours_all:.6f} pycocotools "
          f"{coco_all:.6f}; largest difference {max(abs(ours50 - coco50), abs(ours_all - coco_all)):.1e}")
    print(f"evaluation time: ours {t_ours:.2f} s, pycocotools {t_coco:.2f} s, ratio {t_ours / t_coco:.2f}; "
          f"with the 1000-replicate bootstrap intervals {t_boot:.2f} s ({t_boot / t_coco:.1f}x pycocotools)")


if __name__ == "__main__":
    main()
