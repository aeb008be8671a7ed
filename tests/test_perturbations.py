"""The perturbation catalogue: one conformance suite for every entry, then each one's physics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy import stats

from trustcase.checks import CheckError, build
from trustcase.data import images
from trustcase.robustness import perturbations as P
from trustcase.schemas import CheckSpec
from trustcase.seeding import item_seeds

CATALOGUE = sorted(P.PERTURBATIONS)
FORMATS = {  # dtype, value range, channels
    "uint8-grey": (np.uint8, (0.0, 255.0), 1),
    "float32-rgb": (np.float32, (0.0, 1.0), 3),
    "float64-grey-signed": (np.float64, (-1.0, 1.0), 1),
}


class Invert(P.Perturbation):
    """A partner's perturbation: blend towards the negative image."""

    name = "invert"
    unit = "blend weight"
    grid = (0.5, 1.0)
    domain = (0.0, 1.0)

    def one(self, image, amplitude, rng):
        return (1 - amplitude) * image + amplitude * (1 - image)


class Broken(Invert):
    name = "broken"

    def one(self, image, amplitude, rng):
        return image * np.nan


def batch(fmt: str, n: int = 6, size: int = 24, seed: int = 0) -> np.ndarray:
    dtype, (lo, hi), c = FORMATS[fmt]
    x = lo + np.random.default_rng(seed).random((n, size, size, c)) * (hi - lo)
    return np.rint(x).astype(dtype) if dtype == np.uint8 else x.astype(dtype)


def grey_field(value: float = 128.0, n: int = 4, size: int = 32) -> np.ndarray:
    return np.full((n, size, size, 1), value, np.float32)


def texture(n: int = 3, size: int = 48) -> np.ndarray:
    """Sharp random blocks (4x4 px): plenty of high frequencies for blur and JPEG to remove."""
    blocks = np.random.default_rng(1).integers(30, 225, (n, size // 4, size // 4, 1))
    return np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2).astype(np.uint8)


def seeds(n: int, seed: int = 0) -> np.ndarray:
    return item_seeds(seed, "test", range(n), "perturbation")


# --- conformance: every perturbation, every input format -----------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", CATALOGUE)
def test_conformance(name, fmt):
    dtype, vr, c = FORMATS[fmt]
    x = batch(fmt)
    pert = P.get(name, vr)
    assert pert.unit and pert.grid and all(pert.validate(a) == a for a in pert.grid)
    s = seeds(len(x))
    assert pert.apply(x, 0.0, s) is x  # amplitude 0: exactly the identity
    for a in pert.grid:
        y = pert.apply(x, a, s)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert np.isfinite(y).all() and y.min() >= vr[0] and y.max() <= vr[1]
        assert np.array_equal(y, pert.apply(x, a, s))  # deterministic for the seeds
    a = pert.grid[-1]
    whole = pert.apply(x, a, s)
    assert not np.array_equal(whole, x)
    # per-item randomness: the batching does not matter, nor does a thread pool
    parts = np.concatenate([pert.apply(x[:2], a, s[:2]), pert.apply(x[2:], a, s[2:])])
    assert np.array_equal(whole, parts)
    with ThreadPoolExecutor(2) as pool:
        assert np.array_equal(whole, pert.apply(x, a, s, pool=pool, chunks=3))


@pytest.mark.parametrize("name", ["gaussian_noise", "dead_pixels", "dead_columns", "occlusion", "translation",
                                  "motion_blur", "brightness", "rotation"])
def test_random_perturbations_follow_the_seed(name):
    x = batch("uint8-grey")
    pert = P.get(name, (0, 255))
    a = pert.grid[-1]
    assert not np.array_equal(pert.apply(x, a, seeds(len(x), 0)), pert.apply(x, a, seeds(len(x), 1)))


def test_catalogue_lists_every_perturbation_with_unit_domain_and_grid():
    names = [e["name"] for e in P.catalogue()]
    assert names == CATALOGUE
    assert set(names) >= {"gaussian_blur", "motion_blur", "defocus", "brightness", "contrast", "gamma",
                          "gaussian_noise", "dead_pixels", "dead_columns", "dead_rows", "jpeg", "occlusion",
                          "rotation", "translation"}


# --- physics ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gaussian_blur", "motion_blur", "defocus"])
def test_blur_lowers_the_variance_of_the_laplacian(name):
    x = texture()
    pert = P.get(name, (0, 255))
    sharp = [images.laplacian_variance(pert.apply(x, a, seeds(len(x)))).mean() for a in (0.0, *pert.grid)]
    assert all(b < a for a, b in zip(sharp, sharp[1:], strict=False)), sharp


def test_blur_kernels_are_normalised_and_shaped():
    line = P.line_kernel(5.0, 0.0)
    assert line.sum() == pytest.approx(1.0)
    row = line.sum(axis=1)
    assert row.argmax() == len(row) // 2 and row.max() == pytest.approx(1.0)  # horizontal streak
    assert (line.sum(axis=0) > 0).sum() in (5, 6, 7)  # about 5 px long (anti-aliased ends)
    disk = P.disk_kernel(3.0)
    assert disk.sum() == pytest.approx(1.0) and disk.shape == (7, 7)
    assert disk[3, 3] == pytest.approx(1 / (np.pi * 9), rel=0.02)  # a full cell over the disk's area
    assert disk[0, 0] == 0 and disk[3, 0] > 0
    assert np.array_equal(P.disk_kernel(0.01), np.pad(np.ones((1, 1)), 1))  # below the sub-cell pitch: a delta


def test_motion_blur_along_a_fixed_angle_leaves_the_other_axis_alone():
    x = np.zeros((1, 21, 21, 1), np.float32)
    x[0, :, 10] = 1.0  # a vertical line: a horizontal streak smears it, a vertical one does not
    horizontal = P.get("motion_blur", (0, 1), angle=0.0).apply(x, 5.0, seeds(1))
    vertical = P.get("motion_blur", (0, 1), angle=90.0).apply(x, 5.0, seeds(1))
    assert horizontal[0, 10, 10, 0] < 0.5 and horizontal[0, 10, 8, 0] > 0.05
    assert np.allclose(vertical, x, atol=1e-6)


def test_gaussian_noise_std_is_the_requested_fraction_of_the_range():
    x = grey_field(n=8, size=64)
    for a in (0.01, 0.05, 0.1):
        d = P.get("gaussian_noise", (0, 255)).apply(x, a, seeds(len(x))) - x
        assert d.std() == pytest.approx(a * 255, rel=0.03)
        assert abs(d.mean()) < 3 * a * 255 / np.sqrt(d.size)


def test_dead_pixel_fraction_matches_within_sampling_error_and_sets_are_nested():
    x = grey_field(n=10, size=64).astype(np.uint8)
    pert = P.get("dead_pixels", (0, 255))
    previous = np.zeros(x.shape, bool)
    for a in (0.001, 0.01, 0.05, 0.2):
        y = pert.apply(x, a, seeds(len(x)))
        dead = y != 128
        k, n = int(dead.sum()), dead.size
        lo, hi = stats.binom.interval(0.999, n, a)
        assert lo <= k <= hi, (a, k / n)
        assert set(np.unique(y[dead])) <= {0, 255}
        assert (dead | ~previous).all()  # everything dead before is still dead
        previous = dead
    high = P.get("dead_pixels", (0, 255), stuck="high").apply(x, 0.1, seeds(len(x)))
    assert set(np.unique(high)) == {128, 255}


def test_dead_pixels_kill_every_channel_of_a_pixel():
    x = np.full((2, 16, 16, 3), 0.5, np.float32)
    y = P.get("dead_pixels", (0, 1), stuck="low").apply(x, 0.3, seeds(2))
    dead = (y == 0).any(axis=-1)
    assert dead.any() and (y[dead] == 0).all()


@pytest.mark.parametrize("name,axis", [("dead_columns", 2), ("dead_rows", 1)])
def test_dead_lines_count_exactly(name, axis):
    x = grey_field(n=3, size=20)
    for n_lines in (1, 3, 7):
        y = P.get(name, (0, 255)).apply(x, float(n_lines), seeds(3))
        changed = (y != 128).any(axis=(3, 3 - axis))  # per item, which lines changed
        assert (changed.sum(axis=1) == n_lines).all()
        stuck = np.moveaxis(y, axis, 1)[changed]
        assert all(len(np.unique(line)) == 1 and line.flat[0] in (0, 255) for line in stuck)
    frac = P.get(name, (0, 255), as_fraction=True).apply(x, 0.25, seeds(3))
    assert ((frac != 128).any(axis=(3, 3 - axis)).sum(axis=1) == 5).all()


def test_brightness_shifts_by_the_fraction_of_the_range():
    x = grey_field(100.0, n=40)
    up = P.get("brightness", (0, 255), direction="up").apply(x, 0.2, seeds(40))
    down = P.get("brightness", (0, 255), direction="down").apply(x, 0.2, seeds(40))
    assert np.allclose(up, 151.0, atol=1e-3) and np.allclose(down, 49.0, atol=1e-3)
    both = P.get("brightness", (0, 255)).apply(x, 0.2, seeds(40))[:, 0, 0, 0]
    assert set(np.round(both).tolist()) == {49.0, 151.0}
    assert P.get("brightness", (0, 255), direction="up").apply(x, 1.0, seeds(40)).max() == 255  # clipped


def test_contrast_scales_deviations_from_the_mean():
    x = batch("float32-rgb") * 0.5 + 0.25  # room on both sides: no clipping
    dev = x - x.mean(axis=(1, 2), keepdims=True)
    for direction, factor in (("down", 0.6), ("up", 1.4)):
        y = P.get("contrast", (0, 1), direction=direction).apply(x, 0.4, seeds(len(x)))
        assert np.allclose(y - y.mean(axis=(1, 2), keepdims=True), factor * dev, atol=1e-5)
    with pytest.raises(P.PerturbationError, match="outside"):
        P.get("contrast", (0, 1), direction="down").validate(1.5)
    assert P.get("contrast", (0, 1), direction="up").validate(1.5) == 1.5


def test_gamma_closed_form():
    x = batch("float32-rgb")
    assert np.allclose(P.get("gamma", (0, 1)).apply(x, 1.0, seeds(len(x))), x**2, atol=1e-6)
    assert np.allclose(P.get("gamma", (0, 1), direction="brighten").apply(x, 1.0, seeds(len(x))), np.sqrt(x),
                       atol=1e-6)


def test_jpeg_error_grows_as_quality_drops():
    x = texture()
    pert = P.get("jpeg", (0, 255))
    err = [np.abs(pert.apply(x, a, seeds(len(x))).astype(float) - x).mean() for a in pert.grid]
    assert all(b > a for a, b in zip(err, err[1:], strict=False)), err
    with pytest.raises(P.PerturbationError, match="whole number"):
        pert.validate(10.5)


def test_occlusion_patches_grow_around_the_same_centre():
    x = grey_field(n=5, size=40)
    pert = P.get("occlusion", (0, 255))
    previous = np.zeros(x.shape, bool)
    for a in (0.1, 0.2, 0.4):
        hidden = pert.apply(x, a, seeds(5)) == 0
        side = round(a * 40)
        assert ((hidden.sum(axis=(1, 2, 3)) > 0) & (hidden.sum(axis=(1, 2, 3)) <= side * side)).all()
        assert (hidden | ~previous).all()
        previous = hidden


def test_rotation_by_90_degrees_is_a_quarter_turn():
    x = batch("float32-rgb", size=15)
    y = P.get("rotation", (0, 1), direction="counterclockwise").apply(x, 90.0, seeds(len(x)))
    assert np.allclose(y, np.rot90(x, k=1, axes=(1, 2)), atol=1e-4)
    small = P.get("rotation", (0, 1))
    err = [np.abs(small.apply(x, a, seeds(len(x))) - x).mean() for a in small.grid]
    assert all(b > a for a, b in zip(err, err[1:], strict=False))


def test_translation_shifts_by_whole_and_half_pixels():
    x = batch("float32-rgb", size=16)
    right = P.get("translation", (0, 1), angle=0.0)
    assert np.allclose(right.apply(x, 3.0, seeds(len(x)))[:, :, 3:], x[:, :, :-3], atol=1e-5)
    half = right.apply(x, 0.5, seeds(len(x)))
    assert np.allclose(half[:, :, 1:], (x[:, :, 1:] + x[:, :, :-1]) / 2, atol=1e-3)
    up = P.get("translation", (0, 1), angle=90.0).apply(x, 2.0, seeds(len(x)))
    assert np.allclose(up[:, :-2], x[:, 2:], atol=1e-5)


# --- bad input and extension ------------------------------------------------------------------------


def sweep_spec(perturbations) -> CheckSpec:
    return CheckSpec(check="perturbation_sweep", params={"perturbations": perturbations})


@pytest.mark.parametrize("perturbations,message", [
    ({"gausian_blur": None}, "unknown perturbation 'gausian_blur'"),
    ({"gaussian_blur": [-1.0]}, r"gaussian_blur: amplitude -1.0 px \(sigma\) is outside \[0, 20\]"),
    ({"dead_pixels": [0.1, 1.5]}, "dead_pixels: amplitude 1.5 fraction of pixels is outside"),
    ({"gaussian_blur": []}, "grid is empty"),
    ({}, "at least one perturbation"),
    ({"motion_blur": {"options": {"angel": 3}}}, "motion_blur: bad options: angel"),
    ({"jpeg": [12.5]}, "whole number"),
    ({"gaussian_noise": [float("nan")]}, "gaussian_noise.*finite number"),
    ({"x": {"perturbation": "tests_nowhere:Thing"}}, "cannot import module 'tests_nowhere'"),
    ({"x": {"perturbation": "numpy:ndarray"}}, "not a Perturbation subclass"),
])
def test_bad_sweep_parameters_are_located_before_any_work(perturbations, message):
    with pytest.raises(CheckError, match=message):
        build(sweep_spec(perturbations), 2)


def test_custom_perturbation_by_module_and_class():
    check = build(sweep_spec({"test_perturbations:Invert": [0.25], "negative": {"perturbation":
                                                                               "test_perturbations:Invert"}}))
    assert check.params.grid("test_perturbations:Invert") == [0.0, 0.25]
    assert check.params.grid("negative") == [0.0, 0.5, 1.0]  # the class's own grid
    pert = P.get("test_perturbations:Invert", (0, 255))
    x = batch("uint8-grey")
    assert np.array_equal(pert.apply(x, 1.0, seeds(len(x))), 255 - x)


def test_a_perturbation_producing_nan_is_caught():
    with pytest.raises(P.PerturbationError, match="NaN"):
        Broken((0, 1)).apply(batch("float32-rgb"), 0.5, seeds(6))


def test_shape_checks():
    with pytest.raises(P.PerturbationError, match="40 columns but the images have 32"):
        P.get("dead_columns", (0, 255)).check_shape((32, 32, 1), [1.0, 40.0])
    with pytest.raises(P.PerturbationError, match="leaves nothing"):
        P.get("translation", (0, 255)).check_shape((8, 8, 1), [8.0])
    with pytest.raises(P.PerturbationError, match="1 or 3 channels"):
        P.get("jpeg", (0, 255)).check_shape((8, 8, 2), [10.0])
    with pytest.raises(P.PerturbationError, match="expected a batch"):
        P.get("gaussian_blur", (0, 255)).apply(np.zeros((8, 8, 1)), 1.0, seeds(8))


# --- each physical parameter, exactly, on constructed images ------------------------------------------------
# A perturbation whose amplitude were halved (or its unit misread) on the way to the primitive must fail here:
# the response to a point of light is the point-spread function itself, and the patch, line and pixel counts
# are counted. Float tolerances come from the arithmetic: u32 = 2^-24 per rounding, times the terms summed.

U32 = 2.0 ** -24


def point(size: int = 41) -> np.ndarray:
    """One pixel of light (1.0) in the centre of a dark float32 image, value range (0, 1): its blur is the PSF."""
    x = np.zeros((1, size, size, 1), np.float32)
    x[0, size // 2, size // 2] = 1.0
    return x


def placed(kernel: np.ndarray, size: int = 41) -> np.ndarray:
    """A kernel centred in a size x size image, as a filter maps the centre point to it."""
    out = np.zeros((size, size))
    k = kernel.shape[0]
    start = size // 2 - (k - 1) // 2
    out[start:start + k, start:start + k] = kernel
    return out


@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7, 3.0])
def test_gaussian_blur_of_a_point_is_the_gaussian_of_that_sigma(sigma):
    y = P.get("gaussian_blur", (0, 1)).apply(point(), sigma, seeds(1))[0, ..., 0]
    k = 2 * int(np.ceil(3 * sigma)) + 1  # sampled over +-3 sigma, normalised
    i = np.arange(k) - (k - 1) / 2
    g = np.exp(-i**2 / (2 * sigma**2))
    g /= g.sum()
    # separable float32 filtering: two sums of k products, each entry of the kernel at most 1
    assert np.abs(y - placed(np.outer(g, g))).max() <= 2 * k * U32
    # the variance of the light along a row is the sampled kernel's: sigma^2 from sigma 1 on, less the +-3 sigma
    # truncation (a truncated normal keeps 1 - 6 phi(3) / (2 Phi(3) - 1) = 0.973 of it); below 1 px, sampling at
    # whole pixels lowers it further (0.215 for 0.25 at sigma 0.5)
    rows = y.sum(axis=1)
    variance = (rows * (np.arange(len(rows)) - len(rows) // 2) ** 2).sum()
    assert variance == pytest.approx((g * i**2).sum(), abs=len(rows) ** 2 * 2 * k * U32)
    assert sigma**2 * 0.97 <= variance <= sigma**2 or sigma < 1


@pytest.mark.parametrize("length", [3.0, 6.0, 9.0])
@pytest.mark.parametrize("angle", [0.0, 90.0])
def test_motion_blur_of_a_point_is_a_streak_of_that_length(length, angle):
    y = P.get("motion_blur", (0, 1), angle=angle).apply(point(), length, seeds(1))[0, ..., 0]
    kernel = P.line_kernel(length, angle)
    assert np.abs(y - placed(kernel)).max() <= kernel.shape[0] ** 2 * U32  # k^2 products summed in float32
    along = y.sum(axis=0 if angle == 0 else 1)
    across = y.sum(axis=1 if angle == 0 else 0)
    assert across[20] == pytest.approx(1.0, abs=len(y) ** 2 * U32)  # all the light on the point's own line
    # N samples evenly spaced over [-L/2, L/2] have variance L^2/12 (N+1)/(N-1); bilinear splatting adds <= 1/4
    n = max(2, int(np.ceil(length * 8)))
    variance = (along * (np.arange(len(along)) - 20) ** 2).sum()
    assert length**2 / 12 * (n + 1) / (n - 1) * (1 - 1e-6) <= variance <= length**2 / 12 * (n + 1) / (n - 1) + 0.25


@pytest.mark.parametrize("radius", [1.0, 2.0, 3.0, 4.5])
def test_defocus_of_a_point_is_the_disk_of_that_radius(radius):
    y = P.get("defocus", (0, 1)).apply(point(), radius, seeds(1))[0, ..., 0]
    kernel = P.disk_kernel(radius)
    assert np.abs(y - placed(kernel)).max() <= kernel.shape[0] ** 2 * U32
    # cells wholly inside the disk carry the full weight, cells wholly outside none
    r = (kernel.shape[0] - 1) // 2
    c = np.abs(np.arange(-r, r + 1))
    far = np.hypot(c[:, None] + 0.5, c[None, :] + 0.5)  # farthest point of each cell from the centre
    near = np.hypot(np.maximum(c[:, None] - 0.5, 0), np.maximum(c[None, :] - 0.5, 0))
    assert np.allclose(kernel[far <= radius], kernel.max()) and (far <= radius).any()
    assert (kernel[near >= radius] == 0).all()
    # and the full weight is 1 / (pi r^2) but for the 1/8 px supersampling of the rim (2 pi r x 1/8)
    assert kernel.max() * np.pi * radius**2 == pytest.approx(1.0, abs=(2 * np.pi * radius / 8) / (np.pi * radius**2))


@pytest.mark.parametrize("amplitude", [0.1, 0.25, 0.4])
def test_occlusion_hides_a_square_of_exactly_that_side(amplitude):
    size, n = 60, 40
    x = grey_field(n=n, size=size)
    hidden = P.get("occlusion", (0, 255)).apply(x, amplitude, seeds(n))[..., 0] == 0
    side = round(amplitude * size)
    inside = 0
    for h in hidden:
        rows, cols = np.flatnonzero(h.any(axis=1)), np.flatnonzero(h.any(axis=0))
        box = h[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert box.all() and h.sum() == box.size  # one solid rectangle
        clipped = rows[0] == 0 or cols[0] == 0 or rows[-1] == size - 1 or cols[-1] == size - 1
        assert box.shape == (side, side) if not clipped else max(box.shape) <= side
        inside += not clipped
    assert inside >= 4  # patches wholly inside: the exact side is tested, not only the clipped ones


def test_occlusion_fills_and_counts_its_patches():
    x = grey_field(n=6, size=60)
    three = P.get("occlusion", (0, 255), patches=3, fill="high").apply(x, 0.1, seeds(6))
    assert set(np.unique(three)) == {128, 255} and ((three == 255).sum(axis=(1, 2, 3)) <= 3 * 36).all()
    assert ((three == 255).sum(axis=(1, 2, 3)) > 36).any()  # more than one patch of 6 x 6
    ramp = np.broadcast_to(np.linspace(0, 1, 60, dtype=np.float32)[None, :, None, None], (2, 60, 60, 1)).copy()
    mean = P.get("occlusion", (0, 1), fill="mean").apply(ramp, 0.2, seeds(2))
    changed = mean != ramp
    assert np.allclose(mean[changed], ramp.mean(), atol=4 * U32)
    noise = P.get("occlusion", (0, 1), fill="noise").apply(grey_field(0.5, n=2, size=60) / 255, 0.3, seeds(2))
    assert len(np.unique(noise)) > 100  # uniform noise in the patch


@pytest.mark.parametrize("amplitude", [10, 50, 90])
def test_jpeg_is_the_codec_at_quality_100_minus_the_amplitude(amplitude):
    import cv2

    x = texture(n=2)
    y = P.get("jpeg", (0, 255)).apply(x, float(amplitude), seeds(2))
    for img, out in zip(x, y, strict=True):
        _, code = cv2.imencode(".jpg", img, (int(cv2.IMWRITE_JPEG_QUALITY), 100 - amplitude))
        assert np.array_equal(out[..., 0], cv2.imdecode(code, cv2.IMREAD_GRAYSCALE))


def test_rotation_by_a_small_angle_turns_a_blob_about_the_centre():
    size, d, angle = 61, 18, 10.0
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    blob = np.exp(-((xx - d) ** 2 + yy**2) / (2 * 2.0**2)).astype(np.float32)[None, ..., None]  # on the x axis
    y = P.get("rotation", (0, 1), direction="counterclockwise").apply(blob, angle, seeds(1))[0, ..., 0]
    cx, cy = (y * xx).sum() / y.sum(), (y * yy).sum() / y.sum()
    # counterclockwise on screen: up (y decreases) by d sin a; bilinear sampling keeps a smooth blob's centroid
    assert cx == pytest.approx(d * np.cos(np.radians(angle)), abs=0.02)
    assert cy == pytest.approx(-d * np.sin(np.radians(angle)), abs=0.02)


def test_shape_checks_accept_exactly_what_fits():
    """The boundaries of the shape checks (found by mutation testing): every column may die, a shift short of the
    side leaves something, JPEG takes 3 channels, a fraction of the lines is counted on the images' lines."""
    P.get("dead_columns", (0, 255)).check_shape((32, 32, 1), [32.0])
    P.get("dead_rows", (0, 255)).check_shape((16, 32, 3), [16.0])
    P.get("dead_columns", (0, 255), as_fraction=True).check_shape((8, 8, 1), [0.5, 1.0])
    P.get("translation", (0, 255)).check_shape((8, 8, 3), [7.0])
    P.get("jpeg", (0, 255)).check_shape((8, 8, 3), [10.0])


def test_gamma_takes_pixels_just_outside_the_range():
    """A pixel below the range is clipped before the power (a negative base to a fractional power is NaN)."""
    x = np.array([[[[-10.0], [300.0]]]], np.float32)
    y = P.get("gamma", (0, 255)).apply(x, 0.5, seeds(1))
    assert np.array_equal(y, np.array([[[[0.0], [255.0]]]], np.float32))


def test_occlusion_grows_around_its_drawn_centre_and_fills_each_image_with_its_own_mean():
    """Survivors of the mutation run: the square sits centred on its drawn centre whatever its side (centres
    spread over the image, not on its diagonal), a side of one pixel hides one pixel, `mean` is each image's."""
    size, n = 60, 40
    x = grey_field(n=n, size=size)
    pert = P.get("occlusion", (0, 255))
    centres = []
    for a in (0.1, 0.4):
        hidden = pert.apply(x, a, seeds(n))[..., 0] == 0
        cs = []
        for h in hidden:
            ys, xs = np.nonzero(h)
            inside = ys.min() > 0 and xs.min() > 0 and ys.max() < size - 1 and xs.max() < size - 1
            cs.append((ys.mean(), xs.mean()) if inside else (np.nan, np.nan))
        centres.append(np.array(cs))
    both = ~np.isnan(centres[0][:, 0]) & ~np.isnan(centres[1][:, 0])
    assert both.sum() >= 3 and np.abs(centres[0][both] - centres[1][both]).max() <= 1.0  # rint of c - side / 2
    assert (np.abs(centres[0][:, 0] - centres[0][:, 1]) > 2)[~np.isnan(centres[0][:, 0])].any()
    one = pert.apply(x, 1 / size, seeds(n))
    assert ((one == 0).sum(axis=(1, 2, 3)) == 1).all()
    ramp = np.linspace(0, 1, size, dtype=np.float32)[None, :, None, None] * np.float32([[[[1.0]]], [[[0.5]]]])
    ramp = np.broadcast_to(ramp, (2, size, size, 1)).copy()
    y = P.get("occlusion", (0, 1), fill="mean").apply(ramp, 0.2, seeds(2))
    for img, out in zip(ramp, y, strict=True):
        changed = out != img
        assert changed.any() and np.allclose(out[changed], img.mean(), atol=4 * U32)
