"""Cost of attacking and explaining a detector (issue 26), against forward passes of the same images, measured in
one run on the bundled steel-defect detector and real NEU-DET test images:

On the first test images where the detector finds a true box (the split is ordered by class):
- the attacks of the adversarial check's detection branch (`robustness.detection_attacks.attack_boxes`: PGD on the
  vanishing and misclassification losses, Square as a black box), per image, over one forward pass of the image;
- D-RISE (`explain.methods.detection.d_rise`) of one box per image, over one forward pass, and over its masks
  (the ideal ratio is the number of masks: one forward pass per mask); Grad-CAM of the same boxes (one forward and
  one backward pass, through the convolutions tapped from the TorchScript graph).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_detection_attacks.py [--images 16] [--masks 200] [--eps 2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from trustcase.data.streaming import DataSource
from trustcase.explain.methods.detection import box_grad_cam, d_rise, explained_box
from trustcase.explain.network import Network
from trustcase.robustness.attacks import Budget
from trustcase.robustness.detection_attacks import attack_boxes, found_boxes
from trustcase.schemas.loading import load_use_case
from trustcase.tasks import task_of

STEEL = Path(__file__).resolve().parents[1] / "use_cases" / "steel_defects"


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--masks", type=int, default=200)
    ap.add_argument("--eps", type=float, default=2.0, help="L-inf radius in grey levels")
    ap.add_argument("--queries", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    uc = load_use_case(STEEL / "use_case.yaml")
    model = task_of(uc).load_model(uc.model)
    threshold = uc.model.score_threshold
    images, boxes, ids = [], [], []  # the first test images with an indication found (the split is ordered by class)
    for batch in DataSource(uc.data, 0, uc.model).stream("test").batches(16):
        for j, (d, g) in enumerate(zip(model.detect(batch.images, batch.ids), batch.labels, strict=True)):
            if found_boxes(d, g, threshold).any() and len(ids) < a.images:
                images.append(batch.images[j])
                boxes.append(g)
                ids.append(batch.ids[j])
        if len(ids) >= a.images:
            break
    images = np.stack(images)
    n = len(ids)
    fwd, dets = timed(lambda: model.detect(images, ids), repeat=3)
    per_image = fwd / n
    found = sum(int(found_boxes(d, g, threshold).sum()) for d, g in zip(dets, boxes, strict=True))
    print(f"load {os.getloadavg()[0]:.1f}; {n} test images, {sum(map(len, boxes))} true boxes, {found} found clean at "
          f"threshold {threshold:g}; one forward pass {per_image * 1e3:.1f} ms per image (batched)")
    budget = Budget(steps=10, restarts=1, queries=a.queries)
    for kind, objective in (("pgd", "vanishing"), ("pgd", "misclassification"), ("square", "vanishing")):
        t, kept = timed(lambda k=kind, o=objective: attack_boxes(k, model, images, boxes, ids, a.eps, "linf", (0, 255),
                                                                 threshold, o, budget, seed=0))
        left = sum(int(k.sum()) for k in kept)
        print(f"{kind} {objective:17s} eps {a.eps:g}: {t:7.2f} s, {t / fwd:6.1f}x the forward pass of the images "
              f"({t / max(found, 1) / per_image:6.1f}x per attacked box); {found - left} of {found} boxes hidden")
    targets = [explained_box(d, g, threshold) for d, g in zip(dets, boxes, strict=True)]
    keep = [i for i, t in enumerate(targets) if t is not None]
    x = model.to_input(images[keep])
    tt = torch.tensor(np.stack([targets[i] for i in keep]), dtype=torch.float32)
    t, _ = timed(lambda: d_rise(model.forward, x, tt, 0.0, masks=a.masks, cells=16, seed=0))
    one = per_image * len(keep)
    print(f"d_rise {a.masks} masks on {len(keep)} boxes: {t:7.2f} s, {t / one:6.1f}x their forward pass "
          f"({t / one / a.masks:.2f}x the ideal of one forward pass per mask)")
    net = Network(model)
    t, (_, layer) = timed(lambda: box_grad_cam(net, x, tt), repeat=3)
    print(f"grad_cam ({layer}) on {len(keep)} boxes: {t:7.2f} s, {t / one:6.1f}x their forward pass")


if __name__ == "__main__":
    main()
