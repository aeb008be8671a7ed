"""The sigmoid / tanh lines stay sound far from 0: their intercepts, checked in exact (60-digit) arithmetic at the
ends of the interval and at the stationary points, for bounds up to 1e8 (where a fixed 1e-10 margin is not)."""
import mpmath
import pytest
import torch

from trustcase.certification.propagation import _FMAX, _intercepts

mpmath.mp.dps = 60
EXACT = {"sigmoid": lambda z: 1 / (1 + mpmath.exp(-z)), "tanh": mpmath.tanh}


@pytest.mark.parametrize("kind", ["sigmoid", "tanh"])
@pytest.mark.parametrize("scale", [1.0, 1e3, 1e6, 1e8])
def test_intercepts_hold_in_exact_arithmetic(kind, scale):
    g = torch.Generator().manual_seed(7)
    lo = -scale * torch.rand(64, generator=g, dtype=torch.float64)
    hi = scale * torch.rand(64, generator=g, dtype=torch.float64)
    a = _FMAX[kind] * torch.rand(64, generator=g, dtype=torch.float64)
    low, high = _intercepts(kind, a, lo, hi)
    for i in range(64):
        ai = mpmath.mpf(float(a[i]))
        zs = [mpmath.mpf(float(lo[i])), mpmath.mpf(float(hi[i]))]
        inner = float(torch.atanh((1 - a[i]).sqrt())) if kind == "tanh" else \
            float(torch.logit((1 + (1 - 4 * a[i]).sqrt()) / 2))
        zs += [mpmath.mpf(z) for z in (inner, -inner) if float(lo[i]) <= z <= float(hi[i])]
        for z in zs:  # a z + low <= f(z) <= a z + high, exactly
            gap = EXACT[kind](z) - ai * z
            assert gap >= mpmath.mpf(float(low[i])), (kind, scale, i, float(gap - mpmath.mpf(float(low[i]))))
            assert gap <= mpmath.mpf(float(high[i])), (kind, scale, i, float(mpmath.mpf(float(high[i])) - gap))
