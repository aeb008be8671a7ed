"""Sound output bounds of ReLU networks over input boxes: interval arithmetic and linear relaxation
(CROWN: backward propagation of linear bounds with the triangle relaxation of each unstable ReLU),
with input splitting (branch and bound on the box) to prove more within a time budget.

The network is first reduced to an alternation of affine maps and ReLUs (`linearise`); everything is
computed in float64 on a batch of boxes at once. Rounding errors of float64 are not accounted for
formally: a property is proved only with a margin of `TOLERANCE`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from trustcase.errors import UserError

TOLERANCE = 1e-7


class BoundsError(UserError, ValueError):
    """The network cannot be bounded (a layer other than Linear/ReLU/Flatten/shift)."""


@dataclass
class Affine:
    W: torch.Tensor  # (out, in), float64
    b: torch.Tensor  # (out,)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    children = list(module.named_children())
    if not children:
        return [(prefix or type(module).__name__, module)]
    if isinstance(module, torch.jit.ScriptModule):
        from trustcase.models.anatomy import script_chain  # a traced Sequential: its chain of layers

        return script_chain(module, prefix)
    if not isinstance(module, nn.Sequential):
        raise BoundsError(f"module {prefix or type(module).__name__} ({type(module).__name__}) is not a Sequential "
                          "of Linear/ReLU layers")
    out = []
    for n, c in children:
        out += _leaves(c, f"{prefix}.{n}" if prefix else n)
    return out


def linearise(module: nn.Module) -> list[Affine]:
    """Affine maps A_1..A_L such that f = A_L o relu o ... o relu o A_1 (consecutive affine layers merged)."""
    layers: list[Affine] = []
    pending: Affine | None = None

    def compose(a: Affine) -> None:
        nonlocal pending
        pending = a if pending is None else Affine(a.W @ pending.W, a.W @ pending.b + a.b)

    for name, m in _leaves(module):
        kind = m.original_name if isinstance(m, torch.jit.ScriptModule) else type(m).__name__
        if kind == "Linear":
            W = m.weight.detach().double()
            b = m.bias.detach().double() if getattr(m, "bias", None) is not None else torch.zeros(W.shape[0],
                                                                                              dtype=torch.float64)
            compose(Affine(W, b))
        elif kind == "_Shift":
            c = m.c.detach().double()
            n = len(c) if pending is None else pending.W.shape[0]
            compose(Affine(torch.eye(n, dtype=torch.float64), c.expand(n).clone()))
        elif kind == "ReLU":
            if pending is None:
                raise BoundsError(f"layer {name}: a ReLU must follow an affine layer")
            layers.append(pending)
            pending = None
        elif kind in ("Flatten", "Identity", "Dropout"):
            continue
        else:
            raise BoundsError(f"layer {name} ({kind}) is not supported by bound propagation (Linear, ReLU only)")
    if pending is None:
        raise BoundsError("the network must end with an affine layer")
    layers.append(pending)
    return layers


def interval(layers: list[Affine], lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pre-activation bounds of every affine layer by interval arithmetic; lo/hi (N, d)."""
    out = []
    for i, a in enumerate(layers):
        if i:
            lo, hi = lo.clamp_min(0), hi.clamp_min(0)
        c, r = (lo + hi) / 2, (hi - lo) / 2
        mid, rad = c @ a.W.T + a.b, r @ a.W.abs().T
        lo, hi = mid - rad, mid + rad
        out.append((lo, hi))
    return out


def _relu_relax(lo: torch.Tensor, hi: torch.Tensor):
    """Per neuron: lower slope (0 or 1, CROWN's choice), upper slope and intercept of the triangle relaxation."""
    active, dead = lo >= 0, hi <= 0
    unstable = ~active & ~dead
    denom = (hi - lo).clamp_min(1e-30)
    up_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable, hi / denom, torch.zeros_like(lo)))
    up_icpt = torch.where(unstable, -lo * hi / denom, torch.zeros_like(lo))
    low_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable & (hi > -lo), torch.ones_like(lo),
                                                                      torch.zeros_like(lo)))
    return low_slope, up_slope, up_icpt


def backward_lower(layers: list[Affine], k: int, C: torch.Tensor, pre: list, lo: torch.Tensor, hi: torch.Tensor,
                   relax: list | None = None, rows: torch.Tensor | None = None, signs: torch.Tensor | None = None,
                   alpha: list | None = None):
    """Lower bound of C z_k (z_k the output of affine layer k) over the boxes; C (N, m, d_k), or, with `rows`
    and `signs` (N, m) instead, of signs * z_k[rows] (C the matching signed one-hot rows, never built).
    `relax`: the ReLU relaxations of `pre` when already computed; `alpha`: per layer (N, m, d_j), the lower
    slopes of the unstable neurons (any value in [0, 1] is sound), instead of CROWN's 0 or 1.

    Returns (bound (N, m), Lambda (N, m, d_in)): the linear function of the input that bounds C z_k from below.
    """
    if rows is None:
        lam = C @ layers[k].W  # (N, m, d_{k-1})
        const = C @ layers[k].b
    else:
        lam = layers[k].W[rows] * signs[:, :, None]
        const = layers[k].b[rows] * signs
    n, m = lam.shape[:2]
    for j in range(k - 1, -1, -1):
        low_s, up_s, up_c = relax[j] if relax is not None else _relu_relax(*pre[j])  # (N, d_j)
        neg = lam.clamp_max(0)
        # relu(z) >= low_s z for positive coefficients, <= up_s z + up_c for negative ones
        const = const + torch.bmm(neg, up_c[:, :, None]).squeeze(-1)
        low = low_s[:, None, :]
        if alpha is not None:
            low = torch.where(((up_s > 0) & (up_s < 1))[:, None, :], alpha[j], low)
        lam = torch.addcmul(neg * up_s[:, None, :], lam - neg, low)
        w = layers[j].W
        const = const + lam @ layers[j].b
        lam = (lam.reshape(n * m, -1) @ w).view(n, m, w.shape[1])
    centre, radius = (lo + hi) / 2, (hi - lo) / 2
    bound = const + (lam @ centre[:, :, None]).squeeze(-1) - (lam.abs() @ radius[:, :, None]).squeeze(-1)
    return bound, lam


def crown(layers: list[Affine], lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor, known: list | None = None,
          alpha_steps: int = 0):
    """Lower bounds of C y (C (m, out) or (N, m, out)) over each box, with CROWN intermediate bounds.

    Each hidden layer's pre-activation bounds: interval arithmetic from the previous layer's bounds,
    intersected with `known` (bounds valid on a larger box, e.g. the parent of a split) and with CROWN's
    backward bounds of each box's neurons that can be positive (a dead neuron's bounds matter nowhere).
    Stable neurons are refined too: the next layer's interval bounds start from theirs, and that
    intersection is often tighter than CROWN alone on the next layer (a few times fewer boxes on ACAS Xu).
    Returns (bound (N, m), Lambda (N, m, d_in), intermediate bounds).
    """
    n = len(lo)
    pre: list[tuple[torch.Tensor, torch.Tensor]] = []
    relax: list = []
    for k in range(len(layers) - 1):
        a = layers[k]
        x_lo, x_hi = (lo, hi) if k == 0 else (pre[-1][0].clamp_min(0), pre[-1][1].clamp_min(0))
        mid, rad = (x_lo + x_hi) / 2 @ a.W.T + a.b, (x_hi - x_lo) / 2 @ a.W.abs().T
        z_lo, z_hi = mid - rad, mid + rad  # exact for k = 0 (an affine map of a box)
        if known is not None:
            z_lo, z_hi = torch.maximum(z_lo, known[k][0]), torch.minimum(z_hi, known[k][1])
        alive = z_hi > 0
        m = int(alive.sum(1).max()) if k > 0 else 0
        if m:  # each box's live neurons, padded to the largest count with others (any CROWN bound is valid)
            idx = alive.double().topk(m, dim=1).indices  # (N, m)
            signs = torch.ones(n, 2 * m, dtype=torch.float64)
            signs[:, m:] = -1
            b, _ = backward_lower(layers, k, None, pre, lo, hi, relax, torch.cat([idx, idx], 1), signs)
            z_lo = z_lo.scatter(1, idx, torch.maximum(z_lo.gather(1, idx), b[:, :m]))
            z_hi = z_hi.scatter(1, idx, torch.minimum(z_hi.gather(1, idx), -b[:, m:]))
        pre.append((z_lo, z_hi))
        relax.append(_relu_relax(z_lo, z_hi))
    C = C.expand(n, *C.shape[-2:]) if C.ndim == 2 else C
    bound, lam = backward_lower(layers, len(layers) - 1, C, pre, lo, hi, relax)
    if alpha_steps and any(bool(((r[1] > 0) & (r[1] < 1)).any()) for r in relax):  # some ReLU unstable
        bound, lam = _alpha(layers, C, pre, lo, hi, relax, bound, lam, alpha_steps)
    return bound, lam, pre


def _alpha(layers, C, pre, lo, hi, relax, bound, lam, steps: int):
    """alpha-CROWN on the output rows only (the intermediate bounds stay): the lower slopes of the unstable
    ReLUs, per box and row, optimised by projected Adam from CROWN's choice; every iterate is a valid bound,
    the best one per row is kept. Lambda stays CROWN's: the split rules read it."""
    m = C.shape[1]
    alpha = [r[0][:, None, :].expand(-1, m, -1).clone().requires_grad_(True) for r in relax]
    opt = torch.optim.Adam(alpha, lr=0.2)
    with torch.enable_grad():
        for _ in range(steps):
            b, _ = backward_lower(layers, len(layers) - 1, C, pre, lo, hi, relax, alpha=alpha)
            bound = torch.maximum(bound, b.detach())
            opt.zero_grad()
            (-b.sum()).backward()
            opt.step()
            with torch.no_grad():
                for a in alpha:
                    a.clamp_(0, 1)
    return bound, lam


@dataclass
class Outcome:
    verdict: str  # "holds", "violated", "unknown"
    counterexample: np.ndarray | None = None
    boxes: int = 0  # boxes bounded
    reason: str = ""


def _split_dims(lam: torch.Tensor, live: torch.Tensor, width: torch.Tensor, rule: str) -> torch.Tensor:
    """The input dimension(s) to try halving in each box, (N, k). lam (N, rows, d); live (N, rows): rows of
    conjunctions not refuted yet. "influence": the input of largest |Lambda| x width summed over the live
    rows (how far the linear bound moves across the box along it); "widest": the widest side (it shrinks
    the relaxation of every neuron); "try": every input, each halving bounded and the best one kept."""
    if rule == "try":
        return torch.arange(width.shape[1]).expand(len(width), -1)
    widest = width.argmax(dim=1, keepdim=True)
    if rule == "widest":
        return widest
    influence = ((lam.abs() * width[:, None, :]) * live[:, :, None]).sum(1).argmax(dim=1, keepdim=True)
    if rule == "influence":
        return influence
    if rule == "pair":
        return torch.cat([influence, widest], 1)
    raise ValueError(f"unknown split rule {rule!r}")


def mixed(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a conjunction A y <= b plus the means of every pair of them and of all: if a mean
    sum_k w_k (A_k y - b_k) is positive over a box, some row is positive at each point, so the box
    is refuted, even where no single row is positive everywhere (near a switch between the rows that
    refute, e.g. property 2 of ACAS Xu: "some other advisory scores higher than COC"). CROWN bounds the
    mean as one function, tighter than the mean of the rows' bounds."""
    m = len(A)
    if m < 2:
        return A, b
    weights = [np.eye(m)]
    if m <= 6:  # pairs: at most 15 more rows
        weights += [np.array([[0.5 * (k in (i, j)) for k in range(m)]]) for i in range(m) for j in range(i + 1, m)]
    if m > 2:
        weights.append(np.full((1, m), 1.0 / m))
    w = np.concatenate(weights)
    return w @ A, w @ b


class _Boxes:
    """Boxes with their bounds: corners, intermediate bounds (inherited by their children), Lambda, margins."""

    def __init__(self, lo, hi, pre, lam, margin, refuted):
        self.lo, self.hi, self.pre, self.lam, self.margin, self.refuted = lo, hi, pre, lam, margin, refuted

    def __len__(self):
        return len(self.lo)

    def take(self, sel) -> _Boxes:
        return _Boxes(self.lo[sel], self.hi[sel], [(a[sel], b[sel]) for a, b in self.pre], self.lam[sel],
                      self.margin[sel], self.refuted[sel])

    @staticmethod
    def cat(parts: list[_Boxes]) -> _Boxes:
        parts = [p for p in parts if p is not None and len(p)]
        return _Boxes(torch.cat([p.lo for p in parts]), torch.cat([p.hi for p in parts]),
                      [(torch.cat([p.pre[k][0] for p in parts]), torch.cat([p.pre[k][1] for p in parts]))
                       for k in range(len(parts[0].pre))],
                      torch.cat([p.lam for p in parts]), torch.cat([p.margin for p in parts]),
                      torch.cat([p.refuted for p in parts]))


def prove(layers: list[Affine], lower: np.ndarray, upper: np.ndarray, conjunctions, deadline: float,
          candidate=None, search=None, batch: int = 128, max_boxes: int = 50_000_000, split: str = "pair",
          alpha_steps: int = 10) -> Outcome:
    """Prove that no x in [lower, upper] has A_c f(x) <= b_c for any conjunction c (a list of (A, b)).

    A box is refuted when, for every conjunction, some row has a lower bound of A_k y above b_k. An open
    box is halved along one of the inputs `split` proposes (`_split_dims`): both halves of every proposed
    input are bounded in one batch (alpha-beta-CROWN's brute-force input split, on a shortlist) and the
    input whose halves come nearest to refutation is kept, its halves already bounded. On ACAS Xu no single
    rule fits every property: "influence" leaves N_1,4 property 1 open after 7,000 boxes where "widest"
    proves it in 99, and "widest" leaves N_1,1 property 5 open where "influence" proves it; the default
    "pair" tries both (twice the bounds per split, robust); "try" (every input) costs d and gains little.
    Each conjunction is also refuted by the means of its rows (`mixed`). The output rows' bounds are
    tightened by `alpha_steps` of alpha-CROWN (`_alpha`): N_1,1 property 5 in 1,600 boxes instead of
    14,000, N_3,3 and N_4,2 property 2 decided at all.
    Children inherit the parent's intermediate bounds. Open boxes are taken `batch` at a time from the
    front of the queue and their open children put back in front (depth first: the queue stays small).
    Falsification during the search: `candidate(x)` is called on the minimising corners and the centres of
    the open boxes, `search(lo, hi)` now and then on the open boxes; each returns a verified counterexample
    or None.
    """
    conjunctions = [mixed(np.asarray(a, np.float64), np.asarray(b_, np.float64)) for a, b_ in conjunctions]
    A = torch.from_numpy(np.concatenate([c[0] for c in conjunctions])).double()
    b = torch.from_numpy(np.concatenate([c[1] for c in conjunctions])).double()
    owner = torch.from_numpy(np.concatenate([[i] * len(c[0]) for i, c in enumerate(conjunctions)]))
    of = torch.nn.functional.one_hot(owner, len(conjunctions)).bool()  # (rows, conjunctions)
    done, next_search = 0, time.perf_counter()

    def bound(lo, hi, known) -> tuple[_Boxes, torch.Tensor]:
        """Bound boxes; returns them and their closeness to refutation (> TOLERANCE: refuted)."""
        nonlocal done
        bnd, lam, pre = crown(layers, lo, hi, A, known, alpha_steps)
        done += len(lo)
        margin = bnd - b  # > 0: this row cannot be met anywhere in the box
        # per conjunction its best row; the box is as close to refutation as its worst conjunction
        best = margin[:, :, None].expand(-1, -1, len(conjunctions)).masked_fill(~of, -torch.inf).amax(dim=1)
        return _Boxes(lo, hi, pre, lam, margin, best > TOLERANCE), best.amin(dim=1)

    def check_corners(bx: _Boxes):
        if candidate is None or not len(bx):
            return None
        live = ~(bx.refuted.float() @ of.T.float()).bool()  # rows of conjunctions still open
        row = bx.margin.masked_fill(~live, torch.inf).argmin(dim=1)
        g = bx.lam[torch.arange(len(bx)), row]
        # the corner minimising the bound of the most violated row: the likeliest counterexample
        corner = torch.where(g > 0, bx.lo, bx.hi)
        return candidate(np.concatenate([corner.numpy(), ((bx.lo + bx.hi) / 2).numpy()]))

    root, q = bound(torch.from_numpy(np.asarray(lower, np.float64))[None],
                    torch.from_numpy(np.asarray(upper, np.float64))[None], None)
    queue = root.take(q <= TOLERANCE)
    found = check_corners(queue)
    if found is not None:
        return Outcome("violated", counterexample=found, boxes=done)
    while len(queue):
        if time.perf_counter() > deadline:
            return Outcome("unknown", boxes=done, reason=f"budget exhausted with {len(queue)} boxes open")
        if done > max_boxes:
            return Outcome("unknown", boxes=done, reason=f"more than {max_boxes} boxes")
        open_, queue = queue.take(slice(0, batch)), queue.take(slice(batch, None))
        n = len(open_)
        if search is not None and time.perf_counter() >= next_search:
            t = time.perf_counter()
            found = search(open_.lo.numpy(), open_.hi.numpy())
            if found is not None:
                return Outcome("violated", counterexample=found, boxes=done)
            next_search = time.perf_counter() + 4 * (time.perf_counter() - t)  # at most a fifth of the time
        live = ~(open_.refuted.float() @ of.T.float()).bool()
        dims = _split_dims(open_.lam, live, open_.hi - open_.lo, split)  # (n, k)
        k = dims.shape[1]
        at = torch.arange(n)[:, None].expand(-1, k)
        mid = (open_.lo[at, dims] + open_.hi[at, dims]) / 2  # (n, k)
        left_lo, left_hi = open_.lo[:, None].repeat(1, k, 1), open_.hi[:, None].repeat(1, k, 1)
        right_lo, right_hi = left_lo.clone(), left_hi.clone()
        left_hi.scatter_(2, dims[:, :, None], mid[:, :, None])
        right_lo.scatter_(2, dims[:, :, None], mid[:, :, None])
        d = open_.lo.shape[1]
        lo = torch.cat([left_lo, right_lo], 1).reshape(-1, d)  # (n * 2k, d): box, side, candidate
        hi = torch.cat([left_hi, right_hi], 1).reshape(-1, d)
        known = [(a.repeat_interleave(2 * k, 0), b_.repeat_interleave(2 * k, 0)) for a, b_ in open_.pre]
        children, q = bound(lo, hi, known)
        q = q.view(n, 2, k)
        pick = q.clamp_max(0).sum(dim=1).argmax(dim=1)  # the input whose halves come nearest to refutation
        rows = (torch.arange(n)[:, None] * 2 * k + torch.tensor([0, k])[None] + pick[:, None]).flatten()
        chosen = children.take(rows)
        chosen = chosen.take(q.flatten()[rows] <= TOLERANCE)
        found = check_corners(chosen)
        if found is not None:
            return Outcome("violated", counterexample=found, boxes=done)
        queue = _Boxes.cat([chosen, queue]) if len(chosen) else queue
    return Outcome("holds", boxes=done)
