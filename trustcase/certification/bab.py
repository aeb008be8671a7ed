"""Branch and bound on the layer graph: the one search that decides a property the bounds alone leave open.

`decide(g, lo, hi, conjunctions, deadline)` proves that no input of the box [lo, hi] meets any of the
conjunctions A_c y <= b_c, or finds a counterexample, or says why it could not. It splits the input box when
the input is low-dimensional (`INPUT_SPLIT_MAX` inputs or fewer, e.g. ACAS Xu's 5: `split_inputs`) and the
unstable ReLUs otherwise (images, MNIST: `split_relus`), both on the bounds of `propagation` (CROWN,
alpha-CROWN, float64).

Floating point (`forward_error`, the rule of `certification.rounding`: gamma_n for n accumulated roundings of
unit roundoff u, in any order, with or without fused multiply-add): a box or domain counts as refuted only when
every bound clears the property by the float64 rounding of the bounds themselves, |A| e64 per row, e64 the
network's float64 error bound over the input box with every sum counted in both directions (the forward pass
and CROWN's backward products, whose slopes lie in [0, 1]; beta-CROWN's Lagrangian terms beta z are not
counted); 3e-9 to 6e-7 on ACAS Xu. The float32 forward error of the deployed network is
bounded the same way (e32, u = 2^-24) and reported with the outcome: the proof covers the float32 network when
its smallest margin exceeds |A| e32 (`Outcome.float32`); a worst-case bound, far above the measured deviation
(0.6 to 127 over the input boxes of ACAS Xu properties against 1e-6 measured), so a proof usually covers
the network in exact arithmetic, which the validity conditions say (`MARGIN_RULE`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from trustcase import clock
from trustcase.certification import graph as G
from trustcase.certification import propagation as P
from trustcase.certification.graph import Graph
from trustcase.certification.rounding import U32, U64, gamma

MARGIN_RULE = ("every bound clears the property by the float64 rounding of its own arithmetic (derived per "
               "instance: gamma_n u |A| over one pass of |W| |x| through the network, which bounds CROWN's products; "
               "beta-CROWN's Lagrangian terms of ReLU splitting are not counted); the float32 forward error of "
               "the deployed network is covered only where the outcome says so (its worst-case bound, derived the "
               "same way, is far above the measured deviation): otherwise the proof is about the network in exact "
               "arithmetic")
SIGMOID_ULPS = 8  # float32 sigmoid / tanh kernels are libm-grade (a few ulps): taken within 8 (not proved here)
MAX_SPLIT = 2000  # unstable ReLUs beyond which an image's ReLU splitting is not attempted (thousands of
# unstable neurons in a CNN's first layer: no search finishes)
SMOOTH_ITERATIONS = 1280  # the most alpha-CROWN iterations of one round on a network without ReLUs (a bound
# without a deadline: eran's sigmoid network takes about 0.2 s per iteration on one core)
INPUT_SPLIT_MAX = 16  # inputs; above, the ReLUs are split (the field's rule: boxes halve badly in many dimensions)
ROOT_ITERATIONS = 40  # alpha-CROWN iterations per layer for the root's intermediate bounds of a ReLU split (every
# domain inherits them: on mnistfc 256x4 prop_9_0.03, 40 instead of 10 leave 348 unstable ReLUs instead of 377)


@dataclass
class Outcome:
    verdict: str  # "holds", "violated", "unknown"
    counterexample: np.ndarray | None = None
    boxes: int = 0  # boxes or domains bounded
    reason: str = ""
    method: str = ""
    least: float = math.inf  # holds: the smallest margin a refuted box or domain had beyond the float64 allowance
    float32: float = math.nan  # the float32 forward error bound of the rows, |A| e32 (largest row)

    @property
    def covers_float32(self) -> bool:
        """The proof also holds for the network evaluated in float32 (its margin exceeds the float32 error)."""
        return self.verdict == "holds" and self.least > self.float32


def _roundings(mp: G.Map, backward: bool) -> int:
    """Roundings accumulated by one output element of a linear map (products summed; copies are exact); backward:
    also those of its transpose (CROWN multiplies back through it)."""
    if isinstance(mp, G.Dense):
        return mp.W.shape[1] + (mp.W.shape[0] if backward else 0)
    if isinstance(mp, G.Conv):
        taps = mp.W.shape[2] * mp.W.shape[3]
        return mp.W.shape[1] * taps + (mp.W.shape[0] * taps if backward else 0)
    if isinstance(mp, G.Scale):
        return 1
    return 0  # reshapes, permutations, padding, placing, the windows and pairs of a max pooling: exact


def forward_error(g: Graph, lo: torch.Tensor, hi: torch.Tensor, u: float = U32, backward: bool = False,
                  bounds: list | None = None) -> torch.Tensor:
    """A bound of |f_u(x) - f(x)| per output for every x of the box [lo, hi] (1, *input shape): f the graph in
    exact arithmetic, f_u the same layers evaluated with unit roundoff u in any summation order.

    Per affine node (Higham 3.1): the error it inherits, through |W|, plus gamma_n u (|W| (|x| + e) + |c|) with n
    its fan-in, one for the bias, one per extra input and 4 for operations folded into it (a BatchNorm, a
    constant shift), |c| the magnitude of the constants the model adds (`Node.folded`: a shift and a bias that
    cancel in the graph's folded bias still round apart in the model), plus `Node.rounded` times the same for
    weights the graph folded (a BatchNorm: their float64 rounding against the model's) and gamma_n(u64) |c| for
    the folded bias's own float64 sum; |x| from the interval bounds of the box (`bounds`, else IBP). A ReLU passes the
    error on, or none when its input stays below zero even with it (the output is exactly 0); sigmoid / tanh shrink
    it by their slope and add SIGMOID_ULPS u. backward: the sums of the transposed maps too (the float64 arithmetic of
    CROWN, whose products Lambda W run back through every layer and stay within the same magnitudes: slopes in
    [0, 1])."""
    if bounds is None:
        bounds = P.intermediate(g, lo, hi, "ibp")
    err = [torch.zeros_like(bounds[0][0])]
    for node in g.nodes[1:]:
        if node.kind == "relu":
            j = node.inputs[0]
            err.append(torch.where(bounds[j][1] + err[j] > 0, err[j], torch.zeros_like(err[j])))
            continue
        if node.kind in G.SMOOTH:
            slope = 0.25 if node.kind == "sigmoid" else 1.0
            err.append(slope * err[node.inputs[0]] + SIGMOID_ULPS * u)
            continue
        if node.kind != "affine":
            raise G.GraphError(f"{node.layer or node.name}: no floating-point error bound for a {node.kind!r} node")
        pairs = list(zip(node.inputs, node.maps, strict=True))
        size = sum(mp.abs(torch.maximum(bounds[j][0].abs(), bounds[j][1].abs()) + err[j]) for j, mp in pairs)
        size = size + G.magnitude(node)  # the folded constants as the model adds them, apart
        n = sum(_roundings(mp, backward) for _, mp in pairs) + (node.bias is not None) + len(pairs) - 1 + 4
        # the graph's bias is those constants summed once in float64 (within n roundings): the model's differs by
        folded = 0.0 if node.folded is None else gamma(n, U64) * node.folded  # up to that, a cancellation included
        err.append(sum(mp.abs(err[j]) for j, mp in pairs) + (gamma(n, u) + node.rounded) * size + folded)
    return err[-1].flatten(1)[0] * (1 + gamma(2 * len(g.nodes), U64))  # this pass's own float64 roundings


def split_dims(lam: torch.Tensor, live: torch.Tensor, width: torch.Tensor, rule: str) -> torch.Tensor:
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


class _Specification:
    """The conjunctions as one matrix of rows A y - b, with the conjunction each row belongs to."""

    def __init__(self, conjunctions, mix: bool = True, error: torch.Tensor | None = None):
        """error: the float64 error bound of the outputs (`forward_error`); each row's b moves up by |A_k| error,
        so a lower bound of A_k y - b above 0 clears the property by the rounding of its own arithmetic."""
        conj = [(np.asarray(a, np.float64), np.asarray(b, np.float64)) for a, b in conjunctions]
        conj = [mixed(a, b) for a, b in conj] if mix else conj
        self.A = torch.from_numpy(np.concatenate([c[0] for c in conj])).double()
        self.b = torch.from_numpy(np.concatenate([c[1] for c in conj])).double()
        owner = torch.from_numpy(np.concatenate([[i] * len(c[0]) for i, c in enumerate(conj)]))
        self.of = torch.nn.functional.one_hot(owner, len(conj)).bool()  # (rows, conjunctions)
        if error is not None:
            self.b = self.b + self.allowance(error)

    def allowance(self, error: torch.Tensor) -> torch.Tensor:
        """|A_k| error per row, rounded up (its own sums: gamma of the outputs)."""
        return self.A.abs() @ error * (1 + gamma(self.A.shape[1] + 2, U64))

    def closeness(self, margin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """margin (N, rows), lower bounds of A y - b: per box its conjunctions' best rows (N, conj), and how
        close the box is to refutation (its worst conjunction; > 0: refuted)."""
        best = margin[:, :, None].expand(-1, -1, self.of.shape[1]).masked_fill(~self.of, -torch.inf).amax(dim=1)
        return best, best.amin(dim=1)

    def live(self, refuted: torch.Tensor) -> torch.Tensor:
        """(N, rows): the rows of conjunctions not refuted yet."""
        return ~(refuted.float() @ self.of.T.float()).bool()


class _Boxes:
    """Boxes (flat inputs) with their bounds: every node's bounds (inherited by children), Lambda, margins."""

    def __init__(self, lo, hi, bounds, lam, margin, refuted):
        self.lo, self.hi, self.bounds, self.lam, self.margin, self.refuted = lo, hi, bounds, lam, margin, refuted

    def __len__(self):
        return len(self.lo)

    def take(self, sel) -> _Boxes:
        return _Boxes(self.lo[sel], self.hi[sel], [(a[sel], b[sel]) for a, b in self.bounds], self.lam[sel],
                      self.margin[sel], self.refuted[sel])

    @staticmethod
    def cat(parts: list[_Boxes]) -> _Boxes:
        parts = [p for p in parts if p is not None and len(p)]
        return _Boxes(torch.cat([p.lo for p in parts]), torch.cat([p.hi for p in parts]),
                      [(torch.cat([p.bounds[k][0] for p in parts]), torch.cat([p.bounds[k][1] for p in parts]))
                       for k in range(len(parts[0].bounds))],
                      torch.cat([p.lam for p in parts]), torch.cat([p.margin for p in parts]),
                      torch.cat([p.refuted for p in parts]))


def _specification(g: Graph, lo: torch.Tensor, hi: torch.Tensor, conjunctions, mix: bool):
    """The rows with their float64 allowance over the box, and the float32 forward error of the largest row."""
    bounds = P.intermediate(g, lo, hi, "ibp")
    spec = _Specification(conjunctions, mix, forward_error(g, lo, hi, U64, backward=True, bounds=bounds))
    return spec, float(spec.allowance(forward_error(g, lo, hi, U32, bounds=bounds)).max())


def allowance(g: Graph, lo: torch.Tensor, hi: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """The float64 allowance of each row C_k y over the box (1, *input shape): what its bound must clear."""
    spec = _Specification([(C.numpy(), np.zeros(len(C)))], mix=False)
    return spec.allowance(forward_error(g, lo, hi, U64, backward=True))


def _least(least: float, close: torch.Tensor) -> float:
    """The smallest margin so far of the refuted boxes or domains (close > 0)."""
    done = close[close > 0]
    return min(least, float(done.min())) if len(done) else least


def split_inputs(g: Graph, lower: np.ndarray, upper: np.ndarray, conjunctions, deadline: float, candidate=None,
                 search=None, batch: int = 128, max_boxes: int = 50_000_000, split: str = "pair",
                 alpha_steps: int = 10) -> Outcome:
    """Prove that no x in [lower, upper] (flat) has A_c f(x) <= b_c for any conjunction c (a list of (A, b)),
    by halving the input box.

    A box is refuted when, for every conjunction, some row has a lower bound of A_k y - b_k above
    its float64 allowance (`forward_error`).
    Each box is bounded by CROWN on the graph with every live neuron's intermediate bounds refined (stable
    ones too) and intersected with its parent's, then `alpha_steps` of alpha-CROWN on the output rows
    (N_1,1 property 5 of ACAS Xu in 1,600 boxes instead of 14,000; N_3,3 and N_4,2 property 2 decided at all).
    An open box is halved along one of the inputs `split` proposes (`split_dims`): both halves of every
    proposed input are bounded in one batch (alpha-beta-CROWN's brute-force input split, on a shortlist) and
    the input whose halves come nearest to refutation is kept, its halves already bounded. On ACAS Xu no
    single rule fits every property: "influence" leaves N_1,4 property 1 open after 7,000 boxes where
    "widest" proves it in 99, and "widest" leaves N_1,1 property 5 open where "influence" proves it; the
    default "pair" tries both. Each conjunction is also refuted by the means of its rows (`mixed`).
    Open boxes are taken `batch` at a time from the front of the queue and their open children put back in
    front (depth first: the queue stays small).
    Falsification during the search: `candidate(x)` is called on the minimising corners and the centres of
    the open boxes, `search(lo, hi)` now and then on the open boxes; each returns a verified counterexample
    or None.
    """
    shape = g.nodes[0].shape
    spec, float32 = _specification(g, torch.from_numpy(np.asarray(lower, np.float64)).view(1, *shape),
                                   torch.from_numpy(np.asarray(upper, np.float64)).view(1, *shape), conjunctions,
                                   mix=True)
    done, next_search, least = 0, clock.now(), math.inf

    def bound(lo, hi, known) -> tuple[_Boxes, torch.Tensor]:
        nonlocal done
        r = P.lower_bound(g, lo.view(len(lo), *shape), hi.view(len(hi), *shape), spec.A, "alpha-crown",
                          known=known, iterations=alpha_steps, rhs=spec.b, alive=True, crown_lam=True)
        done += len(lo)
        best, close = spec.closeness(r.lower)
        return _Boxes(lo, hi, r.bounds, r.lam.flatten(2), r.lower, best > 0.0), close

    def check_corners(bx: _Boxes):
        if candidate is None or not len(bx):
            return None
        live = spec.live(bx.refuted)
        row = bx.margin.masked_fill(~live, torch.inf).argmin(dim=1)
        grad = bx.lam[torch.arange(len(bx)), row]
        # the corner minimising the bound of the most violated row: the likeliest counterexample
        corner = torch.where(grad > 0, bx.lo, bx.hi)
        return candidate(np.concatenate([corner.numpy(), ((bx.lo + bx.hi) / 2).numpy()]))

    root, q = bound(torch.from_numpy(np.asarray(lower, np.float64)).flatten()[None],
                    torch.from_numpy(np.asarray(upper, np.float64)).flatten()[None], None)
    queue, least = root.take(q <= 0.0), _least(least, q)
    found = check_corners(queue)
    if found is not None:
        return Outcome("violated", counterexample=found, boxes=done)
    while len(queue):
        if clock.now() > deadline:
            return Outcome("unknown", boxes=done, reason=f"budget exhausted with {len(queue)} boxes open")
        if done > max_boxes:
            return Outcome("unknown", boxes=done, reason=f"more than {max_boxes} boxes")
        open_, queue = queue.take(slice(0, batch)), queue.take(slice(batch, None))
        n = len(open_)
        if search is not None and clock.now() >= next_search:
            t = clock.now()
            found = search(open_.lo.numpy(), open_.hi.numpy())
            if found is not None:
                return Outcome("violated", counterexample=found, boxes=done)
            next_search = clock.now() + 4 * (clock.now() - t)  # at most a fifth of the time
        dims = split_dims(open_.lam, spec.live(open_.refuted), open_.hi - open_.lo, split)  # (n, k)
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
        known = [(a.repeat_interleave(2 * k, 0), b_.repeat_interleave(2 * k, 0)) for a, b_ in open_.bounds]
        children, q = bound(lo, hi, known)
        q = q.view(n, 2, k)
        pick = q.clamp_max(0).sum(dim=1).argmax(dim=1)  # the input whose halves come nearest to refutation
        rows = (torch.arange(n)[:, None] * 2 * k + torch.tensor([0, k])[None] + pick[:, None]).flatten()
        chosen = children.take(rows)
        least = _least(least, q.flatten()[rows])
        chosen = chosen.take(q.flatten()[rows] <= 0.0)
        found = check_corners(chosen)
        if found is not None:
            return Outcome("violated", counterexample=found, boxes=done)
        queue = _Boxes.cat([chosen, queue]) if len(chosen) else queue
    return Outcome("holds", boxes=done, least=least, float32=float32)


class _Domains:
    """ReLU-split sub-problems of one input box: their split decisions {pre-activation node: (N, *shape) in
    {-1, 0, +1}}, every node's bounds, alpha (per ReLU) and beta (per split node) to warm-start the children,
    their lower bounds (N, rows) and the branching scores (per pre-activation node, (N, *shape))."""

    def __init__(self, splits, bounds, alphas, betas, lower, scores, lam):
        self.splits, self.bounds, self.alphas, self.betas = splits, bounds, alphas, betas
        self.lower, self.scores, self.lam = lower, scores, lam

    def __len__(self):
        return len(self.lower)

    def take(self, sel) -> _Domains:
        def pick(d):
            return {k: v[sel] for k, v in d.items()}
        return _Domains(pick(self.splits), [(a[sel], b[sel]) for a, b in self.bounds], pick(self.alphas),
                        pick(self.betas), self.lower[sel], pick(self.scores), self.lam[sel])

    @staticmethod
    def cat(parts: list[_Domains]) -> _Domains:
        parts = [p for p in parts if len(p)]

        def join(key):
            # batches bounded apart may hold alpha / beta for different nodes (beta only where that batch has a
            # split): a part without one gets zeros, which are sound (any alpha in [0, 1], any beta >= 0 bounds)
            keys = dict.fromkeys(k for p in parts for k in getattr(p, key))
            like = {k: next(getattr(p, key)[k] for p in parts if k in getattr(p, key)) for k in keys}
            return {k: torch.cat([getattr(p, key)[k] if k in getattr(p, key) else
                                  like[k].new_zeros((len(p), *like[k].shape[1:])) for p in parts]) for k in keys}
        return _Domains(join("splits"), [(torch.cat([p.bounds[k][0] for p in parts]),
                                          torch.cat([p.bounds[k][1] for p in parts]))
                                         for k in range(len(parts[0].bounds))],
                        join("alphas"), join("betas"), torch.cat([p.lower for p in parts]), join("scores"),
                        torch.cat([p.lam for p in parts]))


def _clamp(bounds: list, splits: dict) -> None:
    """The split decisions in the pre-activation bounds: >= 0 (+1) or <= 0 (-1)."""
    for j, s in splits.items():
        lb, ub = bounds[j]
        bounds[j] = (torch.where(s > 0, lb.clamp_min(0), lb), torch.where(s < 0, ub.clamp_max(0), ub))


def _tighten(g: Graph, bounds: list, splits: dict) -> list:
    """Interval bounds recomputed after a split (a ReLU fixed off narrows what follows), intersected with the
    inherited ones, which stay valid on the sub-problem."""
    out = [bounds[0]]
    for k in range(1, len(g.nodes)):
        lb, ub = P._ibp(g, k, out)
        out.append((torch.maximum(lb, bounds[k][0]), torch.minimum(ub, bounds[k][1])))
        if k in splits:
            _clamp(out, {k: splits[k]})
    return out


def _optimise(g: Graph, lo, hi, spec: _Specification, bounds: list, splits: dict, alphas: dict, betas: dict,
              iterations: int, deadline: float, known: torch.Tensor | None = None, fast: Graph | None = None):
    """alpha-beta-CROWN on the output rows, the intermediate bounds fixed: the lower slopes alpha in [0, 1] of
    the unstable ReLUs and the multipliers beta >= 0 of the split decisions s z >= 0, per domain and row,
    by projected Adam. For beta >= 0, f(x) - sum beta s z(x) <= f(x) wherever the decisions hold, so every
    iterate's bound is a valid bound of the sub-problem; the best per row is kept, and so is the parent's
    (`known`, valid on the smaller set). Only the live rows of each domain are bounded: every (domain, live row)
    pair is one problem of one row (a domain of mnistfc's 9-row properties has 3 to 4 rows live on average, and
    bounding every row live anywhere in the batch cost all 9 in each).
    `fast`: the graph in float32, where alpha and beta are searched (twice as fast); their bound is then
    computed once in float64 (any alpha in [0, 1], beta >= 0 is sound: float32 only steers the search).
    Returns (lower (N, m), Lambda of the worst row's last bound (N, d), branching scores, alphas, betas)."""
    n, m_all = len(lo), spec.A.shape[0]
    best_all = torch.full((n, m_all), -torch.inf, dtype=torch.float64) if known is None else known.clone()
    open_rows = torch.ones(n, m_all, dtype=torch.bool) if known is None else _live(spec, best_all)
    d, r = torch.nonzero(open_rows, as_tuple=True)  # the (domain, row) pairs, each bounded as one problem
    C, rhs = spec.A[r].unsqueeze(1), spec.b[r].unsqueeze(1)  # (P, 1, outputs), (P, 1)
    pre = {g.nodes[q].inputs[0]: q for q in g.relus}
    unstable = {q: (bounds[j][0] < 0) & (bounds[j][1] > 0) for j, q in pre.items()}
    alphas_all = {q: alphas[q].clone() if q in alphas else (bounds[j][1] > -bounds[j][0]).double().unsqueeze(1)
                  .expand(n, m_all, *bounds[j][0].shape[1:]).clone() for j, q in pre.items() if unstable[q].any()}
    betas_all = {j: betas[j].clone() if j in betas else torch.zeros(n, m_all, *s.shape[1:], dtype=torch.float64)
                 for j, s in splits.items() if s.any()}
    pair_bounds = [(a[d], b[d]) for a, b in bounds]
    pair_splits = {j: v[d] for j, v in splits.items()}
    dtype = torch.float64 if fast is None else torch.float32
    alphas = {q: a[d, r].unsqueeze(1).to(dtype).requires_grad_(True) for q, a in alphas_all.items()}
    betas = {j: v[d, r].unsqueeze(1).to(dtype).requires_grad_(True) for j, v in betas_all.items()}
    gq, Cq, rq = (g, C, rhs) if fast is None else (fast, C.float(), rhs.float())
    bq = pair_bounds if fast is None else [(a.float(), b.float()) for a, b in pair_bounds]
    sq = pair_splits if fast is None else {j: v.float() for j, v in pair_splits.items()}
    groups = [{"params": list(alphas.values()), "lr": 0.1}]
    if betas:
        groups.append({"params": list(betas.values()), "lr": 0.05})
    opt = torch.optim.Adam(groups) if alphas or betas else None
    best = torch.full((len(d), 1), -torch.inf, dtype=torch.float64)
    lam, keep, cache = None, {}, {}
    for t in range(iterations if opt is not None else 1):
        with torch.enable_grad():
            terms = {j: -b * sq[j].unsqueeze(1) for j, b in betas.items()}
            keep = {}
            b, lam = P.backward(gq, len(g.nodes) - 1, Cq, bq, alphas, terms, keep, cache)
            b = b - rq
            best = torch.maximum(best, b.detach().double())
            now = _raise(best_all, d, r, best[:, 0])
            if fast is None:
                best_all = now
            _, close = spec.closeness(now)
            if opt is None or bool((close > 0.0).all()) or t == iterations - 1 or clock.now() > deadline:
                break
            opt.zero_grad()
            (-b.clamp_max(1.0).sum()).backward()
        opt.step()
        with torch.no_grad():
            for a in alphas.values():
                a.clamp_(0.0, 1.0)
            for v in betas.values():
                v.clamp_(min=0.0)
    with torch.no_grad():
        for q, a in alphas.items():
            alphas_all[q][d, r] = a.detach()[:, 0].double()
        for j, v in betas.items():
            betas_all[j][d, r] = v.detach()[:, 0].double()
        if fast is not None:  # the sound bound of the parameters found: float64
            a64 = {q: a[d, r].unsqueeze(1) for q, a in alphas_all.items()}
            terms = {j: -v[d, r].unsqueeze(1) * pair_splits[j].unsqueeze(1) for j, v in betas_all.items()}
            keep = {}
            b, lam = P.backward(g, len(g.nodes) - 1, C, pair_bounds, a64, terms, keep)
            best_all = _raise(best_all, d, r, (b - rhs)[:, 0])
        live = _live(spec, best_all)[d, r].double()  # (P,)
        scores = {}
        for j, q in pre.items():
            a = keep[q].detach()[:, 0]  # coefficients of the ReLU's output, (P, *shape)
            _, up, icpt = P.relax(*bounds[j])
            # BaBSR (Bunel et al. 2020): what the upper line's intercept costs the live rows, plus how the
            # pre-activation's bias moves their bound when the relaxation becomes one of its two lines
            w = live.view(-1, *[1] * (a.ndim - 1))
            cost = a.clamp_max(0).neg() * w
            s = torch.zeros_like(icpt).index_add_(0, d, cost) * icpt
            if g.nodes[j].bias is not None:
                ab = torch.zeros_like(icpt).index_add_(0, d, a * w) * g.nodes[j].bias
                s = (torch.minimum(ab * (up - 1), ab * up) - s).abs()
            lb, ub = bounds[j]
            area = -lb * ub / (ub - lb).clamp_min(1e-30)
            scores[j] = torch.where(unstable[q], s + 1e-6 * area, -1.0)
        # Lambda of each domain's worst live row (of its first pair when none is live, zeros without a pair: such
        # a domain is refuted)
        value = torch.full((n, m_all), torch.inf, dtype=torch.float64)
        value[d, r] = best_all[d, r].masked_fill(live == 0, torch.inf)
        at = torch.full((n, m_all), -1, dtype=torch.long)
        at[d, r] = torch.arange(len(d))
        first = torch.full((n,), len(d), dtype=torch.long).scatter_reduce(0, d, torch.arange(len(d)), "amin")
        pick = at[torch.arange(n), value.argmin(1)]
        lam = lam.detach()[:, 0].flatten(1)
        lam = torch.cat([lam, lam.new_zeros(1, lam.shape[1])])[torch.where(pick >= 0, pick, first)]
    return best_all, lam, scores, alphas_all, betas_all


def _live(spec: _Specification, lower: torch.Tensor) -> torch.Tensor:
    """(N, rows): the rows not settled yet, of conjunctions not refuted and with a bound not above 0."""
    return spec.live(spec.closeness(lower)[0] > 0.0) & (lower <= 0.0)


def _raise(a: torch.Tensor, d: torch.Tensor, r: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A copy of a with its elements (d, r) (distinct pairs) raised to `values` where higher."""
    a = a.clone()
    a[d, r] = torch.maximum(a[d, r], values)
    return a


def _alpha_intermediate(g: Graph, bounds: list, iterations: int, deadline: float) -> list:
    """The pre-activation bounds of the unstable ReLUs after the first layer tightened by alpha-CROWN (one
    domain, at the root of a ReLU split: every later domain inherits them), layer by layer; every iterate's
    bound is valid, the best is kept."""
    bounds = list(bounds)
    for k in sorted({g.nodes[r].inputs[0] for r in g.relus}):
        lb, ub = bounds[k]
        idx = torch.nonzero(((lb < 0) & (ub > 0)).flatten(1)[0]).flatten()
        earlier = [r for r in g.relus if r < k]
        widest = max(math.prod(g.nodes[j].shape) for j in range(k + 1))
        if not len(idx) or not earlier or clock.now() > deadline or 2 * len(idx) * widest > P.ELEMENTS:
            continue  # (an image layer with thousands of unstable neurons keeps CROWN's bounds: memory)
        c = len(idx)
        C = torch.zeros(1, 2 * c, math.prod(lb.shape[1:]), dtype=torch.float64)
        C[0, torch.arange(c), idx], C[0, c + torch.arange(c), idx] = 1.0, -1.0
        C = C.view(1, 2 * c, *lb.shape[1:])
        alphas = {}
        for r in earlier:
            a, b = bounds[g.nodes[r].inputs[0]]
            if ((a < 0) & (b > 0)).any():
                alphas[r] = (b > -a).double().unsqueeze(1).expand(1, 2 * c, *a.shape[1:]).clone().requires_grad_(True)
        best = torch.full((1, 2 * c), -torch.inf, dtype=torch.float64)
        opt = torch.optim.Adam(list(alphas.values()), lr=0.1) if alphas else None
        for _ in range(iterations if opt else 1):
            with torch.enable_grad():
                b, _ = P.backward(g, k, C, bounds, alphas)
                best = torch.maximum(best, b.detach())
                if opt is None or clock.now() > deadline:
                    break
                opt.zero_grad()
                (-b.sum()).backward()
            opt.step()
            with torch.no_grad():
                for a in alphas.values():
                    a.clamp_(0.0, 1.0)
        flo, fhi = lb.flatten(1).clone(), ub.flatten(1).clone()
        flo[0, idx] = torch.maximum(flo[0, idx], best[0, :c])
        fhi[0, idx] = torch.minimum(fhi[0, idx], -best[0, c:])
        bounds[k] = (flo.view_as(lb), fhi.view_as(ub))
        for q in range(k + 1, len(g.nodes)):  # what follows, by intervals, intersected with what it had
            a, b = P._ibp(g, q, bounds)
            bounds[q] = (torch.maximum(a, bounds[q][0]), torch.minimum(b, bounds[q][1]))
    return bounds


def _smooth_rounds(g: Graph, lo: torch.Tensor, hi: torch.Tensor, spec: _Specification, deadline: float,
                   float32: float, iterations: int = 40) -> Outcome:
    """A network of S-shaped activations only, where nothing can be split: rounds of alpha-CROWN until the
    deadline, each with twice the iterations of the one before (up to SMOOTH_ITERATIONS), every layer's slopes
    optimised again from the intermediate bounds of the round before (`propagation.smooth_intermediate`: they
    only tighten, and stay valid); starting each round from the slopes the round before ended with was measured
    and left off (the same bounds on the sigmoid networks of `tests/test_bab_search.py`);
    the best bound of each row over the rounds is kept. 20 iterations leave most of eran's sigmoid instances open
    that 60 to 160 prove."""
    best, bounds, rounds = None, None, 0
    while clock.now() < deadline and iterations <= SMOOTH_ITERATIONS:
        r = P.lower_bound(g, lo, hi, spec.A, "alpha-crown", bounds=bounds, iterations=iterations, rhs=spec.b,
                          deadline=deadline, target=0.0)
        best = r.lower if best is None else torch.maximum(best, r.lower)
        bounds, rounds, iterations = r.bounds, rounds + 1, 2 * iterations
        close = spec.closeness(best)[1]
        if bool((close > 0).all()):
            return Outcome("holds", boxes=rounds, least=float(close.min()), float32=float32,
                           method=f"alpha-CROWN on the S-shaped activations, {rounds} rounds (layer graph)")
    worst = float(spec.closeness(best)[1].min()) if best is not None else -math.inf
    return Outcome("unknown", boxes=rounds, reason=f"no ReLU to split; alpha-CROWN after {rounds} rounds leaves a "
                                                    f"margin of {worst:.4g}")


def _branch(g: Graph, pre: list, d: _Domains, at: torch.Tensor) -> _Domains:
    """Both children of each domain for the neuron at flat position `at` (over the pre-activation nodes in
    order): the "on" children first, then the "off" ones; their bounds clamped and tightened, `empty` set
    where they contradict the decisions."""
    n = len(d)
    offsets = np.cumsum([0, *[math.prod(g.nodes[j].shape) for j in pre]])
    kids = d.take(torch.arange(n).repeat(2))
    sign = torch.cat([torch.ones(n), -torch.ones(n)]).double()
    splits = {j: v.clone() for j, v in kids.splits.items()}
    for q, j in enumerate(pre):
        here = torch.nonzero((at >= offsets[q]) & (at < offsets[q + 1])).flatten()
        if len(here):
            rows = torch.cat([here, here + n])
            splits[j].view(2 * n, -1)[rows, (at[here] - int(offsets[q])).repeat(2)] = sign[rows]
    bounds = [(a.clone(), b.clone()) for a, b in kids.bounds]
    _clamp(bounds, splits)
    bounds = _tighten(g, bounds, splits)
    kids.splits, kids.bounds = splits, bounds
    kids.empty = torch.zeros(2 * n, dtype=torch.bool)
    for a, b in bounds[1:]:
        kids.empty |= (a > b).flatten(1).any(1)
    return kids


def split_relus(g: Graph, lower: np.ndarray, upper: np.ndarray, conjunctions, deadline: float, candidate=None,
                batch: int = 128, iterations: int = 10, shortlist: int = 1, max_domains: int = 2_000_000) -> Outcome:
    """Prove that no x in [lower, upper] has A_c f(x) <= b_c for any conjunction c, by splitting ReLUs with
    the decisions carried into the bounds as Lagrangian terms (beta-CROWN, Wang et al. 2021).

    The root is bounded by CROWN (every unstable neuron's bounds refined, those after the first layer by
    `ROOT_ITERATIONS` of alpha-CROWN) and alpha-CROWN on the output rows. An open domain splits its unstable
    neuron of largest BaBSR score (the intercept of its upper relaxation weighted by what the live rows' bounds
    lose through it, plus its bias term); each child clamps the neuron's
    bounds, tightens the later interval bounds, and optimises alpha and beta on the output rows from its
    parent's (the intermediate bounds of the parent stay valid, as in alpha-beta-CROWN's BaB). Domains are
    bounded `batch` at a time (both children of each), depth first. A domain whose bounds contradict its
    decisions is empty. Counterexamples: `candidate(x)` on the corner of the box minimising the worst row's
    linear bound of each open domain.
    """
    shape = g.nodes[0].shape
    fast = G.astype(g, torch.float32)
    lo = torch.from_numpy(np.asarray(lower, np.float64)).view(1, *shape)
    hi = torch.from_numpy(np.asarray(upper, np.float64)).view(1, *shape)
    spec, float32 = _specification(g, lo, hi, conjunctions, mix=False)
    pre = sorted({g.nodes[r].inputs[0] for r in g.relus})
    if not pre:  # S-shaped activations only (a sigmoid network): nothing to split, the bounds alone decide
        return _smooth_rounds(g, lo, hi, spec, deadline, float32)
    bounds = P.intermediate(g, lo, hi, "crown", deadline=deadline)
    bounds = _alpha_intermediate(g, bounds, ROOT_ITERATIONS, deadline)
    splits = {j: torch.zeros(1, *g.nodes[j].shape, dtype=torch.float64) for j in pre}
    lower_, lam, scores, alphas, betas = _optimise(g, lo, hi, spec, bounds, splits, {}, {}, iterations, deadline)
    done = 1
    root = _Domains(splits, bounds, alphas, betas, lower_, scores, lam)
    open_, least = root.take(spec.closeness(lower_)[1] <= 0.0), _least(math.inf, spec.closeness(lower_)[1])
    stuck = 0

    def corners(d: _Domains):
        if candidate is None or not len(d):
            return None
        x = torch.where(d.lam > 0, lo.flatten(1), hi.flatten(1))  # the minimiser of the worst row's linear bound
        return candidate(x.numpy())

    found = corners(open_)
    if found is not None:
        return Outcome("violated", found, done, method="bound-guided corner")
    # per domain and row, alpha, beta and their gradients: about 48 bytes per ReLU; about 400 MB a batch at most
    per_domain = 48 * spec.A.shape[0] * sum(math.prod(g.nodes[r].shape) for r in g.relus)
    batch = max(1, min(batch, int(4e8 // max(per_domain, 1))))
    while len(open_):
        if clock.now() > deadline:
            return Outcome("unknown", boxes=done, reason=f"budget exhausted with {len(open_)} ReLU-split domains "
                                                          "open")
        if done > max_domains:
            return Outcome("unknown", boxes=done, reason=f"more than {max_domains} domains")
        take, open_ = open_.take(slice(0, batch)), open_.take(slice(batch, None))
        flat = torch.cat([take.scores[j].flatten(1) for j in pre], 1)
        ok = flat.max(1).values >= 0
        stuck += int((~ok).sum())  # every ReLU decided and still open: nothing left to split
        take = take.take(ok)
        n = len(take)
        if not n:
            continue
        # filtered smart branching (De Palma et al. 2021): the `shortlist` best neurons by BaBSR score, both
        # children of each bounded once with the parent's alpha and beta, the one nearest to refutation kept
        k = min(shortlist, flat.shape[1])
        cand = flat[ok].topk(k, dim=1).indices  # (n, k)
        if k > 1:
            trial = _branch(g, pre, take.take(torch.arange(n).repeat(k)), cand.T.flatten())
            q = spec.closeness(_optimise(g, lo.expand(2 * k * n, *shape), hi.expand(2 * k * n, *shape), spec,
                                         trial.bounds, trial.splits, trial.alphas, trial.betas, 1, deadline,
                                         trial.lower)[0])[1]
            q = torch.where(trial.empty, torch.inf, q).view(2, k, n)
            pick = q.clamp_max(0).sum(0).argmax(0)  # (n,)
            done += 2 * k * n
            at = cand[torch.arange(n), pick]
        else:
            at = cand[:, 0]
        kids = _branch(g, pre, take, at)
        lo_n, hi_n = lo.expand(2 * n, *shape), hi.expand(2 * n, *shape)
        lower_, lam, scores, alphas, betas = _optimise(g, lo_n, hi_n, spec, kids.bounds, kids.splits, kids.alphas,
                                                       kids.betas, iterations, deadline, kids.lower, fast)
        done += 2 * n
        splits, bounds, empty = kids.splits, kids.bounds, kids.empty
        children = _Domains(splits, bounds, alphas, betas, lower_, scores, lam)
        close = spec.closeness(lower_)[1]
        least = _least(least, close[~empty])
        keep = (close <= 0.0) & ~empty
        children = children.take(keep)
        found = corners(children)
        if found is not None:
            return Outcome("violated", found, done, method="bound-guided corner")
        open_ = _Domains.cat([children, open_]) if len(children) else open_
    if stuck:
        return Outcome("unknown", boxes=done, reason=f"{stuck} domains with every ReLU decided stay open")
    return Outcome("holds", boxes=done, least=least, float32=float32)


def decide(g: Graph, lower: np.ndarray, upper: np.ndarray, conjunctions, deadline: float, candidate=None,
           search=None) -> Outcome:
    """holds / violated / unknown for "no x in [lower, upper] meets any conjunction (A, b): A f(x) <= b":
    input splitting for low-dimensional inputs, ReLU splitting (beta-CROWN) otherwise."""
    if math.prod(g.nodes[0].shape) <= INPUT_SPLIT_MAX:
        out = split_inputs(g, lower, upper, conjunctions, deadline, candidate, search)
        out.method = out.method or "input splitting (CROWN + alpha-CROWN on the layer graph)"
    else:
        out = split_relus(g, lower, upper, conjunctions, deadline, candidate)
        out.method = out.method or "ReLU splitting (beta-CROWN on the layer graph)"
    return out
