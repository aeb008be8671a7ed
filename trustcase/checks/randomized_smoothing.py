"""The `randomized_smoothing` check: certified radii of the smoothed classifier (Cohen et al.; science in
`certification.smoothing`).

A detector (task detection) is certified on its per-image decision "an indication is present" (a detection scoring
>= the operating threshold; `certification.detection_smoothing`), the label being "the image has a true box".

Summary keys: sigma, sigma_pixels, n0, n, alpha, abstain_rate, radii, certified_accuracy, accuracy,
training_noise_sigma, certified_classifier. Artefact: per-item CSV (id, label, prediction, radius).
"""

from __future__ import annotations

import numpy as np
from pydantic import field_validator, model_validator

from trustcase.certification.detection_smoothing import DECISION, IndicationPresent, indication_labels
from trustcase.certification.smoothing import ABSTAIN, PPF_ERROR, certify, predict, training_noise
from trustcase.checks import Check, Context, Params, Produces
from trustcase.measurement import accuracy_curve, estimate, median_radius, proportion, radius_grid, write_items
from trustcase.schemas import CheckOutcome, Scope, Stage


class SmoothingParams(Params):
    sigma: float = 0.12  # fraction of the value range
    n0: int = 64
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 256
    split: str = "test"
    max_items: int | None = 200  # certification costs n0 + n forward passes per item
    radii: list[float] | None = None  # None: 0 and 20 steps up to the largest radius (claimed radii added)

    @field_validator("sigma")
    @classmethod
    def _sigma(cls, v: float) -> float:
        if not v > 0:
            raise ValueError("sigma must be > 0 (a fraction of the value range)")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("alpha must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _counts(self) -> SmoothingParams:
        for name in ("n0", "n", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_items is not None and self.max_items < 1:
            raise ValueError("max_items must be >= 1")
        if self.radii is not None and (not self.radii or any(r < 0 for r in self.radii)):
            raise ValueError("radii must be a non-empty list of values >= 0")
        return self


class RandomizedSmoothing(Check):
    name = "randomized_smoothing"
    Params = SmoothingParams
    stage = Stage.FORMAL
    tasks = frozenset({"classification", "detection"})

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split: `smoothing_certified_accuracy` under the perturbation scope l2_radius (amplitude
        r: the share of items the smoothed classifier g certifies correct at radius r, abstaining counted wrong);
        `smoothing_abstain_rate`, `smoothing_accuracy` (g's prediction, abstaining counted wrong) and
        `smoothing_median_radius` (0 for a wrong or abstained item)."""
        clean = ["smoothing_abstain_rate", "smoothing_accuracy", "smoothing_median_radius"]
        return [Produces(m, params.split) for m in clean] + [
            Produces("smoothing_certified_accuracy", params.split, "l2_radius")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: SmoothingParams = self.params
        detection = ctx.use_case.task == "detection"
        threshold = ctx.use_case.model.score_threshold
        model = IndicationPresent(ctx.model, threshold) if detection else ctx.model
        ids, labels, preds, radii, voted = [], [], [], [], []
        for batch in ctx.batches(p.split):
            if p.max_items is not None and len(ids) >= p.max_items:
                break
            keep = slice(0, None if p.max_items is None else p.max_items - len(ids))
            images, y = batch.images[keep], batch.labels[keep]
            y = indication_labels(y) if detection else y
            item_ids = batch.ids[keep]  # noise follows (seed, item id): evidence independent of batching
            c, r, _ = certify(model, images, sigma=p.sigma, n0=p.n0, n=p.n, alpha=p.alpha,
                              batch_size=p.batch_size, seed=ctx.seed, ids=item_ids)
            voted.append(predict(model, images, sigma=p.sigma, n=p.n, alpha=p.alpha, batch_size=p.batch_size,
                                 seed=ctx.seed, ids=item_ids))
            ids += item_ids
            labels.append(y)
            preds.append(c)
            radii.append(r)
        y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        pred = np.concatenate(preds) if preds else np.zeros(0, np.int64)
        radius = np.concatenate(radii) if radii else np.zeros(0)
        g_pred = np.concatenate(voted) if voted else np.zeros(0, np.int64)
        ok = pred == y
        n_items = len(y)
        conf = ctx.use_case.plan.confidence
        grid = radius_grid(p.radii, ctx.claimed("smoothing_certified_accuracy", "l2_radius"), radius, ok)
        ms, curve, values = accuracy_curve(self.name, "smoothing_certified_accuracy", p.split, grid, radius, ok,
                                           conf, f"Randomized smoothing (sigma = {p.sigma:g}): certified accuracy "
                                           "of the smoothed classifier vs L2 radius")
        scope = Scope(split=p.split)
        abstain = int((pred == ABSTAIN).sum())
        correct_g = int((g_pred == y).sum())
        ms += [
            proportion(self.name, "smoothing_abstain_rate", abstain, n_items, conf, scope),
            proportion(self.name, "smoothing_accuracy", correct_g, n_items, conf, scope),
            estimate(check=self.name, metric="smoothing_median_radius", n=n_items, interval=None, scope=scope,
                     value=median_radius(radius, ok)),
        ]
        write_items(ctx.workdir / "items.csv", ids, y, pred, radius)
        lo, hi = model.spec.value_range
        trained = training_noise(model.spec.path)
        trained_text = ("the base model's training noise is not recorded (no <model>.json): smoothing certifies "
                        "little unless the base model was trained with Gaussian noise" if trained is None else
                        f"base model trained with Gaussian noise augmentation sigma = {trained:g}"
                        + (" (none: the smoothed classifier is expected to abstain often)" if trained == 0 else ""))
        return CheckOutcome(
            check=self.name, measurements=ms, curves=[curve],
            caveat="The guarantee covers the smoothed classifier (a majority vote under noise), not the base model: "
                   "it holds only if the smoothed classifier is what is deployed.",
            artefacts=[ctx.artefact(ctx.workdir / "items.csv", "table")],
            summary={"sigma": p.sigma, "sigma_pixels": p.sigma * (hi - lo), "n0": p.n0, "n": p.n, "alpha": p.alpha,
                     "abstain_rate": abstain / n_items if n_items else None, "radii": grid,
                     "certified_accuracy": values, "accuracy": correct_g / n_items if n_items else None,
                     "training_noise_sigma": trained, "certified_classifier": "smoothed classifier g"},
            validity=[
                "the guarantee covers the smoothed classifier g (majority vote of the model under Gaussian noise), "
                "not the base model: it holds only if g is what is deployed",
                f"noise: Gaussian, sigma = {p.sigma:g} of the value range ({p.sigma * (hi - lo):g} in pixel units), "
                "added in pixel space before normalisation; norm: L2 of the input scaled to [0, 1]",
                f"each certificate holds with probability >= 1 - alpha = {1 - p.alpha:g} (Clopper-Pearson, "
                f"n0 = {p.n0} selection samples, n = {p.n} estimation samples); abstain counts as wrong",
                f"radius = sigma * PhiInverse(pA), pA lowered by {PPF_ERROR:g} (relative) for the inverse beta's "
                f"rounding and the radius by 1e-15; measured on {n_items} items of the {p.split} split",
                trained_text,
                *([f"the certified decision is the detector's per image \"indication present\" (some detection scores "
                   f">= the operating threshold {threshold:g}; classes {DECISION}), judged against \"the image has a "
                   "true box\"; where the boxes are, how many and of which class are not certified"]
                  if detection else []),
            ],
            limitations=([f"certified {n_items} items of the {p.split} split (max_items = {p.max_items})"]
                         if p.max_items is not None and n_items >= p.max_items else []),
        )

