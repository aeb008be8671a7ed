"""Adversarial attacks on a detector, through the one attack engine (`attacks.attack_region`): what is attacked is
each true box the detector finds at its operating threshold, one box per attacked item.

- **vanishing**: hide the box. Loss: minus the scores above the threshold of the detections of its class that
  overlap it at IoU >= 0.5 (the predictions matched to it); hit: the box is no longer found (COCO's greedy
  matching of the detections above the threshold, as `indication_recall` counts it).
- **misclassification**: indicate the box as another class. Loss: the best score of another class overlapping it
  minus the best of its own class; hit: the box is no longer found as its class and a detection of another class
  above the threshold overlaps it at IoU >= 0.5.

The figure is the recall under attack: a true box counts as found only if the detector found it clean and the
attack could not hide (or relabel) it within the radius, so at radius 0 it is `indication_recall`. A box is
"robustly found" when no perturbation of the ball hides it; the recall under attack is an UPPER bound of the share
of robustly found boxes (an attack that fails proves nothing), as the accuracy under attack of a classifier. Each
box is attacked on its own image (its own perturbation): the threat is "this indication can be hidden", the
strictest per-box reading. Every success is re-checked by a plain forward pass of the witness through
`Detector.detect`, the path the metrics use.

Gradient attacks (FGSM, PGD, APGD, auto) need the detector's module; Square needs forward passes only (black
boxes). Random starts and Square's draws follow (seed, check, image id and box index): the same evidence at any
batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from trustcase.measurement import BOOTSTRAP_REPLICATES, bootstrap_weights
from trustcase.robustness.attacks import Budget, Norm, attack_region
from trustcase.schemas import Measurement, PerturbationScope, Scope
from trustcase.seeding import item_seeds
from trustcase.tasks.detection_metrics import box_recall, iou

Objective = Literal["vanishing", "misclassification"]
OBJECTIVES: tuple[Objective, ...] = ("vanishing", "misclassification")
IOU = 0.5  # the operating IoU of `indication_recall`


def found_boxes(dets: np.ndarray, gts: np.ndarray, threshold: float, iou_threshold: float = IOU) -> np.ndarray:
    """Which true boxes (G, 5) the detections (K, 6) find at the operating threshold: per class, COCO's greedy
    matching by decreasing score of the detections scoring >= threshold (the best free box at IoU >= 0.5, the later
    one on a tie), as `DetectionTally` counts `indication_recall`. (G,) bool."""
    found = np.zeros(len(gts), bool)
    above = dets[dets[:, 4] >= threshold]
    for c in np.unique(gts[:, 4]).astype(int):
        g = np.flatnonzero(gts[:, 4] == c)
        d = above[above[:, 5] == c]
        d = d[np.argsort(-d[:, 4], kind="mergesort")]
        if not len(d):
            continue
        ious = iou(d[:, :4], gts[g, :4])
        for k in range(len(d)):
            best, m = min(iou_threshold, 1 - 1e-10), -1
            for j in range(len(g)):
                if not found[g[j]] and ious[k, j] >= best:
                    best, m = ious[k, j], j
            if m >= 0:
                found[g[m]] = True
    return found


def _overlap(rows: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """IoU of each detection row (D, 6) with one box (4,), without gradient (it selects, never steers)."""
    return torch.from_numpy(iou(rows[:, :4].detach().double().numpy(), box.double().numpy()[None])[:, 0])


def _best(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The best score among the masked detections, 0 (still in the graph) when there is none."""
    return scores[mask].max() if mask.any() else scores.sum() * 0


@dataclass
class _Targets:
    """The attacked boxes: per item its box, class, and every true box of its image (greedy matching needs them)."""

    box: torch.Tensor  # (N, 4)
    cls: torch.Tensor  # (N,)
    image_boxes: list[np.ndarray]  # per item: (G, 5) true boxes of its image
    position: list[int]  # per item: the box's row among its image's boxes
    threshold: float

    def loss(self, objective: Objective):
        t = self.threshold

        def vanishing(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            rows = []
            for r, j in zip(out, label.tolist(), strict=True):
                mine = (r[:, 5].detach() == self.cls[j]) & (_overlap(r, self.box[j]) >= IOU)
                rows.append(-(r[:, 4] - t).clamp_min(0)[mine].sum())
            return torch.stack(rows)

        def misclassification(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            rows = []
            for r, j in zip(out, label.tolist(), strict=True):
                near = (_overlap(r, self.box[j]) >= IOU) & (r[:, 4].detach() >= 0)
                own = near & (r[:, 5].detach() == self.cls[j])
                other = near & ~own
                rows.append(_best(r[:, 4], other) - _best(r[:, 4], own))
            return torch.stack(rows)

        return vanishing if objective == "vanishing" else misclassification

    def hit(self, objective: Objective):
        def rule(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return torch.tensor([self.hidden(r.detach().double().numpy(), j, objective)
                                 for r, j in zip(out, label.tolist(), strict=True)], dtype=torch.bool)

        return rule

    def hidden(self, rows: np.ndarray, j: int, objective: Objective) -> bool:
        """Item j's box is hidden (vanishing) or indicated as another class (misclassification) by these rows."""
        dets = rows[rows[:, 4] >= 0]
        if found_boxes(dets, self.image_boxes[j], self.threshold)[self.position[j]]:
            return False
        if objective == "vanishing":
            return True
        above = dets[(dets[:, 4] >= self.threshold) & (dets[:, 5] != float(self.cls[j]))]
        return bool(len(above)) and bool((iou(above[:, :4], self.box[j].double().numpy()[None]) >= IOU).any())


def attack_boxes(kind: str, detector, images: np.ndarray, boxes: list[np.ndarray], ids: list[str], eps: float,
                 norm: Norm, value_range: tuple[float, float], threshold: float, objective: Objective,
                 budget: Budget, seed: int, check: str = "adversarial", stream: str = "") -> list[np.ndarray]:
    """Per image, which of its true boxes are still found under the attack `kind` (an `attacks.ATTACKS` kind) of
    radius eps (pixel units). A box missed clean stays missed; a box found clean is attacked on its own copy of the
    image and counts as missed only when the witness, re-checked by `detector.detect`, hides it."""
    clean = detector.detect(images, ids)
    found = [found_boxes(d, g, threshold) for d, g in zip(clean, boxes, strict=True)]
    which = [(i, k) for i, f in enumerate(found) for k in np.flatnonzero(f)]
    if not which or eps <= 0:
        return found
    targets = _Targets(box=torch.tensor(np.array([boxes[i][k, :4] for i, k in which]), dtype=torch.float32),
                       cls=torch.tensor([float(boxes[i][k, 4]) for i, k in which]),
                       image_boxes=[boxes[i] for i, _ in which], position=[int(k) for _, k in which],
                       threshold=threshold)
    x = torch.as_tensor(np.stack([images[i] for i, _ in which])).float()
    lo_v, hi_v = value_range
    if norm == "linf":
        lo, hi = (x - eps).clamp(lo_v, hi_v), (x + eps).clamp(lo_v, hi_v)
    else:
        lo, hi = torch.full_like(x, lo_v), torch.full_like(x, hi_v)
    seeds = item_seeds(seed, check, [f"{ids[i]}#box{k}" for i, k in which], stream or f"{kind}_{norm}.{objective}")
    adv, fooled = attack_region(kind, lambda p: detector.forward(detector.to_input(p)), x,
                                torch.arange(len(which)), lo, hi, budget, eps=torch.full((len(x),), float(eps)),
                                norm=norm, seeds=seeds, hit=targets.hit(objective), loss=targets.loss(objective))
    hits = torch.nonzero(fooled).flatten().tolist()
    if hits:  # the re-check: a plain forward pass of each witness, through the metrics' path
        again = detector.detect(adv[hits].numpy(), [f"{ids[which[j][0]]} (attacked)" for j in hits])
        for j, d in zip(hits, again, strict=True):
            if targets.hidden(d, j, objective):
                i, k = which[j]
                found[i][k] = False
    return found


def recall_under_attack(check: str, name: str, split: str, ids: list[str], boxes: list[np.ndarray],
                        found: list[np.ndarray], clean: list[np.ndarray], class_names: list[str], eps: float,
                        threshold: float, confidence: float, seed: int) -> list[Measurement]:
    """`indication_recall` and `recall:<class>` of the boxes still found at radius eps, and `attack_success_rate`
    (boxes found clean that the attack hid, of those found clean), under the perturbation scope `name`; intervals
    by the recall's rule (the wider of Clopper-Pearson over boxes and the Poisson bootstrap over images)."""
    scope = Scope(split=split, perturbation=PerturbationScope(name=name, max_amplitude=eps))
    weights = bootstrap_weights(seed, check, ids, BOOTSTRAP_REPLICATES).astype(np.float64)
    n = len(class_names)
    per_class = lambda flags: np.array([np.bincount(g[f, 4].astype(int), minlength=n) for g, f in  # noqa: E731
                                        zip(boxes, flags, strict=True)], float).reshape(len(ids), n)
    true = per_class([np.ones(len(g), bool) for g in boxes])
    kept, before = per_class(found), per_class(clean)
    common = dict(weights=weights, confidence=confidence, scope=scope, amplitude=eps, threshold=threshold, iou=IOU)
    out = [box_recall(check, "indication_recall", kept.sum(1), true.sum(1), undefined="no true box in the split",
                   **common)]
    out += [box_recall(check, f"recall:{c}", kept[:, k], true[:, k], undefined=f"no true box of class {c}", **common)
            for k, c in enumerate(class_names)]
    out.append(box_recall(check, "attack_success_rate", (before - kept).sum(1), before.sum(1),
                       undefined="no true box found clean to attack", **common))
    return out
