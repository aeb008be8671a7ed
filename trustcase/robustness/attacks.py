"""Adversarial robustness: FGSM and PGD under L-inf and L2, and per-item minimal adversarial distances.

Everything is EMPIRICAL. An attack that finds an adversarial example proves the model can be fooled
at that distance; an attack that fails proves nothing. So the accuracy under attack is an UPPER
bound on the robust accuracy, and each item's distance is an UPPER bound on its true minimal
adversarial distance (its robust radius). Neither is a certificate (see `lipschitz`/`smoothing`).

Epsilons are in pixel units of the model's value range: L-inf bounds the change of any one pixel
value, L2 the Euclidean norm of the change over all H x W x C values. The attacks run in pixel space
and differentiate through `Classifier.to_input`, so the normalisation is accounted for exactly; the
adversarial images are clipped to the value range (not quantised to integer grey levels).

Measurements, per attack (scope.perturbation = {name: <attack>, max_amplitude: eps}, amplitude = eps,
eps = 0 is the clean data): every metric of `performance.Tally` (accuracy, recall:<class>, ...),
`adversarial_accuracy` (= accuracy under attack) and `attack_success_rate` (share of the items
correct when clean that the attack fools), with Clopper-Pearson intervals. PGD attacks with
`distance: true` add, with no perturbation scope, `adversarial_distance_median.<attack>` and
`adversarial_distance_q10.<attack>` (pixel units; distribution-free order-statistic intervals;
items not fooled up to `max_distance` count as at `max_distance`).

Summary, per attack: `norm`, `epsilons`, `steps`, `step_size`, `restarts`, `n`, `accuracy`,
`success_rate` (per epsilon), `breaking` (as in the sweep), and for PGD `distance` (`median`, `q10`,
`q90`, `max_distance`, `censored`: items not fooled within it, `search_steps`).
Curves: `adversarial_<attack>`: accuracy and critical recall vs epsilon with bands.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from trustcase.models.classifier import Classifier
from trustcase.schemas import Interval

Norm = Literal["linf", "l2"]
ATTACKS: dict[str, tuple[str, Norm]] = {
    "fgsm_linf": ("fgsm", "linf"), "fgsm_l2": ("fgsm", "l2"), "pgd_linf": ("pgd", "linf"), "pgd_l2": ("pgd", "l2"),
    "apgd_linf": ("apgd", "linf"), "apgd_l2": ("apgd", "l2"), "square_linf": ("square", "linf"),
}
BLACK_BOX = {"square"}  # attacks that need forward passes only
# default epsilons as fractions of the value range (x 255: 0.5 to 8 grey levels for L-inf)
DEFAULT_EPS = {"linf": (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255), "l2": (0.05, 0.1, 0.25, 0.5, 1.0)}


def norms(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-item norm of a batch of perturbations (B, ...)."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project(delta: torch.Tensor, eps: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Nearest point of the ball of radius eps[i] around 0, item by item."""
    e = eps.view(-1, *([1] * (delta.ndim - 1)))
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, e), -e)
    n = norms(delta, "l2").view_as(e)
    return delta * torch.clamp(e / n.clamp_min(1e-12), max=1.0)


def _direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest ascent direction of unit norm: sign for L-inf, normalised gradient for L2."""
    if norm == "linf":
        return grad.sign()
    n = norms(grad, "l2").view(-1, *([1] * (grad.ndim - 1)))
    return grad / n.clamp_min(1e-12)


def _loss_grad(clf: Classifier, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the cross-entropy w.r.t. the pixel-space input, and the logits it came from."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = clf.forward(clf.to_input(x))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
    return g, logits.detach()


def _predict(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return clf.forward(clf.to_input(x)).argmax(dim=1)


def _clip(x: torch.Tensor, delta: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Shrink delta so that x + delta stays in the value range (keeps it inside any ball around 0)."""
    return (x + delta).clamp(lo, hi) - x


def fgsm(clf: Classifier, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: Norm,
         value_range: tuple[float, float]) -> torch.Tensor:
    """One step of size eps along the gradient's sign (L-inf) or direction (L2): the fast gradient method."""
    g, _ = _loss_grad(clf, x, y)
    e = eps.view(-1, *([1] * (x.ndim - 1)))
    return x + _clip(x, e * _direction(g, norm), *value_range)


def random_start(shape: tuple[int, ...], eps: torch.Tensor, norm: Norm, seeds: np.ndarray,
                 restart: int) -> torch.Tensor:
    """A uniform point of each item's ball (L-inf: uniform cube; L2: uniform in the ball), seeded per item."""
    d = int(np.prod(shape[1:]))
    out = []
    for s, e in zip(seeds, eps.tolist(), strict=True):
        rng = np.random.default_rng([int(s), restart])
        if norm == "linf":
            v = rng.uniform(-e, e, d)
        else:
            v = rng.standard_normal(d)
            v *= e * rng.random() ** (1.0 / d) / max(np.linalg.norm(v), 1e-12)
        out.append(v)
    return torch.from_numpy(np.stack(out).astype(np.float32)).view(shape)


def pgd(clf: Classifier, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: Norm,
        value_range: tuple[float, float], steps: int = 20, step_size: float = 2.5, restarts: int = 1,
        seeds: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the cross-entropy (Madry et al.): first from the clean input, then from
    `restarts - 1` random starts in the ball.

    Returns (x_adv, fooled): for a fooled item x_adv is the first misclassified iterate found (a
    witness inside its ball), otherwise the last iterate. Items misclassified when clean count as
    fooled with x_adv = x. Fooled items leave the batch, so a strong attack costs less.
    """
    seeds = np.arange(len(x)) if seeds is None else seeds
    adv = x.clone()
    fooled = _predict(clf, x) != y  # items with eps = 0 keep this clean verdict
    alpha = step_size * eps / steps
    for r in range(restarts):
        idx = torch.nonzero(~fooled & (eps > 0)).flatten()
        if len(idx) == 0:
            break
        xi, yi, ei, ai = x[idx], y[idx], eps[idx], alpha[idx].view(-1, *([1] * (x.ndim - 1)))
        # the first run starts at the clean input (for a locally linear model the best start); restarts are random
        delta = torch.zeros_like(xi) if r == 0 else _clip(
            xi, project(random_start(tuple(xi.shape), ei, norm, seeds[idx.numpy()], r), ei, norm), *value_range)
        for step in range(steps + 1):
            g, logits = _loss_grad(clf, xi + delta, yi)
            hit = logits.argmax(dim=1) != yi
            if hit.any():  # keep the witness, drop the item
                adv[idx[hit]] = (xi + delta)[hit]
                fooled[idx[hit]] = True
                keep = ~hit
                idx, xi, yi, ei, ai, delta, g = idx[keep], xi[keep], yi[keep], ei[keep], ai[keep], delta[keep], g[keep]
            if len(idx) == 0 or step == steps:
                break
            delta = _clip(xi, project(delta + ai * _direction(g, norm), ei, norm), *value_range)
        if len(idx):
            adv[idx] = xi + delta
    return adv, fooled


def attack(kind: str, clf: Classifier, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: Norm,
           value_range: tuple[float, float], steps: int, step_size: float, restarts: int,
           seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "pgd":
        return pgd(clf, x, y, eps, norm, value_range, steps, step_size, restarts, seeds)
    clean_wrong = _predict(clf, x) != y
    if kind in ("apgd", "square"):
        e = eps.view(-1, *([1] * (x.ndim - 1)))
        lo_v, hi_v = value_range
        if norm == "linf":
            lo, hi = (x - e).clamp(lo_v, hi_v), (x + e).clamp(lo_v, hi_v)
        else:
            lo, hi = torch.full_like(x, lo_v), torch.full_like(x, hi_v)

        def forward(p):
            return clf.forward(clf.to_input(p))

        if kind == "apgd":
            adv, fooled = apgd(forward, x, y, lo, hi, steps, restarts, seeds=seeds, eps=eps, norm=norm)
        else:
            adv, fooled = square(forward, x, y, lo, hi, queries=steps * restarts, seeds=seeds)
        fooled = fooled & (eps > 0)  # a zero ball changes nothing (a tie at the clean input is not an attack)
        adv = torch.where((clean_wrong | ~fooled).view(-1, *([1] * (x.ndim - 1))), x, adv)
        return adv, clean_wrong | fooled
    adv = torch.where(clean_wrong.view(-1, *([1] * (x.ndim - 1))), x, fgsm(clf, x, y, eps, norm, value_range))
    return adv, clean_wrong | (_predict(clf, adv) != y)


def minimal_distance(kind: str, clf: Classifier, x: torch.Tensor, y: torch.Tensor, norm: Norm,
                     value_range: tuple[float, float], max_distance: float, search_steps: int, steps: int,
                     step_size: float, restarts: int, seeds: np.ndarray) -> np.ndarray:
    """Per item, the norm of the closest adversarial example found by bisection over epsilon.

    An upper bound on the item's minimal adversarial distance (the witness exists); `inf` when the
    attack found nothing within `max_distance`, 0 when the item is misclassified clean.
    """
    n = len(x)
    best = torch.full((n,), math.inf)

    def probe(eps: torch.Tensor) -> torch.Tensor:
        adv, fooled = attack(kind, clf, x, y, eps, norm, value_range, steps, step_size, restarts, seeds)
        found = norms(adv - x, norm)
        ok = fooled & (found <= eps + 1e-4 * max(1.0, max_distance))
        best[ok] = torch.minimum(best[ok], found[ok])
        return ok

    probe(torch.full((n,), float(max_distance)))
    lo = torch.zeros(n)
    for _ in range(search_steps):
        live = torch.isfinite(best) & (best > 0)
        if not live.any():
            break
        mid = torch.where(live, (lo + best) / 2, torch.zeros(n))
        ok = probe(mid)
        lo = torch.where(live & ~ok, mid, lo)
    return best.numpy().astype(np.float64)


def quantile_interval(values: np.ndarray, q: float, confidence: float) -> tuple[float, Interval]:
    """Sample quantile and its distribution-free interval from order statistics (binomial counts)."""
    x = np.sort(values)
    n = len(x)
    a = 1 - confidence
    lo_k = int(stats.binom.ppf(a / 2, n, q))  # number of items below the lower bound
    hi_k = int(stats.binom.ppf(1 - a / 2, n, q)) + 1
    lower = float(x[lo_k - 1]) if lo_k >= 1 else 0.0
    upper = float(x[min(hi_k, n) - 1])
    value = float(np.quantile(x, q, method="inverted_cdf"))
    return value, Interval(lower=lower, upper=upper, confidence=confidence, method="order-statistic")




# --- the attack engine: APGD on the margin, targeted at the runner-up classes --------------------------

def margin(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_target - z_label: >= 0 exactly when the target class scores at least as high as the label."""
    return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, label[:, None])[:, 0]


def apgd(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, steps: int = 50,
         restarts: int = 1, targets: int = 3, seed: int = 0, seeds: np.ndarray | None = None,
         eps: torch.Tensor | None = None, norm: Norm = "linf") -> tuple[torch.Tensor, torch.Tensor]:
    """APGD (Croce & Hein 2020) on the margin loss, targeted at each of the `targets` runner-up classes, from
    the clean input then `restarts - 1` seeded random starts.

    The search stays in the box [lo, hi] (per element: the L-inf ball intersected with the value range, or
    any input region), and for norm "l2" also in the L2 ball of radius eps[i] around x. Step size: half the
    box (or 2 eps) at first, halved at APGD's checkpoints when the loss stalls, with momentum 0.75. Returns
    (x_adv, fooled): fooled[i] when some class scores >= the label's at x_adv[i] by a plain forward pass (a tie
    counts: the verifier's convention); x_adv[i] is that witness, else the clean input.
    """
    seeds = np.arange(len(x)) if seeds is None else seeds
    with torch.no_grad():
        clean = forward(x)
    k = clean.shape[1]
    order = clean.masked_fill(F.one_hot(label, k).bool(), -math.inf).argsort(1, descending=True)
    t_count = max(1, min(targets, k - 1))
    adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    shape = (1,) * (x.ndim - 1)
    width = (hi - lo).clamp_min(0)
    for r in range(restarts):
        for t in range(t_count):
            idx = torch.nonzero(~fooled).flatten()
            if not len(idx):
                return adv, fooled
            xi, yi, li, hi_i = x[idx], label[idx], lo[idx], hi[idx]
            target = order[idx, t]
            if r == 0:
                start = xi.clone()
            else:
                u = torch.stack([torch.from_numpy(np.random.default_rng([int(seeds[i]), seed, r, t]).random(
                    int(np.prod(x.shape[1:])))).view(x.shape[1:]) for i in idx.tolist()]).to(x.dtype)
                start = li + (hi_i - li) * u
            ei = None if eps is None else eps[idx].view(-1, *shape)
            found, ok = _apgd_run(forward, xi, start, yi, target, li, hi_i, width[idx], steps, ei, norm)
            adv[idx[ok]] = found[ok]
            fooled[idx[ok]] = True
    return adv, fooled


def _apgd_project(x0, x, lo, hi, eps, norm):
    if norm == "l2" and eps is not None:
        d = x - x0
        n = d.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
        x = x0 + d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return torch.minimum(torch.maximum(x, lo), hi)


def _apgd_run(forward, x0, start, label, target, lo, hi, width, steps, eps, norm):
    checkpoints, p, q = [0], 0.0, 0.22  # APGD's checkpoints: fractions 0, 0.22, 0.41, 0.57, ... of the steps
    while q < 1:
        checkpoints.append(int(math.ceil(q * steps)))
        p, q = q, q + max(q - p - 0.03, 0.06)
    view = (-1,) + (1,) * (x0.ndim - 1)
    eta = (width if norm == "linf" else 2 * eps.expand_as(x0)).clone()
    x = _apgd_project(x0, start, lo, hi, eps, norm)

    def loss_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            out = forward(z)
            m = margin(out, label, target)
            (g,) = torch.autograd.grad(m.sum(), z)
        return m.detach(), g, out.detach()

    loss, g, out = loss_grad(x)
    best_x, best = x.clone(), loss.clone()
    hit = _fooled(out, label)
    found, ok = x.clone(), hit.clone()
    prev = x.clone()
    gains = torch.zeros(len(x))
    last_best, last_eta_cut = best.clone(), torch.zeros(len(x), dtype=torch.bool)
    for step in range(1, steps + 1):
        if ok.all():
            break
        direction = g.sign() if norm == "linf" else g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(view)
        z = _apgd_project(x0, x + eta * direction, lo, hi, eps, norm)
        a = 0.75 if step > 1 else 1.0
        new = _apgd_project(x0, x + a * (z - x) + (1 - a) * (x - prev), lo, hi, eps, norm)
        prev, x = x, new
        loss, g, out = loss_grad(x)
        hit = _fooled(out, label) & ~ok
        found[hit], ok = x[hit], ok | hit
        gains += (loss > best).float()
        better = loss > best
        best_x[better], best[better] = x[better], loss[better]
        if step in checkpoints:
            since = checkpoints[checkpoints.index(step) - 1]
            stall = (gains < 0.75 * (step - since)) | (~last_eta_cut & (best <= last_best))
            eta[stall] /= 2
            if stall.any():  # restart from the best point with the smaller step
                x[stall], prev[stall] = best_x[stall], best_x[stall]
                _, g, _ = loss_grad(x)
            gains.zero_()
            last_best, last_eta_cut = best.clone(), stall
    return found, ok


def _fooled(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Some other class scores at least as high as the label (a tie counts as a change)."""
    other = logits.masked_fill(F.one_hot(label, logits.shape[1]).bool(), -math.inf).amax(1)
    return other >= logits.gather(1, label[:, None])[:, 0]


def square(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, queries: int = 300,
           seed: int = 0, seeds: np.ndarray | None = None, p_init: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Square attack (Andriushchenko et al. 2020), L-inf, black box: forward passes only, no gradient.

    Starts from vertical stripes at the box's faces, then changes one random square window per query to
    a random face of the box per channel, kept when the margin loss (the best other class minus the label)
    grows; the window shrinks on APGD-like checkpoints. Images (B, H, W, C) or (B, C, H, W) with H, W the
    two largest axes after the batch; returns (x_adv, fooled) as `apgd` (a tie counts).
    """
    seeds = np.arange(len(x)) if seeds is None else seeds
    gens = [np.random.default_rng([int(s), seed, 7]) for s in seeds]
    dims = sorted(range(1, x.ndim), key=lambda d: x.shape[d])[-2:]  # the two spatial axes
    h, w = x.shape[dims[0]], x.shape[dims[1]]

    def loss(z, lab):
        with torch.no_grad():
            out = forward(z)
        other = out.masked_fill(F.one_hot(lab, out.shape[1]).bool(), -math.inf).amax(1)
        return other - out.gather(1, lab[:, None])[:, 0]

    stripes = torch.stack([torch.from_numpy(g.choice([0.0, 1.0], size=w)).float() for g in gens])
    shape = [len(x)] + [1] * (x.ndim - 1)
    shape[dims[1]] = w
    best_x = lo + (hi - lo) * stripes.view(shape) if x.ndim > 2 else x.clone()
    best = loss(best_x, label)
    for q in range(queries):
        live = torch.nonzero(best < 0).flatten()
        if not len(live):
            break
        frac = p_init / 2 ** sum(q >= int(t * queries) for t in (0.02, 0.1, 0.2, 0.4, 0.6, 0.8))
        s = max(1, int(round(math.sqrt(frac * h * w))))
        cand = best_x[live].clone()
        for n, i in enumerate(live.tolist()):
            g = gens[i]
            r0, c0 = int(g.integers(0, h - s + 1)), int(g.integers(0, w - s + 1))
            index = [slice(None)] * x.ndim
            index[0] = n
            index[dims[0]], index[dims[1]] = slice(r0, r0 + s), slice(c0, c0 + s)
            pick = torch.from_numpy(g.choice([0.0, 1.0], size=1)).float()
            cand[tuple(index)] = lo[i][tuple(index[1:])] + (hi[i] - lo[i])[tuple(index[1:])] * pick
        new = loss(cand, label[live])
        better = new > best[live]
        best_x[live[better]], best[live[better]] = cand[better], new[better]
    fooled = best >= 0
    return torch.where(fooled.view(-1, *[1] * (x.ndim - 1)), best_x, x), fooled
