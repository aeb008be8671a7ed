"""What an attack on a segmenter increases and when it has succeeded: the `loss` and `hit` rules that the one attack
engine (`attacks.attack`, `attacks.attack_region`: FGSM, PGD, APGD, Square, auto) takes for a segmenter's logits
(B, K, H, W), class 0 the background, every other class a defect (`tasks.segmentation`).

- goal "pixels": mark the wrong pixels. The loss is the per-pixel cross-entropy averaged over the true defect
  region (over every pixel of a defect-free image: the attack then raises false defects); the label is the true
  mask (B, H, W). An image is fooled when its defect IoU (predicted defect pixels against true ones, any defect
  class; 1 when both are empty) falls below `iou_floor`.
- goal "decision": flip the image-level decision "defective if at least A pixels are predicted a defect class".
  A pixel's defect margin m = max over defect classes of its logit - the background logit (the pixel is predicted
  a defect exactly when m > 0: the background, class 0, wins ties of the arg max). A truly defective image is
  attacked on -sum relu(m) (every predicted defect pixel pushed back), a defect-free one on the sum of its A
  largest margins (the A pixels nearest to a false alarm pushed up); the label is the true decision (B,) (1
  defective: a true defect pixel); fooled when the decision differs from it.

The pixels goal is scored on the full budget (`worst_iou`: the attack never stops at the rule, and each image keeps
its worst iterate for IoU, never its clean input when the attack lowered it): an attack stopped at the rule would
discard partial damage and overstate IoU and Dice (review R1). The decision goal stops at the flip: what it reports
is the rule's own outcome. Evidence stays EMPIRICAL (`robustness.attacks`): IoU and image recall under attack are
upper bounds of the robust ones. The adversarial check scores the adversarial images with the task's own scorer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from trustcase.robustness.attacks import attack_region
from trustcase.tasks.segmentation_metrics import image_decisions

Rule = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
GOALS = ("pixels", "decision")


def defect_margin(logits: torch.Tensor) -> torch.Tensor:
    """(B, H, W): the best defect logit minus the background logit; > 0 exactly where a defect is predicted."""
    return logits[:, 1:].amax(1) - logits[:, 0]


def defect_iou(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,): per image the IoU of predicted and true defect pixels (any defect class); 1 when both are empty."""
    pred, true = logits.argmax(1) != 0, masks != 0
    inter, union = (pred & true).flatten(1).sum(1), (pred | true).flatten(1).sum(1)
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float32))


def pixel_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,): the per-pixel cross-entropy on the true classes, averaged over the true defect region plus averaged over
    the true background (every pixel of an image without a defect): the defect's few pixels weigh as much as the
    background's many, and both the pixels it misses and the false defects it marks lower the IoU."""
    ce = F.cross_entropy(logits, masks.long(), reduction="none").flatten(1)  # (B, H x W)
    defect = (masks != 0).flatten(1)
    parts = [(ce * r).sum(1) / r.sum(1).clamp_min(1) for r in (defect, ~defect)]
    return parts[0] + parts[1]


def wrong_pixels(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,): per image the pixels whose defect / background call is wrong (missed or false defect pixels)."""
    return ((logits.argmax(1) != 0) != (masks != 0)).flatten(1).sum(1)


def never(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A hit rule that never fires: every stage of the engine runs its whole budget on every item."""
    return torch.zeros(len(logits), dtype=torch.bool)


class WorstIterate:
    """The attack's forward pass, keeping per image the worst point for its defect IoU among every point of its
    region the attack evaluates (the lowest IoU; ties: the most wrong pixels), the clean input first. Only whole-batch
    passes are read (with the `never` rule no stage of the engine drops an item, so a pass of every item is the batch
    in order) and only points inside the region ([lo, hi] per element, and the L2 ball of radius eps): what is kept
    is a point the attack's own ball contains."""

    def __init__(self, forward, x: torch.Tensor, masks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 eps: torch.Tensor, norm: str):
        self.forward, self.x, self.masks, self.lo, self.hi, self.norm = forward, x, masks, lo, hi, norm
        self.eps = eps.to(x.dtype)
        self.best, self.passes = x.clone(), 0
        with torch.no_grad():
            out = forward(x)
        self.iou, self.wrong = defect_iou(out, masks), wrong_pixels(out, masks)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        out = self.forward(z)
        if len(z) == len(self.x):
            with torch.no_grad():
                z0 = z.detach()
                inside = ((z0 >= self.lo) & (z0 <= self.hi)).flatten(1).all(1)
                if self.norm == "l2":  # the projection's rounding: a relative 1e-5 of the radius
                    inside &= (z0 - self.x).flatten(1).norm(dim=1) <= self.eps * (1 + 1e-5)
                logits = out.detach()
                iou, wrong = defect_iou(logits, self.masks), wrong_pixels(logits, self.masks)
                worse = inside & ((iou < self.iou) | ((iou == self.iou) & (wrong > self.wrong)))
                self.best[worse], self.iou[worse], self.wrong[worse] = z0[worse], iou[worse], wrong[worse]
                self.passes += 1
        return out


def worst_iou(kind: str, model, x: torch.Tensor, masks: torch.Tensor, eps: torch.Tensor, norm: str,
              value_range: tuple[float, float], budget, seeds) -> tuple[torch.Tensor, int]:
    """The pixels goal scored honestly (review R1): the engine (`attacks.attack_region`, pixel units through the
    model's normalisation, the ball of radius eps[i] intersected with the value range) runs its whole budget on
    `pixel_loss` with a hit rule that never fires, and each image's adversarial input is the worst iterate for its
    defect IoU it evaluated (`WorstIterate`; an image with eps 0 keeps its input). Returns (x_adv, forward passes
    read per image)."""
    adv = x.clone()
    i = torch.nonzero(eps > 0).flatten()
    if not len(i):
        return adv, 0
    xi, e = x[i], eps[i].to(x.dtype)
    lo_v, hi_v = value_range
    if norm == "linf":
        ev = e.view(-1, *([1] * (x.ndim - 1)))
        lo, hi = (xi - ev).clamp(lo_v, hi_v), (xi + ev).clamp(lo_v, hi_v)
    else:
        lo, hi = torch.full_like(xi, lo_v), torch.full_like(xi, hi_v)
    track = WorstIterate(lambda p: model.forward(model.to_input(p)), xi, masks[i], lo, hi, e, norm)
    attack_region(kind, track, xi, masks[i].long(), lo, hi, budget, eps=e, norm=norm, seeds=seeds[i.numpy()],
                  hit=never, loss=pixel_loss)
    adv[i] = track.best
    return adv, track.passes


def pixel_hit(iou_floor: float) -> Rule:
    """Fooled: the image's defect IoU below `iou_floor`."""
    if not 0 < iou_floor <= 1:
        raise ValueError(f"iou_floor must be in (0, 1], got {iou_floor}")
    return lambda logits, masks: defect_iou(logits, masks) < iou_floor


def decision(logits: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """(B,) int64: 1 when at least `min_pixels` pixels are predicted a defect class (the segmenter's rule)."""
    return image_decisions(logits.argmax(1), min_pixels).long()


def decision_loss(min_pixels: int) -> Rule:
    """What flips the decision: -sum relu(m) for a truly defective image, the sum of its `min_pixels` largest
    defect margins for a defect-free one."""
    def loss(logits: torch.Tensor, defective: torch.Tensor) -> torch.Tensor:
        m = defect_margin(logits).flatten(1)
        k = min(min_pixels, m.shape[1])
        return torch.where(defective.bool(), -F.relu(m).sum(1), m.topk(k, dim=1).values.sum(1))
    return loss


def decision_hit(min_pixels: int) -> Rule:
    """Fooled: the image-level decision differs from the true one."""
    return lambda logits, defective: decision(logits, min_pixels) != defective.long()


def goal(name: str, min_pixels: int, iou_floor: float) -> tuple[Rule, Rule]:
    """(loss, hit) of a goal; labels: the masks (B, H, W) for "pixels", the true decisions (B,) for "decision"."""
    if name == "pixels":
        return pixel_loss, pixel_hit(iou_floor)
    if name == "decision":
        if min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
        return decision_loss(min_pixels), decision_hit(min_pixels)
    raise ValueError(f"unknown goal {name!r}; known: {', '.join(GOALS)}")


def labels(name: str, masks: torch.Tensor) -> torch.Tensor:
    """The label a goal's rules take: the masks, or each image's true decision (a true defect pixel)."""
    return masks.long() if name == "pixels" else (masks != 0).flatten(1).any(1).long()
