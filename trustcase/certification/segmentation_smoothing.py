"""Certified segmentation by randomized smoothing (Fischer, Baader and Vechev, "Scalable certified segmentation
via randomized smoothing", ICML 2021: SegCertify), with per-pixel abstention.

The smoothed segmenter g^tau gives pixel i the class c_i whose probability under noise, P(f(x + e)_i = c_i) with
e ~ N(0, sigma^2 I), exceeds tau, and abstains elsewhere. The certificate: with probability >= 1 - alpha over the
noise, SIMULTANEOUSLY for every certified pixel of the image, g's class of that pixel stays c_i for every input
perturbation d with ||d||_2 < R = sigma * PhiInverse(tau) (Cohen et al.'s radius, pixel by pixel).

- `sample_votes`: per pixel the class c_i of most votes among n0 noisy samples, then the votes n_i for c_i
  among n separate samples (the classification code's `smoothing.sample_counts`: the same noise, seeding by
  item id and batching, every pixel counted by one bincount per forward batch).
- `certify_pixels` at a stated radius R: tau = Phi(R / sigma); per pixel the one-sided binomial test of
  H0: p_i <= tau (p-value P(Binomial(n, tau) >= n_i)); the family of an image's pixels is corrected by Holm's
  step-down (as in the paper; the FWER stays <= alpha whatever the dependence between pixels) or Bonferroni.
  A pixel whose H0 is rejected is certified at R; the others abstain (`smoothing.ABSTAIN`). More pixels make
  the correction stricter: abstention grows with the image size at a fixed n.
- `pixel_radii`: a radius per pixel, sigma * PhiInverse(pA_i) with pA_i the Clopper-Pearson lower bound at
  level alpha / pixels (Bonferroni: simultaneously valid), for the certified-pixel map.
- `image_decision`: the image-level rule "defective if at least A pixels of defect" of g, certified at R when
  A pixels are certified defect (defective) or more than pixels - A pixels are certified not defect (good).

Floating point: tau is raised by gamma_8 (the normal cdf and the division), p-values by PPF_ERROR (relative;
the regularised incomplete beta that computes the binomial tail is far more accurate) so that neither a
certification nor a radius rests on one library build's last digits; `pixel_radii` reuses
`smoothing.certified_radius`. sigma is a fraction of the value range and radii are L2 norms of the input
scaled to [0, 1], over all H x W x C values, as for classification smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from trustcase.certification.rounding import gamma
from trustcase.certification.smoothing import ABSTAIN, PPF_ERROR, _validate, certified_radius, sample_counts
from trustcase.measurement import bootstrap_interval, bootstrap_weights, estimate, proportion
from trustcase.models.classifier import Classifier
from trustcase.schemas import Measurement, PerturbationScope, Scope
from trustcase.seeding import content_id, item_seeds

CORRECTIONS = ("holm", "bonferroni")


@dataclass(frozen=True)
class PixelVotes:
    """Per pixel the selected class (from n0 samples) and its votes among n further samples."""

    guess: np.ndarray  # (B, H, W) int64
    n_top: np.ndarray  # (B, H, W) int64
    n: int
    sigma: float


def sample_votes(model: Classifier, x: np.ndarray, *, sigma: float, n0: int, n: int, batch_size: int = 256,
                 seed: int = 0, ids=None, check: str = "randomized_smoothing") -> PixelVotes:
    """Votes of the base segmenter (logits (B, K, H, W)) on noisy copies of pixel-space inputs x (B, H, W, C).

    Noise follows (seed, check, item id, stream) as in `smoothing.certify` (streams "select" and "estimate":
    the selection is not reused), so an item's votes are the same in any batch and at any `batch_size`."""
    _validate(model, sigma, 0.5, batch_size, n0=n0, n=n)
    ids = [content_id(v) for v in x] if ids is None else ids
    guess = sample_counts(model, x, n0, sigma, batch_size, item_seeds(seed, check, ids, "select")).argmax(-1)
    counts = sample_counts(model, x, n, sigma, batch_size, item_seeds(seed, check, ids, "estimate"))
    if counts.ndim != 4:
        raise ValueError(f"votes of shape {counts.shape}: certified segmentation needs logits (B, K, H, W)")
    n_top = np.take_along_axis(counts, guess[..., None], axis=-1)[..., 0]
    return PixelVotes(guess=guess, n_top=n_top, n=n, sigma=sigma)


def tau_at(radius: float, sigma: float) -> float:
    """The class probability a pixel must exceed to be certified at L2 `radius`: Phi(radius / sigma), raised by
    gamma_8 so that sigma * PhiInverse(tau) >= radius whatever the last digits of the normal cdf."""
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    return min(1.0, float(stats.norm.cdf(radius / sigma)) * (1 + gamma(8)))


def p_values(n_top: np.ndarray, n: int, tau: float) -> np.ndarray:
    """One-sided binomial p-values of H0: p <= tau given n_top of n votes, P(Binomial(n, tau) >= n_top), raised
    by PPF_ERROR (relative) and capped at 1."""
    return np.minimum(1.0, stats.binom.sf(np.asarray(n_top) - 1, n, tau) * (1 + PPF_ERROR))


def reject(p: np.ndarray, alpha: float, correction: str = "holm") -> np.ndarray:
    """Which hypotheses of each row (one image's pixels, (B, P)) are rejected with the family-wise error rate of
    each row at most alpha: Holm's step-down (sorted p_(j) <= alpha / (P - j), j from 0, up to the first that
    is not) or Bonferroni (p <= alpha / P)."""
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; known: {', '.join(CORRECTIONS)}")
    p = np.asarray(p, np.float64)
    m = p.shape[-1]
    if correction == "bonferroni":
        return p <= alpha / m
    order = np.argsort(p, axis=-1, kind="stable")
    ok = np.take_along_axis(p, order, axis=-1) <= alpha / (m - np.arange(m))
    out = np.empty_like(ok)
    np.put_along_axis(out, order, np.cumprod(ok, axis=-1).astype(bool), axis=-1)
    return out


def certify_pixels(votes: PixelVotes, radius: float, alpha: float, correction: str = "holm") -> np.ndarray:
    """(B, H, W): each pixel's class certified at L2 `radius` (simultaneously for the image's certified pixels,
    with probability >= 1 - alpha), ABSTAIN elsewhere."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    b = len(votes.guess)
    p = p_values(votes.n_top, votes.n, tau_at(radius, votes.sigma)).reshape(b, -1)
    ok = reject(p, alpha, correction).reshape(votes.guess.shape)
    return np.where(ok, votes.guess, ABSTAIN)


def pixel_radii(votes: PixelVotes, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(classes, radii), each (B, H, W): the radius of every pixel, sigma * PhiInverse(pA_i) with pA_i the one-sided
    Clopper-Pearson bound at level alpha / pixels (Bonferroni: every radius of the image holds at once with
    probability >= 1 - alpha); a pixel with pA_i < 1/2 abstains, radius 0."""
    pixels = int(np.prod(votes.guess.shape[1:]))
    p_a, radius = certified_radius(votes.n_top, votes.n, alpha / pixels, votes.sigma)
    return np.where(p_a >= 0.5, votes.guess, ABSTAIN), radius


def image_decision(classes: np.ndarray, defect: Sequence[int], min_pixels: int) -> np.ndarray:
    """(B,) the certified image-level decision of the rule "defective if at least `min_pixels` pixels are of a
    defect class": 1 defective (min_pixels pixels certified defect), 0 good (fewer than min_pixels pixels can
    still be defect: certified non-defect pixels > pixels - min_pixels), ABSTAIN otherwise."""
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    flat = classes.reshape(len(classes), -1)
    is_defect = np.isin(flat, list(defect))
    certain_good = (flat != ABSTAIN) & ~is_defect
    maybe_defect = flat.shape[1] - certain_good.sum(1)
    return np.where(is_defect.sum(1) >= min_pixels, 1, np.where(maybe_defect < min_pixels, 0, ABSTAIN))


@dataclass
class CertifiedImages:
    """Per image and radius of a grid what the certificates give (the check's figures are ratios of their sums)."""

    defect_pixels: np.ndarray  # (B,) true defect pixels
    certified_defect: np.ndarray  # (B, R) true defect pixels certified with their true class at each radius
    decision: np.ndarray  # (B, R) certified image-level decision: 1, 0 or ABSTAIN
    abstain: np.ndarray  # (B,) pixels abstaining at radius 0 (the smoothed segmenter's own abstention)
    pixels: int


def certify_images(votes: PixelVotes, masks: np.ndarray, radii: Sequence[float], alpha: float, min_pixels: int,
                   n_classes: int, correction: str = "holm") -> tuple[CertifiedImages, list[np.ndarray]]:
    """The certificates of a batch of images with true masks (B, H, W) at each radius (each its own family test),
    and the certified classes (B, H, W) at each radius. Class 0 is the background, every other class a defect."""
    truth = np.asarray(masks)
    defect = truth != 0
    classes = [certify_pixels(votes, r, alpha, correction) for r in radii]
    flat = (lambda a: a.reshape(len(a), -1))
    return CertifiedImages(
        defect_pixels=flat(defect).sum(1),
        certified_defect=np.stack([flat((c == truth) & defect).sum(1) for c in classes], 1),
        decision=np.stack([image_decision(c, range(1, n_classes), min_pixels) for c in classes], 1),
        abstain=flat(certify_pixels(votes, 0.0, alpha, correction) == ABSTAIN).sum(1),
        pixels=int(np.prod(truth.shape[1:])),
    ), classes


def map_colours(classes: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 certified-pixel maps: certified defect on a true defect pixel red, certified background on
    a true background pixel dark grey, abstained yellow, certified background on a true defect (a certified miss)
    blue, certified defect on true background (a certified false defect) magenta."""
    out = np.zeros((*classes.shape, 3), np.uint8)
    certified, defect = classes != ABSTAIN, np.asarray(masks) != 0
    right = certified & (classes == masks)
    out[right & defect] = (220, 30, 30)
    out[right & ~defect] = (60, 60, 60)
    out[~certified] = (240, 200, 40)
    out[certified & ~right & defect] = (40, 90, 230)
    out[certified & ~right & ~defect] = (230, 60, 230)
    return out


def join(parts: list[CertifiedImages], radii: int) -> CertifiedImages:
    """The certificates of several batches as one (no batch: no image)."""
    def cat(field: str, *shape: int) -> np.ndarray:
        return np.concatenate([getattr(g, field) for g in parts]) if parts else np.zeros((0, *shape), np.int64)

    return CertifiedImages(defect_pixels=cat("defect_pixels"), certified_defect=cat("certified_defect", radii),
                           decision=cat("decision", radii), abstain=cat("abstain"),
                           pixels=parts[0].pixels if parts else 0)


FIGURES = ("smoothing_certified_defect_share", "smoothing_certified_image_recall", "smoothing_certified_image_accuracy")


def figures(got: CertifiedImages, ids: list[str], radii: Sequence[float], check: str, split: str, seed: int,
            confidence: float) -> list[Measurement]:
    """The evidence of a split's certificates: `smoothing_pixel_abstain_rate` (pixels abstaining at radius 0), and per
    radius r (scope l2_radius, amplitude r) the FIGURES: the share of true defect pixels certified with their class
    (a ratio of sums over images, the Poisson bootstrap over images: pixels of one image are not independent), the
    defective images certified defective and the images whose true decision is certified (Clopper-Pearson)."""
    n = len(ids)
    weights = bootstrap_weights(seed, check, ids).astype(np.float64)
    truth = got.defect_pixels > 0
    empty = f"no readable image in split {split!r}"

    def share(metric: str, num: np.ndarray, den: np.ndarray, scope: Scope, r: float | None, why: str) -> Measurement:
        num, den = num.astype(np.float64), den.astype(np.float64)
        if den.sum() == 0:
            return estimate(check, metric, None, n, None, scope=scope, amplitude=r, details={"undefined": why})
        with np.errstate(invalid="ignore", divide="ignore"):  # a replicate that drew no such pixel
            reps = (weights.T @ num) / (weights.T @ den)
        return estimate(check, metric, float(num.sum() / den.sum()), n, bootstrap_interval(reps, confidence),
                        scope=scope, amplitude=r, details={"pixels": int(den.sum())})

    out = [share("smoothing_pixel_abstain_rate", got.abstain, np.full(n, got.pixels), Scope(split=split), None, empty)]
    for j, r in enumerate(radii):
        scope = Scope(split=split, perturbation=PerturbationScope(name="l2_radius", max_amplitude=r))
        decided = got.decision[:, j]
        out += [share(FIGURES[0], got.certified_defect[:, j], got.defect_pixels, scope, r, "no true defect pixel"),
                proportion(check, FIGURES[1], int(((decided == 1) & truth).sum()), int(truth.sum()), confidence,
                           scope, r, undefined="no defective image"),
                proportion(check, FIGURES[2], int((decided == truth).sum()), n, confidence, scope, r, undefined=empty)]
    return out
