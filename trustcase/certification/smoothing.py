"""Randomized smoothing (Cohen, Rosenfeld and Kolter, 2019): certified L2 robustness of the SMOOTHED
classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I).

The guarantee covers g, not the base model f: deploying it means predicting with `predict` (Monte Carlo
votes under noise), not with one forward pass of f.

- `certify`: class cA from n0 noisy samples, then a separate draw of n samples, a one-sided
  Clopper-Pearson lower bound pA of P(f(x + e) = cA) at level alpha; ABSTAIN (-1) when pA < 1/2, else
  radius sigma * PhiInverse(pA). With probability >= 1 - alpha (per input) g(x + d) = cA for every
  ||d||_2 < radius. Floating-point margin: pA is lowered by PPF_ERROR (relative) before use, covering the
  error of the inverse incomplete beta that computes it, and the radius by gamma_8 (the inverse normal and
  the product), so neither the decision pA >= 1/2 nor the radius rests on one library build's last digits.
- `predict`: the binomial test of Cohen et al.; abstains unless the top class wins at level alpha.

sigma is a fraction of the value range: noise of standard deviation sigma * (max - min) is added in
pixel space, before the model's normalisation, so radii are L2 norms of the input scaled to [0, 1]
(the same convention as the Lipschitz check). Noise of many inputs is batched together (an input
repeated along the batch), votes are counted with one bincount per forward batch: no per-sample
Python loop in the hot path. The check `randomized_smoothing` packs these as evidence.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from trustcase.certification.rounding import gamma
from trustcase.measurement import clopper_pearson_lower
from trustcase.models.classifier import Classifier, ModelError
from trustcase.seeding import content_id, item_seeds

ABSTAIN = -1
# Relative error allowed for pA = the inverse incomplete beta (scipy: Boost's ibeta_inv, Newton/Halley on the
# forward function to about 1e-15): Cephes' incbi documents a peak relative error of 5.8e-12 for a, b up to
# 1e4 (n here); 1e-10 sits a factor 17 above, and costs 1e-10 of a radius's pA (tested against the forward
# binomial tail in tests/test_smoothing.py)
PPF_ERROR = 1e-10


def _validate(model: Classifier, sigma: float, alpha: float, batch_size: int, **counts: int) -> None:
    # the certificate is about the deterministic base model f: in training mode Dropout and BatchNorm make each
    # vote another function. Refused, not switched: the module is the caller's (shared by other work), and every
    # loader of the package already gives it in eval mode
    if model.module is not None and model.module.training:
        raise ModelError(f"the model {model.spec.path} is in training mode (Dropout and BatchNorm would change "
                         "every vote): randomized smoothing certifies it in eval mode; call module.eval()")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (a fraction of the value range), got {sigma}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for name, v in counts.items():
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def noise_step(model: Classifier) -> torch.Tensor:
    """How one pixel-space unit moves the model input (the normalisation is affine: x * scale + shift)."""
    shape = model.spec.input_shape
    probe = np.zeros((1, *shape[1:], shape[0]) if len(shape) > 1 else (1, shape[0]), np.float32)
    step = model.to_input(probe + 1) - model.to_input(probe)
    return step[..., :1, :1] if step.ndim == 4 else step  # per channel: fits an image of any size (fit: tiles)


NOISE_BLOCK = 64  # noise is drawn per item in blocks of this many samples, whatever the forward batch


def sample_counts(model: Classifier, x: np.ndarray, num: int, sigma: float, batch_size: int,
                  seeds: np.ndarray) -> np.ndarray:
    """Votes (B, C) of the base model on `num` noisy copies of each pixel-space input of x; for a segmenter
    (logits (B, C, H, W)) the votes of every pixel, (B, H, W, C).

    Item i's noise comes from its own generator (seeds[i]) in blocks of NOISE_BLOCK samples, so the
    votes of an item do not depend on the batch it arrives in nor on `batch_size`.
    """
    lo, hi = model.spec.value_range
    with torch.inference_mode():
        clean = model.to_input(x)  # normalise once; noise e in pixel space maps to e * step
        step = noise_step(model) * (sigma * (hi - lo))
        image = clean.ndim == 4
        if image:  # work channels-last, the layout to_input gives the model (its fast convolution path)
            clean, step = clean.permute(0, 2, 3, 1), step.permute(0, 2, 3, 1)
        b, c = len(clean), model.n_classes
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        drawn, pending = [0] * b, [clean[:0, ...]] * b

        def noise(i: int, k: int) -> torch.Tensor:  # the next k noise samples of item i
            while len(pending[i]) < k:
                size = min(NOISE_BLOCK, num - drawn[i])
                drawn[i] += size
                block = torch.randn((size, *clean.shape[1:]), generator=gens[i])
                pending[i] = torch.cat([pending[i], block]) if len(pending[i]) else block  # no copy when used up
            out, pending[i] = pending[i][:k], pending[i][k:]
            return out

        counts, cells = None, ()
        total = b * num
        for start in range(0, total, batch_size):
            owner = torch.arange(start, min(start + batch_size, total)) // num
            items, k = torch.unique_consecutive(owner, return_counts=True)
            parts = [noise(int(i), int(n)) for i, n in zip(items, k, strict=True)]
            # scaled in place (the drawn samples are used once): one item's samples are not copied
            noisy = (parts[0] if len(parts) == 1 else torch.cat(parts)).mul_(step)
            at = 0
            for i, n in zip(items.tolist(), k.tolist(), strict=True):  # in place: clean + e * step, no copies
                noisy[at:at + n] += clean[i]
                at += n
            pred = model.forward(noisy.permute(0, 3, 1, 2) if image else noisy).argmax(1)  # (k,) or (k, H, W)
            if counts is None:  # one vote counter per item, output cell (a segmenter's pixel) and class
                cells = tuple(pred.shape[1:])
                counts = torch.zeros(b * math.prod(cells) * c, dtype=torch.int64)
                first = torch.arange(math.prod(cells)).view(cells) * c  # each cell's first counter in an item's
            where = pred + first
            where += (owner * (math.prod(cells) * c)).view(-1, *[1] * len(cells))
            counts += torch.bincount(where.flatten(), minlength=len(counts))
    return np.zeros((b, c), np.int64) if counts is None else counts.view(b, *cells, c).numpy()


def certify(model: Classifier, x: np.ndarray, *, sigma: float, n0: int, n: int, alpha: float,
            batch_size: int = 256, seed: int = 0, ids=None, check: str = "randomized_smoothing",
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CERTIFY of Cohen et al. for a batch of pixel-space inputs: (class or -1, radius, pA lower bound).

    Noise follows (seed, check, item id, stream) (`trustcase.seeding`; `ids` default: each item's content):
    the same item gets the same certificate in any batch and at any `batch_size`.
    """
    _validate(model, sigma, alpha, batch_size, n0=n0, n=n)
    ids = [content_id(v) for v in x] if ids is None else ids
    guess = sample_counts(model, x, n0, sigma, batch_size, item_seeds(seed, check, ids, "select")).argmax(1)
    # a separate draw: the selection is not reused
    counts = sample_counts(model, x, n, sigma, batch_size, item_seeds(seed, check, ids, "estimate"))
    p_a, radius = certified_radius(counts[np.arange(len(guess)), guess], n, alpha, sigma)
    return np.where(p_a >= 0.5, guess, ABSTAIN), radius, p_a


def certified_radius(n_a: np.ndarray, n: int, alpha: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """pA, the one-sided Clopper-Pearson lower bound of n_a of n at level alpha lowered by PPF_ERROR, and the
    radius sigma * PhiInverse(pA) lowered by gamma_8 (0 where pA < 1/2: abstain)."""
    p_a = clopper_pearson_lower(n_a, n, alpha) * (1 - PPF_ERROR)
    radius = np.where(p_a >= 0.5, sigma * stats.norm.ppf(np.clip(p_a, 0.5, 1.0)) * (1 - gamma(8)), 0.0)
    return p_a, radius


def predict(model: Classifier, x: np.ndarray, *, sigma: float, n: int, alpha: float, batch_size: int = 256,
            seed: int = 0, ids=None, check: str = "randomized_smoothing") -> np.ndarray:
    """PREDICT of Cohen et al.: the top class if it beats the runner-up in a two-sided binomial test at alpha
    (noise seeded as in `certify`)."""
    _validate(model, sigma, alpha, batch_size, n=n)
    ids = [content_id(v) for v in x] if ids is None else ids
    counts = sample_counts(model, x, n, sigma, batch_size, item_seeds(seed, check, ids, "predict"))
    order = np.argsort(-counts, axis=1, kind="stable")
    rows = np.arange(len(counts))
    n_a, n_b = counts[rows, order[:, 0]], counts[rows, order[:, 1]]
    # two-sided binomial test of n_a successes in n_a + n_b trials at p = 1/2
    p_value = np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(n_a, n_b), n_a + n_b, 0.5))
    return np.where(p_value <= alpha, order[:, 0], ABSTAIN)


def training_noise(model_path: Path) -> float | None:
    """The Gaussian augmentation recorded by the training script beside the model (<model>.json), if any."""
    log = Path(model_path).with_suffix(".json")
    try:
        return float(json.loads(log.read_text())["params"]["noise_sigma"])
    except (OSError, KeyError, TypeError, ValueError):
        return None




