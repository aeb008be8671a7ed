"""Tests written from the survivors of the certification chunk's seeded sample (`make mutants MUTANTS="--sample 250
--seed 0 certification"`, seed 0), second round: each pins what a certificate, its table or a 1-Lipschitz layer
must do, against an exact answer (a closed form, rationals, a permutation), never against one CPU's float output."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from test_smoothing import classifier
from torch import nn

from trustcase.certification import graph as G
from trustcase.certification import lipschitz as L
from trustcase.certification import smoothing as S
from trustcase.certification.rounding import U32, U64, fft_error, gamma, widen
from trustcase.models import lipschitz_layers as LL


def test_the_lipschitz_table_names_each_layer_by_what_it_does():
    """A convolution with its BatchNorm folded in, a ReLU, a BatchNorm standing alone (an entrywise scale), an
    average pooling and a dense map: the table's rows say so, one per layer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.BatchNorm2d(2), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    rows = [(r["name"], r["kind"]) for r in L.analyse(m, (1, 8, 8)).layers]
    assert rows == [("0+1", "conv2d"), ("2", "activation"), ("3", "batchnorm"), ("4", "avgpool"), ("6", "linear")]


def test_a_folded_batchnorm_leaves_room_for_the_rounding_of_its_folded_weight():
    """The folded weight W' = diag(gamma / sqrt(var + eps)) W carries a relative rounding e per entry (the node's
    `rounded`): the true map is W' + E with |E| <= e |W'|, so its norm is at most ||W'|| + e || |W'| ||. The row's
    bound must be at least that sum, computed exactly from the same float64 figures (rationals)."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).eval()
    with torch.no_grad():
        m[1].running_var.uniform_(0.3, 3.0)
        m[1].weight.uniform_(-2.0, 2.0)
    g = G.read(m, (4,))
    (i, node), = [(i, n) for i, n in enumerate(g.nodes) if n.kind == "affine" and n.rounded]
    w = node.maps[0].W
    row = next(r for r in L.bound_graph(g).layers if r["name"] == node.name)
    needed = Fraction(LL.matrix_norm(w)) + Fraction(node.rounded) * Fraction(LL.matrix_norm(w.abs()))
    assert Fraction(row["bound"]) >= needed > Fraction(LL.matrix_norm(w))


def test_a_node_without_a_stated_constant_is_refused_naming_its_layer():
    """An "op" node (a layer the bound engine keeps whole) must state its Lipschitz constant; one that does not
    (a partner's graph) is an error naming the layer, never treated as 1-Lipschitz."""
    g = G.read(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)).eval(), (2,))
    relu = next(i for i, n in enumerate(g.nodes) if n.kind == "relu")
    g.nodes[relu] = dataclasses.replace(g.nodes[relu], kind="op", lipschitz=None)
    with pytest.raises(L.LipschitzError, match=r"^layer 1 '1' \(ReLU\): no Lipschitz bound for a 'op' node$"):
        L.bound_graph(g)


def test_the_windows_of_a_max_pooling_have_the_norm_of_their_overlap():
    """The windows of a 3 x 3, stride-1 max pooling: nine shifted copies of the input stacked, so (circularly) the
    operator norm is sqrt(9) = 3 exactly; the certified figure is 3 widened by its rounding margins only."""
    g = G.read(nn.Sequential(nn.MaxPool2d(3, stride=1)).eval(), (1, 7, 7))
    [node] = [n for n in g.nodes if n.maps and isinstance(n.maps[0], G._Windows)]
    norm = L.map_norm(node.maps[0], g.nodes[node.inputs[0]].shape)
    assert 3.0 <= norm <= 3.0 * (1 + 1e-10)


def test_the_lipschitz_lower_bound_is_the_same_on_every_call():
    """The ascent's start directions follow (seed, item): the same points give the same lower bound, bit for bit,
    whatever ran before (a direction drawn from the global random state would move it)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).eval()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    first = L.empirical_lower_bound(net, x, steps=5)
    torch.randn(100)  # the global random state moves
    assert L.empirical_lower_bound(net, x, steps=5) == first
    assert L.empirical_lower_bound(net, x, steps=5, seed=0) == first  # no seed given: the run's default, 0


def test_bjorck_orthonormalises_the_columns_of_a_tall_matrix():
    """A 5 x 3 matrix gets orthonormal columns (Q^T Q = I) and keeps its shape; its 3 x 5 transpose the rows."""
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    q = LL.bjorck(w)
    assert q.shape == (5, 3)
    assert torch.allclose(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(LL.bjorck(w.T), q.T, atol=1e-12)


def test_bake_leaves_the_model_it_copies_untouched():
    """bake returns a baked copy: the model being trained keeps its Lipschitz layers and its training mode."""
    model = nn.Sequential(LL.LipschitzConv2d(1, 2, 3, (6, 6), padding=1), LL.GroupSort(2), nn.Flatten(),
                          LL.BjorckLinear(72, 3)).train()
    baked = LL.bake(model)
    assert [type(m) for m in model] == [LL.LipschitzConv2d, LL.GroupSort, nn.Flatten, LL.BjorckLinear]
    assert model.training and all(m.training for m in model)
    assert [type(m) for m in baked] == [nn.Conv2d, LL.GroupSort, nn.Flatten, nn.Linear] and not baked.training


def test_group_sort_and_scaled_pooling_default_to_pairs_and_two_by_two_windows():
    """GroupSort() is MaxMin (groups of 2, sorted ascending); ScaledAvgPool2d() sums 2 x 2 windows / 2."""
    x = torch.tensor([[3.0, 1.0, 2.0, 5.0, 4.0, 0.0]])
    assert torch.equal(LL.GroupSort()(x), torch.tensor([[1.0, 3.0, 2.0, 5.0, 0.0, 4.0]]))
    img = torch.arange(16.0).view(1, 1, 4, 4)
    expected = torch.tensor([[[[0 + 1 + 4 + 5, 2 + 3 + 6 + 7], [8 + 9 + 12 + 13, 10 + 11 + 14 + 15]]]],
                            dtype=torch.float32) / 2
    assert torch.equal(LL.ScaledAvgPool2d()(img), expected)


def test_a_lipschitz_convolution_is_a_function_of_its_weights():
    """Its power iteration starts from a fixed vector: two layers given the same weights compute the same map,
    whatever the caller's random state when they were made."""
    torch.manual_seed(6)
    a = LL.LipschitzConv2d(2, 3, 3, (5, 5), padding=1).eval()
    torch.manual_seed(7)
    b = LL.LipschitzConv2d(2, 3, 3, (5, 5), padding=1).eval()
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def _documented_fft_error(points: int) -> Fraction:
    """Higham's Theorem 24.2 as rounding.fft_error documents it, in rationals (sqrt 2 from above)."""
    u = Fraction(U64)
    g4 = 4 * u / (1 - 4 * u)
    stages = max(1, math.ceil(math.log2(2 * max(points, 1))))
    eta = u + g4 * (Fraction(math.sqrt(2)) + u)
    return 3 * stages * eta / (1 - 3 * stages * eta) + g4


@pytest.mark.parametrize("points", [1, 2, 8, 36, 1000])
def test_the_fft_error_bound_is_highams(points):
    """log2 of the next power of two of 2n stages (one for a single point), three FFTs for Bluestein, gamma_4: the
    float64 figure is the documented bound up to its own few roundings."""
    exact = _documented_fft_error(points)
    assert abs(Fraction(fft_error(points)) - exact) <= exact * Fraction(1, 10 ** 12)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_convolution_is_widened_by_the_whole_fft_margin(groups):
    """On a 1 x 1 input (one point: its transform is the identity, exact) a depthwise 1 x 1 kernel c is c times the
    identity, each group's channel matrix [c]: the norm is |c| exactly. The bound must still carry the FFT's
    documented error, fft_error(P) sqrt(P groups r) relative (P = 1 point, r = 1): checked in rationals against
    |c| / (1 - that)."""
    c = 1.7
    w = torch.full((groups, 1, 1, 1), c, dtype=torch.float64)
    margin = Fraction(fft_error(1)) * Fraction(math.sqrt(groups))
    assert Fraction(LL.conv2d_norm(w, (1, 1), groups=groups)) >= Fraction(c) / (1 - margin)


def test_a_unit_norm_weight_has_norm_at_most_one_after_its_float32_rounding():
    """unit_norm leaves room for the float32 rounding of each entry of w / b ((U32 + 2 U64) || |w| || in all):
    for rows (1000, 1000 t) the float32 weight's norm, squared exactly in rationals, never exceeds 1 (a room
    scaled down by || |w| || = 1000 sqrt(1 + t^2) would let about half the rows' rounding up through). And the
    room costs little: the norm stays above 1 - 4 U32."""
    for t in np.linspace(0.05, 0.95, 101):
        w = torch.tensor([[1000.0, 1000.0 * t]], dtype=torch.float64)
        q = LL.unit_norm(w, LL.matrix_norm)
        assert q.dtype == torch.float32
        sq = sum(Fraction(float(v)) ** 2 for v in q.flatten())
        assert (1 - 4 * Fraction(U32)) ** 2 <= sq <= 1, t


def test_predict_draws_the_noise_of_the_randomized_smoothing_check_by_default():
    """The randomized_smoothing check calls PREDICT without naming itself: its noise must be that check's stream
    (seed, "randomized_smoothing", item, ...). On the boundary each vote is a coin toss, so 200 items with 9 votes
    each abstain or not by their draws: another check's name gives another pattern."""
    clf = classifier([1.0], -0.5)
    x = np.full((200, 1), 0.5, np.float32)
    ids = [f"cell{k}" for k in range(200)]
    kw = dict(sigma=0.25, n=9, alpha=0.2, seed=5, ids=ids)
    by_default = S.predict(clf, x, **kw)
    assert np.array_equal(by_default, S.predict(clf, x, check="randomized_smoothing", **kw))
    assert not np.array_equal(by_default, S.predict(clf, x, check="segmentation_smoothing", **kw))
    assert 0 < (by_default == S.ABSTAIN).sum() < 200


def test_the_composition_of_one_node_counts_one_rounding():
    """A graph of one dense map composes nothing: its bound is the map's certified norm widened by gamma_1 (one
    product), not by gamma_2 (an extra rounding counted), in IEEE arithmetic, correctly rounded on every CPU. The two
    differ by about u, less than an ulp for some norms: 61 weights make sure some norm tells them apart."""
    lin = nn.Linear(1, 1, bias=False).eval()
    for w in np.linspace(1.0, 7.0, 61):
        with torch.no_grad():
            lin.weight.fill_(float(w))
        assert L.analyse(lin, (1,)).total == widen(LL.matrix_norm(lin.weight), gamma(1)), w
    assert widen(widen(1.5, gamma(1)), gamma(1)) != widen(widen(1.5, gamma(1)), gamma(2))  # 1.5: one such norm
