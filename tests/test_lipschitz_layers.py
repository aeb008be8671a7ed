"""1-Lipschitz layers against exact answers: dense operator norms, permutations, orthogonal maps; and the
Lipschitz bound of models built from them, eager, baked and traced: between the measured slope and the
product of the layer constants."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from trustcase.certification import lipschitz as L
from trustcase.certification.rounding import U32, U64, gamma, svd_error
from trustcase.models import lipschitz_layers as lip

# Tolerances come from the arithmetic (certification.rounding), never from one CPU's result. The certified
# figures carry float64 margins of about 1e-12 and must absorb the float32 rounding of exported weights (about
# 6e-8): "at most 1 + 1e-9" tests that a margin is there and not vastly larger than derived.
LOOSE = 1e-9


def dense(layer: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A linear layer (bias removed) as a matrix on inputs of `shape`, column by column."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        return layer.double()(eye).reshape(n, -1).T


def trained(model: nn.Module, shape: tuple[int, ...], steps: int = 20) -> nn.Module:
    """A few optimiser steps, so that the weights and the power-iteration vectors have moved."""
    torch.manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(torch.randn(8, *shape)).square().mean()
        opt.zero_grad()
        (-loss).backward()  # push the gain up: the normalisation must hold it at 1
        opt.step()
    return model.eval()


def traced(model: nn.Module, shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """Baked, traced, saved and loaded, as the solar-cell script exports it."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(lip.bake(model), torch.zeros(1, *shape)), buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("cfg", [(1, 4, 3, 1, 1, 8), (3, 5, 3, 1, 1, 6), (4, 2, 3, 2, 1, 8), (2, 6, 1, 1, 0, 5)])
def test_a_baked_convolution_has_operator_norm_at_most_one(cfg):
    cin, cout, k, s, p, hw = cfg
    conv = trained(lip.LipschitzConv2d(cin, cout, k, (hw, hw), stride=s, padding=p, bias=False), (cin, hw, hw))
    baked = conv.baked()
    # divided by the circular bound on the padded size and room for the float32 rounding of the weight: the
    # zero-padded operator's norm is at most 1 exactly, so its float64 SVD at most 1 + that SVD's error
    matrix = dense(baked, (cin, hw, hw))
    norm = torch.linalg.matrix_norm(matrix, 2).item()
    assert 0.9 <= norm <= 1 + svd_error(*matrix.shape)
    # the certificate of the baked layer: above its norm, below 1 + LOOSE
    bound = L.upper_bound(baked.float(), (cin, hw, hw))
    assert norm * (1 - svd_error(*matrix.shape)) <= bound <= 1 + LOOSE
    # before baking, the layer divides by the power-iteration estimate: the bound reads the float32 weight it
    # applies (weight / sigma, rounded), whose exact norm the float64 SVD of that weight's dense matrix gives
    applied = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
    with torch.no_grad():
        applied.weight.copy_(conv.weight / conv.sigma())
    matrix = dense(applied, (cin, hw, hw))
    exact = torch.linalg.matrix_norm(matrix, 2).item()
    assert L.upper_bound(conv, (cin, hw, hw)) >= exact * (1 - svd_error(*matrix.shape))


def test_bjorck_linear_is_orthonormal_and_group_sort_is_a_permutation():
    lin = trained(lip.BjorckLinear(12, 4), (12,))
    s = torch.linalg.svdvals(lin.baked().weight.double())
    # orthonormal, divided by 1 + (U32 + 2 U64) || |q| || (||q|| = 1, || |q| || <= sqrt(12)) before rounding
    room = (U32 + 2 * U64) * 12 ** 0.5 + svd_error(4, 12)
    assert ((s <= 1 + svd_error(4, 12)) & (s >= 1 - 2 * room)).all()
    s_eager = torch.linalg.svdvals(lip.bjorck(lin.weight.double(), lin.iterations))
    assert s_eager.max().item() <= 1 + 1e-3  # 15 iterations in training: close to orthonormal already
    gs = lip.GroupSort(2)
    x, y = torch.randn(64, 6, 3, 3), torch.randn(64, 6, 3, 3)
    fx, fy = gs(x), gs(y)
    assert torch.equal(fx.flatten(1).sort(1).values, x.flatten(1).sort(1).values)  # same values, moved
    assert torch.equal(fx[:, 0::2], torch.minimum(x[:, 0::2], x[:, 1::2]))  # MaxMin: (min, max) per pair
    # the same values, permuted: their float32 norms differ only by the order of 54 squares summed
    assert ((fx - fy).flatten(1).norm(dim=1) <= (x - y).flatten(1).norm(dim=1) * (1 + gamma(56, U32))).all()
    pool = lip.ScaledAvgPool2d(2)
    matrix = dense(pool, (2, 4, 4))
    assert torch.linalg.matrix_norm(matrix, 2).item() == pytest.approx(1.0, abs=svd_error(*matrix.shape))


def small(width: int = 4, size: int = 8) -> nn.Sequential:
    return nn.Sequential(
        lip.LipschitzConv2d(1, width, 3, (size, size), padding=1), lip.GroupSort(2), lip.ScaledAvgPool2d(2),
        lip.LipschitzConv2d(width, 2 * width, 3, (size // 2, size // 2), padding=1, stride=2), lip.GroupSort(2),
        nn.Flatten(), lip.BjorckLinear(2 * width * (size // 4) ** 2, 3))


def test_a_model_of_these_layers_is_bounded_between_its_slope_and_the_product_of_constants():
    shape = (1, 8, 8)
    model = trained(small(), shape)
    script = traced(model, shape)
    upper = L.analyse(script, shape)
    assert upper.total <= 1 + LOOSE  # the product of the layer constants, all <= 1, and its rounding margins
    assert [r["kind"] for r in upper.layers] == ["conv2d", "activation", "avgpool", "conv2d", "activation",
                                                 "linear"]
    # eager = traced, but for the margins of their compositions: gamma of at most 2 roundings per graph node
    assert L.upper_bound(lip.bake(model), shape) == pytest.approx(upper.total, rel=gamma(64))
    torch.manual_seed(0)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        assert torch.allclose(script(x), lip.bake(model)(x), atol=1e-6)
    # sampled: the Jacobian's spectral norm at random points and the gradient ascent never exceed the bound
    xs = x.double().requires_grad_(True)
    out = lip.bake(model).double()(xs)
    jac = torch.stack([torch.autograd.grad(out[:, c].sum(), xs, retain_graph=True)[0].flatten(1)
                       for c in range(out.shape[1])], 1)
    assert torch.linalg.matrix_norm(jac, 2).max().item() <= upper.total
    lower = L.empirical_lower_bound(script, x, steps=30)
    assert 0 < lower <= upper.total
    # the eager model before baking: its power-iteration norms are estimates, the bound reads what it applies
    assert L.upper_bound(model, shape) >= lower


def test_the_bound_on_known_orthogonal_maps_is_one():
    torch.manual_seed(0)
    mix = nn.Conv2d(6, 6, 1, bias=False)  # an orthogonal channel mix at every pixel
    head = nn.Linear(24 * 4 * 4, 6)  # orthonormal rows
    with torch.no_grad():
        mix.weight.copy_(torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0].view(6, 6, 1, 1))
        head.weight.copy_(torch.linalg.qr(torch.randn(24 * 4 * 4, 6, dtype=torch.float64))[0].T)
    model = nn.Sequential(mix, lip.GroupSort(2), nn.PixelUnshuffle(2), nn.Flatten(), head).eval()
    for m in (model, traced(model, (6, 8, 8))):
        assert L.upper_bound(m, (6, 8, 8)) == pytest.approx(1.0, abs=1e-5)
    # an identity (Dirac) 3x3 convolution, zero-padded: exactly 1
    dirac = nn.Conv2d(2, 2, 3, padding=1, bias=False).eval()
    with torch.no_grad():
        nn.init.dirac_(dirac.weight)
    assert L.upper_bound(dirac, (2, 5, 5)) == pytest.approx(1.0, abs=1e-5)


class GroupSort(nn.Module):
    """Not trustcase's: returns the sort indices' order statistics mixed with the input (not a permutation)."""

    def forward(self, x):
        return x.unflatten(1, (-1, 2)).sort(dim=2).values.flatten(1, 2) * 3


def test_a_look_alike_layer_is_not_taken_for_a_1_lipschitz_one():
    shape = (2, 4, 4)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), GroupSort()).eval()
    with pytest.raises(L.LipschitzError, match="not supported"):
        L.upper_bound(model, shape)  # eager: traced into, the sort is not a known operation
    with pytest.raises(L.LipschitzError, match="GroupSort"):
        L.upper_bound(torch.jit.trace(model, torch.zeros(1, *shape)), shape)  # traced: another class, other ops
    with pytest.raises(L.LipschitzError, match="training mode"):
        L.upper_bound(small().train(), (1, 8, 8))
