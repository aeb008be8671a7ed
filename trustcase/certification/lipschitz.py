"""Lipschitz certification: a guaranteed upper bound of the L2 Lipschitz constant of the logit map.

`upper_bound(model, input_shape)` composes per-node operator-norm bounds over the model's layer graph
(`graph.read`: the one reading of a model, the bound engine's too; eager modules through torch.fx, so residual
additions and concatenations are seen; TorchScript as the plain chain of a traced nn.Sequential). Every bound is
an upper bound by construction, and on every machine: each float64 figure is widened by its own rounding error,
derived from the arithmetic in `certification.rounding` (SVD and FFT errors, gamma_n for n accumulated
roundings; about 1e-12 relative for the solar CNN), never by a tolerance measured on one CPU:

- a dense map (Linear): the spectral norm (float64 SVD).
- a convolution (Conv2d, zero padding, any stride, dilation, groups; average pooling, a depthwise convolution of
  constant kernels): the norm of the CIRCULAR convolution on the padded input size, computed exactly in the
  Fourier domain (largest singular value of the per-frequency channel matrices, Sedghi et al. 2019). The
  zero-padded operator is a restriction of that circular operator (embed, convolve, select), and stride is a
  subsampling, so its norm is <=.
- eval-mode BatchNorm: folded into the Conv2d/Linear before it by the graph (the folded weight's rounding,
  FOLDED relative per entry, adds FOLDED || |W| ||), otherwise max |gamma / sqrt(var + eps)|.
- ReLU 1, sigmoid 1/4, tanh 1; a layer the graph keeps whole (an "op" node, a max pooling's tree) states its
  own constant: its largest slope (GELU 1.13, SiLU 1.1, LeakyReLU max(1, |a|), ...), GroupSort and pixel
  shuffles 1 (permutations), max pooling sqrt(largest number of windows covering one input).
- reshapes, permutations, padding: 1; residual additions: sum of |scale| L_i; concatenation: sqrt(sum L_i^2);
  multiplication by a number c: |c|.
An unsupported layer is an error naming it, never silently treated as 1-Lipschitz.

Certified radius (L2): with the last node a dense map W after a body of Lipschitz bound L_body, the
pairwise form  r(x) = min_{j != y} (z_y - z_j) / (||W_y - W_j|| L_body); otherwise
r(x) = (z_y - z_2nd) / (sqrt(2) L). The check states radii in the input scaled to [0, 1]
(pixel / (max - min) of model.value_range), i.e. L is divided by min(normalisation std). The check
`lipschitz` packs these as evidence.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from trustcase.certification import graph as G
from trustcase.certification.graph import FOLDED  # noqa: F401 - the folded weight's rounding, with the bound
from trustcase.certification.rounding import gamma, widen
from trustcase.errors import UserError
from trustcase.models.lipschitz_layers import conv2d_norm, matrix_norm
from trustcase.seeding import content_id, item_seed


class LipschitzError(UserError, ValueError):
    """The model cannot be bounded (unsupported layer, training mode, input shape)."""


@dataclass
class Bound:
    """The result: total bound of the logit map, and the split body/head for pairwise radii."""

    total: float
    layers: list[dict] = field(default_factory=list)  # name, kind, bound
    body: float | None = None  # bound of the map up to the last dense map
    head: torch.Tensor | None = None  # that last dense map's weight (C, K)


# --- per-node operator norms -------------------------------------------------------------------------

SLOPE = {"relu": 1.0, "sigmoid": 0.25, "tanh": 1.0}  # sup |f'| of the graph's activation nodes
ISOMETRIES = (G.Reshape, G.Permute, G.Pad, G.Place)  # norm 1 (padding and placing embed: norm 1 too)


def map_norm(mp: G.Map, in_shape: tuple[int, ...], rounded: float = 0.0) -> float:
    """Upper bound of the operator norm of one linear map on inputs of in_shape (no batch). `rounded`: each weight
    entry may carry that relative rounding error; an entrywise error e |W| moves the norm by at most e || |W| ||."""
    if isinstance(mp, ISOMETRIES):
        return 1.0
    if isinstance(mp, G.Scale):  # entrywise: the largest factor (its own roundings in `rounded`)
        return widen(float(mp.s.abs().max()) * (1 + rounded), 0.0)
    if isinstance(mp, G._Windows):
        return map_norm(mp.conv, in_shape)
    if isinstance(mp, G.Dense | G.Mix):
        def norm(w: torch.Tensor) -> float:
            return matrix_norm(w)
        w = mp.W if isinstance(mp, G.Dense) else mp.S
    elif isinstance(mp, G.Conv):
        def norm(w: torch.Tensor) -> float:
            return conv2d_norm(w, mp.in_shape[1:], mp.stride, mp.padding, mp.dilation, mp.groups)
        w = mp.W
    else:
        raise LipschitzError(f"no Lipschitz bound for the linear map {type(mp).__name__}")
    try:
        return widen(norm(w) + rounded * norm(w.abs()), 0.0) if rounded else norm(w)
    except ValueError as e:
        raise LipschitzError(str(e)) from None


def _kind(node: G.Node) -> str:
    """What a node does, in the table's words: linear, conv2d, avgpool, batchnorm, maxpool2d, activation, ..."""
    layer = node.layer[node.layer.rindex("(") + 1:-1] if node.layer else ""
    if "MaxPool" in layer:
        return "adaptive_maxpool2d" if layer.startswith("Adaptive") else "maxpool2d"
    if node.kind != "affine":
        return "activation"
    kinds = {G.Dense: "linear", G.Conv: "avgpool" if "AvgPool" in layer else "conv2d",
             G.Scale: "batchnorm" if "BatchNorm" in layer else "scale"}
    return "+".join(kinds.get(type(mp), type(mp).__name__.strip("_").lower()) for mp in node.maps)


def bound_graph(g: G.Graph) -> Bound:
    """The Lipschitz bound of the graph's output in its input, composed over the nodes the output depends on."""
    L: dict[int, float] = {0: 1.0}
    own: dict[int, float] = {}  # each node's own constant (the rows of the table)
    ops = 0  # roundings of the composition: each node's products and sums

    def lip(i: int) -> float:
        nonlocal ops
        if i in L:
            return L[i]
        node = g.nodes[i]
        if node.lipschitz is not None:  # a layer read whole: its constant
            j, c = node.lipschitz
            own[i], L[i] = c, c * lip(j)
        elif node.kind in SLOPE:
            own[i], L[i] = SLOPE[node.kind], SLOPE[node.kind] * lip(node.inputs[0])
        elif node.kind == "affine":
            norms = [map_norm(mp, g.nodes[j].shape, node.rounded) for mp, j in zip(node.maps, node.inputs,
                                                                                 strict=True)]
            terms = [n * lip(j) for n, j in zip(norms, node.inputs, strict=True)]
            if len(terms) == 1:
                own[i] = norms[0]
                L[i] = terms[0]
            elif all(isinstance(mp, G.Place) for mp in node.maps):  # disjoint places: the squares add
                L[i] = math.sqrt(sum(t * t for t in terms))
            else:
                L[i] = sum(terms)
        else:
            raise LipschitzError(f"{node.layer or node.name}: no Lipschitz bound for a {node.kind!r} node")
        ops += 1 if len(node.inputs) == 1 else 2 * len(node.inputs) + 1  # products, sums, a square root
        return L[i]

    out = len(g.nodes) - 1
    total = lip(out)
    rounding = gamma(max(ops, 1))
    rows = [{"name": g.nodes[i].name, "kind": _kind(g.nodes[i]), "bound": own[i]} for i in sorted(own)
            if not (g.nodes[i].kind == "affine" and isinstance(g.nodes[i].maps[0], ISOMETRIES) and own[i] == 1.0)]
    head, body = None, None
    node = g.nodes[out]
    if node.kind == "affine" and node.lipschitz is None and len(node.maps) == 1 and isinstance(node.maps[0], G.Dense) \
            and not node.rounded:  # the logits' own dense map: pairwise radii
        head, body = node.maps[0].W, widen(lip(node.inputs[0]), rounding)
    return Bound(total=widen(total, rounding), layers=rows, body=body, head=head)


def analyse(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> Bound:
    """Upper bound of the L2 Lipschitz constant of `model` (eval mode) on inputs of `input_shape` (no batch)."""
    try:
        g = G.read(model, input_shape)
    except G.GraphError as e:
        raise LipschitzError(f"{e} (the Lipschitz bound)") from None
    return bound_graph(g)


def upper_bound(model: nn.Module, input_shape: tuple[int, ...] | list[int]) -> float:
    """A guaranteed upper bound of the L2 Lipschitz constant of the logit map (model input space)."""
    return analyse(model, input_shape).total


# --- radii and the empirical lower bound -------------------------------------------------------

def certified_radii(logits: np.ndarray, bound: Bound, input_scale: float = 1.0) -> np.ndarray:
    """Per-item L2 radius within which the arg-max cannot change (input_scale: d(model input)/d(input)).

    The float64 quotient is shrunk by its own rounding (the norm of a K-vector difference, three products, a
    difference and a division: gamma_{K + 6}). The logits are taken as given: the rounding of the forward
    pass that produced them is not bounded here (the check says so in its validity conditions).
    """
    z = np.asarray(logits, np.float64)
    y = z.argmax(1)
    if bound.head is not None and bound.body is not None:
        w = bound.head.numpy()
        diff = np.linalg.norm(w[:, None, :] - w[None, :, :], axis=2)  # ||W_i - W_j||
        lip = diff[y] * bound.body * input_scale  # (B, C)
        margin = z[np.arange(len(z)), y][:, None] - z
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(lip > 0, margin / lip, np.inf)
        r[np.arange(len(z)), y] = np.inf
        return r.min(axis=1) * (1 - gamma(w.shape[1] + 6))
    top2 = np.sort(z, axis=1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) / (math.sqrt(2) * bound.total * input_scale) * (1 - gamma(6))


def empirical_lower_bound(forward, x: torch.Tensor, steps: int = 50, eps: float = 1e-3, lr: float = 0.01,
                          seed: int = 0) -> float:
    """Largest ||f(x) - f(y)|| / ||x - y|| found by gradient ascent from the points x (a lower bound of L).

    Pairs at distance eps are moved (Adam) to increase the ratio; the Jacobian spectral norm at the
    final points (exact local slope where f is differentiable) is included too.
    """
    if isinstance(forward, nn.Module):
        forward = _double(forward)
    x = x.detach().double().clone().requires_grad_(True)
    d = torch.stack([torch.randn(v.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(
        item_seed(seed, "lipschitz", content_id(v), "direction"))) for v in x.detach()])  # per item, any batch
    d = (d / d.flatten(1).norm(dim=1).view(-1, *[1] * (x.ndim - 1)) * eps).requires_grad_(True)
    opt = torch.optim.Adam([x, d], lr=lr)
    best = 0.0
    for _ in range(steps):
        dn = d.flatten(1).norm(dim=1)
        ratio = (forward(x + d) - forward(x)).flatten(1).norm(dim=1) / dn
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
        with torch.no_grad():  # back to the sphere of radius eps
            d.mul_(eps / d.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.ndim - 1)))
    xj = x.detach().clone().requires_grad_(True)
    out = forward(xj)
    rows = [torch.autograd.grad(out[:, c].sum(), xj, retain_graph=True)[0].flatten(1) for c in range(out.shape[1])]
    jac = torch.stack(rows, 1)  # (B, C, D)
    best = max(best, float(torch.linalg.matrix_norm(jac, ord=2).max()))
    return best


# --- the check ---------------------------------------------------------------------------------

















def _double(module: nn.Module):
    """A float64 copy of the model for the ascent (ratios of tiny differences need the precision)."""
    try:
        return copy.deepcopy(module).double()
    except Exception:  # a module that cannot be copied: float32, inputs cast
        return lambda x: module(x.float()).double()

