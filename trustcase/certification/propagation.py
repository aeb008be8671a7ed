"""Sound bounds of a layer graph (`graph.Graph`) over input boxes: IBP, CROWN and alpha-CROWN, batched.

All three give, for a batch of N boxes [lo, hi] and specification rows C (N, m, outputs), a lower bound of
C y over each box (an upper bound is the lower bound of -C):

- IBP (interval bound propagation): intervals node by node; cheap, loose.
- CROWN (Zhang et al. 2018): linear bounds propagated backward from the specification to the input
  through the transposes of the affine maps (transposed convolutions, no dense matrix of an image layer)
  and a linear relaxation of each unstable ReLU: upper line through (l, 0) and (u, u), lower line
  alpha z with alpha in [0, 1]. The pre-activation bounds of each ReLU come from IBP, refined by CROWN
  for the neurons IBP leaves unstable (the first layer is exact by IBP).
- alpha-CROWN (Xu et al. 2021): any alpha in [0, 1] is sound, so alpha is optimised by projected gradient
  ascent of the bound and the best bound seen for each row is kept; it can only tighten CROWN.

Branch and bound carries ReLU split decisions as `splits`: {node: (N, *shape) tensor in {-1, 0, 1}}, a
pre-activation known to be <= 0 (-1) or >= 0 (+1) in that sub-problem, and `known` bounds of a parent
problem (valid on every child) are intersected with the recomputed ones.

Everything is float64; rounding is not accounted for formally, so a bound is trusted only with a margin.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from trustcase.certification.graph import Graph, affine

METHODS = ("ibp", "crown", "alpha-crown")
ELEMENTS = 1 << 22  # largest backward tensor (elements) of one chunk of intermediate bounds


@dataclass
class Result:
    lower: torch.Tensor  # (N, m) lower bounds of C y
    lam: torch.Tensor | None  # (N, m, *input shape): the linear function of the input behind it (CROWN)
    bounds: list  # per node (lo, hi) (N, *shape): intermediate bounds, reusable by children of a split


def relax(lo: torch.Tensor, hi: torch.Tensor, alpha: torch.Tensor | None = None):
    """Lower slope, upper slope and upper intercept of the ReLU relaxation on [lo, hi] (elementwise)."""
    active, dead = lo >= 0, hi <= 0
    unstable = ~active & ~dead
    denom = (hi - lo).clamp_min(1e-30)
    up = torch.where(active, 1.0, torch.where(unstable, hi / denom, 0.0))
    icpt = torch.where(unstable, -lo * hi / denom, 0.0)
    default = (hi > -lo).double()  # CROWN's choice: the lower line of the smaller area
    low = torch.where(active, 1.0, torch.where(unstable, default if alpha is None else alpha, 0.0))
    return low, up, icpt


def _dot(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over the node's shape of lam (N, m, *s) * x (N, *s) -> (N, m)."""
    return (lam * x.unsqueeze(1)).flatten(2).sum(-1)


def backward(g: Graph, start: int, C: torch.Tensor, bounds: list, alphas: dict | None = None):
    """Lower bound of C z_start (C (N, m, *shape of node start)) over the input box bounds[0].

    Returns (bound (N, m), Lambda (N, m, *input shape)).
    """
    n, m = C.shape[:2]
    lams: dict[int, torch.Tensor] = {start: C}
    const = torch.zeros(n, m, dtype=torch.float64)
    for k in range(start, -1, -1):
        lam = lams.pop(k, None)
        if lam is None:
            continue
        node = g.nodes[k]
        if node.kind == "input":
            lo, hi = bounds[0]
            bound = const + _dot(lam, (lo + hi) / 2) - _dot(lam.abs(), (hi - lo) / 2)
            return bound, lam
        if node.kind == "relu":
            j = node.inputs[0]
            low, up, icpt = relax(*bounds[j], None if alphas is None else alphas.get(k))
            pos, neg = lam.clamp_min(0), lam.clamp_max(0)
            const = const + _dot(neg, icpt)  # relu(z) <= up z + icpt where the coefficient is negative
            new = pos * low.unsqueeze(1) + neg * up.unsqueeze(1)
        else:
            if node.bias is not None:
                const = const + (lam * node.bias).flatten(2).sum(-1)
            flat = lam.reshape(n * m, *node.shape)
            for j, mp in zip(node.inputs, node.maps, strict=True):
                back = mp.backward(flat).reshape(n, m, *g.nodes[j].shape)
                lams[j] = lams[j] + back if j in lams else back
            continue
        lams[j] = lams[j] + new if j in lams else new
    raise AssertionError("the graph does not reach its input")


def _ibp(g: Graph, k: int, bounds: list):
    node = g.nodes[k]
    if node.kind == "relu":
        lo, hi = bounds[node.inputs[0]]
        return lo.clamp_min(0), hi.clamp_min(0)
    mid = affine(node, [(bounds[i][0] + bounds[i][1]) / 2 for i in node.inputs])
    rad = sum(mp.abs((bounds[i][1] - bounds[i][0]) / 2) for i, mp in zip(node.inputs, node.maps, strict=True))
    return mid - rad, mid + rad


def _refine(g: Graph, k: int, bounds: list, limit: int | None = None,
            deadline: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN bounds of the neurons of node k that are unstable in some box (chunked to bound memory).

    At most `limit` neurons, those whose ReLU relaxation is loosest (largest -l u / (u - l)), and none after
    `deadline`: the others keep their interval bounds, which are sound too.
    """
    lo, hi = bounds[k]
    n, shape = len(lo), g.nodes[k].shape
    lo, hi = lo.flatten(1).clone(), hi.flatten(1).clone()
    idx = torch.nonzero(((lo < 0) & (hi > 0)).any(0)).flatten()
    if limit is not None and len(idx) > limit:
        lb, ub = lo[:, idx], hi[:, idx]
        area = (-lb.clamp_max(0) * ub.clamp_min(0) / (ub - lb).clamp_min(1e-30)).amax(0)
        idx = idx[area.argsort(descending=True)[:limit]]
    widest = max(int(torch.tensor(nd.shape).prod()) for nd in g.nodes[:k + 1])
    rows = max(1, ELEMENTS // (2 * n * widest))
    for chunk in idx.split(rows):
        if deadline is not None and time.perf_counter() > deadline:
            break
        c = len(chunk)
        C = torch.zeros(n, 2 * c, lo.shape[1], dtype=torch.float64)
        r = torch.arange(c)
        C[:, r, chunk] = 1.0
        C[:, c + r, chunk] = -1.0
        b, _ = backward(g, k, C.view(n, 2 * c, *shape), bounds)
        lo[:, chunk] = torch.maximum(lo[:, chunk], b[:, :c])
        hi[:, chunk] = torch.minimum(hi[:, chunk], -b[:, c:])
    return lo.view(n, *shape), hi.view(n, *shape)


def intermediate(g: Graph, lo: torch.Tensor, hi: torch.Tensor, method: str = "crown", known: list | None = None,
                 splits: dict | None = None, limit: int | None = None, deadline: float | None = None) -> list:
    """(lo, hi) of every node over each box, IBP refined by CROWN at the inputs of unstable ReLUs (at most
    `limit` neurons per node, until `deadline`)."""
    pre = {g.nodes[r].inputs[0] for r in g.relus}
    bounds: list = [(lo.double(), hi.double())]
    for k in range(1, len(g.nodes)):
        lb, ub = _ibp(g, k, bounds)
        if known is not None and known[k] is not None:
            lb, ub = torch.maximum(lb, known[k][0]), torch.minimum(ub, known[k][1])
        if splits and k in splits:
            s = splits[k]
            lb, ub = torch.where(s > 0, lb.clamp_min(0), lb), torch.where(s < 0, ub.clamp_max(0), ub)
        bounds.append((lb, ub))
        exact = g.nodes[k].kind == "affine" and g.nodes[k].inputs == [0]  # an affine map of a box
        if method != "ibp" and k in pre and not exact:
            bounds[k] = _refine(g, k, bounds, limit, deadline)
            if splits and k in splits:  # the split still holds after refinement
                lb, ub = bounds[k]
                s = splits[k]
                bounds[k] = (torch.where(s > 0, lb.clamp_min(0), lb), torch.where(s < 0, ub.clamp_max(0), ub))
    return bounds


def lower_bound(g: Graph, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor, method: str = "crown",
                known: list | None = None, splits: dict | None = None, iterations: int = 20, lr: float = 0.2,
                bounds: list | None = None, target: float = 0.0, limit: int | None = None,
                deadline: float | None = None) -> Result:
    """Lower bounds of C y (C (m, out) or (N, m, out)) over the boxes [lo, hi] (N, *input shape).

    alpha-CROWN stops early once every row's bound exceeds `target` (nothing left to prove).
    """
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r} (one of {', '.join(METHODS)})")
    n = len(lo)
    C = C.double()
    C = C.expand(n, *C.shape[-2:]) if C.ndim == 2 else C
    if bounds is None:
        bounds = intermediate(g, lo, hi, "ibp" if method == "ibp" else "crown", known, splits, limit, deadline)
    out = len(g.nodes) - 1
    if method == "ibp":
        lb, ub = bounds[out]
        low = (C.clamp_min(0) * lb.unsqueeze(1) + C.clamp_max(0) * ub.unsqueeze(1)).sum(-1)
        return Result(low, None, bounds)
    best, lam = backward(g, out, C, bounds)
    if method == "crown" or (best > target).all():
        return Result(best, lam, bounds)
    alphas = {}
    for r in g.relus:
        lb, ub = bounds[g.nodes[r].inputs[0]]
        if ((lb < 0) & (ub > 0)).any():
            alphas[r] = (ub > -lb).double().requires_grad_(True)
    if not alphas:
        return Result(best, lam, bounds)
    opt = torch.optim.Adam(list(alphas.values()), lr=lr)
    for _ in range(iterations):
        if deadline is not None and time.perf_counter() > deadline:
            break
        with torch.enable_grad():
            b, lam_b = backward(g, out, C, bounds, alphas)
            better = b.detach() > best
            best = torch.where(better, b.detach(), best)
            lam = torch.where(better.view(*better.shape, *[1] * (lam.ndim - 2)), lam_b.detach(), lam)
            if (best > target).all():
                break
            opt.zero_grad()
            (-b.clamp_max(target + 1.0).sum()).backward()  # rows already proved with room to spare stop pulling
        opt.step()
        with torch.no_grad():
            for a in alphas.values():
                a.clamp_(0.0, 1.0)
    return Result(best, lam, bounds)
