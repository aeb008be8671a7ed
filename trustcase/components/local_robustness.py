"""Local robustness, proved: around sampled inputs, does the prediction stay the same for every input of
an L-infinity ball? Answered per input and radius by the formal machinery of `properties` and `bounds`:

- `verified`: proved by CROWN + interval bounds with input splitting (float64, margin `bounds.TOLERANCE`)
  that no input of the ball gives another class a score >= the predicted one (a tie counts as a change);
- `falsified`: an input of the ball that changes the prediction, found by the bounds' corners or by
  sampling + PGD, and re-checked by a plain float32 forward pass;
- `unknown`: neither within the time budget. Unknown is not verified: the verified fraction is a lower
  bound of the robust fraction, the falsified fraction a lower bound of the fragile one.

Radii are in the input scaled to [0, 1] (value / (max - min) of model.value_range), the convention of the
Lipschitz and smoothing checks, but in L-infinity; the ball is clipped to the value range (inputs outside
it are not in the domain). A falsified radius makes every larger one falsified (the counterexample is
inside the larger ball); a verified one makes every smaller one verified.

Check `local_robustness` (stage "formal"), per radius r, scope {split, perturbation {linf_radius, r}}:
- `local_robustness_verified`: fraction of the sampled inputs proved robust at r (Clopper-Pearson);
- `local_robustness_falsified`: fraction with a verified counterexample at r.
Summary keys: radii, verified, falsified, unknown (counts per radius), items, timeout, seconds.
Artefact: per-item CSV (id, label, prediction, one verdict per radius).
Requirements: `metric: local_robustness_verified, scope: {perturbation: {name: linf_radius, max_amplitude: r}}`.
Networks of Linear and ReLU layers only (e.g. ACAS Xu); anything else is "not run", with the layer named.
"""

from __future__ import annotations

import csv
import time

import numpy as np
import torch
from pydantic import Field, field_validator

from trustcase.components import bounds as B
from trustcase.components.checks import Check, Context, Params, Unsupported, register
from trustcase.components.lipschitz import claimed_radii
from trustcase.components.properties import falsify, plain_check, single_thread
from trustcase.components.stats import clopper_pearson
from trustcase.components.vnnlib import Conjunction, Property, Region
from trustcase.schemas import CheckOutcome, Curve, Measurement, PerturbationScope, Scope, Series

VERDICTS = ("verified", "falsified", "unknown")


class LocalRobustnessParams(Params):
    split: str = "test"
    radii: list[float] = [0.001, 0.002, 0.005, 0.01]  # L-inf, input scaled to [0, 1]; claimed radii are added
    max_items: int = Field(50, ge=1)  # the first items of the split (seeded subset when the split is capped)
    timeout: float = Field(2.0, gt=0)  # seconds per (input, radius)

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float]) -> list[float]:
        if not v or any(r <= 0 for r in v):
            raise ValueError("radii must be a non-empty list of values > 0")
        return v


def change_property(name: str, lower: np.ndarray, upper: np.ndarray, predicted: int, n_classes: int) -> Property:
    """'Some input of the box gives a class j != predicted a score >= the predicted one', one row per j."""
    rows = []
    for j in range(n_classes):
        if j != predicted:
            a = np.zeros((1, n_classes))
            a[0, predicted], a[0, j] = 1.0, -1.0  # y_pred - y_j <= 0
            rows.append(Conjunction(A=a, b=np.zeros(1), strict=np.zeros(1, bool)))
    return Property(name=name, n_inputs=len(lower), n_outputs=n_classes,
                    regions=[Region(lower=np.asarray(lower, np.float64), upper=np.asarray(upper, np.float64),
                                    outputs=rows)])


def verify_ball(layers: list[B.Affine], forward, prop: Property, timeout: float, seed: int = 0) -> str:
    """verified / falsified / unknown for one box: proof first (small balls are mostly proved at once),
    then a search for a counterexample with what is left of the budget."""
    t0 = time.perf_counter()
    region = prop.regions[0]

    def candidate(xs: np.ndarray):
        return plain_check(forward, prop, np.clip(xs, region.lower, region.upper))

    out = B.prove(layers, region.lower, region.upper, [(c.A, c.b) for c in region.outputs],
                  t0 + 0.8 * timeout, candidate=candidate)
    if out.verdict == "holds":
        return "verified"
    if out.verdict == "violated":
        return "falsified"
    found = falsify(forward, prop, t0 + timeout, seed, samples=1024, restarts=16, steps=50)
    return "falsified" if found is not None else "unknown"


@register
class LocalRobustness(Check):
    name = "local_robustness"
    Params = LocalRobustnessParams
    stage = "formal"
    needs_gradients = True

    def run(self, ctx: Context) -> CheckOutcome:
        p: LocalRobustnessParams = self.params
        model = ctx.model
        if model.module.training:
            raise Unsupported("local_robustness: the model is in training mode")
        try:
            layers = B.linearise(model.module)
        except B.BoundsError as e:
            raise Unsupported(f"local_robustness: {e}") from None
        shape = list(model.spec.input_shape)
        lo_v, hi_v = model.spec.value_range
        radii = sorted({*p.radii, *claimed_radii(ctx, "local_robustness_verified", "linf_radius")})

        def forward(x: torch.Tensor) -> torch.Tensor:  # flat model inputs (N, prod(shape)) -> scores
            return model.module(x.reshape(len(x), *shape))

        def model_input(pixels: np.ndarray) -> np.ndarray:
            return model.to_input(pixels[None]).reshape(-1).numpy().astype(np.float64)

        rows, t0 = [], time.perf_counter()
        with single_thread():
            for batch in ctx.batches(p.split):
                preds = model.logits(batch.images, batch.ids).argmax(1)
                for k in range(len(batch)):
                    if len(rows) == p.max_items:
                        break
                    x = np.asarray(batch.images[k], np.float64)
                    c = int(preds[k])
                    verdicts: dict[float, str] = {}
                    for r in radii:
                        if verdicts and list(verdicts.values())[-1] == "falsified":
                            verdicts[r] = "falsified"  # the counterexample lies in this larger ball too
                            continue
                        eps = r * (hi_v - lo_v)
                        lower = model_input(np.clip(x - eps, lo_v, hi_v))
                        upper = model_input(np.clip(x + eps, lo_v, hi_v))
                        prop = change_property(f"{batch.ids[k]}@{r:g}", lower, upper, c, model.n_classes)
                        verdicts[r] = verify_ball(layers, forward, prop, p.timeout, ctx.seed)
                    rows.append((batch.ids[k], int(batch.labels[k]), c, verdicts))
                if len(rows) == p.max_items:
                    break
        seconds = time.perf_counter() - t0
        n = len(rows)
        if not n:
            raise Unsupported(f"local_robustness: the {p.split} split has no readable items")
        conf = ctx.use_case.plan.confidence
        counts = {v: [sum(row[3][r] == v for row in rows) for r in radii] for v in VERDICTS}
        ms, series = [], {}
        for metric, verdict in (("local_robustness_verified", "verified"), ("local_robustness_falsified",
                                                                             "falsified")):
            values, lows, highs = [], [], []
            for r, k in zip(radii, counts[verdict], strict=True):
                iv = clopper_pearson(k, n, conf)
                values.append(k / n)
                lows.append(iv.lower)
                highs.append(iv.upper)
                ms.append(Measurement(check=self.name, metric=metric, value=k / n, interval=iv, n=n, amplitude=r,
                                      scope=Scope(split=p.split, perturbation=PerturbationScope(
                                          name="linf_radius", max_amplitude=r))))
            series[verdict] = Series(y=values, lower=lows, upper=highs)
        path = ctx.workdir / "items.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "prediction", *[f"r={r:g}" for r in radii]])
            w.writerows([i, label, c, *[v[r] for r in radii]] for i, label, c, v in rows)
        unknown = sum(counts["unknown"])
        return CheckOutcome(
            check=self.name, measurements=ms,
            curves=[Curve(id="local-robustness", title="Local robustness: proved and falsified vs L-inf radius",
                          x_label="L-inf radius (input scaled to [0, 1])", y_label="fraction of sampled inputs",
                          x=radii, series=series)],
            artefacts=[ctx.artefact(path, "table")],
            summary={"radii": radii, **counts, "items": n, "timeout": p.timeout, "seconds": round(seconds, 2)},
            validity=[
                f"L-infinity balls in the input scaled to [0, 1] around the first {n} items of the {p.split} split, "
                f"clipped to the value range [{lo_v:g}, {hi_v:g}]",
                "robust: the predicted class keeps a score strictly above every other class for every input of "
                "the ball (a tie counts as a change)",
                f"verified: proved by CROWN + interval bounds with input splitting in float64, margin "
                f"{B.TOLERANCE:g} (rounding of the float32 model is not formally accounted for)",
                "falsified: a counterexample re-checked by a plain float32 forward pass",
                f"unknown (no proof, no counterexample within {p.timeout:g} s) counts as not verified",
            ],
            limitations=[f"{unknown} (input, radius) pairs stayed unknown within {p.timeout:g} s"] if unknown else [],
        )
