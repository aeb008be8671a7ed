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
    return P.item_seeds(seed, np.arange(n))


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
