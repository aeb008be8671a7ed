"""Sensor troubles, each parameterised by one physical amplitude, applied in pixel space.

A perturbation maps a batch (B, H, W, C) in the model's pixel value range to a batch of the same
shape and dtype, deterministically for (seed, item position). Amplitude 0 is the identity.
"""

from __future__ import annotations

from typing import ClassVar

import albumentations as A
import numpy as np

PERTURBATIONS: dict[str, type[Perturbation]] = {}


class PerturbationError(ValueError):
    pass


class Perturbation:
    name: ClassVar[str]
    unit: ClassVar[str]
    grid: ClassVar[tuple[float, ...]]  # default amplitude grid
    domain: ClassVar[tuple[float, float]] = (0.0, float("inf"))

    def __init__(self, value_range: tuple[float, float] = (0.0, 255.0)):
        self.lo, self.hi = value_range

    @classmethod
    def validate(cls, amplitude: float) -> float:
        lo, hi = cls.domain
        if not lo <= amplitude <= hi:
            raise PerturbationError(f"{cls.name}: amplitude {amplitude} {cls.unit} is outside [{lo}, {hi}]")
        return float(amplitude)

    def apply(self, images: np.ndarray, amplitude: float, seeds: np.ndarray) -> np.ndarray:
        """`seeds[i]` makes item i's randomness independent of batch composition."""
        if amplitude == 0:
            return images
        return np.stack([self.one(img, amplitude, np.random.default_rng(int(s))) for img, s in zip(images, seeds)])

    def one(self, image: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


def register(cls: type[Perturbation]) -> type[Perturbation]:
    PERTURBATIONS[cls.name] = cls
    return cls


def item_seeds(seed: int, positions: np.ndarray) -> np.ndarray:
    """A seed per (run seed, item position): same item, same noise, whatever the batching."""
    return (np.uint64(seed) * np.uint64(1_000_003) + positions.astype(np.uint64)) % np.uint64(2**63)


def _albu(transform: A.BasicTransform, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    transform.set_random_seed(int(rng.integers(2**31)))
    return transform(image=image)["image"].reshape(image.shape)


@register
class GaussianBlur(Perturbation):
    """Loss of focus modelled as a Gaussian point-spread function of standard deviation sigma."""

    name = "gaussian_blur"
    unit = "px (sigma)"
    grid = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    domain = (0.0, 20.0)

    def one(self, image, amplitude, rng):
        # kernel wide enough for +-3 sigma, odd
        k = int(2 * np.ceil(3 * amplitude) + 1)
        t = A.GaussianBlur(blur_limit=(k, k), sigma_limit=(amplitude, amplitude), p=1.0)
        return _albu(t, image, rng)


def get(name: str, value_range: tuple[float, float]) -> Perturbation:
    if name not in PERTURBATIONS:
        raise PerturbationError(f"unknown perturbation {name!r}; known: {sorted(PERTURBATIONS)}")
    return PERTURBATIONS[name](value_range)
