"""Certifiers and statistics against answers known exactly: closed forms, hand computations, published
tables. Each test is written so that a plausible wrong implementation fails it (see docs/testing.md)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from trustcase.certification import graph as G
from trustcase.certification import lipschitz as L
from trustcase.certification import propagation as P
from trustcase.certification import smoothing as S
from trustcase.measurement import clopper_pearson, clopper_pearson_lower, wilson
from trustcase.models.classifier import Classifier
from trustcase.schemas import ModelSpec

# --- Lipschitz: pooling ----------------------------------------------------------------------------


def single_pixel_ratio(pool: nn.Module, side: int) -> float:
    """||pool(x + d) - pool(x)|| / ||d|| for x = 0 and d a bump on the centre pixel: a true lower bound."""
    x = torch.zeros(1, 1, side, side, dtype=torch.float64)
    d = torch.zeros_like(x)
    d[0, 0, side // 2, side // 2] = 1.0
    return float((pool(x + d) - pool(x)).norm() / d.norm())


@pytest.mark.parametrize(("kernel", "stride", "exact"), [
    (2, 2, 1.0),   # windows do not overlap: each input in one window
    (3, 3, 1.0),
    (3, 1, 3.0),   # 3x3 at stride 1: the centre pixel is in 9 windows, sqrt(9)
    (3, 2, 2.0),   # 2 windows per axis
    (2, 1, 2.0),
    (4, 1, 4.0),
])
def test_max_pooling_constant_is_exact(kernel, stride, exact):
    pool = nn.MaxPool2d(kernel, stride)
    bound = L.upper_bound(pool.eval(), (1, 9, 9))
    assert bound == pytest.approx(exact, rel=1e-12)
    # sound and tight: a one-pixel bump reaches the bound
    assert single_pixel_ratio(pool, 9) == pytest.approx(exact, rel=1e-12)


def test_max_pooling_in_a_network_multiplies_the_chain():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(2.0)
    net = nn.Sequential(conv, nn.MaxPool2d(3, 1), nn.Flatten()).eval()
    assert L.upper_bound(net, (1, 8, 8)) == pytest.approx(2.0 * 3.0, rel=1e-5)


def test_average_pooling_constant_is_exact():
    # non-overlapping 2x2 average: each output is the mean of 4 disjoint inputs, norm 1/2 (= 1/sqrt(4))
    assert L.upper_bound(nn.AvgPool2d(2, 2).eval(), (1, 8, 8)) == pytest.approx(0.5, rel=1e-5)
    # global average of 16 values: the row (1/16, ..., 1/16), norm 1/4
    assert L.upper_bound(nn.AdaptiveAvgPool2d(1).eval(), (1, 4, 4)) == pytest.approx(0.25, rel=1e-5)


# --- Lipschitz: activations ------------------------------------------------------------------------

ACTIVATIONS = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(), nn.Tanh(), nn.Softplus(), nn.Softsign(), nn.Sigmoid(),
               nn.Hardsigmoid(), nn.GELU(), nn.SiLU(), nn.Mish(), nn.Hardswish(), nn.LeakyReLU(0.01),
               nn.LeakyReLU(2.0), nn.ELU(0.5), nn.ELU(2.0)]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: repr(a))
def test_activation_constant_is_its_largest_slope(act):
    """sup |f'| on a fine grid (double precision, one-sided slopes at the kinks) vs the bound."""
    t = torch.linspace(-12, 12, 240_001, dtype=torch.float64)
    y = act(t)
    slope = float(((y[1:] - y[:-1]) / (t[1:] - t[:-1])).abs().max())
    bound = L.upper_bound(act.eval(), (3,))
    assert bound >= slope * (1 - 1e-6)            # sound
    assert bound <= slope * 1.003 + 1e-9          # and tight (GELU 1.13 vs 1.1289, Mish 1.09 vs 1.0886)


# --- Lipschitz: the gradient-ascent lower bound ----------------------------------------------------

def test_lower_bound_reaches_a_known_constant():
    """relu(diag(3, 1) x) has Lipschitz constant 3 (reached wherever x1 > 0): the ascent must find 3."""
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    net = nn.Sequential(lin, nn.ReLU()).eval()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    lower = L.empirical_lower_bound(net, x, steps=20)
    upper = L.upper_bound(net, (2,))
    assert lower == pytest.approx(3.0, rel=1e-6)
    assert upper == pytest.approx(3.0, rel=1e-5)


def test_certified_radius_of_a_linear_classifier_is_the_distance_to_its_boundary():
    """One Linear layer: the pairwise radius (z_y - z_j) / ||W_y - W_j|| is the exact distance."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
        lin.bias.zero_()
    bound = L.analyse(nn.Sequential(lin).eval(), (2,))
    x = np.array([[0.5, 3.0], [-2.0, 1.0]])
    logits = lin(torch.tensor(x, dtype=torch.float32)).detach().numpy()
    assert L.certified_radii(logits, bound) == pytest.approx([0.5, 2.0], rel=1e-5)


# --- bound propagation on a network computed by hand -------------------------------------------------

def two_layer():
    """y = relu(x1 + x2 + 1/2) + relu(x1 - x2) on the box [-1, 1]^2 (true range [0, 2.5])."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
        a.bias.copy_(torch.tensor([0.5, 0.0]))
        b.weight.copy_(torch.tensor([[1.0, 1.0]]))
        b.bias.zero_()
    return nn.Sequential(a, nn.ReLU(), b)


def test_interval_bounds_by_hand():
    g = G.from_model(two_layer().eval(), (2,))
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    pre = P.intermediate(g, lo, hi, "ibp")  # nodes: input, hidden affine, ReLU, output
    # hidden: x1 + x2 + 0.5 in [-1.5, 2.5], x1 - x2 in [-2, 2]; output: [0, 2.5 + 2]
    assert pre[1][0].tolist() == [[-1.5, -2.0]] and pre[1][1].tolist() == [[2.5, 2.0]]
    assert pre[-1][0].item() == 0.0 and pre[-1][1].item() == 4.5


def test_crown_bounds_by_hand():
    """Triangle relaxation: upper slopes 2.5/4 and 2/4, intercepts 1.5*2.5/4 and 1; lower slopes 1 and 0
    (CROWN keeps the identity when u > -l). Upper: 3.5, lower: -1.5 (IBP: [0, 4.5]; truth: [0, 2.5])."""
    g = G.from_model(two_layer().eval(), (2,))
    lo, hi = -torch.ones(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64)
    C = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    r = P.lower_bound(g, lo, hi, C, "crown")
    bound, lam = r.lower, r.lam
    assert bound[0, 0].item() == pytest.approx(-1.5, abs=1e-12)
    assert -bound[0, 1].item() == pytest.approx(3.5, abs=1e-12)
    assert lam[0, 1].tolist() == pytest.approx([-1.125, -0.125], abs=1e-12)
    # sound: no point of the box goes beyond
    grid = torch.cartesian_prod(torch.linspace(-1, 1, 41), torch.linspace(-1, 1, 41))
    y = two_layer()(grid).detach()
    assert float(y.max()) == pytest.approx(2.5, abs=1e-6) and float(y.min()) == 0.0


# --- binomial intervals against the published tables -------------------------------------------------

# Newcombe (1998), Statistics in Medicine 17:857-872, Table I: 95% intervals, methods 3 (Wilson score)
# and 5 (exact, Clopper-Pearson), to 4 decimals.
NEWCOMBE = [  # k, n, wilson (lo, hi), clopper-pearson (lo, hi)
    (81, 263, (0.2553, 0.3662), (0.2527, 0.3676)),
    (15, 148, (0.0624, 0.1605), (0.0578, 0.1617)),
    (0, 20, (0.0000, 0.1611), (0.0000, 0.1684)),
    (1, 29, (0.0061, 0.1718), (0.0009, 0.1776)),
]


@pytest.mark.parametrize(("k", "n", "w", "cp"), NEWCOMBE)
def test_intervals_match_newcombe_table(k, n, w, cp):
    iw, icp = wilson(k, n, 0.95), clopper_pearson(k, n, 0.95)
    assert (round(iw.lower, 4), round(iw.upper, 4)) == w
    assert (round(icp.lower, 4), round(icp.upper, 4)) == cp
    assert iw.confidence == icp.confidence == 0.95


def test_intervals_closed_forms():
    # k = 0: the exact upper bound solves (1 - p)^n = alpha / 2
    assert clopper_pearson(0, 10, 0.95).upper == pytest.approx(1 - 0.025 ** 0.1, rel=1e-9)
    assert clopper_pearson(10, 10, 0.95).lower == pytest.approx(0.025 ** 0.1, rel=1e-9)
    # Wilson 5/10 by hand: centre 1/2, half width z sqrt(1/40 + z^2/400) / (1 + z^2/10)
    w90, w95 = wilson(5, 10, 0.90), wilson(5, 10, 0.95)
    assert (round(w95.lower, 4), round(w95.upper, 4)) == (0.2366, 0.7634)  # z = 1.95996
    assert (round(w90.lower, 4), round(w90.upper, 4)) == (0.2693, 0.7307)  # z = 1.64485
    # one-sided lower bound at level alpha: k = n gives alpha^(1/n)
    assert clopper_pearson_lower(np.array([20, 0]), 20, 0.01) == pytest.approx([0.01 ** (1 / 20), 0.0])


# --- randomized smoothing ---------------------------------------------------------------------------

def half_plane(threshold: float = 0.6):
    """Class 1 iff x1 > threshold (pixel values in [0, 1]): the boundary is at distance |x1 - t| in L2."""
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
        lin.bias.copy_(torch.tensor([threshold, -threshold]))
    spec = ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[2], value_range=(0, 1),
                     class_names=["a", "b"], critical_class="b")
    return Classifier(spec, module=lin.eval())


def test_smoothing_radius_of_a_half_plane_is_the_distance():
    """For a linear classifier g = f and pA = Phi(d / sigma), so the radius sigma Phi^-1(pA) -> d:
    with n = 20000 the Clopper-Pearson bound costs a little, never more than the exact radius."""
    clf = half_plane()
    x = np.array([[0.3, 0.5], [0.75, 0.1], [0.9, 0.9]], np.float32)
    dist = np.abs(x[:, 0] - 0.6)
    c, r, _ = S.certify(clf, x, sigma=0.25, n0=64, n=20_000, alpha=0.001, seed=0)
    assert c.tolist() == [0, 1, 1]
    assert np.all(r <= dist + 1e-9)
    assert np.all(r >= dist - 0.03)


def test_smoothing_is_independent_of_batch_size_and_batch():
    """Noise follows (seed, item id): the same certificate at batch size 64 and 7, and inside any batch."""
    clf = half_plane()
    x = np.random.default_rng(0).random((9, 2)).astype(np.float32)
    ids = [f"item-{i}" for i in range(9)]
    kw = dict(sigma=0.3, n0=20, n=150, alpha=0.01, seed=5)
    a = S.certify(clf, x, batch_size=64, ids=ids, **kw)
    b = S.certify(clf, x, batch_size=7, ids=ids, **kw)
    parts = [S.certify(clf, x[s], batch_size=5, ids=ids[s], **kw) for s in (slice(0, 4), slice(4, 9))]
    for i in range(3):
        assert np.array_equal(a[i], b[i])
        assert np.array_equal(a[i], np.concatenate([p[i] for p in parts]))
    pa = S.predict(clf, x, sigma=0.3, n=150, alpha=0.01, seed=5, ids=ids, batch_size=64)
    pb = S.predict(clf, x[::-1].copy(), sigma=0.3, n=150, alpha=0.01, seed=5, ids=ids[::-1], batch_size=11)
    assert np.array_equal(pa, pb[::-1])
    # and a different seed draws different noise
    c = S.certify(clf, x, batch_size=64, ids=ids, **{**kw, "seed": 6})
    assert not np.array_equal(a[2], c[2])


# --- closed forms of the radii and of PREDICT (mutation survivors) ------------------------------------

def test_certified_radii_closed_forms():
    z = np.array([[3.0, 1.0, 0.0], [0.0, 0.5, 2.5]])
    # no head: (z_top - z_2nd) / (sqrt(2) L s)
    plain = L.Bound(total=2.0)
    assert L.certified_radii(z, plain, input_scale=0.5) == pytest.approx([2.0 / math.sqrt(2), 2.0 / math.sqrt(2)])
    # head W (3 classes) after a body of bound 2: min over j of (z_y - z_j) / (||W_y - W_j|| * 2 * s)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    head = L.Bound(total=0.0, body=2.0, head=w)
    r = L.certified_radii(z, head, input_scale=0.5)
    assert r[0] == pytest.approx(min(2.0 / math.sqrt(2), 3.0 / 1.0))  # vs class 1 (||W0-W1|| = sqrt 2), class 2
    assert r[1] == pytest.approx(min(2.5 / 1.0, 2.0 / 1.0))  # y = 2: vs class 0 (||W2-W0|| = 1), class 1
    # two identical rows can never be confused: infinite radius against that class
    same = L.Bound(total=0.0, body=1.0, head=torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert L.certified_radii(np.array([[1.0, 0.0]]), same)[0] == np.inf


class Constant(nn.Module):
    """Always class 1 (whatever the noise): PREDICT's binomial test alone decides."""

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), torch.ones(len(x))], 1)


@pytest.mark.parametrize(("n", "want"), [(10, S.ABSTAIN), (11, 1)])
def test_predict_abstains_exactly_where_the_binomial_test_says(n, want):
    """n_A = n votes, n_B = 0: p = 2 * 0.5^n; at alpha = 0.001, 10 votes (p = 0.00195) are not enough,
    11 (p = 0.00098) are."""
    clf = Classifier(half_plane().spec, module=Constant().eval())
    x = np.zeros((2, 2), np.float32)
    assert S.predict(clf, x, sigma=0.1, n=n, alpha=0.001).tolist() == [want, want]
    c, r, p_a = S.certify(clf, x, sigma=0.1, n0=4, n=n, alpha=0.001)
    assert c.tolist() == [1, 1] and p_a == pytest.approx([0.001 ** (1 / n)] * 2)  # k = n: alpha^(1/n)
    assert r == pytest.approx([0.1 * stats.norm.ppf(0.001 ** (1 / n))] * 2)


def test_noise_step_is_the_normalisation_slope():
    spec = ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[3], value_range=(0, 255),
                     class_names=["a", "b"], critical_class="b", normalisation={"mean": [0.5], "std": [0.25]})
    step = S.noise_step(Classifier(spec, module=nn.Linear(3, 2).eval()))
    assert step.shape == (1, 3) and torch.allclose(step, torch.full((1, 3), 1 / (255 * 0.25)))
    img = ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[2, 4, 5], value_range=(0, 1),
                    class_names=["a", "b"], critical_class="b", normalisation={"mean": [0.0, 0.0], "std": [1.0, 0.5]})
    step = S.noise_step(Classifier(img, module=nn.Identity().eval()))
    # per channel, broadcast over any image size (a tiled segmenter's whole images)
    assert step.shape == (1, 2, 1, 1) and torch.allclose(step[0, :, 0, 0], torch.tensor([1.0, 2.0]))


class OnePixel(nn.Module):
    """Class 1 iff channel 1, row 2, column 3 of a (2, 3, 4) input exceeds 0.5 (normalised): a half space."""

    def forward(self, x):
        v = x[:, 1, 2, 3] - 0.5
        return torch.stack([-v, v], 1)


def test_smoothing_an_image_model_follows_its_channels_and_range():
    """Pixel values in [10, 20] (normalised by the range): the half space of one (channel, row, column) is at
    distance |x - 15| / 10 in the unit range; a transposed layout or a wrong range moves it."""
    spec = ModelSpec(format="torchscript", path=Path("unused.pt"), input_shape=[2, 3, 4], value_range=(10, 20),
                     class_names=["a", "b"], critical_class="b")
    clf = Classifier(spec, module=OnePixel().eval())
    x = np.full((2, 3, 4, 2), 15.0, np.float32)  # (B, H, W, C) pixel space
    x[0, 2, 3, 1], x[1, 2, 3, 1] = 12.0, 19.0
    x[:, 1, 1, 0] = 0.0  # far from the boundary on pixels the model ignores
    c, r, _ = S.certify(clf, x, sigma=0.2, n0=32, n=4000, alpha=0.001, batch_size=100)
    assert c.tolist() == [0, 1]
    dist = np.array([0.3, 0.4])
    assert np.all(r <= dist + 1e-9) and np.all(r >= dist - 0.06)


def test_smoothing_parameters_at_their_edges():
    clf = half_plane()
    x = np.zeros((1, 2), np.float32)
    S.certify(clf, x, sigma=0.1, n0=1, n=1, alpha=0.5, batch_size=1)  # the smallest valid values
    for kw, msg in (({"alpha": 1.0}, "alpha must be in"), ({"n": 0}, "n must be >= 1"),
                    ({"batch_size": 0}, "batch_size must be >= 1, got 0")):
        with pytest.raises(ValueError, match=msg):
            S.certify(clf, x, **{**dict(sigma=0.1, n0=1, n=1, alpha=0.5, batch_size=1), **kw})
    with pytest.raises(ValueError, match="n must be >= 1"):
        S.predict(clf, x, sigma=0.1, n=0, alpha=0.5)

