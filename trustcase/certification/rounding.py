"""Floating-point margins of certified bounds, derived from the arithmetic, not from one CPU's result.

A bound computed in floating point holds on every machine only when it is widened by a bound of its own
rounding error: another CPU (another SIMD width, `ATEN_CPU_CAPABILITY`, thread count) sums in another order
and lands elsewhere within that error. The rules (Higham, Accuracy and Stability of Numerical Algorithms,
2nd ed.): u is the unit roundoff of the dtype (2^-53 for float64, 2^-24 for float32); n rounded operations
accumulated in any order err by at most gamma_n = n u / (1 - n u) relative to the sum of the magnitudes (3.1);
the FFT by log2(n) stages of eta each (Theorem 24.2); a backward-stable SVD moves every singular value by at most
p(m, n) u sigma_1 (LAPACK's bound, p "a modestly growing function": m n is taken, far above its practice).
"""

from __future__ import annotations

import math

U64 = 2.0 ** -53  # unit roundoff of float64
U32 = 2.0 ** -24  # unit roundoff of float32


def gamma(n: int, u: float = U64) -> float:
    """Relative error bound of n accumulated rounding errors of unit roundoff u: n u / (1 - n u)."""
    if not 0 <= n * u < 0.5:
        raise ValueError(f"{n} rounding errors of {u:.3g} each exceed any useful bound")
    return n * u / (1 - n * u)


def fft_error(points: int) -> float:
    """Relative 2-norm error of a float64 FFT over `points` (all axes together) (Higham Theorem 24.2:
    log2(n) stages of eta = mu + gamma_4 (sqrt 2 + mu), mu <= u the twiddle factors' error). pocketfft's
    mixed radices are covered by counting stages of the next power of two of 2n, and Bluestein's algorithm
    for large prime factors (three FFTs and two chirp products) by three times that plus gamma_4."""
    stages = max(1, math.ceil(math.log2(2 * max(points, 1))))
    eta = U64 + gamma(4) * (math.sqrt(2) + U64)
    return 3 * stages * eta / (1 - 3 * stages * eta) + gamma(4)


def svd_error(m: int, n: int) -> float:
    """How far a float64 singular value of an m x n matrix may sit from the exact one, relative to the largest."""
    return gamma(max(m * n, 1))


def widen(value: float, relative: float) -> float:
    """An upper bound of x >= 0 from a computed x_hat with |x_hat - x| <= relative x: x <= x_hat / (1 - relative),
    and 4 u more for the three roundings of this very expression."""
    if not 0 <= relative < 0.5:
        raise ValueError(f"relative error {relative} leaves no useful bound")
    return value / (1 - relative) * (1 + 4 * U64)
