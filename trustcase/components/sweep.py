"""Perturbation sweeps: how each metric degrades as a sensor trouble grows.

One pass over the data per perturbation: each batch is predicted clean once, then perturbed
at every amplitude of the grid; nothing is copied per amplitude beyond the batch in hand.
"""

from __future__ import annotations

import numpy as np
from pydantic import field_validator

from trustcase.components import perturbations as P
from trustcase.components.checks import Check, Context, Params, register
from trustcase.components.performance import Tally
from trustcase.components.stats import clopper_pearson
from trustcase.schemas import CheckOutcome, Measurement, PerturbationScope, Scope


class SweepParams(Params):
    perturbations: dict[str, list[float] | None]  # name -> amplitude grid (None: the default grid)
    split: str = "test"

    @field_validator("perturbations")
    @classmethod
    def _known(cls, v: dict[str, list[float] | None]) -> dict[str, list[float] | None]:
        if not v:
            raise ValueError("name at least one perturbation")
        for name, grid in v.items():
            if name not in P.PERTURBATIONS:
                raise ValueError(f"unknown perturbation {name!r}; known: {sorted(P.PERTURBATIONS)}")
            if grid is not None:
                if not grid:
                    raise ValueError(f"{name}: the amplitude grid is empty")
                for a in grid:
                    P.PERTURBATIONS[name].validate(a)
        return v

    def grid(self, name: str) -> list[float]:
        g = self.perturbations[name]
        return sorted(set([0.0, *(P.PERTURBATIONS[name].grid if g is None else g)]))


def area_under(amplitudes: list[float], values: list[float]) -> float:
    """Mean of the metric over the amplitude range (trapezoid area / width): 1 is perfect."""
    a, v = np.asarray(amplitudes), np.asarray(values)
    return float(np.trapezoid(v, a) / (a[-1] - a[0])) if len(a) > 1 else float(v[0])


@register
class PerturbationSweep(Check):
    name = "perturbation_sweep"
    Params = SweepParams

    def shards(self) -> list[Check]:
        p: SweepParams = self.params
        return [PerturbationSweep(SweepParams(perturbations={n: p.grid(n)}, split=p.split)) for n in p.perturbations]

    def run(self, ctx: Context) -> CheckOutcome:
        p: SweepParams = self.params
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        out: list[Measurement] = []
        summary = {}
        for name in p.perturbations:
            pert = P.get(name, uc.model.value_range)
            grid = p.grid(name)
            tallies = [Tally(uc) for _ in grid]
            flips = np.zeros(len(grid), np.int64)
            seen = 0
            for batch in ctx.batches(p.split):
                seeds = P.item_seeds(ctx.seed, batch.index)
                clean = None
                for j, a in enumerate(grid):
                    x = pert.apply(batch.images, a, seeds)
                    pred = tallies[j].update(ctx.model.logits(x, batch.ids), batch.labels, batch.meta)
                    clean = pred if clean is None else clean
                    flips[j] += int((pred != clean).sum())
                seen += len(batch)
            for j, a in enumerate(grid):
                ms = tallies[j].compute(self.name, p.split, conf, perturbation=name, amplitude=a, calibration=False)
                iv = clopper_pearson(int(flips[j]), seen, conf)
                scope = Scope(split=p.split, perturbation=PerturbationScope(name=name, max_amplitude=a))
                ms.append(Measurement(check=self.name, metric="flip_rate", value=flips[j] / max(seen, 1),
                                      interval=iv, n=seen, scope=scope, amplitude=a))
                out += ms
            acc = [m.value for m in out if m.metric == "accuracy" and not m.scope.subgroup
                   and m.scope.perturbation.name == name]
            summary[name] = {"unit": pert.unit, "grid": grid, "accuracy_auc": area_under(grid, acc)}
        return CheckOutcome(
            check=self.name, measurements=out, summary=summary,
            validity=[f"{n}: amplitudes {summary[n]['grid']} {summary[n]['unit']}, applied in pixel space "
                      f"before normalisation, seed {ctx.seed}" for n in summary],
        )
