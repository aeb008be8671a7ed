"""Perturbation sweeps: how each metric degrades as a sensor trouble grows, and where the claims break.

One pass over the data per perturbation: each batch is predicted clean once (amplitude 0), then
perturbed at every amplitude of the grid; nothing is copied per amplitude beyond the batch in hand.
With `workers >= 2`, the perturbations of a batch are computed on a thread pool while the model
runs on the previous amplitude (OpenCV and numpy release the GIL); results do not depend on it.

Measurements, per perturbation (scope.perturbation = {name: <key>, max_amplitude: a}, amplitude = a):
- every metric of `performance.Tally` (accuracy, recall:<class>, precision:<class>,
  false_negative_rate:<critical>, cost, and the same per categorical ODD subgroup), with
  Clopper-Pearson intervals at the plan's confidence;
- `flip_rate`: share of items whose prediction differs from their clean prediction.

Summary, per perturbation key: `perturbation` (class), `unit`, `grid`, `options`, `n`, `accuracy_auc`
and `critical_recall_auc` (mean of the metric over the amplitude range, 1 is perfect), `flip_rate`
(per amplitude), `breaking` (per requirement that names this perturbation, judged over the whole grid:
`holds_up_to`, the largest grid amplitude up to which the claim PASSes at every amplitude, None if not
even clean; `not_held_from`, the next grid amplitude, and `verdict_there` (FAIL or INCONCLUSIVE);
`value`/`interval` of the metric at `holds_up_to`; `point_holds_up_to`, the same on the point estimate
alone, an optimistic reading), `strip` (the example image, or None).

Curves: `robustness_<key>`: accuracy, recall of the critical class and flip rate vs amplitude with
bands; claim thresholds as y marks, claimed and held amplitudes as x marks.

Parameters: `perturbations` maps a key (the name claims use) to None (default grid), a grid, or
`{perturbation: <catalogue name or module:Class>, grid: [...], options: {...}}` (the key then is
an alias: e.g. `darker: {perturbation: brightness, options: {direction: down}}`).
"""

from __future__ import annotations

import math
import re
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
from pydantic import Field, field_validator

from trustcase.components import perturbations as P
from trustcase.components import verdicts
from trustcase.components.checks import Check, CheckError, Context, Params, Unsupported, register
from trustcase.components.performance import Tally
from trustcase.components.stats import clopper_pearson
from trustcase.schemas import (
    CheckOutcome,
    Curve,
    Measurement,
    PerturbationScope,
    Requirement,
    Scope,
    Series,
    UseCase,
)


class PerturbationSpec(Params):
    perturbation: str | None = Field(None, description="catalogue name or module:Class; default: the key")
    grid: list[float] | None = Field(None, description="amplitudes; default: the perturbation's own grid")
    options: dict[str, Any] = {}


class SweepParams(Params):
    perturbations: dict[str, PerturbationSpec | list[float] | None]
    split: str = "test"
    workers: int = Field(2, ge=0, le=32, description="threads computing perturbations (0 or 1: inline)")
    strip: bool = Field(True, description="write an example strip (never for a confidential use case)")
    batch_size: int | None = Field(None, ge=1)

    @field_validator("perturbations")
    @classmethod
    def _known(cls, v: dict) -> dict[str, PerturbationSpec]:
        if not v:
            raise ValueError("name at least one perturbation")
        out = {}
        for key, spec in v.items():
            spec = spec if isinstance(spec, PerturbationSpec) else PerturbationSpec(grid=spec)
            if not key.strip():
                raise ValueError("a perturbation key is empty")
            pert = P.get(spec.perturbation or key, (0.0, 1.0), **spec.options)  # PerturbationError is a ValueError
            if spec.grid is not None and not spec.grid:
                raise ValueError(f"{key}: the amplitude grid is empty")
            grid = sorted({0.0, *(pert.validate(a) for a in (spec.grid if spec.grid is not None else pert.grid))})
            out[key] = spec.model_copy(update={"grid": grid})
        return out

    def spec(self, key: str) -> PerturbationSpec:
        return self.perturbations[key]

    def grid(self, key: str) -> list[float]:
        return list(self.perturbations[key].grid)


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
        wide = r.model_copy(update={"scope": r.scope.model_copy(
            update={"perturbation": PerturbationScope(name=key, max_amplitude=math.inf)})})
        found = sorted((m for m in measurements if verdicts.matches(wide, m)), key=lambda m: m.amplitude or 0.0)
        if not found:
            out[r.id] = {"metric": r.metric, "measured": False}
            continue
        held = verdicts.breaking_amplitude(wide, found)
        at = next((m for m in found if m.amplitude == held), None)
        beyond = next((m for m in found if held is None or (m.amplitude or 0.0) > held), None)
        bounds = (None, None) if beyond is None or beyond.interval is None else \
            (beyond.interval.lower, beyond.interval.upper)
        point = [m.model_copy(update={"interval": None}) for m in found]
        out[r.id] = {
            "metric": r.metric, "comparator": r.comparator, "threshold": r.threshold,
            "claimed_up_to": r.scope.perturbation.max_amplitude, "holds_up_to": held,
            "not_held_from": None if beyond is None else beyond.amplitude,
            "verdict_there": None if beyond is None else
            verdicts.verdict(beyond.value, r.comparator, r.threshold, *bounds).value,
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
    metrics = ["accuracy", f"recall:{uc.model.critical_class}", "flip_rate"]
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


@register
class PerturbationSweep(Check):
    name = "perturbation_sweep"
    Params = SweepParams
    stage = "testing"

    def shards(self) -> list[Check]:
        p: SweepParams = self.params
        return [PerturbationSweep(p.model_copy(update={"perturbations": {k: s}})) for k, s in p.perturbations.items()]

    def run(self, ctx: Context) -> CheckOutcome:
        p: SweepParams = self.params
        uc = ctx.use_case
        if len(uc.model.input_shape) != 3:
            raise Unsupported(f"{self.name} perturbs images; the model takes input_shape {uc.model.input_shape}")
        c, h, w = uc.model.input_shape
        perts = {}
        for key, spec in p.perturbations.items():  # every shape problem before any work
            pert = P.get(spec.perturbation or key, uc.model.value_range, **spec.options)
            try:
                pert.check_shape((h, w, c), spec.grid)
            except P.PerturbationError as e:
                raise CheckError(f"{self.name}: {e}") from None
            perts[key] = pert
        out = CheckOutcome(check=self.name)
        pool = ThreadPoolExecutor(p.workers, thread_name_prefix="perturb") if p.workers >= 2 else None
        try:
            for key, pert in perts.items():
                self._sweep(ctx, key, pert, p.grid(key), pool, out)
        finally:
            if pool is not None:
                pool.shutdown()
        return out

    def _sweep(self, ctx: Context, key: str, pert: P.Perturbation, grid: list[float], pool: Executor | None,
               out: CheckOutcome) -> None:
        p: SweepParams = self.params
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        tallies = [Tally(uc) for _ in grid]
        flips = np.zeros(len(grid), np.int64)
        seen = 0
        example: list[np.ndarray] = []
        keep = p.strip and not uc.confidential
        for batch in ctx.batches(p.split, p.batch_size):
            seeds = P.item_seeds(ctx.seed, batch.index)
            pick = None
            if keep and not example:  # an item of the critical class if the first batch has one
                crit = np.flatnonzero(batch.labels == uc.critical_index)
                pick = int(crit[0]) if len(crit) else 0
            clean = None
            for j, (_, x) in enumerate(_perturbed(pert, batch.images, grid, seeds, pool)):
                pred = tallies[j].update(ctx.model.logits(x, batch.ids), batch.labels, batch.meta)
                clean = pred if clean is None else clean
                flips[j] += int((pred != clean).sum())
                if pick is not None:
                    example.append(x[pick])
            seen += len(batch)
        unreadable = len(ctx.data.stream(p.split).unreadable)

        ms: list[Measurement] = []
        for j, a in enumerate(grid):
            ms += tallies[j].compute(self.name, p.split, conf, perturbation=key, amplitude=a, calibration=False)
            scope = Scope(split=p.split, perturbation=PerturbationScope(name=key, max_amplitude=a))
            ms.append(Measurement(check=self.name, metric="flip_rate", value=flips[j] / max(seen, 1),
                                  interval=clopper_pearson(int(flips[j]), seen, conf), n=seen, scope=scope,
                                  amplitude=a))
        broken = breaking(uc.requirements, key, ms)

        def auc(metric: str) -> float | None:
            v = [m.value for m in ms if m.metric == metric and not m.scope.subgroup]
            return None if not v or any(undefined(x) for x in v) else area_under(grid, v)

        strip = None
        if example:
            path = ctx.workdir / f"strip_{re.sub(r'[^A-Za-z0-9_.-]', '_', key)}.png"
            cv2.imwrite(str(path), strip_image(example, [f"{a:g}" for a in grid], uc.model.value_range))
            out.artefacts.append(ctx.artefact(path, "image"))
            strip = out.artefacts[-1].path
        spec = p.spec(key)
        out.measurements.extend(ms)
        out.curves.append(curve(key, pert.unit, grid, ms, uc, broken))
        out.summary[key] = {
            "perturbation": spec.perturbation or key, "unit": pert.unit, "grid": grid,
            "options": pert.options.model_dump(), "n": seen,
            "accuracy_auc": auc("accuracy"), "critical_recall_auc": auc(f"recall:{uc.model.critical_class}"),
            "flip_rate": [float(f / max(seen, 1)) for f in flips], "breaking": broken, "strip": strip,
        }
        opts = ", ".join(f"{k}={v}" for k, v in pert.options.model_dump().items())
        lo, hi = uc.model.value_range
        out.validity.append(
            f"{key} ({spec.perturbation or key}{', ' + opts if opts else ''}): amplitudes {grid} {pert.unit}, "
            f"applied in pixel space [{lo:g}, {hi:g}] (results clipped to it) before the model's normalisation; "
            f"randomness seeded per item by (seed {ctx.seed}, item position), shared across amplitudes; "
            f"{seen} items of the {p.split} split at every amplitude, {conf:.0%} Clopper-Pearson intervals"
        )
        if unreadable:
            out.limitations.append(f"{key}: {unreadable} unreadable items of the {p.split} split were skipped")
        if any(b.get("measured", True) for b in broken.values()):
            out.limitations.append(f"{key}: a breaking amplitude is only located to within the grid "
                                   f"{grid}: the claim breaks somewhere in [holds_up_to, not_held_from)")
        if p.strip and uc.confidential:
            out.limitations.append(f"{key}: no example strip (the use case is confidential)")
