"""The ODD descriptor catalogue: measurable properties of one image, in the model's pixel space.

The one catalogue that the specification monitor, data quality (ODD coverage, drift) and root causes
(describing clusters) read: brightness, contrast, sharpness, relative_sharpness, noise, saturated_fraction,
dead_pixel_fraction, dead_lines. Source "metadata" (a value the loader gives per item) and source
"feature" (a column of a tabular input) are declared in the use case and need no catalogue entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trustcase.data import images as I


class Views:
    """One batch of images and what several descriptors share (the luminance), computed once."""

    def __init__(self, images: np.ndarray, value_range: tuple[float, float]):
        self.images, self.value_range = images, value_range
        self._grey: np.ndarray | None = None

    @property
    def grey(self) -> np.ndarray:
        """(B, H, W, 1) float64 luminance, in the layout the `images` functions take."""
        if self._grey is None:
            self._grey = I.grey(self.images)[..., None]
        return self._grey


def relative_sharpness(grey: np.ndarray) -> np.ndarray:
    """The variance of the Laplacian over the variance of the luminance, (B,): unchanged by a brightness offset or
    a contrast gain (both scale or shift the two alike), so a range read on the data separates loss of focus from
    the content's own detail better than `sharpness` (magnetic tiles: 30 to 710 in focus, 1.2 to 41 at 1 px of
    blur, so no limit on `sharpness` stops 2 px without stopping 1 px). 0 for a flat image (no detail to judge)."""
    lap, var = I.laplacian_variance(grey), I.contrast(grey) ** 2
    return np.divide(lap, var, out=np.zeros_like(lap), where=var > 0)


@dataclass(frozen=True)
class DescriptorKind:
    name: str
    unit: str
    fn: Callable[[Views], np.ndarray]  # -> (B,)
    doc: str


DESCRIPTORS: dict[str, DescriptorKind] = {d.name: d for d in [
    DescriptorKind("brightness", "grey level", lambda v: I.brightness(v.grey), "mean luminance"),
    DescriptorKind("contrast", "grey level RMS", lambda v: I.contrast(v.grey), "standard deviation of the luminance"),
    DescriptorKind("sharpness", "variance of the Laplacian", lambda v: I.laplacian_variance(v.grey),
                   "low values mean blur"),
    DescriptorKind("relative_sharpness", "Laplacian variance / luminance variance",
                   lambda v: relative_sharpness(v.grey),
                   "focus whatever the lighting and contrast: low values mean blur; 0 for a flat image"),
    DescriptorKind("noise", "grey level (sigma)", lambda v: I.noise_sigma(v.grey),
                   "standard deviation of additive noise (Immerkaer)"),
    DescriptorKind("saturated_fraction", "share of pixels", lambda v: I.saturated_fraction(v.images, v.value_range),
                   "pixels at the top of the range"),
    DescriptorKind("dead_pixel_fraction", "share of pixels",
                   lambda v: I.dead_pixel_fraction(v.images, v.value_range), "pixels at the bottom of the range"),
    DescriptorKind("dead_lines", "rows + columns", lambda v: I.dead_lines(v.images), "flat rows and columns"),
]}

