"""Measurable properties of one image: the functions behind the ODD descriptor catalogue (`odd.descriptors`).

Images arrive as (B, H, W, C) arrays in pixel space; values are reported in that space. Every
function maps a batch to one number per image, (B,), and costs a few passes over the pixels: the
ODD monitor computes them beside the model in production.
"""

from __future__ import annotations

import cv2
import numpy as np

LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)
# Immerkaer's noise mask: the difference of two Laplacians, blind to edges and gradients up to second order
NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def grey(images: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W) float64 luminance."""
    x = np.asarray(images, dtype=np.float64)  # no copy when already float64
    if x.shape[-1] == 1:
        return x[..., 0]
    if x.shape[-1] == 3:
        return x @ np.array([0.299, 0.587, 0.114])
    return x.mean(axis=-1)


def _per_image(images: np.ndarray, stat) -> np.ndarray:
    """stat(one (H, W) float64 luminance image) for each image of the batch. OpenCV on one image at a time
    is about 3x faster than numpy over the batch, at batch 1 and at batch 64 alike (bench/bench_odd.py)."""
    g = np.ascontiguousarray(grey(images))
    if g.shape[1] < 3 or g.shape[2] < 3:
        raise ValueError(f"images of {g.shape[1]}x{g.shape[2]} px are too small for a 3x3 filter")
    return np.array([stat(im) for im in g], dtype=np.float64)


def _std(im: np.ndarray) -> float:
    return float(cv2.meanStdDev(im)[1][0, 0])  # the population standard deviation, as numpy's std


def _valid(filtered: np.ndarray) -> np.ndarray:
    """The valid region of a 3x3 filter's output: no border effects."""
    return filtered[1:-1, 1:-1]


def brightness(images: np.ndarray) -> np.ndarray:
    """Mean luminance; numpy's pairwise sum keeps a uniform image's value exact, which limits rely on."""
    return grey(images).mean(axis=(1, 2))


def contrast(images: np.ndarray) -> np.ndarray:
    """RMS contrast: the standard deviation of the luminance."""
    return _per_image(images, _std)


def laplacian_variance(images: np.ndarray) -> np.ndarray:
    """Sharpness: low values mean blur (variance of the 4-neighbour Laplacian, valid region only)."""
    return _per_image(images, lambda im: _std(_valid(cv2.filter2D(im, cv2.CV_64F, LAPLACIAN))) ** 2)


def noise_sigma(images: np.ndarray) -> np.ndarray:
    """Standard deviation of additive white noise, in grey levels (Immerkaer 1996, 'Fast noise variance
    estimation'): sigma = sqrt(pi/2) / 6 * mean |I * N|. Exact for Gaussian noise on a locally quadratic
    image; texture adds a small positive bias, which is why the ODD range is read on the data."""
    def sigma(im: np.ndarray) -> float:
        r = _valid(cv2.filter2D(im, cv2.CV_64F, NOISE_MASK))
        return np.sqrt(np.pi / 2) / 6 * cv2.norm(r, cv2.NORM_L1) / r.size
    return _per_image(images, sigma)


def saturated_fraction(images: np.ndarray, value_range: tuple[float, float] = (0.0, 255.0)) -> np.ndarray:
    """Share of pixel values at or above the top of the sensor's range (clipped highlights)."""
    x = np.asarray(images)
    return (x >= value_range[1]).reshape(len(x), -1).mean(axis=1)


def dead_pixel_fraction(images: np.ndarray, value_range: tuple[float, float] = (0.0, 255.0)) -> np.ndarray:
    """Share of pixel values at or below the bottom of the sensor's range (dead or black pixels)."""
    x = np.asarray(images)
    return (x <= value_range[0]).reshape(len(x), -1).mean(axis=1)


def dead_lines(images: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """Number of rows plus columns that are flat (peak-to-peak <= tolerance in every channel): a dead or
    stuck sensor line. A uniform image counts every line: it carries no information either."""
    x = np.asarray(images)
    rows = (np.ptp(x, axis=2) <= tolerance).all(axis=-1).sum(axis=1)  # (B, H, C) -> (B,)
    cols = (np.ptp(x, axis=1) <= tolerance).all(axis=-1).sum(axis=1)
    return (rows + cols).astype(np.float64)
