"""Attacks on a segmenter through the one attack engine, against exact answers on a per-pixel threshold segmenter.

f(x)_i = 1[x_i > t]: a pixel d above (below) the threshold flips with a change of d of that pixel alone, so under
L-inf eps every pixel within eps of t can flip and nothing else, and under L2 flipping k pixels at distance d
costs exactly sqrt(k) d.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_segmentation_certify import T, segmenter
from torch import nn

from trustcase.robustness import segmentation_attacks as SA
from trustcase.robustness.attacks import Budget, attack
from trustcase.seeding import item_seeds
from trustcase.tasks.segmentation import Segmenter

D = 0.1  # every pixel of interest sits D from the threshold


def images() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 8x8 images: a 10-pixel defect D above t on a background D below it, and a defect-free one."""
    x = np.full((2, 8, 8), T - D, np.float32)
    masks = np.zeros((2, 8, 8), np.int64)
    x[0, 2, :5] = x[0, 3, :5] = T + D
    masks[0, 2, :5] = masks[0, 3, :5] = 1
    return torch.from_numpy(x[..., None]), torch.from_numpy(masks)


def run(kind, goal_name, eps, norm, min_pixels=5, iou_floor=0.5):
    x, masks = images()
    seg = Segmenter(segmenter(8, 8))
    loss, hit = SA.goal(goal_name, min_pixels, iou_floor)
    y = SA.labels(goal_name, masks)
    seeds = item_seeds(0, "adversarial", ["a", "b"], kind)
    adv, fooled = attack(kind, seg, x, y, torch.full((2,), eps), norm, (0.0, 1.0), Budget(steps=20, restarts=1),
                         seeds, hit=hit, loss=loss)
    delta = (adv - x).flatten(1)
    bound = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (bound <= eps * (1 + 1e-5)).all()  # the witness is inside the ball
    with torch.no_grad():
        assert (hit(seg.forward(seg.to_input(adv)), y) == fooled).all()  # and re-checked
    return fooled.tolist(), adv


@pytest.mark.parametrize("kind", ["fgsm", "pgd", "apgd", "auto"])
def test_linf_fools_exactly_beyond_the_margin(kind):
    assert run(kind, "pixels", 0.9 * D, "linf")[0] == [False, False]
    assert run(kind, "decision", 0.9 * D, "linf")[0] == [False, False]
    assert run(kind, "pixels", 1.2 * D, "linf")[0] == [True, True]  # defect hidden, false defects raised
    assert run(kind, "decision", 1.2 * D, "linf")[0] == [True, True]


def test_l2_decision_attack_meets_the_exact_cost():
    # a false alarm needs min_pixels = 5 pixels raised by D: exactly sqrt(5) D
    assert run("pgd", "decision", 0.95 * math.sqrt(5) * D, "l2")[0][1] is False
    assert run("pgd", "decision", 1.1 * math.sqrt(5) * D, "l2")[0][1] is True
    # hiding the 10-pixel defect below 5 pixels needs at least sqrt(6) D: never fooled below it
    assert run("pgd", "decision", 0.95 * math.sqrt(6) * D, "l2")[0][0] is False
    assert run("apgd", "decision", 1.1 * math.sqrt(10) * D, "l2")[0][0] is True


def test_rules_on_known_logits():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 1.0  # one pixel of defect class 2
    logits[0, 1, 1, 1] = 0.0  # a tie with the background: background (class 0 wins ties)
    masks = torch.tensor([[[2, 1], [0, 0]]])
    assert SA.defect_iou(logits, masks).tolist() == [0.5]
    assert SA.decision(logits, 1).tolist() == [1] and SA.decision(logits, 2).tolist() == [0]
    assert SA.defect_iou(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)).tolist() == [1.0]
    assert SA.labels("decision", masks).tolist() == [1]
    with pytest.raises(ValueError, match="unknown goal"):
        SA.goal("boxes", 1, 0.5)


class TinyConv(nn.Module):
    """A small convolutional segmenter with seeded weights (real convolutions, a real backward pass)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, padding=1))

    def forward(self, x):
        return self.net(x)


def test_attack_on_a_convolutional_segmenter_lowers_its_iou():
    net = TinyConv().eval()
    seg = segmenter(8, 8)
    seg = Segmenter(type(seg)(seg.spec, module=net))
    x = torch.rand(4, 8, 8, 1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m = SA.defect_margin(seg.forward(seg.to_input(x)))
        net.net[2].bias[1] -= m.median()  # about half of the pixels a defect
        masks = seg.forward(seg.to_input(x)).argmax(1)  # its own prediction as the truth: IoU 1 clean
    assert (masks.flatten(1).sum(1) > 0).all()
    loss, hit = SA.goal("pixels", 1, 1.0)  # fooled as soon as one pixel changes
    adv, fooled = attack("pgd", seg, x, masks, torch.full((4,), 0.2), "linf", (0.0, 1.0), Budget(steps=10),
                         item_seeds(0, "adversarial", range(4), "pgd"), hit=hit, loss=loss)
    with torch.no_grad():
        iou = SA.defect_iou(seg.forward(seg.to_input(adv)), masks)
    assert fooled.all() and (iou < 1).all()


# --- the adversarial check on a segmentation use case ----------------------------------------------------------

from test_segmentation import _context, segmentation_case  # noqa: E402, F401  (the tiny PNG use case)


def test_the_adversarial_check_scores_a_segmenter_under_attack(segmentation_case):  # noqa: F811
    """The case's segmenter marks pixels brighter than grey 127.5: t1's bright defect (220) flips at an L-inf radius
    of 92.5 grey levels and not below; t2_free (a false alarm) and t3 (missed) are wrong clean."""
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    params = {"attacks": ["pgd_linf"], "linf": [30.0, 100.0], "steps": 20, "restarts": 1}
    out = build(CheckSpec(check="adversarial", params=params))(_context(uc, tmp_path, "adv"))
    by = {(m.metric, m.scope.perturbation.name, m.amplitude): m for m in out.measurements if not m.scope.subgroup}
    for goal in ("pixels", "decision"):
        key = f"pgd_linf.{goal}"
        assert by[("attack_success_rate", key, 30.0)].value == 0 and by[("attack_success_rate", key, 30.0)].n == 1
        assert by[("attack_success_rate", key, 100.0)].value == 1
    d = "pgd_linf.decision"
    assert by[("image_recall", d, 0.0)].value == 1 / 2 and by[("image_recall", d, 30.0)].value == 1 / 2
    assert by[("image_recall", d, 100.0)].value == 0
    # IoU and Dice only under the pixels goal, which runs its whole budget (tests/test_segmentation_attack_iou.py);
    # the decision goal stops at its rule and would overstate them
    assert not {m for m, k, _ in by if k == d and m.startswith(("iou", "dice", "mean_", "pixel_"))}
    assert not {m for m, k, _ in by if k == "pgd_linf.pixels" and m.startswith("image_")}
    assert {c.id for c in out.curves} == {"adversarial_pgd_linf.pixels", "adversarial_pgd_linf.decision"}
