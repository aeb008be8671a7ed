"""The `local_robustness` check: L-inf balls around sampled inputs proved, falsified or unknown (science in
`certification.local_robustness`)."""

from __future__ import annotations

import csv
import time

import numpy as np
import torch
from pydantic import Field, field_validator

from trustcase.certification import bounds as B
from trustcase.certification.local_robustness import VERDICTS, change_property, verify_ball
from trustcase.certification.properties import single_thread
from trustcase.checks import Check, Context, Params, Produces, Unsupported
from trustcase.measurement import clopper_pearson
from trustcase.schemas import CheckOutcome, Curve, Measurement, PerturbationScope, Scope, Series, Stage


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


class LocalRobustness(Check):
    name = "local_robustness"
    Params = LocalRobustnessParams
    stage = Stage.FORMAL

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, params.split, "linf_radius") for m in
                ("local_robustness_verified", "local_robustness_falsified")]
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
        radii = sorted({*p.radii, *ctx.claimed("local_robustness_verified", "linf_radius")})

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

