"""Sensor troubles, each parameterised by one physical amplitude, applied in pixel space.

A perturbation maps a batch (B, H, W, C) in the model's pixel value range to a batch of the same
shape and dtype, clipped to that range, deterministically for the items' seeds: item i's randomness
comes from `seeds[i]` only (`trustcase.seeding.item_seeds`: run seed, check, item id, perturbation), so it
does not depend on how the stream was batched.
Amplitude 0 is exactly the identity. Randomness is shared across amplitudes (common random numbers:
the same dead pixels, patch centre, noise field, rotation sense grow with the amplitude), so a sweep
curve moves because the amplitude moved, not because the dice were thrown again.

Per-item randomness is drawn from a counter-based generator (splitmix64 of seed, stream and element
index), vectorised over the batch: creating one numpy Generator per item would cost more than most
perturbations themselves. Custom perturbations implementing `one()` get a per-item numpy Generator.

Internally a perturbation works on "unit" float32 images, (x - min) / (max - min) in [0, 1], which
makes it indifferent to uint8 / float inputs and to the value range; the result is mapped back,
clipped, and rounded for integer dtypes.

Catalogue (name: amplitude unit; options):
- gaussian_blur: sigma of the Gaussian point-spread function, px
- motion_blur: length of the motion streak, px; `angle` in degrees (None: uniform per item)
- defocus: radius of the defocus disk (pillbox PSF), px
- brightness: shift as a fraction of the value range; `direction` up | down | random (per item)
- contrast: fraction of contrast lost (down) or gained (up) around the image mean; `direction`
- gamma: u -> u**(1 + a) (darken) or u**(1 / (1 + a)) (brighten); `direction`
- gaussian_noise: std of additive sensor noise as a fraction of the value range; `per_channel`
- dead_pixels: probability that a pixel is stuck; `stuck` low | high | both
- dead_columns, dead_rows: number of stuck lines (or a fraction of them with `as_fraction`); `stuck`
- jpeg: 100 - JPEG quality (albumentations ImageCompression, 8-bit)
- occlusion: side of square occluding patches as a fraction of the shorter image side; `patches`, `fill`
- rotation: angle in degrees (sense random per item unless `direction`); `border`
- translation: shift in px (direction uniform per item unless `angle`); `border`

A partner adds one by subclassing `Perturbation` (name, unit, grid, domain, `one` or `perturb`)
and naming it `module:Class` in the sweep parameters.

The linear filters and warps call OpenCV directly: the same primitives albumentations wraps, without its
per-call overhead (about 10x the filtering work on a 64x64 image, see bench/bench_sweep.py).
"""

from __future__ import annotations

import math
from concurrent.futures import Executor
from typing import Any, ClassVar, Literal

import albumentations as A
import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from trustcase.errors import UserError, validation_message
from trustcase.registry import Registry, RegistryError

BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}


class PerturbationError(UserError, ValueError):
    pass


class Options(BaseModel):
    """A perturbation's secondary parameters (everything but the amplitude); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Perturbation:
    name: ClassVar[str]
    unit: ClassVar[str]
    grid: ClassVar[tuple[float, ...]]  # default amplitude grid
    domain: ClassVar[tuple[float, float]] = (0.0, float("inf"))
    integer: ClassVar[bool] = False  # the amplitude must be a whole number
    Options: ClassVar[type[Options]] = Options

    def __init__(self, value_range: tuple[float, float] = (0.0, 255.0), **options: Any):
        self.lo, self.hi = float(value_range[0]), float(value_range[1])
        if not self.lo < self.hi:
            raise PerturbationError(f"{self.name}: value range {value_range} must be [min, max] with min < max")
        try:
            self.options = self.Options(**options)
        except ValidationError as e:
            raise PerturbationError(f"{self.name}: bad options: {validation_message(e, 'options')}") from None

    # --- validation, before any work -------------------------------------------------------------

    def amplitude_domain(self) -> tuple[float, float]:
        """Valid amplitudes; may depend on the options (e.g. contrast loss cannot exceed 1)."""
        return self.domain

    def validate(self, amplitude: float) -> float:
        lo, hi = self.amplitude_domain()
        a = float(amplitude)
        if not math.isfinite(a) or not lo <= a <= hi:
            raise PerturbationError(f"{self.name}: amplitude {amplitude} {self.unit} is outside [{lo:g}, {hi:g}]")
        if self.integer and a != round(a):
            raise PerturbationError(f"{self.name}: amplitude {amplitude} must be a whole number ({self.unit})")
        return a

    def check_shape(self, shape: tuple[int, int, int], amplitudes: list[float]) -> None:
        """Raise if images of shape (H, W, C) cannot take these amplitudes (e.g. 40 dead columns in 32)."""

    # --- application ------------------------------------------------------------------------------

    def apply(self, images: np.ndarray, amplitude: float, seeds: np.ndarray, pool: Executor | None = None,
              chunks: int = 1) -> np.ndarray:
        """`seeds[i]` makes item i's randomness independent of batch composition.

        With a `pool`, the batch is cut into `chunks` parts processed concurrently (OpenCV and most
        numpy kernels release the GIL); the result does not depend on the cut.
        """
        images = np.asarray(images)
        if images.ndim != 4:
            raise PerturbationError(f"{self.name}: expected a batch (B, H, W, C), got shape {images.shape}")
        if len(seeds) != len(images):
            raise PerturbationError(f"{self.name}: {len(seeds)} seeds for {len(images)} images")
        if amplitude == 0:
            return images
        if pool is None or chunks < 2 or len(images) < 2:
            return self._apply(images, amplitude, seeds)
        parts = np.array_split(np.arange(len(images)), min(chunks, len(images)))
        done = [pool.submit(self._apply, images[p], amplitude, seeds[p]) for p in parts]
        return np.concatenate([f.result() for f in done])

    def _apply(self, images: np.ndarray, amplitude: float, seeds: np.ndarray) -> np.ndarray:
        out = self.perturb(self.to_unit(images), float(amplitude), seeds)
        if not np.isfinite(out).all():  # a bug in the perturbation, never the user's fault
            raise PerturbationError(f"{self.name} produced NaN/inf at amplitude {amplitude}")
        return self.from_unit(out, images.dtype)

    def to_unit(self, images: np.ndarray) -> np.ndarray:
        return ((images.astype(np.float32) - np.float32(self.lo)) * np.float32(1.0 / (self.hi - self.lo)))

    def from_unit(self, u: np.ndarray, dtype: np.dtype) -> np.ndarray:
        x = np.clip(u, 0.0, 1.0, dtype=np.float32)
        x *= np.float32(self.hi - self.lo)
        x += np.float32(self.lo)
        if np.issubdtype(dtype, np.integer):
            np.rint(x, out=x)
        return np.clip(x, self.lo, self.hi, out=x).astype(dtype, copy=False)

    def perturb(self, u: np.ndarray, amplitude: float, seeds: np.ndarray) -> np.ndarray:
        """Unit-space batch (B, H, W, C) float32 -> perturbed unit-space batch (may leave [0, 1])."""
        return np.stack([self.one(img, amplitude, rng) for img, rng in zip(u, _rngs(seeds), strict=True)])

    def one(self, image: np.ndarray, amplitude: float, rng: np.random.Generator) -> np.ndarray:
        """One unit-space image (H, W, C) float32 -> perturbed; override this or `perturb`."""
        raise NotImplementedError(f"{type(self).__name__} must implement one() or perturb()")


PERTURBATIONS = Registry("trustcase.perturbations", Perturbation, "perturbation")


def _rngs(seeds: np.ndarray) -> list[np.random.Generator]:
    return [np.random.default_rng(int(s)) for s in seeds]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective uint64 hash whose outputs on a counter pass BigCrush."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniforms(seeds: np.ndarray, shape: tuple[int, ...], stream: int) -> np.ndarray:
    """(B, *shape) float32 uniforms in [0, 1): item i's depend on (seeds[i], stream) only."""
    keys = _splitmix(np.asarray(seeds, np.uint64) ^ _splitmix(np.full(1, stream, np.uint64)))
    idx = np.arange(int(np.prod(shape)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = _splitmix(keys[:, None] + idx[None, :] * _GOLDEN)
    return ((z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)).reshape(len(keys), *shape)


def normals(seeds: np.ndarray, shape: tuple[int, ...], stream: int) -> np.ndarray:
    """(B, *shape) float32 standard normals (Box-Muller on two uniform streams)."""
    r = np.sqrt(-2.0 * np.log1p(-uniforms(seeds, shape, stream)))
    return r * np.cos(np.float32(2 * np.pi) * uniforms(seeds, shape, stream + 1))


def _per_image(fn, u: np.ndarray) -> np.ndarray:
    """Apply an OpenCV call image by image, keeping the channel axis OpenCV drops for one channel."""
    return np.stack([fn(img).reshape(img.shape) for img in u])


def _filter(u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    k = kernel.astype(np.float32)
    return _per_image(lambda img: cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT_101), u)


# --- optics --------------------------------------------------------------------------------------


class GaussianBlur(Perturbation):
    """Loss of focus modelled as a Gaussian point-spread function of standard deviation sigma."""

    name = "gaussian_blur"
    unit = "px (sigma)"
    grid = (0.5, 1.0, 1.5, 2.0, 3.0)
    domain = (0.0, 20.0)

    def perturb(self, u, amplitude, seeds):
        k = int(2 * math.ceil(3 * amplitude) + 1)  # +-3 sigma, odd
        return _per_image(lambda img: cv2.GaussianBlur(img, (k, k), amplitude, borderType=cv2.BORDER_REFLECT_101), u)


def line_kernel(length: float, angle: float) -> np.ndarray:
    """Normalised streak of `length` px at `angle` degrees (anti-aliased by bilinear splatting)."""
    k = 2 * math.ceil(length / 2) + 3
    c = (k - 1) / 2
    t = np.linspace(-length / 2, length / 2, max(2, int(math.ceil(length * 8))))
    xs, ys = c + t * math.cos(math.radians(angle)), c - t * math.sin(math.radians(angle))
    x0, y0 = np.floor(xs).astype(int), np.floor(ys).astype(int)
    fx, fy = xs - x0, ys - y0
    ker = np.zeros((k, k))
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        np.add.at(ker, (y0 + dy, x0 + dx), w)
    return ker / ker.sum()


def disk_kernel(radius: float, supersample: int = 8) -> np.ndarray:
    """Normalised pillbox of `radius` px: each cell weighted by the share of it inside the disk."""
    r = math.ceil(radius)
    k = 2 * r + 1
    s = (np.arange(k * supersample) + 0.5) / supersample - k / 2  # sub-cell centres, origin at the centre
    inside = (s[None, :] ** 2 + s[:, None] ** 2 <= radius * radius).astype(float)
    ker = inside.reshape(k, supersample, k, supersample).mean(axis=(1, 3))
    if ker.sum() == 0:  # radius below the sub-cell pitch: no blur
        ker[r, r] = 1.0
    return ker / ker.sum()


class MotionOptions(Options):
    angle: float | None = None  # degrees from the x axis; None: uniform in [0, 180) per item


class MotionBlur(Perturbation):
    """Camera or part moving during exposure: a straight streak of `length` px."""

    name = "motion_blur"
    unit = "px (streak length)"
    grid = (2.0, 4.0, 6.0, 9.0, 13.0)
    domain = (0.0, 64.0)
    Options = MotionOptions

    def perturb(self, u, amplitude, seeds):
        if self.options.angle is not None:
            return _filter(u, line_kernel(amplitude, self.options.angle))
        angles = 180.0 * uniforms(seeds, (), 10)
        return np.stack([
            cv2.filter2D(img, -1, line_kernel(amplitude, float(t)).astype(np.float32),
                         borderType=cv2.BORDER_REFLECT_101).reshape(img.shape)
            for img, t in zip(u, angles, strict=True)])


class Defocus(Perturbation):
    """Out-of-focus lens: the point-spread function is a disk of `radius` px (below 0.5 px: within one pixel)."""

    name = "defocus"
    unit = "px (disk radius)"
    grid = (1.0, 1.5, 2.0, 3.0, 4.0)
    domain = (0.0, 20.0)

    def perturb(self, u, amplitude, seeds):
        return _filter(u, disk_kernel(amplitude))


# --- exposure -----------------------------------------------------------------------------------


class DirectionOptions(Options):
    direction: Literal["up", "down", "random"] = "random"


def _signs(direction: str, seeds: np.ndarray) -> np.ndarray:
    if direction == "up":
        return np.ones(len(seeds), np.float32)
    if direction == "down":
        return -np.ones(len(seeds), np.float32)
    return np.where(uniforms(seeds, (), 11) < 0.5, np.float32(1.0), np.float32(-1.0))


class Brightness(Perturbation):
    """Lighting or exposure drift: every pixel shifted by `a` x (max - min) (sign by `direction`)."""

    name = "brightness"
    unit = "fraction of the value range"
    grid = (0.05, 0.1, 0.2, 0.3, 0.4)
    domain = (0.0, 1.0)
    Options = DirectionOptions

    def perturb(self, u, amplitude, seeds):
        return u + (amplitude * _signs(self.options.direction, seeds))[:, None, None, None]


class ContrastOptions(Options):
    direction: Literal["down", "up"] = "down"


class Contrast(Perturbation):
    """Washed-out (down) or harsh (up) exposure: deviations from the image mean scaled by 1 -+ a."""

    name = "contrast"
    unit = "fraction of contrast lost (down) / gained (up)"
    grid = (0.1, 0.2, 0.4, 0.6, 0.8)
    domain = (0.0, 10.0)
    Options = ContrastOptions

    def amplitude_domain(self):
        return (0.0, 1.0) if self.options.direction == "down" else (0.0, 10.0)

    def perturb(self, u, amplitude, seeds):
        factor = 1.0 - amplitude if self.options.direction == "down" else 1.0 + amplitude
        mean = u.mean(axis=(1, 2), keepdims=True)
        return mean + np.float32(factor) * (u - mean)


class GammaOptions(Options):
    direction: Literal["darken", "brighten"] = "darken"


class Gamma(Perturbation):
    """Non-linear sensor response: u -> u**(1 + a) darkens mid-tones, u**(1 / (1 + a)) brightens them."""

    name = "gamma"
    unit = "gamma - 1"
    grid = (0.25, 0.5, 1.0, 1.5, 2.0)
    domain = (0.0, 10.0)
    Options = GammaOptions

    def perturb(self, u, amplitude, seeds):
        g = 1.0 + amplitude if self.options.direction == "darken" else 1.0 / (1.0 + amplitude)
        return np.power(np.clip(u, 0.0, 1.0), np.float32(g))


# --- sensor defects -----------------------------------------------------------------------------


class NoiseOptions(Options):
    per_channel: bool = True  # False: one noise field shared by the channels (luminance noise)


class GaussianNoise(Perturbation):
    """Additive Gaussian sensor noise of std `a` x (max - min), independent per pixel."""

    name = "gaussian_noise"
    unit = "std as a fraction of the value range"
    grid = (0.01, 0.02, 0.05, 0.1, 0.2)
    domain = (0.0, 1.0)
    Options = NoiseOptions

    def perturb(self, u, amplitude, seeds):
        h, w, c = u.shape[1:]
        shape = (h, w, c if self.options.per_channel else 1)
        return u + np.float32(amplitude) * normals(seeds, shape, 12)


class StuckOptions(Options):
    stuck: Literal["low", "high", "both"] = "both"  # dead pixels stuck at min, at max, or either (1/2 each)


def _stuck_values(stuck: str, seeds: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(B, *shape) values 0 (stuck low) or 1 (stuck high)."""
    if stuck in ("low", "high"):
        return np.full((len(seeds), *shape), float(stuck == "high"), np.float32)
    return (uniforms(seeds, shape, 14) < 0.5).astype(np.float32)


class DeadPixels(Perturbation):
    """Each pixel (all its channels) independently stuck at min or max with probability `a`."""

    name = "dead_pixels"
    unit = "fraction of pixels"
    grid = (0.001, 0.005, 0.01, 0.02, 0.05)
    domain = (0.0, 1.0)
    Options = StuckOptions

    def perturb(self, u, amplitude, seeds):
        h, w = u.shape[1:3]
        # the same uniform field at every amplitude: dead sets are nested as `a` grows
        dead = uniforms(seeds, (h, w), 13) < amplitude
        return np.where(dead[..., None], _stuck_values(self.options.stuck, seeds, (h, w))[..., None], u)


class LineOptions(StuckOptions):
    as_fraction: bool = False  # amplitude is a fraction of the lines instead of a count


class DeadColumns(Perturbation):
    """Whole sensor columns stuck at min or max (a failed read-out line)."""

    name = "dead_columns"
    unit = "columns"
    grid = (1.0, 2.0, 4.0, 8.0)
    Options = LineOptions
    axis: ClassVar[int] = 1  # axis of (H, W) along which lines are counted: columns are indexed by W

    def amplitude_domain(self):
        return (0.0, 1.0) if self.options.as_fraction else (0.0, float("inf"))

    def validate(self, amplitude):
        a = super().validate(amplitude)
        if not self.options.as_fraction and a != round(a):
            raise PerturbationError(f"{self.name}: amplitude {amplitude} must be a whole number of {self.unit}")
        return a

    def count(self, amplitude: float, lines: int) -> int:
        return int(round(amplitude * lines)) if self.options.as_fraction else int(amplitude)

    def check_shape(self, shape, amplitudes):
        lines = shape[self.axis]
        worst = max(amplitudes)
        if self.count(worst, lines) > lines:
            raise PerturbationError(f"{self.name}: amplitude {worst:g} asks for {self.count(worst, lines)} "
                                    f"{self.unit} but the images have {lines}")

    def perturb(self, u, amplitude, seeds):
        lines = u.shape[1 + self.axis]
        n = self.count(amplitude, lines)
        # a random rank per line: the n lowest are dead, so the dead set is nested as the amplitude grows
        rank = uniforms(seeds, (lines,), 15).argsort(axis=1).argsort(axis=1)
        dead, values = rank < n, _stuck_values(self.options.stuck, seeds, (lines,))
        where = (slice(None), None, slice(None), None) if self.axis == 1 else (slice(None), slice(None), None, None)
        return np.where(dead[where], values[where], u)


class DeadRows(DeadColumns):
    """Whole sensor rows stuck at min or max."""

    name = "dead_rows"
    unit = "rows"
    axis = 0


class Jpeg(Perturbation):
    """Lossy transmission or storage: 8-bit JPEG at quality 100 - a (albumentations ImageCompression)."""

    name = "jpeg"
    unit = "100 - JPEG quality"
    grid = (10.0, 30.0, 50.0, 70.0, 90.0)
    domain = (0.0, 99.0)
    integer = True

    def check_shape(self, shape, amplitudes):
        if shape[2] not in (1, 3):
            raise PerturbationError(f"{self.name}: JPEG takes 1 or 3 channels, the images have {shape[2]}")

    def perturb(self, u, amplitude, seeds):
        q = int(round(100 - amplitude))
        t = A.ImageCompression(quality_range=(q, q), p=1.0)
        u8 = np.rint(np.clip(u, 0.0, 1.0) * 255).astype(np.uint8)
        return _per_image(lambda img: t(image=img)["image"], u8).astype(np.float32) / np.float32(255)


class OcclusionOptions(Options):
    patches: int = 1
    fill: Literal["low", "high", "mean", "noise"] = "low"


class Occlusion(Perturbation):
    """Dirt, a tool or a label over the part: square patches of side `a` x the shorter image side."""

    name = "occlusion"
    unit = "fraction of the image side"
    grid = (0.05, 0.1, 0.2, 0.3, 0.5)
    domain = (0.0, 1.0)
    Options = OcclusionOptions

    def perturb(self, u, amplitude, seeds):
        b, h, w, c = u.shape
        side = int(round(amplitude * min(h, w)))
        if side == 0:
            return u
        # centres drawn whatever the amplitude: patches grow around the same points
        centres = uniforms(seeds, (self.options.patches, 2), 16) * np.float32([h, w])
        y0 = np.rint(centres[..., 0] - side / 2).astype(int)[..., None, None]  # (B, patches, 1, 1)
        x0 = np.rint(centres[..., 1] - side / 2).astype(int)[..., None, None]
        yy, xx = np.arange(h)[:, None], np.arange(w)[None, :]
        hidden = ((yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)).any(axis=1)[..., None]
        fill = self.options.fill
        if fill == "noise":
            value = uniforms(seeds, (h, w, c), 17)
        elif fill == "mean":
            value = u.mean(axis=(1, 2, 3), keepdims=True)
        else:
            value = np.float32(fill == "high")
        return np.where(hidden, value, u)


# --- geometry ----------------------------------------------------------------------------------


def _warp(u: np.ndarray, matrices: list[np.ndarray], border: str) -> np.ndarray:
    h, w = u.shape[1:3]
    return np.stack([
        cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=BORDERS[border]).reshape(img.shape)
        for img, m in zip(u, matrices, strict=True)
    ])


class RotationOptions(Options):
    direction: Literal["random", "counterclockwise", "clockwise"] = "random"
    border: Literal["reflect", "replicate", "constant"] = "reflect"


class Rotation(Perturbation):
    """Part or camera rotated by `a` degrees about the image centre (bilinear)."""

    name = "rotation"
    unit = "degrees"
    grid = (2.0, 5.0, 10.0, 15.0, 30.0)
    domain = (0.0, 180.0)
    Options = RotationOptions

    def perturb(self, u, amplitude, seeds):
        h, w = u.shape[1:3]
        d = self.options.direction
        signs = _signs({"counterclockwise": "up", "clockwise": "down"}.get(d, d), seeds)
        centre = ((w - 1) / 2, (h - 1) / 2)
        return _warp(u, [cv2.getRotationMatrix2D(centre, float(s * amplitude), 1.0) for s in signs],
                     self.options.border)


class TranslationOptions(Options):
    angle: float | None = None  # direction of the shift in degrees from the x axis; None: uniform per item
    border: Literal["reflect", "replicate", "constant"] = "reflect"


class Translation(Perturbation):
    """Part off its nominal position by `a` px (sub-pixel shifts interpolate bilinearly)."""

    name = "translation"
    unit = "px"
    grid = (1.0, 2.0, 4.0, 6.0, 8.0)
    Options = TranslationOptions

    def check_shape(self, shape, amplitudes):
        if max(amplitudes) >= min(shape[:2]):
            raise PerturbationError(f"{self.name}: a shift of {max(amplitudes):g} px leaves nothing of "
                                    f"{shape[0]}x{shape[1]} images")

    def perturb(self, u, amplitude, seeds):
        angles = ([self.options.angle] * len(seeds) if self.options.angle is not None
                  else (360.0 * uniforms(seeds, (), 18)).tolist())
        mats = [np.float32([[1, 0, amplitude * math.cos(math.radians(t))],
                            [0, 1, -amplitude * math.sin(math.radians(t))]]) for t in angles]
        return _warp(u, mats, self.options.border)


# --- lookup -------------------------------------------------------------------------------------


def perturbation_class(name: str) -> type[Perturbation]:
    """A catalogue name, or a partner's 'module:Class' (a Perturbation subclass)."""
    try:
        cls = PERTURBATIONS.resolve(name)
    except RegistryError as e:
        raise PerturbationError(str(e)) from None
    for attr in ("name", "unit", "grid"):
        if not hasattr(cls, attr):
            raise PerturbationError(f"{name!r} does not define {attr!r}")
    return cls


def get(name: str, value_range: tuple[float, float], **options: Any) -> Perturbation:
    return perturbation_class(name)(value_range, **options)


def catalogue() -> list[dict[str, Any]]:
    """Name, unit, domain, default grid, options and description of every built-in perturbation."""
    return [
        {"name": n, "unit": c.unit, "domain": list(c.domain), "grid": list(c.grid),
         "options": {k: str(f.default) for k, f in c.Options.model_fields.items()},
         "description": (c.__doc__ or "").strip()}
        for n, c in sorted(PERTURBATIONS.items())
    ]
