"""IoU and Dice under attack, against the exact worst case of a linear per-pixel segmenter (review R1).

f(x)_i = 1[x_i > t] (logits (0, x_i - t), the background winning ties): pixels are independent, so under L-inf eps
the worst perturbation flips at once every true defect pixel within eps above t (x_i - t <= eps) and every
background pixel within eps below it (t - x_i < eps), and nothing else. That one point minimises each image's IoU
and the split's pooled IoU together: the attack must reach it exactly. An attack stopped at a rule, keeping the
clean input of an image it did not fool, stays above it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_segmentation_certify import T, segmenter

from trustcase.robustness import segmentation_attacks as SA
from trustcase.robustness.attacks import Budget, attack
from trustcase.seeding import item_seeds
from trustcase.tasks.segmentation import Segmenter
from trustcase.tasks.segmentation_metrics import pixel_counts

# image 0: 16 defect pixels 0.02..0.30 above t on a background 0.03..0.38 below it; image 1: defect-free, its
# background 0.045..0.365 below t. No margin within 1e-3 of a tested radius (float32 rounding is ~1e-7).
DEFECT = np.linspace(0.02, 0.30, 16)
BACK0 = np.linspace(0.03, 0.38, 48)
BACK1 = np.linspace(0.045, 0.365, 64)
RADII = (0.1, 0.2)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    x = np.empty((2, 8, 8), np.float32)
    masks = np.zeros((2, 8, 8), np.int64)
    x[0].flat[:16], x[0].flat[16:] = T + DEFECT, T - BACK0
    masks[0].flat[:16] = 1
    x[1].flat[:] = T - BACK1
    return torch.from_numpy(x[..., None]), torch.from_numpy(masks)


def margins(x: torch.Tensor) -> np.ndarray:
    """Each pixel's float32 value minus t, in float64 (the exact distance to the flip)."""
    return x[..., 0].numpy().astype(np.float64) - T


def worst_counts(x: torch.Tensor, masks: torch.Tensor, eps: float) -> tuple[int, int, int]:
    """(TP, FP, FN) of defect pixels at the ball's worst point, in closed form."""
    m, true = margins(x), masks.numpy() != 0
    tp = int((true & (m > eps)).sum())
    fp = int((~true & (-m < eps)).sum())
    return tp, fp, int(true.sum()) - tp


def counts(seg: Segmenter, x: torch.Tensor, masks: torch.Tensor) -> tuple[int, int, int]:
    pred = seg.segment(x.numpy())
    c = sum(pixel_counts(p, t, 2) for p, t in zip(pred, masks.numpy(), strict=True))
    return int(c[1, 0]), int(c[1, 1]), int(c[1, 2])


def run(kind: str, eps: float, norm: str = "linf", steps: int = 10):
    x, masks = images()
    seg = Segmenter(segmenter(8, 8))
    seeds = item_seeds(0, "adversarial", ["a", "b"], kind)
    adv, passes = SA.worst_iou(kind, seg, x, masks, torch.full((2,), eps), norm, (0.0, 1.0),
                               Budget(steps=steps, restarts=1, apgd_steps=20), seeds)
    delta = (adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()  # the scored point is in the ball
    assert ((adv >= 0) & (adv <= 1)).all()
    return seg, x, masks, adv, passes


def test_the_closed_form_itself():
    x, masks = images()
    assert worst_counts(x, masks, 0.0) == (16, 0, 0)
    # at 0.1: defect pixels 0.02..0.0947 flip (5 of 16 spaced 0.01867), background 0.03..0.0972 (10 of 48 spaced
    # 0.00745) in image 0 and 0.045..0.0958 (11 of 64 spaced 0.00508) in image 1
    assert worst_counts(x, masks, 0.1) == (11, 10 + 11, 5)


@pytest.mark.parametrize("kind", ["fgsm", "pgd", "apgd", "auto"])
@pytest.mark.parametrize("eps", RADII)
def test_linf_attack_reaches_the_exact_worst_case(kind, eps):
    seg, x, masks, adv, _ = run(kind, eps)
    assert counts(seg, adv, masks) == worst_counts(x, masks, eps)


def test_the_whole_budget_runs_and_the_clean_iterate_counts():
    """PGD reads every one of its steps + 1 passes (nothing stops at a rule); at radius 0 the input is kept."""
    _, _, _, _, passes = run("pgd", 0.1, steps=7)
    assert passes == 8
    seg, x, masks, adv, passes = run("pgd", 0.0)
    assert passes == 0 and torch.equal(adv, x)


def test_a_stopped_attack_overstates_and_the_full_budget_does_not():
    """The earlier scoring: PGD through `attack` stops at the IoU floor and an image not fooled keeps its clean
    input. At 0.1 image 0's worst IoU is 11 / (16 + 10) = 0.42 < 0.5, but the attack stops as soon as it crosses 0.5
    and image 1 (clean IoU 1, any false pixel: 0) stops at its first false pixel: its pooled IoU is above the
    ball's worst, which the full-budget scoring reaches."""
    x, masks = images()
    seg = Segmenter(segmenter(8, 8))
    tp, fp, fn = worst_counts(x, masks, 0.1)
    exact = tp / (tp + fp + fn)
    loss, hit = SA.goal("pixels", 1, 0.5)
    stopped, _ = attack("pgd", seg, x, masks, torch.full((2,), 0.1), "linf", (0.0, 1.0), Budget(steps=10, restarts=1),
                        item_seeds(0, "adversarial", ["a", "b"], "pgd"), hit=hit, loss=loss)
    s_tp, s_fp, s_fn = counts(seg, stopped, masks)
    assert s_tp / (s_tp + s_fp + s_fn) > exact + 0.05
    _, _, _, adv, _ = run("pgd", 0.1)
    a_tp, a_fp, a_fn = counts(seg, adv, masks)
    assert a_tp / (a_tp + a_fp + a_fn) == pytest.approx(exact, abs=1e-15)


@pytest.mark.parametrize("kind", ["pgd", "apgd"])
def test_l2_never_goes_below_the_linf_worst_case(kind):
    """The L2 ball of radius r lies in the L-inf ball of radius r: no L2 attack may score below its worst case."""
    eps = 0.2
    seg, x, masks, adv, _ = run(kind, eps, "l2")
    tp, fp, fn = counts(seg, adv, masks)
    w_tp, w_fp, w_fn = worst_counts(x, masks, eps)
    assert tp >= w_tp and fp <= w_fp
    assert tp / (tp + fp + fn) >= w_tp / (w_tp + w_fp + w_fn)
    assert tp < 16 or fp > 0  # and it does damage


def test_pixel_loss_weighs_defect_and_background_alike():
    logits = torch.zeros(1, 2, 2, 2)
    masks = torch.tensor([[[1, 0], [0, 0]]])
    assert SA.pixel_loss(logits, masks).item() == pytest.approx(2 * np.log(2), rel=1e-6)  # log 2 per region
    free = torch.zeros(1, 2, 2, dtype=torch.long)
    assert SA.pixel_loss(logits, free).item() == pytest.approx(np.log(2), rel=1e-6)  # the background only


# --- the adversarial check on the tiny PNG use case --------------------------------------------------------------

from test_segmentation import _context, segmentation_case  # noqa: E402, F401


def test_the_check_reports_iou_and_dice_of_the_worst_iterate(segmentation_case):  # noqa: F811
    """The case's segmenter marks pixels brighter than grey 127.5; the test tiles have a background of 40 (87.5
    below), bright spots of 220 (92.5 above) and t3's dim defect of 100 (missed clean). Clean: IoU 12 / 20. At 30 no
    pixel can be made wrong; at 90 every background pixel turns defect and t1's defect stays:
    IoU 12 / (12 + 244 + 256 + 252 + 4); at 100 every pixel is wrong: 0."""
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    params = {"attacks": ["pgd_linf"], "linf": [30.0, 90.0, 100.0], "steps": 20, "restarts": 1}
    out = build(CheckSpec(check="adversarial", params=params))(_context(uc, tmp_path, "adv"))
    by = {(m.metric, m.scope.perturbation.name, m.amplitude): m for m in out.measurements if not m.scope.subgroup}
    key = "pgd_linf.pixels"
    iou = {a: by[("iou:defect", key, a)].value for a in (0.0, 30.0, 90.0, 100.0)}
    assert iou == pytest.approx({0.0: 12 / 20, 30.0: 12 / 20, 90.0: 12 / 768, 100.0: 0.0}, abs=1e-15)
    assert by[("dice:defect", key, 90.0)].value == pytest.approx(24 / 780, abs=1e-15)
    assert by[("iou:defect", key, 90.0)].interval is not None
    # t1 is the only image the IoU floor (0.5) does not fool clean; at 90 its IoU is 12 / 256
    assert by[("attack_success_rate", key, 30.0)].value == 0 and by[("attack_success_rate", key, 90.0)].value == 1
    assert not {m for m, k, _ in by if k == "pgd_linf.decision" and m.startswith(("iou", "dice", "mean_"))}
    assert any("WORST ITERATE" in v for v in out.validity)
