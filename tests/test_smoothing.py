"""Randomized smoothing against the closed form of a linear binary classifier.

For f(x) = 1[w.x + b > 0] and noise N(0, s^2 I): P(f(x + e) = 1) = Phi((w.x + b) / (s ||w||)), so the
smoothed classifier's exact radius is s * PhiInverse(pA) = |w.x + b| / ||w||, the distance to the hyperplane.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from trustcase.certification import smoothing as S
from trustcase.checks import CheckError, Context, build
from trustcase.data.streaming import DataSource
from trustcase.errors import UserError
from trustcase.measurement import median_radius
from trustcase.models.classifier import Classifier, ModelError
from trustcase.models.loading import load_classifier
from trustcase.schemas import CheckSpec, ModelSpec, load_use_case


class LinearBinary(nn.Module):
    """Logits (0, w.x + b): class 1 iff w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(s), s], 1)


def classifier(w, b, value_range=(0.0, 1.0), mean=0.0, std=1.0) -> Classifier:
    spec = ModelSpec(format="torchscript", path="unused.pt", input_shape=[len(w)], value_range=value_range,
                     normalisation={"mean": [mean], "std": [std]}, class_names=["neg", "pos"],
                     critical_class="pos")
    return Classifier(spec, module=LinearBinary(torch.tensor(w, dtype=torch.float32), b).eval())


W = [0.6, -0.8, 0.0, 0.0]  # ||w|| = 1: the exact radius is |w.x + b|


def test_certified_radius_is_below_the_exact_one_and_approaches_it():
    clf = classifier(W, 0.0)
    x = np.array([[0.3, 0.0, 0.5, 0.5]], np.float32)  # margin 0.18 -> exact radius 0.18
    w = np.array(W, np.float32).astype(np.float64)  # the model's float32 weights, exactly
    exact = abs(w @ x[0].astype(np.float64)) / np.linalg.norm(w)  # 0.18 up to float32 rounding of 0.6 and 0.3
    gaps = []
    for n in (100, 1000, 20000):
        c, r, p_a = S.certify(clf, x, sigma=0.25, n0=50, n=n, alpha=0.001, batch_size=500, seed=1)
        assert c[0] == 1
        assert r[0] <= exact
        gaps.append(exact - r[0])
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.1 * exact


@pytest.mark.parametrize(("n_a", "n", "alpha"), [(51, 100, 0.001), (300, 300, 0.001), (9990, 10000, 1e-6),
                                                 (99_999, 100_000, 0.05), (560, 1000, 0.01)])
def test_the_radius_margin_holds_against_the_exact_binomial_tail(n_a, n, alpha):
    """In 60-digit arithmetic: pA is a valid lower bound (P(Bin(n, pA) >= n_a) <= alpha, so the inverse beta's
    error is covered by PPF_ERROR) and the radius never exceeds sigma * PhiInverse(pA) exactly; the margins cost
    no more than their size."""
    mpmath = pytest.importorskip("mpmath")
    mp = mpmath.mp.clone()
    mp.dps = 60
    sigma = 0.25
    p_a, radius = (float(v[0]) for v in S.certified_radius(np.array([n_a]), n, alpha, sigma))
    p = mp.mpf(p_a)
    # the tail of the binomial at pA: 1 - I_{1 - p}(n - n_a + 1, n_a) = I_p(n_a, n - n_a + 1)
    tail = mp.betainc(n_a, n - n_a + 1, 0, p, regularized=True)
    assert tail <= alpha
    # and no lower than two margins below the exact Clopper-Pearson bound (where the tail reaches alpha)
    assert mp.betainc(n_a, n - n_a + 1, 0, p / (1 - 2 * S.PPF_ERROR), regularized=True) >= alpha
    if p_a >= 0.5:
        exact = sigma * mp.sqrt(2) * mp.erfinv(2 * p - 1)
        assert radius <= exact
        assert radius >= exact * (1 - 1e-12)
    else:
        assert radius == 0


def test_the_certificate_fails_at_most_alpha_of_the_time():
    """P(radius > exact radius) <= alpha: a point estimate instead of the lower bound fails about half the time."""
    clf = classifier(W, 0.0)
    x = np.repeat(np.array([[0.1, 0.0, 0.0, 0.0]], np.float32), 200, axis=0)  # exact radius 0.06
    alpha = 0.1
    c, r, _ = S.certify(clf, x, sigma=0.2, n0=20, n=200, alpha=alpha, batch_size=4000, seed=3)
    too_large = int(((c == 1) & (r > 0.06)).sum())
    assert too_large <= alpha * 200 + 3 * np.sqrt(200 * alpha * (1 - alpha))
    assert (c == 1).mean() > 0.3  # not vacuous: most inputs are certified


def test_abstains_when_the_margin_is_zero():
    clf = classifier(W, 0.0)
    x = np.zeros((20, 4), np.float32) + np.array([0.4, 0.3, 0.1, 0.9], np.float32)  # w.x = 0
    c, r, p_a = S.certify(clf, x, sigma=0.3, n0=50, n=1000, alpha=0.001, batch_size=256, seed=0)
    assert np.all(c == S.ABSTAIN) and np.all(r == 0) and np.all(p_a < 0.5)
    assert np.mean(S.predict(clf, x, sigma=0.3, n=1000, alpha=0.001, seed=0) == S.ABSTAIN) >= 0.9


def test_noise_is_in_pixel_space_and_radii_in_the_unit_range():
    """Pixels in [0, 255], normalisation (v - 0.5) / 0.25 on v = pixel / 255: the exact radius in v is
    |margin| / ||w / 0.25||, and sigma is a fraction of the range."""
    w = np.array([0.6, -0.8, 0.0, 0.0])
    clf = classifier(w.tolist(), 0.0, value_range=(0.0, 255.0), mean=0.5, std=0.25)
    v = np.array([0.6, 0.5, 0.5, 0.5])
    exact = abs(w @ (v - 0.5) / 0.25) / (np.linalg.norm(w) / 0.25)  # = 0.06
    c, r, _ = S.certify(clf, (v * 255)[None].astype(np.float32), sigma=0.1, n0=50, n=20000, alpha=0.001, seed=2)
    assert c[0] == 1
    assert 0.85 * exact < r[0] <= exact


def test_deterministic_for_a_seed_and_predict_agrees():
    clf = classifier(W, 0.05)
    x = np.random.default_rng(0).uniform(0, 1, (30, 4)).astype(np.float32)
    a = S.certify(clf, x, sigma=0.2, n0=10, n=100, alpha=0.01, batch_size=64, seed=7)
    b = S.certify(clf, x, sigma=0.2, n0=10, n=100, alpha=0.01, batch_size=64, seed=7)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    pred = S.predict(clf, x, sigma=0.2, n=2000, alpha=0.001, seed=1)
    truth = (x @ np.array(W) + 0.05 > 0).astype(int)
    decided = pred != S.ABSTAIN
    assert decided.mean() > 0.5 and np.all(pred[decided] == truth[decided])


@pytest.mark.parametrize("kw,msg", [({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"), ({"alpha": 0.0}, "alpha"),
                                    ({"alpha": 1.5}, "alpha"), ({"n0": 0}, "n0"), ({"n": 0}, "n")])
def test_bad_parameters_are_named(kw, msg):
    clf = classifier(W, 0.0)
    args = {"sigma": 0.1, "n0": 10, "n": 10, "alpha": 0.01} | kw
    with pytest.raises(ValueError, match=msg):
        S.certify(clf, np.zeros((1, 4), np.float32), **args)
    with pytest.raises(CheckError, match=msg):
        build(CheckSpec(check="randomized_smoothing", params=kw))


def test_a_model_in_training_mode_is_a_located_user_error_and_is_left_as_it_is():
    """Dropout and BatchNorm in training mode would make every vote another function: refused before any noise is
    drawn, naming the model, and the caller's module is not switched behind its back."""
    clf = classifier(W, 0.0)
    clf.module.train()
    for call in (lambda: S.certify(clf, np.zeros((1, 4), np.float32), sigma=0.1, n0=10, n=10, alpha=0.01),
                 lambda: S.predict(clf, np.zeros((1, 4), np.float32), sigma=0.1, n=10, alpha=0.01)):
        with pytest.raises(ModelError, match=r"the model unused\.pt is in training mode .*call module\.eval\(\)"):
            call()
    assert clf.module.training and issubclass(ModelError, UserError)


def test_the_check_on_the_tiny_solar_model(tiny_case, tmp_path):
    uc = load_use_case(tiny_case)
    check = build(CheckSpec(check="randomized_smoothing",
                            params={"sigma": 0.1, "n0": 8, "n": 40, "alpha": 0.01, "max_items": 24, "batch_size": 128}))
    ctx = Context(use_case=uc, model=load_classifier(uc.model), data=DataSource(uc.data, 0), seed=0,
                  workdir=tmp_path / "checks" / "randomized_smoothing")
    out = check(ctx)
    assert out.stage == "formal"
    acc = [m for m in out.measurements if m.metric == "smoothing_certified_accuracy"]
    assert acc[0].amplitude == 0 and acc[0].n == 24
    assert [m.value for m in acc] == sorted((m.value for m in acc), reverse=True)
    abstain = next(m for m in out.measurements if m.metric == "smoothing_abstain_rate")
    assert 0 <= abstain.value <= 1
    assert any("smoothed classifier g" in v for v in out.validity)
    assert out.summary["training_noise_sigma"] == 0.0  # the tiny model was trained without noise
    assert out.curves and out.curves[0].x[0] == 0


def test_the_median_certified_radius_counts_a_wrong_or_abstained_item_at_zero():
    """Exact, for the smoothing and Lipschitz checks alike: the median of the radii with a wrong item at 0."""
    radius = np.array([0.5, 0.2, 0.9, 0.0, 0.4])
    assert median_radius(radius, np.array([True, True, True, False, True])) == 0.4
    assert median_radius(radius, np.array([False, False, True, False, True])) == 0.0
    assert median_radius(np.zeros(0), np.zeros(0, bool)) is None  # no item: undefined, never 0
