"""Tests written from the surviving mutants of the certification chunk (`scripts/mutants.py --sample`): each pins a
property a certificate must have, checked against exact arithmetic, never against one CPU's float result."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
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
