"""Adversarial robustness under L-inf and L2: FGSM, PGD, APGD (Croce & Hein 2020), Square (black box) and the
engine `auto` (FGSM, then PGD, then APGD, AutoAttack's recipe), behind one call on any input region,
`attack_region(kind, forward, x, label, lo, hi, budget, loss=..., hit=...)`, and its pixel-unit wrapper for a
classifier, `attack(kind, clf, x, y, eps, norm, value_range, budget, seeds)`; per-item minimal adversarial
distances. How hard an attack tries is one `Budget` (steps, restarts, APGD steps, queries, step schedule,
deadline); what it attacks is a `loss` to increase and a `hit` rule (default: the cross-entropy / AutoAttack's
losses, and "the arg max is not the label"), so a property's output condition is attacked by the same code.
Random starts and Square's draws follow each item's seed (`trustcase.seeding`).

Why APGD and not torchattacks: torchattacks 3.5.1 requires torchvision and pins requests~=2.25.1, clamps to
[0, 1] and seeds the torch generator per call (randomness would follow the batch, not the item). Here APGD
runs in any box (pixel units, or the verifier's input region), its random starts are seeded per item, and it
needs its ~100 iterations: with 10, its first steps of 2 eps (the ball's whole width) only hop between corners
(on the solar CNN it then misses a cell that PGD's small steps reach), which is why the engine keeps PGD.

Everything is EMPIRICAL. An attack that finds an adversarial example proves the model can be fooled
at that distance; an attack that fails proves nothing. So the accuracy under attack is an UPPER
bound on the robust accuracy, and each item's distance is an UPPER bound on its true minimal
adversarial distance (its robust radius). Neither is a certificate (see `lipschitz`/`smoothing`).

Epsilons are in pixel units of the model's value range: L-inf bounds the change of any one pixel
value, L2 the Euclidean norm of the change over all H x W x C values. The attacks run in pixel space
and differentiate through `Classifier.to_input`, so the normalisation is accounted for exactly; the
adversarial images are clipped to the value range (not quantised to integer grey levels).

The check `adversarial` packs the attacks' results as evidence (its measurements: `Adversarial.produces`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

from trustcase import clock
from trustcase.models.classifier import Classifier
from trustcase.schemas import Interval
from trustcase.seeding import content_id, item_seeds

Norm = Literal["linf", "l2"]
ATTACKS: dict[str, tuple[str, Norm]] = {
    "fgsm_linf": ("fgsm", "linf"), "fgsm_l2": ("fgsm", "l2"), "pgd_linf": ("pgd", "linf"), "pgd_l2": ("pgd", "l2"),
    "apgd_linf": ("apgd", "linf"), "apgd_l2": ("apgd", "l2"), "square_linf": ("square", "linf"),
    "auto_linf": ("auto", "linf"), "auto_l2": ("auto", "l2"),
}
BLACK_BOX = {"square"}  # attacks that need forward passes only
# default epsilons as fractions of the value range (x 255: 0.5 to 8 grey levels for L-inf)
DEFAULT_EPS = {"linf": (0.5 / 255, 1 / 255, 2 / 255, 4 / 255, 8 / 255), "l2": (0.05, 0.1, 0.25, 0.5, 1.0)}


def norms(delta: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Per-item norm of a batch of perturbations (B, ...)."""
    flat = delta.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def _direction(grad: torch.Tensor, norm: Norm) -> torch.Tensor:
    """Steepest ascent direction of unit norm: sign for L-inf, normalised gradient for L2."""
    if norm == "linf":
        return grad.sign()
    n = norms(grad, "l2").view(-1, *([1] * (grad.ndim - 1)))
    return grad / n.clamp_min(1e-12)


def _predict(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return clf.forward(clf.to_input(x)).argmax(dim=1)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, label) -> (B,), what an attack increases
Hit = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, label) -> (B,) bool, the item is fooled


def _grad(forward, z: torch.Tensor, label: torch.Tensor, loss: Loss | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the loss (default: the cross-entropy) w.r.t. the input, and the logits it came from."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        logits = forward(z)
        f = F.cross_entropy(logits, label, reduction="sum") if loss is None else loss(logits, label).sum()
        (g,) = torch.autograd.grad(f, z)
    return g, logits.detach()


def project(x0: torch.Tensor, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, eps: torch.Tensor | None,
            norm: Norm) -> torch.Tensor:
    """Into the box [lo, hi] and, for L2, first into the ball of radius eps (B, 1, ...) around x0: a point of
    both (the nearest one when the ball's nearest point is in the box)."""
    if norm == "l2" and eps is not None:
        d = x - x0
        n = d.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))
        x = x0 + d * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)
    return torch.minimum(torch.maximum(x, lo), hi)


def fgsm(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
         eps: torch.Tensor | None = None, norm: Norm = "linf", hit: Hit | None = None,
         loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast gradient method, one step on the loss (default: the cross-entropy): L-inf, to the corner of the
    box the gradient's sign points at; L2, eps along the gradient, then into the box."""
    hit = hit or misclassified
    g, _ = _grad(forward, x, label, loss)
    if norm == "linf":
        adv = torch.where(g > 0, hi, torch.where(g < 0, lo, x))
    else:
        e = eps.view(-1, *([1] * (x.ndim - 1)))
        adv = project(x, x + e * _direction(g, norm), lo, hi, e, norm)
    with torch.no_grad():
        return adv, hit(forward(adv), label)


def pgd(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
        budget: Budget | None = None, seeds: np.ndarray | None = None, eps: torch.Tensor | None = None,
        norm: Norm = "linf", hit: Hit | None = None, loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent on the loss (default: the cross-entropy; Madry et al.): `budget.steps` steps of
    step_size x r / steps, r the ball's radius eps, else per element half the box's width (a box of unequal
    sides is searched in proportion); with `budget.decay` step t is (1 - t / steps + 0.005) times that (large
    first steps leave the start, small last ones settle). First from x, then from `restarts - 1` random points
    (`random_point`, seeded per item). Returns (x_adv, fooled) as `apgd`; fooled items leave the batch, so a
    strong attack costs less.
    """
    b = budget or Budget()
    hit = hit or misclassified
    seeds = _seeds(x, seeds, "pgd")
    adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    view = (-1,) + (1,) * (x.ndim - 1)
    radius = (hi - lo) / 2 if eps is None else eps.view(view).expand_as(x)
    for r in range(b.restarts):
        idx = torch.nonzero(~fooled).flatten()
        if not len(idx) or clock.now() > b.deadline:
            break
        x0, li, hi_i, ei = x[idx], lo[idx], hi[idx], None if eps is None else eps[idx].view(view)
        a = b.step_size * radius[idx] / b.steps
        # the first run starts at x (for a locally linear model the clean input is the best start)
        z = x0.clone() if r == 0 else project(
            x0, random_point(x0, li, hi_i, ei, norm, seeds[idx.numpy()], r), li, hi_i, ei, norm)
        for step in range(b.steps + 1):
            g, logits = _grad(forward, z, label[idx], loss)
            h = hit(logits, label[idx])
            if h.any():  # keep the witness, drop the item
                adv[idx[h]], fooled[idx[h]] = z[h], True
                k = ~h
                idx, x0, li, hi_i, a, z, g = idx[k], x0[k], li[k], hi_i[k], a[k], z[k], g[k]
                ei = None if ei is None else ei[k]
            if not len(idx) or step == b.steps or clock.now() > b.deadline:
                break
            shrink = 1 - step / b.steps + 0.005 if b.decay else 1.0
            z = project(x0, z + shrink * a * _direction(g, norm), li, hi_i, ei, norm)
    return adv, fooled


@dataclass(frozen=True)
class Budget:
    """How hard each attack tries: PGD `steps` of `step_size` x eps / steps (shrinking linearly with `decay`: `pgd`)
    and `restarts` runs (APGD too), APGD `apgd_steps` per run, Square `queries` forward passes per item; no step
    starts after `deadline` (a `clock.now()` value)."""
    steps: int = 10
    step_size: float = 2.5
    restarts: int = 2
    apgd_steps: int = 100
    queries: int = 1000
    decay: bool = False
    deadline: float = math.inf


def _seeds(x: torch.Tensor, seeds: np.ndarray | None, stream: str) -> np.ndarray:
    """Each item's seed: the caller's (`seeding.item_seeds`), else from the item's content, never its position."""
    return item_seeds(0, "attack", (content_id(v) for v in x), stream) if seeds is None else np.asarray(seeds)


ENGINE = ("fgsm", "pgd", "apgd")  # the `auto` attack: each stage attacks the items the ones before left standing


def attack_region(kind: str, forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  budget: Budget = Budget(), eps: torch.Tensor | None = None, norm: Norm = "linf",
                  seeds: np.ndarray | None = None, hit: Hit | None = None,
                  loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacks on any input region: the box [lo, hi] per element (and for L2 the ball of radius eps[i]
    around x), for `kind` in fgsm, pgd, apgd, square, auto; `forward` maps inputs to outputs (logits).

    `auto` is the engine (AutoAttack's recipe): FGSM, then PGD, then APGD on the items still standing, so per
    item it fools whatever FGSM or PGD alone fools. `hit(outputs, label)` says when an item is fooled (default:
    the arg max is not the label; the verifier passes `_fooled`, where a tie counts); `loss(outputs, label)`,
    per item, is what every stage increases (default: cross-entropy for FGSM and PGD, `apgd_runs`' losses for
    APGD, the margin for Square), e.g. minus a property's distance to its unsafe outputs, with `hit` "that
    distance is 0" and any `label`. `seeds`: each item's seed (`trustcase.seeding`; default: from its content).
    Returns (x_adv, fooled): x_adv[i] the witness found for item i (by the forward pass that found it), else x[i].
    """
    hit = hit or misclassified
    seeds = _seeds(x, seeds, kind)
    b = budget
    adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    for stage in ENGINE if kind == "auto" else (kind,):
        i = torch.nonzero(~fooled).flatten()
        if not len(i):
            break
        xi, yi, li, hi_i, s = x[i], label[i], lo[i], hi[i], seeds[i.numpy()]
        ei = None if eps is None else eps[i]
        if clock.now() > b.deadline:
            break
        if stage == "fgsm":
            a, f = fgsm(forward, xi, yi, li, hi_i, ei, norm, hit, loss)
        elif stage == "pgd":
            a, f = pgd(forward, xi, yi, li, hi_i, b, s, ei, norm, hit, loss)
        elif stage == "apgd":
            a, f = apgd(forward, xi, yi, li, hi_i, b, seeds=s, eps=ei, norm=norm, hit=hit, loss=loss)
        else:
            a, f = square(forward, xi, yi, li, hi_i, b, seeds=s, hit=hit, loss=loss)
        adv[i[f]], fooled[i[f]] = a[f], True
    return adv, fooled


def attack(kind: str, clf: Classifier, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, norm: Norm,
           value_range: tuple[float, float], budget: Budget, seeds: np.ndarray, hit: Hit | None = None,
           loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacks in pixel units of a classifier: `attack_region` on each item's ball of radius eps[i]
    intersected with the value range, through the model's normalisation.

    Every counterexample is re-checked by a plain forward pass under the `hit` rule (default the accuracy's:
    arg max != label; a segmenter's rules: `robustness.segmentation_attacks`) before it is returned; x_adv is the
    clean input for items not fooled. Items fooled clean count as fooled, x_adv = x; a zero ball fools nothing else.
    """
    view = (-1,) + (1,) * (x.ndim - 1)
    eps = eps.to(x.dtype)
    hit = hit or misclassified
    with torch.inference_mode():
        clean_wrong = hit(clf.forward(clf.to_input(x)), y)
    adv = x.clone()
    i = torch.nonzero(~clean_wrong & (eps > 0)).flatten()
    if len(i):
        xi, e = x[i], eps[i].view(view)
        lo_v, hi_v = value_range
        if norm == "linf":
            lo, hi = (xi - e).clamp(lo_v, hi_v), (xi + e).clamp(lo_v, hi_v)
        else:
            lo, hi = torch.full_like(xi, lo_v), torch.full_like(xi, hi_v)

        def forward(p):
            return clf.forward(clf.to_input(p))

        a, f = attack_region(kind, forward, xi, y[i], lo, hi, budget, eps=eps[i], norm=norm, seeds=seeds[i.numpy()],
                             hit=hit, loss=loss)
        adv[i[f]] = a[f]
    with torch.inference_mode():  # the re-check: a plain forward pass of what is reported
        fooled = hit(clf.forward(clf.to_input(adv)), y)
    return torch.where(fooled.view(view), adv, x), fooled


def minimal_distance(kind: str, clf: Classifier, x: torch.Tensor, y: torch.Tensor, norm: Norm,
                     value_range: tuple[float, float], max_distance: float, search_steps: int, budget: Budget,
                     seeds: np.ndarray) -> np.ndarray:
    """Per item, the norm of the closest adversarial example found by bisection over epsilon.

    An upper bound on the item's minimal adversarial distance (the witness exists); `inf` when the
    attack found nothing within `max_distance`, 0 when the item is misclassified clean.
    """
    n = len(x)
    best = torch.full((n,), math.inf)

    def probe(eps: torch.Tensor) -> torch.Tensor:
        adv, fooled = attack(kind, clf, x, y, eps, norm, value_range, budget, seeds)
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


DISTANCE_QUANTILES = {"median": 0.5, "q10": 0.1, "q90": 0.9}


def censored_distances(distances: np.ndarray, cap: float) -> tuple[np.ndarray, dict]:
    """Minimal distances with the items not fooled within `cap` (inf) counted at `cap`, and their summary: the
    `DISTANCE_QUANTILES` (inverted CDF, as `quantile_interval`: a distance some item has), `max_distance` and
    how many items were `censored` at it."""
    capped = np.minimum(distances, cap)
    quantiles = {k: float(np.quantile(capped, q, method="inverted_cdf")) for k, q in DISTANCE_QUANTILES.items()}
    return capped, {**quantiles, "max_distance": cap, "censored": int(np.isinf(distances).sum())}


# --- the attack engine: APGD (Croce & Hein 2020) on margin / CE / targeted DLR losses --------------------

def margin(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """z_target - z_label: >= 0 exactly when the target class scores at least as high as the label."""
    return logits.gather(1, target[:, None])[:, 0] - logits.gather(1, label[:, None])[:, 0]


def dlr_targeted(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The targeted DLR loss of AutoAttack: the margin z_target - z_label over the spread of the logits
    (z_pi1 - (z_pi3 + z_pi4) / 2 with pi the classes by decreasing logit; z_pi1 - z_pi3 for 3 classes), so
    that the step-size schedule does not depend on the scale of the logits. Needs >= 3 classes."""
    z = logits.sort(dim=1, descending=True).values
    low = z[:, 2] if z.shape[1] == 3 else (z[:, 2] + z[:, 3]) / 2
    return margin(logits, label, target) / (z[:, 0] - low + 1e-12)


def _cross_entropy(logits: torch.Tensor, label: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, label, reduction="none")  # untargeted: the target is ignored


def _fooled(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Some other class scores at least as high as the label (a tie counts as a change: the verifier's rule)."""
    other = logits.masked_fill(F.one_hot(label, logits.shape[1]).bool(), -math.inf).amax(1)
    return other >= logits.gather(1, label[:, None])[:, 0]


def misclassified(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The arg max is not the label: the rule of the accuracy (and of the adversarial check)."""
    return logits.argmax(dim=1) != label


def apgd_runs(n_classes: int, targets: int = 3) -> list[tuple[str, int | None]]:
    """(loss, runner-up rank) of one APGD restart. 2 classes: the margin to the other class only (cross-
    entropy = softplus(-margin) is a monotone function of it, so both give the same sign steps and the same
    schedule, but the cross-entropy's gradient underflows on confident items; DLR needs a third logit).
    >= 3 classes: cross-entropy untargeted, then targeted DLR at each of the `targets` runner-up classes."""
    if n_classes == 2:
        return [("margin", 0)]
    return [("ce", None)] + [("dlr", t) for t in range(max(1, min(targets, n_classes - 1)))]


LOSSES = {"margin": margin, "dlr": dlr_targeted, "ce": _cross_entropy}


def apgd(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
         budget: Budget | None = None, targets: int = 3, seeds: np.ndarray | None = None,
         eps: torch.Tensor | None = None, norm: Norm = "linf", hit: Hit | None = None,
         loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD (Croce & Hein 2020, Algorithm 1), `budget.apgd_steps` per run, with the losses of `apgd_runs` (or
    the caller's `loss` alone), from x then `budget.restarts - 1` seeded random starts; each item leaves as
    soon as one run fools it.

    The search stays in the box [lo, hi] (per element: the L-inf ball intersected with the value range, or
    any input region), and for norm "l2" also in the L2 ball of radius eps[i] around x. `hit(logits, label)`
    says when an item is fooled (default `misclassified`). Returns (x_adv, fooled): x_adv[i] is the first
    point found that fools item i, by the forward pass that found it, else the clean input.
    """
    b = budget or Budget()
    hit = hit or misclassified
    seeds = _seeds(x, seeds, "apgd")
    with torch.no_grad():
        clean = forward(x)
    order = clean.masked_fill(F.one_hot(label, clean.shape[1]).bool(), -math.inf).argsort(1, descending=True) \
        if loss is None else None
    runs = [("custom", None)] if loss is not None else apgd_runs(clean.shape[1], targets)
    adv, fooled = x.clone(), torch.zeros(len(x), dtype=torch.bool)
    shape = (1,) * (x.ndim - 1)
    for r in range(b.restarts):
        for t, (name, rank) in enumerate(runs):
            idx = torch.nonzero(~fooled).flatten()
            if not len(idx) or clock.now() > b.deadline:
                return adv, fooled
            xi, li, hi_i = x[idx], lo[idx], hi[idx]
            ei = None if eps is None else eps[idx].view(-1, *shape)
            start = xi.clone() if r == 0 else random_point(xi, li, hi_i, ei, norm, seeds[idx.numpy()], r, t)
            if loss is None:
                target, loss_fn = order[idx, 0 if rank is None else rank], LOSSES[name]
            else:
                target, loss_fn = label[idx], (lambda out, lab, _t: loss(out, lab))
            found, ok = _apgd_run(forward, xi, start, label[idx], target, li, hi_i, b.apgd_steps, ei, norm, loss_fn,
                                  hit, b.deadline)
            adv[idx[ok]] = found[ok]
            fooled[idx[ok]] = True
    return adv, fooled


def random_point(x, lo, hi, eps, norm, seeds, restart, run=0) -> torch.Tensor:
    """The random start of PGD and APGD, seeded per item: uniform in the box (L-inf), AutoAttack's point on the
    sphere of radius eps (L2); one generator per (item seed, restart, run)."""
    d = int(np.prod(x.shape[1:]))
    gens = [np.random.default_rng([int(s), restart, run]) for s in seeds]
    if norm == "linf" or eps is None:
        u = torch.from_numpy(np.stack([g.random(d) for g in gens])).to(x.dtype).view(x.shape)
        return lo + (hi - lo) * u
    v = torch.from_numpy(np.stack([g.standard_normal(d) for g in gens])).to(x.dtype).view(x.shape)
    return x + eps * v / v.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints w_j = ceil(p_j N): p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    out, p, q = [0], 0.0, 0.22
    while q < 1:
        out.append(math.ceil(round(q * steps, 6)))  # round first: 0.41 * 100 is 41.000000000000004 in floats
        p, q = q, q + max(q - p - 0.03, 0.06)
    return sorted(set(out))


def _apgd_run(forward, x0, start, label, target, lo, hi, steps, eps, norm, loss_fn, hit, deadline=math.inf,
              rho: float = 0.75):
    """One APGD run, item by item in a batch: step eta = 2 eps (the box's width for L-inf), momentum 0.75;
    at each checkpoint w_j an item's step is halved and it restarts from its best point when the loss grew
    on fewer than rho of the steps since w_{j-1} (condition 1), or when its step was not halved at w_{j-1}
    and its best loss did not grow since (condition 2). A fooled item leaves the batch with its witness."""
    view = (-1,) + (1,) * (x0.ndim - 1)
    found, ok = start.clone(), torch.zeros(len(x0), dtype=torch.bool)
    eta = (hi - lo).clamp_min(0) if norm == "linf" or eps is None else 2 * eps.expand_as(x0).clone()

    def loss_grad(z, live):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            out = forward(z)
            f = loss_fn(out, label[live], target[live])
            (g,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), g, out.detach()

    live = torch.arange(len(x0))
    x = project(x0, start, lo, hi, eps, norm)
    f, g, out = loss_grad(x, live)
    s = {"x": x, "prev": x.clone(), "f": f, "g": g, "best_x": x.clone(), "best": f.clone(), "best_g": g.clone(),
         "eta": eta, "x0": x0, "lo": lo, "hi": hi, "gains": torch.zeros(len(x0)), "last_best": f.clone(),
         "cut": torch.zeros(len(x0), dtype=torch.bool)}
    if eps is not None:
        s["eps"] = eps
    marks = checkpoints(steps)
    for step in range(steps + 1):
        h = hit(out, label[live])
        if h.any():  # keep the witness, drop the item
            found[live[h]], ok[live[h]] = s["x"][h], True
            live, s = live[~h], {k: v[~h] for k, v in s.items()}
        if not len(live) or step == steps or clock.now() > deadline:
            break
        e = s.get("eps")
        direction = s["g"].sign() if norm == "linf" else s["g"] / s["g"].flatten(1).norm(dim=1).clamp_min(
            1e-12).view(view)
        z = project(s["x0"], s["x"] + s["eta"] * direction, s["lo"], s["hi"], e, norm)
        a = 0.75 if step > 0 else 1.0
        new = project(s["x0"], s["x"] + a * (z - s["x"]) + (1 - a) * (s["x"] - s["prev"]), s["lo"], s["hi"],
                            e, norm)
        f, g, out = loss_grad(new, live)
        s["gains"] += (f > s["f"]).float()
        s["prev"], s["x"], s["f"], s["g"] = s["x"], new, f, g
        better = f > s["best"]
        s["best_x"][better], s["best"][better], s["best_g"][better] = new[better], f[better], g[better]
        if step + 1 in marks[1:]:
            since = marks[marks.index(step + 1) - 1]
            halve = (s["gains"] < rho * (step + 1 - since)) | (~s["cut"] & (s["best"] <= s["last_best"]))
            s["eta"][halve] /= 2
            # restart from the best point with the smaller step (no momentum across the jump)
            for k, src in (("x", "best_x"), ("prev", "best_x"), ("g", "best_g"), ("f", "best")):
                s[k][halve] = s[src][halve]
            s["gains"].zero_()
            s["last_best"], s["cut"] = s["best"].clone(), halve
    return found, ok


def square(forward, x: torch.Tensor, label: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
           budget: Budget | None = None, seeds: np.ndarray | None = None, p_init: float = 0.1,
           hit: Hit | None = None, loss: Loss | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Square attack (Andriushchenko et al. 2020), L-inf, black box: forward passes only, no gradient.

    Starts from vertical stripes at the box's faces, then changes one random square window per query
    (`budget.queries` per item) to a random face of the box per channel, kept when the loss (default: the
    margin, best other class minus the label) grows; the window shrinks on APGD-like checkpoints. Images
    (B, H, W, C) or (B, C, H, W) with H, W the two largest axes after the batch; returns (x_adv, fooled) as
    `apgd`.
    """
    b = budget or Budget()
    queries = b.queries
    hit = hit or misclassified
    seeds = _seeds(x, seeds, "square")
    gens = [np.random.default_rng([int(s), 7]) for s in seeds]
    dims = sorted(range(1, x.ndim), key=lambda d: x.shape[d])[-2:]  # the two spatial axes
    h, w = x.shape[dims[0]], x.shape[dims[1]]

    def score(z, lab):
        with torch.no_grad():
            out = forward(z)
        if loss is not None:
            return loss(out, lab), hit(out, lab)
        other = out.masked_fill(F.one_hot(lab, out.shape[1]).bool(), -math.inf).amax(1)
        return other - out.gather(1, lab[:, None])[:, 0], hit(out, lab)

    stripes = torch.stack([torch.from_numpy(g.choice([0.0, 1.0], size=w)).float() for g in gens])
    shape = [len(x)] + [1] * (x.ndim - 1)
    shape[dims[1]] = w
    best_x = lo + (hi - lo) * stripes.view(shape) if x.ndim > 2 else x.clone()
    best, done = score(best_x, label)
    for q in range(queries):
        live = torch.nonzero(~done).flatten()
        if not len(live) or clock.now() > b.deadline:
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
        new, won = score(cand, label[live])
        better = (new > best[live]) | won
        best_x[live[better]], best[live[better]] = cand[better], new[better]
        done[live[won]] = True
    return torch.where(done.view(-1, *[1] * (x.ndim - 1)), best_x, x), done
