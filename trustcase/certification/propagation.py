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

import math
from dataclasses import dataclass

import torch

from trustcase import clock
from trustcase.certification.graph import SMOOTH, Graph, affine

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
    default = (hi > -lo).to(lo.dtype)  # CROWN's choice: the lower line of the smaller area
    low = torch.where(active, 1.0, torch.where(unstable, default if alpha is None else alpha, 0.0))
    return low, up, icpt


def _slope(kind: str, z: torch.Tensor) -> torch.Tensor:
    f = SMOOTH[kind](z)
    return f * (1 - f) if kind == "sigmoid" else 1 - f * f


def _upper_slope(kind: str, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """A tight slope for an upper line of sigmoid / tanh on [lo, hi] (convex below 0, concave above): the tangent
    at the middle on the concave side, the chord on the convex side; across 0 the line through (lo, f(lo))
    tangent at some d in [0, hi] (found by bisection) if there is one, else the chord."""
    f = SMOOTH[kind]
    width = hi - lo
    chord = torch.where(width > 1e-12, (f(hi) - f(lo)) / width.clamp_min(1e-12), _slope(kind, (lo + hi) / 2))
    slope = torch.where(lo >= 0, _slope(kind, (lo + hi) / 2), chord)
    cross = (lo < 0) & (hi > 0)
    if cross.any():
        a0, u = lo[cross], hi[cross]

        def gap(d):  # the tangent at d, at a0, above f(a0)?  increasing in d >= 0
            return f(d) + _slope(kind, d) * (a0 - d) - f(a0)

        tangent = gap(u) >= 0
        a, b = torch.zeros_like(u), u.clone()
        for _ in range(40):
            mid = (a + b) / 2
            above = gap(mid) >= 0
            a, b = torch.where(above, a, mid), torch.where(above, mid, b)
        slope[cross] = torch.where(tangent, _slope(kind, b), chord[cross])
    return slope


def _stationary(kind: str, a: torch.Tensor) -> torch.Tensor:
    """z >= 0 with f'(z) = a (the two points are +-z); a outside (0, max f') has none, and any point then only
    adds a candidate inside [lo, hi], which cannot raise the max or lower the min. Safe to differentiate."""
    a = a.clamp(1e-12, _FMAX[kind] * (1 - 1e-12))
    if kind == "sigmoid":
        r = (1 - 4 * a).sqrt()
        return torch.log1p(r) - torch.log1p(-r)  # logit((1 + r) / 2)
    return torch.atanh((1 - a).sqrt())


_FMAX = {"sigmoid": 0.25, "tanh": 1.0}  # the largest slope of each S-shaped activation (at 0)


def _intercepts(kind: str, a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """(min, max) over [lo, hi] of f(z) - a z (broadcast), exactly: at an end or where f'(z) = a; widened for
    rounding by 1e-10 plus 8 units of roundoff of |f(z)| + |a z| at the candidates (f to a few ulps, the product
    and the difference to one each: a fixed margin alone is too small once |a z| is large, e.g. bounds of 1e8).
    Any slope a gives sound lines a z + min <= f(z) <= a z + max."""
    z = _stationary(kind, a)
    lo, hi = lo.expand_as(a), hi.expand_as(a)
    pts = torch.stack([lo, hi, torch.minimum(torch.maximum(z, lo), hi), torch.minimum(torch.maximum(-z, lo), hi)])
    fz, az = SMOOTH[kind](pts), a * pts
    v = fz - az
    margin = 1e-10 + 8 * torch.finfo(v.dtype).eps * (fz.abs() + az.abs()).max(0).values
    return v.min(0).values - margin, v.max(0).values + margin


def smooth_relax(kind: str, lo: torch.Tensor, hi: torch.Tensor):
    """Lines a_l z + b_l <= f(z) <= a_u z + b_u on [lo, hi] for f = sigmoid or tanh (elementwise); returns
    (a_l, b_l, a_u, b_u). The slopes are heuristics (`_upper_slope`, and by f(-z) = c - f(z) the lower slope is
    the upper slope on [-hi, -lo]); the intercepts are exact for them, whatever they are (`_intercepts`)."""
    a_u = _upper_slope(kind, lo, hi)
    a_l = _upper_slope(kind, -hi, -lo)
    return a_l, _intercepts(kind, a_l, lo, hi)[0], a_u, _intercepts(kind, a_u, lo, hi)[1]


def smooth_slopes(g: Graph, bounds: list, n: int, m: int, before: int) -> dict:
    """alpha-CROWN's parameters of the S-shaped activations before node `before`: per node (2, N, m, *shape),
    the lower and upper slopes of each row divided by the largest slope (in [0, 1] like a ReLU's alpha; every
    value is sound, `_intercepts`), starting from `smooth_relax`'s."""
    out = {}
    for k, nd in enumerate(g.nodes[:before]):
        if nd.kind in SMOOTH:
            lo, hi = bounds[nd.inputs[0]]
            s = torch.stack([_upper_slope(nd.kind, -hi, -lo), _upper_slope(nd.kind, lo, hi)]) / _FMAX[nd.kind]
            out[k] = s.unsqueeze(2).expand(2, n, m, *lo.shape[1:]).clone().requires_grad_(True)
    return out


def smooth_intermediate(g: Graph, bounds: list, iterations: int, deadline: float | None = None,
                        lr: float = 0.2) -> list:
    """The input bounds of every S-shaped activation after the first, tightened layer by layer by alpha-CROWN
    on the slopes of the ones before (shared by the rows of a layer: per row is a little tighter and several
    times slower; every iterate is a valid bound, the best is kept), what follows re-bounded by intervals and
    intersected. Without S-shaped activations, nothing changes."""
    bounds = list(bounds)
    for nd in g.nodes:
        j = nd.inputs[0] if nd.kind in SMOOTH else None
        if j is None or not any(q.kind in SMOOTH for q in g.nodes[:j]):
            continue
        if deadline is not None and clock.now() > deadline:
            break
        lb, ub = bounds[j]
        n, size = len(lb), math.prod(lb.shape[1:])
        if 2 * size * math.prod(g.nodes[0].shape) * n > 4 * ELEMENTS:
            continue  # too wide for one pass: CROWN's bounds stay
        eye = torch.eye(size, dtype=torch.float64)
        C = torch.cat([eye, -eye]).expand(n, 2 * size, size).reshape(n, 2 * size, *lb.shape[1:])
        slopes = smooth_slopes(g, bounds, n, 1, j)  # one slope per neuron for all rows: 2 size times cheaper
        opt = torch.optim.Adam(list(slopes.values()), lr=lr)
        best = torch.full((n, 2 * size), -torch.inf, dtype=torch.float64)
        for _ in range(iterations):
            with torch.enable_grad():
                b, _ = backward(g, j, C, bounds, slopes)
                best = torch.maximum(best, b.detach())
                if deadline is not None and clock.now() > deadline:
                    break
                opt.zero_grad()
                (-b.sum()).backward()
            opt.step()
            with torch.no_grad():
                for s in slopes.values():
                    s.clamp_(0.0, 1.0)
        flo = torch.maximum(lb.flatten(1), best[:, :size]).view_as(lb)
        fhi = torch.minimum(ub.flatten(1), -best[:, size:]).view_as(ub)
        bounds[j] = (flo, fhi)
        for q in range(j + 1, len(g.nodes)):  # what follows, by intervals, intersected with what it had
            a, b = _ibp(g, q, bounds)
            bounds[q] = (torch.maximum(a, bounds[q][0]), torch.minimum(b, bounds[q][1]))
    return bounds


def _smooth_back(kind: str, lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, slopes=None):
    """An S-shaped activation passed backward: (constant (N, m, *shape), coefficient of its input); `slopes`:
    alpha-CROWN's (2, N, m, *shape) of `smooth_slopes`, else `smooth_relax`'s."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    if slopes is None:
        a_l, a_u = _upper_slope(kind, -hi, -lo), _upper_slope(kind, lo, hi)
    else:
        a_l, a_u = slopes[0] * _FMAX[kind], slopes[1] * _FMAX[kind]
    b_l, b_u = _intercepts(kind, a_l, lo, hi)[0], _intercepts(kind, a_u, lo, hi)[1]
    pos, neg = lam.clamp_min(0), lam.clamp_max(0)
    return pos * b_l + neg * b_u, pos * a_l + neg * a_u


def _dot(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over the node's shape of lam (N, m, *s) * x (N, *s) -> (N, m)."""
    return torch.bmm(lam.flatten(2), x.reshape(len(x), -1, 1)).squeeze(-1)


def backward(g: Graph, start: int, C: torch.Tensor, bounds: list, alphas: dict | None = None,
             terms: dict | None = None, keep: dict | None = None, cache: dict | None = None):
    """Lower bound of C z_start (C (N, m, *shape of node start)) over the input box bounds[0].

    `terms`: {node: (N, m, *shape)} linear functions of earlier nodes added to the objective (beta-CROWN's
    Lagrangian terms of split decisions); `keep`: a dict that receives, per ReLU node, the coefficients of
    its output in the bound (what a branching rule reads); `cache`: a dict kept across calls on the same
    bounds, holding each ReLU's relaxation (recomputed when its bounds are other tensors).
    Returns (bound (N, m), Lambda (N, m, *input shape)).
    """
    n, m = C.shape[:2]
    lams: dict[int, torch.Tensor] = {start: C, **(terms or {})}
    const = torch.zeros(n, m, dtype=C.dtype)
    for k in range(start, -1, -1):
        lam = lams.pop(k, None)
        if lam is None:
            continue
        node = g.nodes[k]
        if keep is not None and node.kind == "relu":
            keep[k] = lam
        if node.kind == "input":
            lo, hi = bounds[0]
            bound = const + _dot(lam, (lo + hi) / 2) - _dot(lam.abs(), (hi - lo) / 2)
            return bound, lam
        if node.kind == "relu":
            j = node.inputs[0]
            lb, ub = bounds[j]
            hit = None if cache is None else cache.get(j)
            if hit is None or hit[0] is not lb or hit[1] is not ub:
                hit = (lb, ub, *relax(lb, ub), ((lb < 0) & (ub > 0)).unsqueeze(1))
                if cache is not None:
                    cache[j] = hit
            low, up, icpt, unstable = hit[2].unsqueeze(1), hit[3], hit[4], hit[5]
            alpha = None if alphas is None else alphas.get(k)
            if alpha is not None:  # per row (N, m, *shape): the lower slopes of the unstable neurons
                low = torch.where(unstable, alpha, low)
            neg = lam.clamp_max(0)
            const = const + _dot(neg, icpt)  # relu(z) <= up z + icpt where the coefficient is negative
            new = torch.addcmul(neg * up.unsqueeze(1), lam - neg, low)
        elif node.kind in SMOOTH:
            j = node.inputs[0]
            c, new = _smooth_back(node.kind, lam, *bounds[j], None if alphas is None else alphas.get(k))
            const = const + c.flatten(2).sum(-1)
        else:
            if node.bias is not None:
                const = const + lam.flatten(2) @ node.bias.flatten()
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
    if node.kind in SMOOTH:  # increasing
        lo, hi = bounds[node.inputs[0]]
        return SMOOTH[node.kind](lo), SMOOTH[node.kind](hi)
    mid = affine(node, [(bounds[i][0] + bounds[i][1]) / 2 for i in node.inputs])
    rad = sum(mp.abs((bounds[i][1] - bounds[i][0]) / 2) for i, mp in zip(node.inputs, node.maps, strict=True))
    return mid - rad, mid + rad


class _Overlap(Exception):
    """Two neurons of one group reach a common element: the group cannot share a backward pass."""


def _spacing(g: Graph, k: int) -> int | None:
    """Distance (in node k's grid) beyond which two neurons of node k depend on disjoint inputs, or None."""
    shape, in_shape = g.nodes[k].shape, g.nodes[0].shape
    if len(shape) < 3 or len(in_shape) < 3:
        return None
    h, w = shape[-2:]
    one = torch.zeros(1, *shape, dtype=torch.float64)
    one[(0,) * (len(shape) - 1) + (h // 2, w // 2)] = 1.0  # batch, leading dimensions, the centre
    reach = {k: one}
    for j in range(k, 0, -1):
        r = reach.pop(j, None)
        if r is None:
            continue
        node = g.nodes[j]
        pairs = [(node.inputs[0], r)] if node.kind != "affine" else [
            (i, mp.abs_backward(r.reshape(1, *node.shape)).reshape(1, *g.nodes[i].shape))
            for i, mp in zip(node.inputs, node.maps, strict=True)]
        for i, b in pairs:
            reach[i] = reach[i] + b if i in reach else b
    field = reach[0][0].reshape(-1, *in_shape[-2:]).abs().sum(0)
    rows, cols = torch.nonzero(field.sum(1)).flatten(), torch.nonzero(field.sum(0)).flatten()
    if not len(rows):
        return None
    fh, fw = in_shape[-2] / h, in_shape[-1] / w
    s = max(math.ceil((rows[-1] - rows[0] + 1) / fh), math.ceil((cols[-1] - cols[0] + 1) / fw)) + 1
    return s if s < min(h, w) else None


def _groups(shape: tuple[int, ...], idx: torch.Tensor, s: int) -> list[torch.Tensor]:
    """The neurons idx (flat) split by channel and by position modulo s: far enough apart to share a pass."""
    h, w = shape[-2:]
    chan, pos = idx // (h * w), idx % (h * w)
    key = (chan * s + (pos // w) % s) * s + (pos % w) % s
    order = key.argsort()
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    return list(idx[order].split(counts.tolist()))


def _backward_grouped(g: Graph, k: int, groups: list[torch.Tensor], bounds: list):
    """CROWN lower and upper bounds of every neuron of the groups, one backward pass per group: the linear
    bounds of neurons with disjoint inputs do not interact, so their sum is propagated and each element's
    contribution is credited to the neuron that owns it (ownership propagated through |W|, and checked)."""
    n, shape = len(bounds[0][0]), g.nodes[k].shape
    size, m = math.prod(shape), len(groups)
    width = max(len(i) for i in groups) + 1
    C = torch.zeros(n, 2 * m, size, dtype=torch.float64)
    own = torch.zeros(3, m, size, dtype=torch.float64)
    for q, idx in enumerate(groups):
        C[:, 2 * q, idx], C[:, 2 * q + 1, idx] = 1.0, -1.0
        ids = torch.arange(1, len(idx) + 1, dtype=torch.float64)
        own[0, q, idx], own[1, q, idx], own[2, q, idx] = 1.0, ids, ids ** 2
    total = torch.zeros(n, 2 * m, width, dtype=torch.float64)

    def credit(o: torch.Tensor, contrib: torch.Tensor) -> None:
        o0, o1, o2 = o.flatten(2)
        if ((o2 * o0 - o1 ** 2).abs() > 1e-6 * (o1 ** 2).clamp_min(1.0)).any():
            raise _Overlap
        owner = torch.where(o0 > 0, o1 / o0.clamp_min(1e-300), 0.0).round().long()
        owner = owner.repeat_interleave(2, dim=0).expand(n, -1, -1)
        total.scatter_add_(2, owner, contrib.reshape(n, 2 * m, -1))

    lams, owns = {k: C.view(n, 2 * m, *shape)}, {k: own.view(3, m, *shape)}
    for j in range(k, -1, -1):
        lam = lams.pop(j, None)
        if lam is None:
            continue
        o = owns.pop(j)
        node = g.nodes[j]
        if node.kind == "input":
            lo, hi = bounds[0]
            credit(o, lam * ((lo + hi) / 2).unsqueeze(1) - lam.abs() * ((hi - lo) / 2).unsqueeze(1))
            break
        if node.kind == "relu":
            i = node.inputs[0]
            low, up, icpt = relax(*bounds[i])
            pos, neg = lam.clamp_min(0), lam.clamp_max(0)
            credit(o, neg * icpt.unsqueeze(1))
            pairs = [(i, pos * low.unsqueeze(1) + neg * up.unsqueeze(1), o)]
        elif node.kind in SMOOTH:
            i = node.inputs[0]
            c, new = _smooth_back(node.kind, lam, *bounds[i])
            credit(o, c)
            pairs = [(i, new, o)]
        else:
            if node.bias is not None:
                credit(o, lam * node.bias)
            flat, oflat = lam.reshape(n * 2 * m, *node.shape), o.reshape(3 * m, *node.shape)
            pairs = [(i, mp.backward(flat).reshape(n, 2 * m, *g.nodes[i].shape),
                      mp.abs_backward(oflat).reshape(3, m, *g.nodes[i].shape))
                     for i, mp in zip(node.inputs, node.maps, strict=True)]
        for i, back, ob in pairs:
            lams[i] = lams[i] + back if i in lams else back
            owns[i] = owns[i] + ob if i in owns else ob
    lower, upper = [], []
    for q, idx in enumerate(groups):
        lower.append(total[:, 2 * q, 1:len(idx) + 1])
        upper.append(-total[:, 2 * q + 1, 1:len(idx) + 1])
    return torch.cat(lower, 1), torch.cat(upper, 1)


def _refine(g: Graph, k: int, bounds: list, limit: int | None = None,
            deadline: float | None = None, alive: bool = False, cache: dict | None = None) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """CROWN bounds of the neurons of node k that are unstable in some box (chunked to bound memory); with
    `alive`, of every neuron that can be positive in some box (the next layer's intervals start from the
    active ones' bounds too: a few times fewer boxes in input splitting on ACAS Xu).

    Neurons far enough apart to depend on disjoint inputs share one backward pass (image layers). At most
    `limit` neurons, those whose ReLU relaxation is loosest (largest -l u / (u - l)), and none after
    `deadline`: the others keep their interval bounds, which are sound too.
    """
    lo, hi = bounds[k]
    n, shape = len(lo), g.nodes[k].shape
    lo, hi = lo.flatten(1).clone(), hi.flatten(1).clone()
    smooth = any(nd.kind in SMOOTH and nd.inputs == [k] for nd in g.nodes)  # every neuron's bounds matter
    idx = torch.nonzero(((lo < hi) if smooth else (hi > 0) if alive else ((lo < 0) & (hi > 0))).any(0)).flatten()
    if limit is not None and len(idx) > limit:
        lb, ub = lo[:, idx], hi[:, idx]
        area = (-lb.clamp_max(0) * ub.clamp_min(0) / (ub - lb).clamp_min(1e-30)).amax(0)
        idx = idx[area.argsort(descending=True)[:limit]]
    widest = max(math.prod(nd.shape) for nd in g.nodes[:k + 1])
    spacing = _spacing(g, k) if len(idx) > 1 else None
    if spacing is not None:
        groups = _groups(shape, idx, spacing)
        per = max(1, ELEMENTS // ((2 * n + 3) * widest))
        try:
            for start in range(0, len(groups), per):
                if deadline is not None and clock.now() > deadline:
                    break
                chunk = groups[start:start + per]
                b_lo, b_hi = _backward_grouped(g, k, chunk, bounds)
                cols = torch.cat(chunk)
                lo[:, cols] = torch.maximum(lo[:, cols], b_lo)
                hi[:, cols] = torch.minimum(hi[:, cols], b_hi)
            return lo.view(n, *shape), hi.view(n, *shape)
        except _Overlap:  # not separable after all: one pass per neuron (bounds so far are sound)
            pass
    rows = max(1, ELEMENTS // (2 * n * widest))
    for chunk in idx.split(rows):
        if deadline is not None and clock.now() > deadline:
            break
        c = len(chunk)
        C = torch.zeros(n, 2 * c, lo.shape[1], dtype=torch.float64)
        r = torch.arange(c)
        C[:, r, chunk] = 1.0
        C[:, c + r, chunk] = -1.0
        b, _ = backward(g, k, C.view(n, 2 * c, *shape), bounds, cache=cache)
        lo[:, chunk] = torch.maximum(lo[:, chunk], b[:, :c])
        hi[:, chunk] = torch.minimum(hi[:, chunk], -b[:, c:])
    return lo.view(n, *shape), hi.view(n, *shape)


def intermediate(g: Graph, lo: torch.Tensor, hi: torch.Tensor, method: str = "crown", known: list | None = None,
                 splits: dict | None = None, limit: int | None = None, deadline: float | None = None,
                 alive: bool = False) -> list:
    """(lo, hi) of every node over each box, IBP refined by CROWN at the inputs of unstable ReLUs (at most
    `limit` neurons per node, until `deadline`; `alive`: of every ReLU that can be positive)."""
    pre = {n.inputs[0] for n in g.nodes if n.kind == "relu" or n.kind in SMOOTH}
    bounds: list = [(lo.double(), hi.double())]
    cache: dict = {}  # the relaxations of the ReLUs whose bounds are final
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
            bounds[k] = _refine(g, k, bounds, limit, deadline, alive, cache)
            if splits and k in splits:  # the split still holds after refinement
                lb, ub = bounds[k]
                s = splits[k]
                bounds[k] = (torch.where(s > 0, lb.clamp_min(0), lb), torch.where(s < 0, ub.clamp_max(0), ub))
    return bounds


def lower_bound(g: Graph, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor, method: str = "crown",
                known: list | None = None, splits: dict | None = None, iterations: int = 20, lr: float = 0.2,
                bounds: list | None = None, target: float | None = None, limit: int | None = None,
                deadline: float | None = None, rhs: torch.Tensor | None = None, alive: bool = False,
                crown_lam: bool = False) -> Result:
    """Lower bounds of C y - rhs (C (m, out) or (N, m, out), rhs (m,) or none) over the boxes [lo, hi]
    (N, *input shape).

    With a `target` (a proof is all the caller wants), CROWN first tries IBP's intermediate bounds (one backward
    pass) and stops if every row exceeds it, and alpha-CROWN stops once every row's bound exceeds it; without
    one, the tightest bound the method gives. `crown_lam`: Lambda stays CROWN's, not alpha-CROWN's (input
    splitting reads it to pick the input to halve: alpha's steers it worse, 3 times the boxes on N_2,7
    property 1 of ACAS Xu).
    """
    if method not in METHODS:
        raise ValueError(f"unknown bound method {method!r} (one of {', '.join(METHODS)})")
    n = len(lo)
    C = C.double()
    C = C.expand(n, *C.shape[-2:]) if C.ndim == 2 else C
    m = C.shape[1]
    shift = torch.zeros(m, dtype=torch.float64) if rhs is None else rhs.double()
    out = len(g.nodes) - 1
    if target is not None and bounds is None and method != "ibp" and not splits:
        ibp = intermediate(g, lo, hi, "ibp", known)  # often enough for a network trained with interval bounds
        early, lam = backward(g, out, C, ibp)
        if (early - shift > target).all():
            return Result(early - shift, lam, ibp)
    target = 0.0 if target is None else target
    if bounds is None:
        bounds = intermediate(g, lo, hi, "ibp" if method == "ibp" else "crown", known, splits, limit, deadline,
                              alive)
    if method == "ibp":
        lb, ub = bounds[out]
        low = (C.clamp_min(0) * lb.unsqueeze(1) + C.clamp_max(0) * ub.unsqueeze(1)).sum(-1)
        return Result(low - shift, None, bounds)
    cache: dict = {}
    best, lam = backward(g, out, C, bounds, cache=cache)
    best = best - shift
    if method == "crown" or (best > target).all():
        return Result(best, lam, bounds)
    if any(nd.kind in SMOOTH for nd in g.nodes):  # S-shaped activations: their slopes optimised, layer by layer
        bounds = smooth_intermediate(g, bounds, iterations, deadline)
    alphas = smooth_slopes(g, bounds, n, C.shape[1], len(g.nodes))
    for r in g.relus:
        lb, ub = bounds[g.nodes[r].inputs[0]]
        if ((lb < 0) & (ub > 0)).any():  # one slope per row (alpha-CROWN optimises each row on its own)
            alphas[r] = (ub > -lb).double().unsqueeze(1).expand(n, m, *lb.shape[1:]).clone().requires_grad_(True)
    if not alphas:
        return Result(best, lam, bounds)
    opt = torch.optim.Adam(list(alphas.values()), lr=lr)
    for _ in range(iterations):
        if deadline is not None and clock.now() > deadline:
            break
        with torch.enable_grad():
            b, lam_b = backward(g, out, C, bounds, alphas, cache=cache)
            b = b - shift
            better = b.detach() > best
            best = torch.where(better, b.detach(), best)
            if not crown_lam:
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
