"""The `relative_sharpness` ODD descriptor (variance of the Laplacian over the variance of the luminance) on images
whose value is known in closed form, and its invariance to the lighting."""

from __future__ import annotations

import numpy as np
import pytest

from trustcase.odd.descriptors import DESCRIPTORS, Views, relative_sharpness


def checkerboard(side: int, mean: float, amplitude: float) -> np.ndarray:
    """mean +- amplitude alternating: the luminance variance is amplitude^2; every interior pixel's 4-neighbour
    Laplacian is -+8 amplitude, in equal numbers on an even side, so the Laplacian's variance is 64 amplitude^2."""
    r, c = np.indices((side, side))
    return (mean + amplitude * np.where((r + c) % 2 == 0, 1.0, -1.0))[None, :, :, None]


def test_known_values():
    board = checkerboard(8, 100.0, 20.0)
    assert relative_sharpness(board).tolist() == [64.0]  # 25600 / 400, both exact in binary
    ramp = (np.linspace(20, 200, 16)[None, :] + np.linspace(0, 30, 16)[:, None])[None, :, :, None]
    assert relative_sharpness(ramp)[0] == pytest.approx(0.0, abs=1e-12)  # a linear ramp has no Laplacian
    flat = np.full((1, 8, 8, 1), 77.0)
    assert relative_sharpness(flat).tolist() == [0.0]  # no detail: defined as 0, never NaN


def test_unchanged_by_a_brightness_offset_or_a_contrast_gain_and_lowered_by_blur():
    rng = np.random.default_rng(0)
    img = rng.uniform(60, 180, (2, 32, 32, 1))
    base = relative_sharpness(img)
    # exact in real arithmetic; float64 rounding of values ~1e3 over 1e3 pixels stays far below 1e-9 relative
    assert relative_sharpness(3.0 * img + 7.0) == pytest.approx(base, rel=1e-9)
    assert relative_sharpness(0.25 * img - 10.0) == pytest.approx(base, rel=1e-9)
    smooth = (img[:, :-1, :-1] + img[:, 1:, :-1] + img[:, :-1, 1:] + img[:, 1:, 1:]) / 4  # a 2x2 box blur
    assert np.all(relative_sharpness(smooth) < base)


def test_in_the_catalogue_on_the_luminance():
    kind = DESCRIPTORS["relative_sharpness"]
    rgb = np.repeat(checkerboard(8, 100.0, 20.0), 3, axis=-1)  # grey as RGB: the luminance is the same board
    assert kind.fn(Views(rgb, (0.0, 255.0))).tolist() == pytest.approx([64.0], rel=1e-12)
