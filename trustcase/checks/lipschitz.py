"""The `lipschitz` check: a global Lipschitz upper bound, the certified radii it gives, and an empirical
lower bound (science in `certification.lipschitz`).

Summary keys: upper_bound, upper_bound_model_input, lower_bound, tightness, radius_convention, layers, radii,
certified_accuracy, clean_accuracy, seconds_upper_bound. Artefact: per-item CSV (id, label, prediction, radius).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from pydantic import field_validator

from trustcase import measurement
from trustcase.certification.lipschitz import LipschitzError, analyse, certified_radii, empirical_lower_bound
from trustcase.checks import Check, Context, Params, Produces, Unsupported
from trustcase.measurement import accuracy_curve, estimate, median_radius, radius_grid, write_items
from trustcase.schemas import CheckOutcome, Scope, Stage


class LipschitzParams(Params):
    split: str = "test"
    radii: list[float] | None = None  # None: 0 and 20 steps up to the largest radius (claimed radii always added)
    ascent_points: int = 32  # data points the empirical lower bound starts from
    ascent_steps: int = 50

    @field_validator("radii")
    @classmethod
    def _radii(cls, v):
        if v is not None and (not v or any(r < 0 for r in v)):
            raise ValueError("radii must be a non-empty list of values >= 0")
        return v


def input_scale(ctx: Context) -> float:
    """d(model input)/d(input scaled to [0, 1]): the largest 1/std of the normalisation."""
    return 1.0 / min(ctx.use_case.model.normalisation.std)


class Lipschitz(Check):
    name = "lipschitz"
    Params = LipschitzParams
    stage = Stage.FORMAL
    tasks = frozenset({"classification", "detection"})  # detection: not applicable, with the reason (in `run`)

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split: `lipschitz_upper_bound` (the certified bound L, input scaled to [0, 1]),
        `lipschitz_lower_bound` (the largest ||f(x) - f(y)|| / ||x - y|| gradient ascent finds from data points: a
        true lower bound of L), `lipschitz_tightness` (upper / lower), `lipschitz_median_radius` (of the correctly
        classified items, 0 otherwise), and `lipschitz_certified_accuracy` under the perturbation scope l2_radius
        (amplitude r: the share of items classified correctly AND certified at radius r)."""
        clean = ["lipschitz_upper_bound", "lipschitz_lower_bound", "lipschitz_tightness", "lipschitz_median_radius"]
        return [Produces(m, params.split) for m in clean] + [
            Produces("lipschitz_certified_accuracy", params.split, "l2_radius")]
    needs_gradients = True

    def run(self, ctx: Context) -> CheckOutcome:
        p: LipschitzParams = self.params
        model = ctx.model
        if ctx.use_case.task == "detection":
            raise Unsupported(
                "lipschitz: not applicable to a detector: its decision (detections decoded from score peaks by "
                "max-pool suppression, top-k and a score threshold) is not a Lipschitz function of the input, and a "
                "bound on the raw heads certifies no box; the image-level decision is certified by "
                "randomized_smoothing")
        if model.module.training:
            raise Unsupported("lipschitz: the model is in training mode")
        t0 = time.perf_counter()
        try:
            bound = analyse(model.module, model.spec.input_shape)
        except LipschitzError as e:
            raise Unsupported(f"lipschitz: {e}") from None
        seconds = time.perf_counter() - t0
        scale = input_scale(ctx)
        upper = bound.total * scale
        radii, correct, ids, labels, preds, starts = [], [], [], [], [], []
        for batch in ctx.batches(p.split):
            z = model.logits(batch.images, batch.ids)
            r = certified_radii(z, bound, scale)
            radii.append(r)
            correct.append(z.argmax(1) == batch.labels)
            ids += batch.ids
            labels.append(batch.labels)
            preds.append(z.argmax(1))
            if sum(len(s) for s in starts) < p.ascent_points:
                starts.append(model.to_input(batch.images)[: p.ascent_points - sum(len(s) for s in starts)])
        radius = np.concatenate(radii) if radii else np.zeros(0)
        ok = np.concatenate(correct) if correct else np.zeros(0, bool)
        lower = None  # no item, no ascent: undefined, not 0
        if starts:
            lower = empirical_lower_bound(model.module, torch.cat(starts), steps=p.ascent_steps, seed=ctx.seed) * scale
        grid = radius_grid(p.radii, ctx.claimed("lipschitz_certified_accuracy", "l2_radius"), radius, ok)
        conf = ctx.use_case.plan.confidence
        ms, curve, values = accuracy_curve(self.name, "lipschitz_certified_accuracy", p.split, grid, radius, ok,
                                           conf, "Lipschitz certificate: certified accuracy vs L2 radius")
        scope = Scope(split=p.split)
        n = len(radius)
        tight = None if lower is None else upper / lower if lower > 0 else float("inf")
        ms += [
            measurement.bound(check=self.name, metric="lipschitz_upper_bound", value=upper, scope=scope, unit="L2/L2"),
            measurement.bound(check=self.name, metric="lipschitz_lower_bound", value=lower, scope=scope, unit="L2/L2",
                              n=min(n, p.ascent_points)),
            measurement.bound(check=self.name, metric="lipschitz_tightness", value=tight, scope=scope),
            estimate(check=self.name, metric="lipschitz_median_radius", value=median_radius(radius, ok), n=n,
                     interval=None, scope=scope),
        ]
        (ctx.workdir / "items.csv").parent.mkdir(parents=True, exist_ok=True)
        write_items(ctx.workdir / "items.csv", ids, np.concatenate(labels) if labels else [],
                    np.concatenate(preds) if preds else [], radius)
        pairwise = bound.head is not None
        convention = ("pairwise: r = min_j (z_y - z_j) / (||W_y - W_j|| L_body), W the last Linear layer"
                      if pairwise else "r = (z_y - z_second) / (sqrt(2) L)")
        return CheckOutcome(
            check=self.name, measurements=ms, curves=[curve],
            caveat="A certificate for the deterministic model as loaded, for every input within the radius.",
            artefacts=[ctx.artefact(ctx.workdir / "items.csv", "table")],
            summary={"upper_bound": upper, "upper_bound_model_input": bound.total, "lower_bound": lower,
                     "tightness": tight, "radius_convention": convention, "layers": bound.layers,
                     "radii": grid, "certified_accuracy": values, "clean_accuracy": float(ok.mean()) if n else None,
                     "seconds_upper_bound": seconds},
            validity=[
                "norm: L2, in the input scaled to [0, 1] (value / (max - min) of model.value_range); "
                f"the normalisation multiplies it by at most {scale:.4g}",
                f"Lipschitz upper bound L = {upper:.4g} of the logit map, composed layer by layer "
                "(conv: circular-convolution norm on the padded size, BN folded), model in eval mode",
                f"certified radius convention: {convention}",
                "certificates hold for the deterministic model as loaded, for every input within the radius; "
                "every float64 step of the bound and the radii carries its own rounding margin (about 1e-12 "
                "relative, derived from the arithmetic: certification/rounding.py), so they hold on any CPU; "
                "the rounding of the model's float32 forward pass (about 1e-6 of the logits) is not accounted for",
                f"lower bound {lower:.4g} from gradient ascent on {min(n, p.ascent_points)} data points"
                if lower is not None else "no lower bound: no data point to start the gradient ascent from",
            ],
            limitations=[] if n else [f"the {p.split} split has no readable items"],
        )



