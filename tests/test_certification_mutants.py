"""Tests written from the surviving mutants of the certification chunk (`scripts/mutants.py --sample`): each pins a
property a certificate must have, checked against exact arithmetic, never against one CPU's float result."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from test_smoothing import classifier

from trustcase.certification import lipschitz as L
from trustcase.certification import smoothing as S


def _exact(a) -> list[Fraction]:
    return [Fraction(float(v)) for v in np.ravel(a)]


def test_a_certified_radius_never_exceeds_the_exact_quotient_of_its_float64_inputs():
    """The radius r = (z_1st - z_2nd) / (sqrt(2) L s) is shrunk by its own rounding: computed in float64 it must
    stay <= the exact value for the same float64 inputs (checked in rationals: 2 r^2 L^2 s^2 <= margin^2). Without
    the shrinking (or with it growing the quotient) most items overstate their radius by a few ulps."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(400, 3)) * 10.0 ** rng.integers(-3, 4, size=(400, 1))
    for total, scale in ((1.7, 1.0), (123.456789, 0.37), (3.0e-3, 6.25)):
        r = L.certified_radii(z, L.Bound(total=total), input_scale=scale)
        for row, ri in zip(z, r, strict=True):
            top = sorted(_exact(row))
            margin = top[-1] - top[-2]
            rr = Fraction(float(ri))
            assert 2 * rr * rr * Fraction(total) ** 2 * Fraction(scale) ** 2 <= margin * margin


def test_a_pairwise_radius_never_exceeds_the_exact_quotient_of_its_float64_inputs():
    """The head form r = min_j (z_y - z_j) / (||W_y - W_j|| L_body s), against the same in rationals for every
    class j (r^2 ||W_y - W_j||^2 L_body^2 s^2 <= (z_y - z_j)^2 with the squared norm summed exactly)."""
    rng = np.random.default_rng(1)
    head = torch.from_numpy(rng.normal(size=(4, 7)))
    z = rng.normal(size=(300, 4)) * 10.0 ** rng.integers(-2, 3, size=(300, 1))
    body, scale = 2.718281828, 0.41
    r = L.certified_radii(z, L.Bound(total=99.0, body=body, head=head), input_scale=scale)
    w = [[Fraction(float(v)) for v in row] for row in head.numpy()]
    for row, ri in zip(z, r, strict=True):
        zz = _exact(row)
        y = max(range(4), key=lambda c: zz[c])
        rr = Fraction(float(ri))
        for j in range(4):
            if j == y:
                continue
            d2 = sum((a - b) ** 2 for a, b in zip(w[y], w[j], strict=True))
            assert rr * rr * d2 * Fraction(body) ** 2 * Fraction(scale) ** 2 <= (zz[y] - zz[j]) ** 2


def test_every_smoothing_vote_draws_its_own_centred_gaussian_noise():
    """On the decision boundary of a linear classifier a vote goes either way with probability 1/2 exactly, so
    400 items with one vote each give about 200 of each class (a binomial count; outside [140, 260] with
    probability below 1e-9). A noise block that starts with anything but fresh N(0, 1) draws (a clean row kept
    in the first block once did, one of the n draws) moves every single vote to one side."""
    clf = classifier([1.0], -0.5)  # class 1 iff x > 0.5; value range [0, 1]
    x = np.full((400, 1), 0.5, np.float32)
    for num in (1, 3):
        counts = S.sample_counts(clf, x, num, 0.25, 64, np.arange(400) + 7)
        assert counts.shape == (400, 2) and (counts.sum(1) == num).all()
        assert 140 * num <= counts[:, 1].sum() <= 260 * num, counts[:, 1].sum()


def test_predict_answers_when_the_runner_up_has_votes_too():
    """PREDICT (Cohen et al.) returns the top class when a two-sided binomial test of n_A against n_B in n_A + n_B
    trials rejects a tie at alpha. At P(class 1) = 0.7 and n = 1000 (n_B about 300, not 0) the test rejects by
    far (p about 1e-36): every item is predicted."""
    from scipy import stats

    clf = classifier([1.0], -0.5)
    sigma = 0.25
    x = np.full((12, 1), 0.5 + sigma * stats.norm.ppf(0.7), np.float32)  # P(x + e > 0.5) = 0.7
    pred = S.predict(clf, x, sigma=sigma, n=1000, alpha=0.001, seed=3, ids=[f"i{k}" for k in range(12)])
    assert (pred == 1).all(), pred  # a test on n_A - n_B = 400 trials (cdf(300; 400) near 1) would abstain


def _circular_norm(w: np.ndarray, grid: tuple[int, int], dilation=(1, 1)) -> float:
    """The exact norm of the stride-1 circular convolution of w on a grid, from its dense matrix (float64 SVD)."""
    cout, cin, kh, kw = w.shape
    h, wd = grid
    m = np.zeros((cout, h, wd, cin, h, wd))
    for i in range(h):
        for j in range(wd):
            for a in range(kh):
                for b in range(kw):
                    m[:, i, j, :, (i + a * dilation[0]) % h, (j + b * dilation[1]) % wd] += w[:, :, a, b]
    return float(np.linalg.norm(m.reshape(cout * h * wd, cin * h * wd), 2))


def test_a_convolution_norm_is_the_circular_norm_on_each_axis_own_padded_size():
    """conv2d_norm bounds a zero-padded convolution by the circular one on the padded grid, H + 2 p_h by W + 2 p_w:
    with padding (2, 0) and a dilation of (1, 2) it must equal the dense matrix's norm on that 9 x 8 grid, up to its
    own rounding margin (another grid, e.g. the other axis's padding, gives another norm)."""
    from trustcase.models.lipschitz_layers import conv2d_norm

    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 2, 3, 2))
    exact = _circular_norm(w, (5 + 4, 8), dilation=(1, 2))
    bound = conv2d_norm(torch.from_numpy(w), (5, 8), padding=(2, 0), dilation=(1, 2))
    assert exact <= bound <= exact * (1 + 1e-9)


def test_a_kernel_larger_than_the_padded_input_on_one_axis_is_refused():
    """One tap more than the padded input on either axis is refused; a kernel exactly as large is a convolution
    with one output (norm: the kernel's L2 norm, here sqrt 3)."""
    from trustcase.models.lipschitz_layers import conv2d_norm

    for shape, hw in (((1, 1, 4, 1), (3, 8)), ((1, 1, 1, 4), (8, 3)), ((1, 1, 2, 1), (1, 8))):
        with pytest.raises(ValueError, match="larger than the padded input"):
            conv2d_norm(torch.ones(shape), hw)
    for shape, hw in (((1, 1, 3, 1), (3, 8)), ((1, 1, 1, 3), (8, 3))):
        assert conv2d_norm(torch.ones(shape), hw) >= 3 ** 0.5


def test_a_lipschitz_convolution_names_the_input_size_it_was_normalised_for():
    from trustcase.models.lipschitz_layers import LipschitzConv2d

    conv = LipschitzConv2d(1, 2, 3, (8, 8), padding=1)
    with pytest.raises(ValueError, match=r"normalised for inputs \(8, 8\), got \(6, 6\)"):
        conv(torch.zeros(1, 1, 6, 6))


def test_smoothing_noise_follows_the_check_it_serves():
    """The one seeding rule (seed, check, item, stream): two checks smoothing the same item draw different noise
    (identical noise across checks was a defect of issue 23); the same check draws the same."""
    from scipy import stats

    clf = classifier([1.0], -0.5)
    x = np.full((1, 1), 0.5 + 0.25 * stats.norm.ppf(0.6), np.float32)
    run = {c: S.certify(clf, x, sigma=0.25, n0=10, n=2000, alpha=0.001, ids=["cell1"], check=c)[2][0]
           for c in ("randomized_smoothing", "segmentation_smoothing")}
    assert run["randomized_smoothing"] != run["segmentation_smoothing"]
    again = S.certify(clf, x, sigma=0.25, n0=10, n=2000, alpha=0.001, ids=["cell1"], check="randomized_smoothing")
    assert again[2][0] == run["randomized_smoothing"]


def test_gamma_bounds_n_roundings_from_above_and_widen_never_undershoots():
    """gamma_n = n u / (1 - n u) >= n u (Higham 3.1), checked in rationals; widen(x_hat, e) is an upper bound of
    every x with |x_hat - x| <= e x, so it is >= x_hat / (1 - e) computed exactly; e >= 1/2 is refused."""
    from trustcase.certification.rounding import U64, gamma, widen

    for n in (1, 6, 1000, 10 ** 9):
        assert Fraction(gamma(n)) >= n * Fraction(U64)
    rng = np.random.default_rng(4)
    for v, e in zip(rng.uniform(1e-3, 1e3, 200), rng.uniform(0, 0.49, 200), strict=True):
        assert Fraction(widen(float(v), float(e))) >= Fraction(float(v)) / (1 - Fraction(float(e)))
    for e in (0.5, -1e-9):
        with pytest.raises(ValueError, match="leaves no useful bound"):
            widen(1.0, e)


def test_the_lipschitz_lower_bound_ascends_a_model_that_cannot_be_copied():
    """A module that refuses deepcopy is run in float32 with its inputs cast: a linear map's lower bound is then its
    spectral norm (the Jacobian's, exact for a linear map) up to float32 rounding."""

    class Uncopyable(torch.nn.Linear):
        def __deepcopy__(self, memo):
            raise TypeError("not copyable")

    torch.manual_seed(0)
    net = Uncopyable(3, 2)
    sigma = float(torch.linalg.matrix_norm(net.weight.detach().double(), ord=2))
    lb = L.empirical_lower_bound(net, torch.zeros(2, 3), steps=3)
    assert abs(lb - sigma) <= 1e-5 * sigma
