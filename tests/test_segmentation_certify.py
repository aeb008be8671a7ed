"""Certified segmentation (SegCertify) against the closed form of a per-pixel threshold segmenter.

f(x)_i = 1[x_i > t] (logits (0, x_i - t) per pixel). Under noise N(0, s^2 I), s = sigma (value range [0, 1]):
P(f(x + e)_i = 1) = Phi((x_i - t) / s) exactly, pixel by pixel, and the smoothed class of pixel i changes only
when x_i crosses t: its exact L2 radius is |x_i - t|.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from trustcase.certification import segmentation_smoothing as SS
from trustcase.certification.smoothing import ABSTAIN
from trustcase.models.classifier import Classifier, ModelError
from trustcase.schemas import ModelSpec

T = 0.5  # threshold of the planted segmenter


class Threshold(nn.Module):
    """Per-pixel logits (0, x - t): class 1 iff the pixel exceeds t."""

    def forward(self, x):
        s = x[:, 0] - T
        return torch.stack([torch.zeros_like(s), s], 1)


def segmenter(h: int, w: int) -> Classifier:
    spec = ModelSpec(format="torchscript", path="unused.pt", input_shape=[1, h, w], value_range=(0.0, 1.0),
                     normalisation={"mean": [0.0], "std": [1.0]}, class_names=["background", "defect"],
                     critical_class="defect")
    return Classifier(spec, module=Threshold().eval())


def image(margins: np.ndarray) -> np.ndarray:
    """Pixel-space images (B, H, W, 1) whose pixel i sits margins[i] above the threshold."""
    return (T + margins)[..., None].astype(np.float32)


SIGMA = 0.25
# margins from -3 sigma to 3 sigma on an 8 x 8 image, none at the threshold itself
GRID = np.linspace(-3, 3, 64).reshape(1, 8, 8) * SIGMA
GRID[np.abs(GRID) < 0.02] = 0.05


def exact_margin(x: np.ndarray) -> np.ndarray:
    """The pixel's float32 value minus the threshold, in float64: the exact L2 radius of its smoothed class."""
    return x[..., 0].astype(np.float64) - T


def test_votes_follow_the_closed_form_and_certificates_never_overstate():
    x = image(GRID)
    votes = SS.sample_votes(segmenter(8, 8), x, sigma=SIGMA, n0=64, n=2000, batch_size=500, seed=3)
    d = exact_margin(x)
    p = stats.norm.cdf(np.abs(d) / SIGMA)  # the smoothed probability of the majority class, exactly
    assert (votes.guess == (d > 0)).all()
    # every pixel's votes inside its 1e-6 two-sided binomial interval around the closed form
    lo, hi = stats.binom.ppf(5e-7, 2000, p), stats.binom.isf(5e-7, 2000, p)
    assert ((votes.n_top >= lo) & (votes.n_top <= hi)).all()
    for radius in (0.0, 0.1, 0.25, 0.5):
        for correction in SS.CORRECTIONS:
            c = SS.certify_pixels(votes, radius, alpha=0.001, correction=correction)
            certified = c != ABSTAIN
            assert (c[certified] == (d[certified] > 0)).all()
            assert (np.abs(d[certified]) >= radius).all()  # never certified beyond the exact radius
            # far enough from the threshold (probability >= 0.995 with tau <= 0.98) is certified
            assert certified[np.abs(d) >= radius + 2.6 * SIGMA].all()
    c, r = SS.pixel_radii(votes, alpha=0.001)
    assert (r <= np.abs(d)).all() and (r[c == ABSTAIN] == 0).all()
    assert (c[c != ABSTAIN] == (d[c != ABSTAIN] > 0)).all()
    near = (np.abs(d) > SIGMA) & (np.abs(d) <= 2 * SIGMA)  # p in (0.84, 0.98): the bound is close to the exact one
    assert (np.abs(d) - r)[near].max() < 0.5 * SIGMA


def test_certified_radius_approaches_the_exact_one_as_n_grows():
    x = image(np.full((1, 4, 4), 0.3))
    d = exact_margin(x)
    gaps = []
    for n in (100, 1000, 20000):
        c, r = SS.pixel_radii(SS.sample_votes(segmenter(4, 4), x, sigma=SIGMA, n0=32, n=n, seed=1), alpha=0.001)
        assert (c == 1).all() and (r <= d).all()
        gaps.append((d - r).max())
    assert gaps[0] > gaps[1] > gaps[2]


def test_holm_and_bonferroni_on_known_p_values():
    p = np.array([[0.01, 0.04, 0.03, 0.005], [0.001, 0.02, 0.012, 0.9]])
    assert SS.reject(p, 0.05, "holm").tolist() == [[True, False, False, True], [True, True, True, False]]
    assert SS.reject(p, 0.05, "bonferroni").tolist() == [[True, False, False, True], [True, False, True, False]]
    with pytest.raises(ValueError, match="unknown correction"):
        SS.reject(p, 0.05, "none")


def test_abstention_grows_with_the_pixel_count():
    """Every pixel has probability 0.9 of its class; at tau = 0.75 the per-image correction certifies a smaller
    share of pixels as the image grows (alpha / pixels shrinks), and Holm never certifies fewer than Bonferroni."""
    sigma, tau = 0.25, 0.75
    radius = sigma * stats.norm.ppf(tau) * (1 - 1e-6)
    shares = []
    for side in (4, 16, 64):
        x = image(np.full((4, side, side), sigma * stats.norm.ppf(0.9)))
        votes = SS.sample_votes(segmenter(side, side), x, sigma=sigma, n0=16, n=100, batch_size=64, seed=0)
        holm = SS.certify_pixels(votes, radius, alpha=0.01) != ABSTAIN
        bonf = SS.certify_pixels(votes, radius, alpha=0.01, correction="bonferroni") != ABSTAIN
        assert (holm | ~bonf).all()  # Holm rejects at least what Bonferroni rejects
        # without a correction (one test per pixel at alpha) more pixels pass than with it
        single = SS.p_values(votes.n_top, votes.n, SS.tau_at(radius, sigma)) <= 0.01
        assert single.sum() >= holm.sum()
        shares.append(holm.mean())
    assert shares[0] > shares[1] > shares[2]
    # about 0.70, 0.32, 0.12 by the binomial tails (Bonferroni's; Holm's a little more)
    assert shares[0] > 0.5 and shares[2] < 0.25


def test_family_wise_error_stays_below_alpha():
    """Pixels whose true probability lies just below tau: an image with any certified pixel is an error of the
    family; over 300 images at alpha = 0.1 the error rate is not above alpha (99.9% Clopper-Pearson)."""
    sigma, tau, alpha = 0.25, 0.8, 0.1
    x = image(np.full((300, 4, 4), sigma * stats.norm.ppf(tau - 0.01)))
    votes = SS.sample_votes(segmenter(4, 4), x, sigma=sigma, n0=8, n=100, batch_size=1200, seed=5)
    wrong = (SS.certify_pixels(votes, sigma * stats.norm.ppf(tau), alpha) != ABSTAIN).any(axis=(1, 2))
    k = int(wrong.sum())
    assert stats.beta.ppf(0.0005, k, 300 - k + 1) <= alpha if k else True


def test_votes_follow_the_item_not_the_batch():
    x = image(np.random.default_rng(0).uniform(-0.3, 0.3, (5, 6, 6)))
    ids = [f"tile-{i}" for i in range(5)]
    a = SS.sample_votes(segmenter(6, 6), x, sigma=SIGMA, n0=10, n=150, batch_size=7, seed=2, ids=ids)
    b = SS.sample_votes(segmenter(6, 6), x[3:], sigma=SIGMA, n0=10, n=150, batch_size=64, seed=2, ids=ids[3:])
    assert (a.n_top[3:] == b.n_top).all() and (a.guess[3:] == b.guess).all()


def test_image_decision_is_certified_only_when_the_pixels_settle_it():
    c = np.full((4, 3, 3), ABSTAIN)
    c[0, 0, :2] = 1  # two certified defect pixels: defective at A = 2
    c[1] = 0  # all certified background: good
    c[2] = 0
    c[2, 1, 1] = ABSTAIN  # one open pixel cannot reach A = 2: good
    c[3, 0, 0] = 1  # one certified defect, the rest open: undecided
    assert SS.image_decision(c, [1], 2).tolist() == [1, 0, 0, ABSTAIN]
    assert SS.image_decision(c, [1], 1).tolist() == [1, 0, ABSTAIN, 1]


def test_image_decision_on_the_planted_segmenter():
    m = np.full((2, 8, 8), -2 * SIGMA)
    m[0, 2:6, 2:6] = 2 * SIGMA  # a 16-pixel defect far above the threshold
    votes = SS.sample_votes(segmenter(8, 8), image(m), sigma=SIGMA, n0=32, n=1000, seed=0)
    c = SS.certify_pixels(votes, 0.2, alpha=0.001)
    assert SS.image_decision(c, [1], 10).tolist() == [1, 0]
    assert SS.image_decision(SS.certify_pixels(votes, 0.6, alpha=0.001), [1], 10).tolist() == [ABSTAIN, ABSTAIN]


def test_bad_requests_are_refused():
    seg = segmenter(4, 4)
    x = image(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="sigma"):
        SS.sample_votes(seg, x, sigma=0, n0=4, n=4)
    with pytest.raises(ValueError, match="radius"):
        SS.tau_at(-0.1, 0.25)
    seg.module.train()
    with pytest.raises(ModelError, match="training mode"):
        SS.sample_votes(seg, x, sigma=0.1, n0=4, n=4)


# --- the randomized_smoothing check on a segmentation use case -------------------------------------------------

from test_segmentation import _context, segmentation_case  # noqa: E402, F401  (the tiny PNG use case)


def test_the_check_certifies_pixels_and_decisions_of_a_segmenter(segmentation_case):  # noqa: F811
    """The case's segmenter marks pixels brighter than mid-grey: logits (0.5 - v, v - 0.5), v the pixel in [0, 1], so
    its smoothed probabilities are Phi(|v - 0.5| / sigma) and a pixel's exact radius is |v - 0.5|: 0.363 for the
    bright defect of t1 (grey 220), the dim defect of t3 (grey 100) is background to the smoothed segmenter too."""
    from trustcase.checks import build
    from trustcase.schemas import CheckSpec

    uc, tmp_path = segmentation_case
    params = {"sigma": 0.25, "n0": 32, "n": 300, "alpha": 0.001, "radii": [0.05, 0.4], "batch_size": 100}
    out = build(CheckSpec(check="randomized_smoothing", params=params))(_context(uc, tmp_path, "rs"))
    by = {(m.metric, m.amplitude): m for m in out.measurements}
    # t1's 12 bright defect pixels certified at 0.05 (p = 0.926 > tau = 0.58), none beyond their exact radius
    assert by[("smoothing_certified_defect_share", 0.05)].value == 12 / 16
    assert by[("smoothing_certified_defect_share", 0.4)].value == 0
    # decisions at >= 4 defect pixels: t1 certified defective, t3 certified good (missed), t2_free certified
    # defective (its 4 bright background pixels: a certified false alarm)
    assert by[("smoothing_certified_image_recall", 0.05)].value == 1 / 2
    assert by[("smoothing_certified_image_accuracy", 0.05)].value == 1 / 3
    assert by[("smoothing_certified_image_recall", 0.4)].value == 0
    assert by[("smoothing_pixel_abstain_rate", None)].value < 0.05
    assert [a.kind for a in out.artefacts] == ["image", "file"]
    assert any("Holm" in v for v in out.validity) and any("L2 norm" in v for v in out.validity)
    # the same evidence at another batch size
    again = build(CheckSpec(check="randomized_smoothing", params={**params, "batch_size": 7}))(
        _context(uc, tmp_path, "rs7"))
    assert [m.value for m in again.measurements] == [m.value for m in out.measurements]
