"""Measurable properties of one image, shared by data quality and ODD descriptors.

Images arrive as (B, H, W, C) arrays in pixel space; values are reported in that space.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


def grey(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W) float64 luminance."""
    x = np.asarray(images, dtype=np.float64)
    if x.shape[-1] == 3:
        return x @ np.array([0.299, 0.587, 0.114])
    return x.mean(axis=-1)


def brightness(images: np.ndarray) -> np.ndarray:
    return grey(images).mean(axis=(1, 2))


def contrast(images: np.ndarray) -> np.ndarray:
    """RMS contrast: the standard deviation of the luminance."""
    return grey(images).std(axis=(1, 2))


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Sharpness: low values mean blur (variance of the Laplacian, valid region only)."""
    g = grey(images)
    lap = ndimage.convolve(g, LAPLACIAN[None], mode="nearest")[:, 1:-1, 1:-1]
    return lap.var(axis=(1, 2))


PROPERTIES = {"brightness": brightness, "contrast": contrast, "sharpness": laplacian_variance}
