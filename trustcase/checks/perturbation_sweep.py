"""The `perturbation_sweep` check: each perturbation swept over its amplitudes, with breaking amplitudes
and example strips (science in `robustness.perturbations` and `robustness.sweep`).

Summary, per perturbation key: `perturbation` (class), `unit`, `grid`, `options`, `n`, `accuracy_auc`
and `critical_recall_auc` (mean of the metric over the amplitude range, 1 is perfect), `flip_rate`
(per amplitude), `breaking` (per requirement that names this perturbation, judged over the whole grid:
`holds_up_to`, the largest grid amplitude up to which the claim PASSes at every amplitude, None if not
even clean; `not_held_from`, the next grid amplitude, and `verdict_there` (FAIL or INCONCLUSIVE);
`value`/`interval` of the metric at `holds_up_to`; `point_holds_up_to`, the same on the point estimate
alone, an optimistic reading), `strip` (the example image, or None).

Curves: `robustness_<key>`: accuracy, recall of the critical class and flip rate vs amplitude with
bands; claim thresholds as y marks, claimed and held amplitudes as x marks.
Findings: a perturbation measured without a claim, and how far it moves accuracy.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np
from pydantic import Field, field_validator

from trustcase import seeding
from trustcase.checks import Check, CheckError, Context, Params, Produces, Unsupported, artefact_name
from trustcase.measurement import proportion
from trustcase.robustness import perturbations as P
from trustcase.robustness.sweep import _perturbed, area_under, breaking, curve, steady_heap, strip_image, undefined
from trustcase.schemas import (
    CheckOutcome,
    Finding,
    Measurement,
    PerturbationScope,
    Scope,
    Stage,
    Topic,
)
from trustcase.tasks import task_of


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


class PerturbationSweep(Check):
    name = "perturbation_sweep"
    Params = SweepParams
    stage = Stage.TESTING
    tasks = frozenset({"classification", "detection", "segmentation"})  # scored by the task's metrics
    whole_images = True  # under fit: tiles: the whole image perturbed, then tiled

    @classmethod
    def produces(cls, params, use_case):
        """Measurements, per perturbation (scope.perturbation = {name: <key>, max_amplitude: a}, amplitude = a):
        - every metric of the task's scorer without calibration (a classifier's `performance.Tally`: accuracy,
          recall:<class>, precision:<class>, false_negative_rate:<critical>, cost, and the same per categorical
          ODD subgroup, Clopper-Pearson intervals at the plan's confidence; a detector's AP, mAP, recall and
          false indications per image, `tasks.detection_metrics`);
        - `flip_rate`: share of items whose decision differs from their clean one (a classifier's predicted
          class; a detector's set of indicated classes at the operating threshold)."""
        task = task_of(use_case)
        return [Produces(m, params.split, key, subgroups=task.subgroups and task.perturbed_subgroups)
                for key in params.perturbations for m in [*task.metrics(use_case, calibration=False), "flip_rate"]]

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
        out = CheckOutcome(check=self.name, shard=", ".join(perts),
                           caveat="The perturbations are synthetic, applied to real test images before the model; "
                                  "they imitate, not reproduce, defects of the line.")
        pool = ThreadPoolExecutor(p.workers, thread_name_prefix="perturb") if p.workers >= 2 else None
        if pool is not None:
            steady_heap()
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
        tallies = [task_of(uc).scorer(uc, self.name, ctx.seed, calibration=False) for _ in grid]
        flips = np.zeros(len(grid), np.int64)
        seen = 0
        example: list[np.ndarray] = []
        keep = p.strip and not uc.confidential
        for batch in ctx.batches(p.split, p.batch_size):
            seeds = seeding.item_seeds(ctx.seed, self.name, batch.ids, key)
            pick = None
            if keep and not example:  # an item of the critical class if the first batch has one
                crit = np.flatnonzero(batch.labels == uc.critical_index)
                pick = int(crit[0]) if len(crit) else 0
            clean = None
            for j, (_, x) in enumerate(_perturbed(pert, batch.images, grid, seeds, pool)):
                pred = tallies[j].update(ctx.model, dataclasses.replace(batch, images=x))
                clean = pred if clean is None else clean
                flips[j] += int((pred != clean).sum())
                if pick is not None:
                    example.append(x[pick])
            seen += len(batch)
        unreadable = len(ctx.data.stream(p.split).unreadable)

        ms: list[Measurement] = []
        for j, a in enumerate(grid):
            ms += tallies[j].compute(p.split, conf, perturbation=key, amplitude=a)
            scope = Scope(split=p.split, perturbation=PerturbationScope(name=key, max_amplitude=a))
            ms.append(proportion(self.name, "flip_rate", int(flips[j]), seen, conf, scope, a,
                                 undefined=f"no readable item in split {p.split!r}"))
        broken = breaking(uc.requirements, key, ms)

        def auc(metric: str) -> float | None:
            v = [m.value for m in ms if m.metric == metric and not m.scope.subgroup]
            return None if not v or any(undefined(x) for x in v) else area_under(grid, v)

        strip = None
        if example:
            path = ctx.workdir / artefact_name(f"strip_{key}", ".png")
            cv2.imwrite(str(path), strip_image(example, [f"{a:g}" for a in grid], uc.model.value_range))
            out.artefacts.append(ctx.artefact(path, "image"))
            strip = out.artefacts[-1].path
        spec = p.spec(key)
        out.measurements.extend(ms)
        out.curves.append(curve(key, pert.unit, grid, ms, uc, broken))
        out.units[key] = pert.unit
        ends = [next((m for m in ms if m.metric == "accuracy" and not m.scope.subgroup and m.amplitude == a
                      and m.value is not None), None) for a in (grid[0], grid[-1])]
        claimed = any(r.scope.perturbation and r.scope.perturbation.name == key for r in uc.requirements)
        if not claimed and None not in ends:
            out.findings.append(Finding(
                topic=Topic.BREAKS, text=f"Measured without a claim: {key.replace('_', ' ')} moves accuracy from "
                                         "{clean} to {worst} at {worst.amplitude}.",
                cites={"clean": ends[0], "worst": ends[1]}))
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
            f"randomness seeded per item by (seed {ctx.seed}, check, item id, perturbation), shared across amplitudes; "
            f"{seen} items of the {p.split} split at every amplitude, {conf:.0%} Clopper-Pearson intervals"
        )
        if unreadable:
            out.limitations.append(f"{key}: {unreadable} unreadable items of the {p.split} split were skipped")
        if any(b.get("measured", True) for b in broken.values()):
            out.limitations.append(f"{key}: a breaking amplitude is only located to within the grid "
                                   f"{grid}: the claim breaks somewhere in [holds_up_to, not_held_from)")
        if p.strip and uc.confidential:
            out.limitations.append(f"{key}: no example strip (the use case is confidential)")

