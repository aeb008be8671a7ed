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

Evidence stays EMPIRICAL (`robustness.attacks`): IoU and image recall under attack are upper bounds of the robust
ones. The adversarial check scores the adversarial images with the task's own scorer (IoU, Dice, image recall).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    """(B,): the per-pixel cross-entropy on the true classes, averaged over the true defect region (every pixel of
    an image without one)."""
    ce = F.cross_entropy(logits, masks.long(), reduction="none")  # (B, H, W)
    region = masks != 0
    region = torch.where(region.flatten(1).any(1).view(-1, 1, 1), region, torch.ones_like(region))
    return (ce * region).flatten(1).sum(1) / region.flatten(1).sum(1)


def pixel_hit(iou_floor: float) -> Rule:
    """Fooled: the image's defect IoU below `iou_floor`."""
    if not 0 < iou_floor <= 1:
        raise ValueError(f"iou_floor must be in (0, 1], got {iou_floor}")
    return lambda logits, masks: defect_iou(logits, masks) < iou_floor


def decision(logits: torch.Tensor, min_pixels: int) -> torch.Tensor:
    """(B,) int64: 1 when at least `min_pixels` pixels are predicted a defect class (the segmenter's rule)."""
    return ((logits.argmax(1) != 0).flatten(1).sum(1) >= min_pixels).long()


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
