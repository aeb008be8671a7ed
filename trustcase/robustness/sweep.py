"""Perturbation sweeps: how each metric degrades as a sensor trouble grows, and where the claims break.

One pass over the data per perturbation: each batch is predicted clean once (amplitude 0), then
perturbed at every amplitude of the grid; nothing is copied per amplitude beyond the batch in hand.
With `workers >= 2`, the perturbations of a batch are computed on a thread pool while the model
runs on the previous amplitude (OpenCV and numpy release the GIL); results do not depend on it.

The check `perturbation_sweep` packs the sweeps as evidence (its measurements: `PerturbationSweep.produces`).

Parameters: `perturbations` maps a key (the name claims use) to None (default grid), a grid, or
`{perturbation: <catalogue name or module:Class>, grid: [...], options: {...}}` (the key then is
an alias: e.g. `darker: {perturbation: brightness, options: {direction: down}}`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from concurrent.futures import Executor

import cv2
import numpy as np

from trustcase import verdicts
from trustcase.robustness import perturbations as P
from trustcase.schemas import (
    Curve,
    Measurement,
    PerturbationScope,
    Requirement,
    Series,
    UseCase,
)


def area_under(amplitudes: list[float], values: list[float]) -> float:
    """Mean of the metric over the amplitude range (trapezoid area / width): 1 is perfect."""
    a, v = np.asarray(amplitudes, float), np.asarray(values, float)
    return float(np.trapezoid(v, a) / (a[-1] - a[0])) if len(a) > 1 else float(v[0])


def breaking(requirements: list[Requirement], key: str, measurements: list[Measurement]) -> dict[str, dict]:
    """Per requirement naming perturbation `key`: the bracket [holds_up_to, fails_from) of its breaking point.

    The claim is judged over the whole grid (not only up to its declared maximum), with the same
    conservative rule as the verdicts: the pessimistic end of each interval must satisfy it.
    """
    out = {}
    for r in requirements:
        if r.scope.perturbation is None or r.scope.perturbation.name != key:
            continue
        top = max((m.amplitude or 0.0 for m in measurements), default=0.0)  # the whole grid (amplitudes are finite)
        wide = r.model_copy(update={"scope": r.scope.model_copy(
            update={"perturbation": PerturbationScope(name=key, max_amplitude=top)})})
        found = sorted((m for m in measurements if verdicts.matches(wide, m)), key=lambda m: m.amplitude or 0.0)
        if not found:
            out[r.id] = {"metric": r.metric, "measured": False}
            continue
        held = verdicts.breaking_amplitude(wide, found)
        at = next((m for m in found if m.amplitude == held), None)
        beyond = next((m for m in found if held is None or (m.amplitude or 0.0) > held), None)
        bounds = (None, None) if beyond is None or beyond.interval is None else \
            (beyond.interval.lower, beyond.interval.upper)
        point = [m.model_copy(update={"interval": None, "kind": "census"}) for m in found]  # the values alone
        out[r.id] = {
            "metric": r.metric, "comparator": r.comparator, "threshold": r.threshold,
            "claimed_up_to": r.scope.perturbation.max_amplitude, "holds_up_to": held,
            "not_held_from": None if beyond is None else beyond.amplitude,
            "verdict_there": None if beyond is None else
            verdicts.verdict(beyond.value, r.comparator, r.threshold, *bounds, beyond.kind).value,
            "value": None if at is None else at.value,
            "interval": None if at is None or at.interval is None else [at.interval.lower, at.interval.upper],
            "point_holds_up_to": verdicts.breaking_amplitude(wide, point),
        }
    return out


def undefined(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _series(ms: list[Measurement]) -> Series | None:
    if not ms or any(undefined(m.value) for m in ms):
        return None
    lows = [m.interval.lower for m in ms] if all(m.interval for m in ms) else None
    highs = [m.interval.upper for m in ms] if all(m.interval for m in ms) else None
    return Series(y=[m.value for m in ms], lower=lows, upper=highs)


def curve(key: str, unit: str, grid: list[float], ms: list[Measurement], uc: UseCase,
          broken: dict[str, dict]) -> Curve:
    claimed = [r.metric for r in uc.requirements if r.scope.perturbation and r.scope.perturbation.name == key]
    # a classifier's two figures, and what the claims under this perturbation measure (a segmenter's image rates)
    metrics = list(dict.fromkeys(["accuracy", f"recall:{uc.model.critical_class}", *claimed, "flip_rate"]))
    plain = [m for m in ms if not m.scope.subgroup]
    series = {}
    for metric in metrics:
        s = _series(sorted((m for m in plain if m.metric == metric), key=lambda m: m.amplitude))
        if s is not None:
            series[metric] = s
    y_marks, x_marks = {}, {}
    for r in uc.requirements:
        b = broken.get(r.id)
        if b is None or r.metric not in series:
            continue
        y_marks[f"{r.id}: {r.metric} {r.comparator} {r.threshold:g}"] = r.threshold
        x_marks[f"{r.id} claimed up to"] = r.scope.perturbation.max_amplitude
        if b.get("holds_up_to") is not None:
            x_marks[f"{r.id} holds up to"] = b["holds_up_to"]
    return Curve(id=f"robustness_{key}", title=f"Robustness to {key.replace('_', ' ')}",
                 x_label=f"{key} amplitude ({unit})",
                 y_label=f"metric ({uc.plan.confidence:.0%} Clopper-Pearson band)",
                 x=list(grid), series=series, x_marks=x_marks, y_marks=y_marks)


def strip_image(images: list[np.ndarray], captions: list[str], value_range: tuple[float, float],
                min_side: int = 96) -> np.ndarray:
    """One row of tiles (BGR uint8), each upscaled without smoothing and captioned underneath."""
    lo, hi = value_range
    h, w, c = images[0].shape
    f = max(1, math.ceil(min_side / min(h, w)))
    tiles = []
    for img, text in zip(images, captions, strict=True):
        u8 = np.rint(np.clip((img.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
        u8 = cv2.cvtColor(u8, cv2.COLOR_RGB2BGR) if c == 3 else np.repeat(u8[..., :1], 3, axis=2)
        big = cv2.resize(u8, (w * f, h * f), interpolation=cv2.INTER_NEAREST)
        band = np.full((20, w * f, 3), 255, np.uint8)
        cv2.putText(band, text, (3, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
        tiles += [np.vstack([big, band]), np.full((h * f + 20, 4, 3), 255, np.uint8)]
    return np.hstack(tiles[:-1])


@functools.cache
def steady_heap() -> None:
    """Perturbed batches made in the perturbation threads and freed in the main one grow glibc's heap without end:
    its mmap threshold rises to the largest block freed, so later batches are carved from per-thread arenas that are
    not given back (measured on 200x200 images: peak RSS 2.7 GB at 2,700 images against 0.67 GB at 270). A fixed
    threshold of 1 MiB keeps such blocks mapped and returns them on free. Process-wide, glibc only, once."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to set
        pass


def _perturbed(pert: P.Perturbation, images: np.ndarray, grid: list[float], seeds: np.ndarray,
               pool: Executor | None):
    """(amplitude, batch) in grid order; with a pool, later amplitudes are computed while the model runs."""
    if pool is None:
        for a in grid:
            yield a, pert.apply(images, a, seeds)
        return
    futures = [pool.submit(pert.apply, images, a, seeds) for a in grid]
    for a, f in zip(grid, futures, strict=True):
        yield a, f.result()


