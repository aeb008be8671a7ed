"""The `local_robustness` check: L-inf balls around sampled inputs proved, falsified or unknown (science in
`certification.local_robustness`, `certification.graph`, `certification.propagation`).

Every network goes through its layer graph and `local_robustness.decide` (IBP, the attack engine of the
adversarial check, CROWN, alpha-CROWN, then branch and bound: input splitting for tabular inputs such as ACAS
Xu's, beta-CROWN ReLU splitting for images). Radii are in the input scaled to [0, 1] (`unit: scaled`, scope
`linf_radius`) or in pixel units of the value range (`unit: pixel`, scope `linf_pixels`: grey levels for 0-255 images).
Measurements per radius: `local_robustness_verified`, `local_robustness_falsified` and
`local_robustness_certified_accuracy` (verified AND correct), each k of n with a Clopper-Pearson interval.
"""

from __future__ import annotations

import csv
import time
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from trustcase import seeding
from trustcase.certification import graph as G
from trustcase.certification.bab import INPUT_SPLIT_MAX, MARGIN_RULE, MAX_SPLIT
from trustcase.certification.local_robustness import VERDICTS, decide, decisions
from trustcase.certification.properties import single_thread
from trustcase.checks import Check, Context, Params, Produces, Unsupported, artefact_name
from trustcase.measurement import proportion
from trustcase.schemas import CheckOutcome, Curve, PerturbationScope, Scope, Series


class LocalRobustnessParams(Params):
    split: str = "test"
    radii: list[float] = [0.001, 0.002, 0.005, 0.01]  # L-inf, in `unit`; claimed radii are added
    unit: Literal["scaled", "pixel"] = "scaled"  # scaled: input / (max - min) of the value range; pixel: grey levels
    max_items: int = Field(50, ge=1)  # the first items of the split
    timeout: float = Field(2.0, gt=0)  # seconds per (input, radius)
    # image models: neurons per layer whose bounds CROWN refines (loosest first); None: every unstable one
    refine: int | None = Field(None, ge=0)

    @field_validator("radii")
    @classmethod
    def _radii(cls, v: list[float]) -> list[float]:
        if not v or any(r <= 0 for r in v):
            raise ValueError("radii must be a non-empty list of values > 0")
        return v


class LocalRobustness(Check):
    name = "local_robustness"
    Params = LocalRobustnessParams
    stage = "formal"
    needs_gradients = True

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split, per radius r under the perturbation scope linf_radius (or linf_pixels): the
        shares of the sampled inputs proved robust (`local_robustness_verified`; a claim: `metric:
        local_robustness_verified, scope: {perturbation: {name: linf_radius, max_amplitude: r}}`), with a
        re-checked counterexample (`local_robustness_falsified`), and proved robust AND correct
        (`local_robustness_certified_accuracy`). Summary keys: radii, unit, verified, falsified, unknown and
        certified (counts per radius), items, timeout, seconds, decided_by, median_seconds; artefact: the per-item
        CSV (id, label, prediction, one verdict per radius)."""
        scope = "linf_radius" if params.unit == "scaled" else "linf_pixels"
        return [Produces(m, params.split, scope) for m in
                ("local_robustness_verified", "local_robustness_falsified", "local_robustness_certified_accuracy")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: LocalRobustnessParams = self.params
        model = ctx.model
        if model.module.training:
            raise Unsupported("local_robustness: the model is in training mode")
        shape = list(model.spec.input_shape)
        try:
            graph = G.from_model(model.module, shape)
        except G.GraphError as e:
            raise Unsupported(f"local_robustness: {e}") from None
        lo_v, hi_v = model.spec.value_range
        scope_name = "linf_radius" if p.unit == "scaled" else "linf_pixels"
        radii = sorted({*p.radii, *ctx.claimed("local_robustness_verified", scope_name),
                        *ctx.claimed("local_robustness_certified_accuracy", scope_name)})
        pixel = (hi_v - lo_v) if p.unit == "scaled" else 1.0  # pixel units per radius unit
        confidential = ctx.use_case.confidential
        cx_dir = ctx.workdir / "counterexamples"

        rows, details, t0 = [], [], time.perf_counter()
        artefacts = []
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
                        eps = r * pixel
                        lower, upper = np.clip(x - eps, lo_v, hi_v), np.clip(x + eps, lo_v, hi_v)
                        box = [model.to_input(v[None]).double() for v in (x, lower, upper)]
                        out = decide(graph, model.module, *box, c, p.timeout, ctx.seed,
                                     item_seed=seeding.item_seed(ctx.seed, self.name, batch.ids[k], "attack"),
                                     limit=p.refine, prove="unknown" not in verdicts.values())
                        verdicts[r] = out["verdict"]
                        details.append({"item": batch.ids[k], "radius": r, **{key: out.get(key) for key in (
                            "verdict", "method", "margin", "seconds")}})
                        if out["verdict"] == "falsified" and not confidential:
                            artefacts += self._save(ctx, cx_dir, batch.ids[k], r, model, out["counterexample"],
                                                    lower, upper)
                    rows.append((batch.ids[k], int(batch.labels[k]), c, verdicts))
                if len(rows) == p.max_items:
                    break
        seconds = time.perf_counter() - t0
        n = len(rows)
        if not n:
            raise Unsupported(f"local_robustness: the {p.split} split has no readable items")
        conf = ctx.use_case.plan.confidence
        counts = {v: [sum(row[3][r] == v for row in rows) for r in radii] for v in VERDICTS}
        certified = [sum(row[3][r] == "verified" and row[1] == row[2] for row in rows) for r in radii]
        ms, series = [], {}
        for metric, ks in (("local_robustness_verified", counts["verified"]),
                           ("local_robustness_falsified", counts["falsified"]),
                           ("local_robustness_certified_accuracy", certified)):
            values, lows, highs = [], [], []
            for r, k in zip(radii, ks, strict=True):
                m = proportion(self.name, metric, k, n, conf, amplitude=r, scope=Scope(
                    split=p.split, perturbation=PerturbationScope(name=scope_name, max_amplitude=r)))
                ms.append(m)
                values.append(m.value)
                lows.append(m.interval.lower)
                highs.append(m.interval.upper)
            series[metric.removeprefix("local_robustness_")] = Series(y=values, lower=lows, upper=highs)
        path = ctx.workdir / "items.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "label", "prediction", *[f"r={r:g}" for r in radii]])
            w.writerows([i, label, c, *[v[r] for r in radii]] for i, label, c, v in rows)
        unknown = sum(counts["unknown"])
        unit = ("input scaled to [0, 1]" if p.unit == "scaled"
                else f"pixel units of the value range [{lo_v:g}, {hi_v:g}]")
        refined = ("every unstable neuron" if p.refine is None else
                   f"the loosest {p.refine} unstable neurons per layer, the rest by IBP")
        how = ("IBP, then the attack engine (FGSM, PGD, APGD), then CROWN (intermediate bounds refined for "
               f"{refined}, until the time budget), then alpha-CROWN, then branch and bound (input splitting "
               f"for at most {INPUT_SPLIT_MAX} inputs, else beta-CROWN ReLU splitting when at most {MAX_SPLIT} "
               "ReLUs stay unstable), on the layer graph; a ball larger than one left unproved around the same input "
               "is only attacked")
        summary = {"radii": radii, "unit": p.unit, **counts, "certified": certified, "items": n,
                   "timeout": p.timeout, "seconds": round(seconds, 2), "engine": "layer graph"}
        if details:
            summary.update(decisions(details))
        return CheckOutcome(
            check=self.name, measurements=ms,
            caveat="A proof for each sampled input and its ball, not for inputs that were not sampled.",
            curves=[Curve(id="local-robustness", title="Local robustness: proved and falsified vs L-inf radius",
                          x_label=f"L-inf radius ({unit})", y_label="fraction of sampled inputs",
                          x=radii, series=series)],
            artefacts=[ctx.artefact(path, "table"), *artefacts],
            summary=summary,
            validity=[
                f"L-infinity balls ({unit}) around the first {n} items of the {p.split} split, clipped to the "
                f"value range [{lo_v:g}, {hi_v:g}]",
                "robust: the predicted class keeps a score strictly above every other class for every input of "
                "the ball (a tie counts as a change)",
                f"verified: proved by {how}, in float64: {MARGIN_RULE}; here the float32 forward error is not "
                "bounded per ball: a verified ball is proved for the network in exact arithmetic",
                "falsified: a counterexample inside the ball re-checked by a plain float32 forward pass",
                f"unknown (no proof, no counterexample within {p.timeout:g} s) counts as not verified: the verified "
                "fraction is a lower bound of the robust fraction, the falsified one a lower bound of the fragile one",
            ],
            limitations=[f"{unknown} (input, radius) pairs stayed unknown within {p.timeout:g} s"] if unknown else [],
        )

    @staticmethod
    def _save(ctx: Context, folder, item: str, r: float, model, cx_input: np.ndarray, lower, upper) -> list:
        """The counterexample in pixel space (exact .npy, 8-bit .png preview), once per item (smallest radius)."""
        npy = folder / artefact_name(item, ".npy")
        if npy.exists():
            return []
        folder.mkdir(parents=True, exist_ok=True)
        zero = model.to_input(np.zeros_like(lower)[None]).double()
        one = model.to_input(np.ones_like(lower)[None]).double()
        pixels = (torch.from_numpy(cx_input).double()[None] - zero) / (one - zero)  # the inverse affine map
        pixels = pixels.permute(0, 2, 3, 1)[0].numpy() if pixels.ndim == 4 else pixels[0].numpy()
        pixels = np.clip(pixels.reshape(lower.shape), lower, upper)
        np.save(npy, pixels)
        out = [ctx.artefact(npy, "counterexample")]
        if pixels.ndim == 3:
            import cv2

            lo_v, hi_v = model.spec.value_range
            png = folder / artefact_name(item, ".png")
            cv2.imwrite(str(png), np.round((pixels - lo_v) / (hi_v - lo_v) * 255).clip(0, 255).astype(np.uint8))
            out.append(ctx.artefact(png, "image"))
        return out
