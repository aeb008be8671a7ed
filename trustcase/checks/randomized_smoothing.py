"""The `randomized_smoothing` check: certified radii of the smoothed classifier (Cohen et al.; science in
`certification.smoothing`).

A detector (task detection) is certified on its per-image decision "an indication is present" (a detection scoring
>= the operating threshold; `certification.detection_smoothing`), the label being "the image has a true box".

Summary keys: sigma, sigma_pixels, n0, n, alpha, abstain_rate, radii, certified_accuracy, accuracy,
training_noise_sigma, certified_classifier. Artefact: per-item CSV (id, label, prediction, radius).

A segmenter (task segmentation) is certified pixel by pixel with abstention (SegCertify, science in
`certification.segmentation_smoothing`): per radius the certified share of true defect pixels and the certified
image-level decision; artefact `certified_pixels.png` (kind "image", not for a confidential use case).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from trustcase.certification import segmentation_smoothing as seg
from trustcase.certification.detection_smoothing import DECISION, IndicationPresent, indication_labels
from trustcase.certification.smoothing import ABSTAIN, PPF_ERROR, certify, predict, training_noise
from trustcase.checks import Check, Context, Params, Produces
from trustcase.explain import imaging
from trustcase.measurement import (
    accuracy_curve,
    estimate,
    median_radius,
    proportion,
    radius_grid,
    write_items,
)
from trustcase.schemas import CheckOutcome, Curve, Scope, Series, Stage


class SmoothingParams(Params):
    sigma: float = 0.12  # fraction of the value range
    n0: int = 64
    n: int = 1000
    alpha: float = 0.001
    batch_size: int = 256
    split: str = "test"
    max_items: int | None = 200  # certification costs n0 + n forward passes per item
    radii: list[float] | None = None  # None: 0 and 20 steps up to the largest radius (claimed radii added)
    correction: Literal["holm", "bonferroni"] = "holm"  # segmentation: over each image's pixels
    maps: int = Field(4, ge=0, le=32, description="segmentation: images whose certified-pixel map is drawn")

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


SEGMENTATION_METRICS = seg.FIGURES


class RandomizedSmoothing(Check):
    name = "randomized_smoothing"
    Params = SmoothingParams
    stage = Stage.FORMAL
    tasks = frozenset({"classification", "detection", "segmentation"})
    whole_images = True  # under fit: tiles: noise on the whole image, each pixel voted on its stitched logits

    @classmethod
    def produces(cls, params, use_case):
        """On the params' split: `smoothing_certified_accuracy` under the perturbation scope l2_radius (amplitude
        r: the share of items the smoothed classifier g certifies correct at radius r, abstaining counted wrong);
        `smoothing_abstain_rate`, `smoothing_accuracy` (g's prediction, abstaining counted wrong) and
        `smoothing_median_radius` (0 for a wrong or abstained item).

        A segmenter: under l2_radius r, `smoothing_certified_defect_share` (the share of true defect pixels certified
        with their class at r, the Poisson bootstrap over images), `smoothing_certified_image_recall` (defective
        images whose decision "defective" is certified at r) and `smoothing_certified_image_accuracy` (images whose
        true decision is certified at r); `smoothing_pixel_abstain_rate` (pixels abstaining at radius 0)."""
        if use_case.task == "segmentation":
            return [Produces("smoothing_pixel_abstain_rate", params.split)] + [
                Produces(m, params.split, "l2_radius") for m in SEGMENTATION_METRICS]
        clean = ["smoothing_abstain_rate", "smoothing_accuracy", "smoothing_median_radius"]
        return [Produces(m, params.split) for m in clean] + [
            Produces("smoothing_certified_accuracy", params.split, "l2_radius")]

    def run(self, ctx: Context) -> CheckOutcome:
        if ctx.use_case.task == "segmentation":
            return self._segmentation(ctx)
        p: SmoothingParams = self.params
        detection = ctx.use_case.task == "detection"
        threshold = ctx.use_case.model.score_threshold
        model = IndicationPresent(ctx.model, threshold) if detection else ctx.model
        ids, labels, preds, radii, voted = [], [], [], [], []
        sample = ctx.sample(p.split, p.max_items) if detection else None  # a split ordered by class: sampled
        for batch in ctx.batches(p.split):
            if p.max_items is not None and len(ids) >= p.max_items:
                break
            keep = slice(0, None if p.max_items is None else p.max_items - len(ids)) if sample is None else [
                j for j, i in enumerate(batch.index) if int(i) in sample]
            if sample is not None and not keep:
                continue
            images = batch.images[keep]
            y = indication_labels([batch.labels[j] for j in keep]) if detection else batch.labels[keep]
            item_ids = [batch.ids[j] for j in keep] if detection else batch.ids[keep]  # noise follows the item id
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

    def _segmentation(self, ctx: Context) -> CheckOutcome:
        p: SmoothingParams = self.params
        uc, model, conf = ctx.use_case, ctx.model, ctx.use_case.plan.confidence
        rule = uc.model.defect_pixels
        grid = sorted({0.0, *(p.radii or [0.0, 0.05, 0.1, 0.25, 0.5]),
                       *(r for m in SEGMENTATION_METRICS for r in ctx.claimed(m, "l2_radius"))})
        ids, parts, drawn = [], [], []
        # a seeded sample of max_items images (a split ordered by defect type would give its first type only)
        index = np.fromiter(ctx.sample(p.split, p.max_items), np.int64)
        for batch in ctx.batches(p.split):
            take = np.flatnonzero(np.isin(batch.index, index))
            if not len(take):
                continue
            images, masks = batch.images[take], np.stack([batch.labels[t] for t in take])
            item_ids = [batch.ids[t] for t in take]
            votes = seg.sample_votes(model, images, sigma=p.sigma, n0=p.n0, n=p.n, batch_size=p.batch_size,
                                     seed=ctx.seed, ids=item_ids)
            got, classes = seg.certify_images(votes, masks, grid, p.alpha, rule, model.n_classes, p.correction)
            parts.append(got)
            ids += item_ids
            shown = grid.index(min(grid[1:] or grid))  # the maps at the smallest positive radius
            for j in range(min(len(item_ids), p.maps - len(drawn))):
                if not drawn or images[j].shape == drawn[0][0].shape:  # one picture, one size (fit: tiles)
                    drawn.append((images[j], masks[j], classes[shown][j], item_ids[j]))
        n = len(ids)
        ms = seg.figures(seg.join(parts, len(grid)), ids, grid, self.name, p.split, ctx.seed, conf)
        series = {m: ([], [], []) for m in SEGMENTATION_METRICS}
        for m in ms:
            if m.metric in series:
                y, lo, hi = series[m.metric]
                y.append(float("nan") if m.value is None else m.value)
                lo.append(m.interval.lower if m.interval else float("nan"))
                hi.append(m.interval.upper if m.interval else float("nan"))
        names = {"smoothing_certified_defect_share": "certified defect pixels",
                 "smoothing_certified_image_recall": "certified image recall",
                 "smoothing_certified_image_accuracy": "certified image decisions"}
        curve = Curve(id=f"{self.name}-certified-segmentation", x=grid, y_label="certified share",
                      title=f"Certified segmentation (sigma = {p.sigma:g}, {p.correction} over each image's pixels)",
                      x_label="L2 radius (input scaled to [0, 1])", illustrates=list(SEGMENTATION_METRICS),
                      series={names[m]: Series(y=y, lower=lo, upper=hi) for m, (y, lo, hi) in series.items()})
        artefacts = []
        if drawn and not uc.confidential:
            imgs = np.stack([d[0] for d in drawn])
            grey = imaging.to_uint8(imgs, model.spec.value_range)
            true_map = seg.map_colours(np.stack([d[1] for d in drawn]), np.stack([d[1] for d in drawn]))
            cert_map = seg.map_colours(np.stack([d[2] for d in drawn]), np.stack([d[1] for d in drawn]))
            path = ctx.workdir / "certified_pixels.png"
            imaging.save_png(path, imaging.tile([[grey[i], true_map[i], cert_map[i]] for i in range(len(drawn))],
                                                scale=max(1, 128 // imgs.shape[1])))
            legend = ctx.workdir / "certified_pixels.txt"
            legend.write_text(f"rows: images {', '.join(d[3] for d in drawn)}; columns: input, true mask, certified "
                              f"pixels at L2 radius {grid[shown]:g} (red: defect certified, dark grey: background "
                              "certified, yellow: abstained, blue: a true defect certified background, magenta: true "
                              "background certified defect)\n")
            artefacts = [ctx.artefact(path, "image"), ctx.artefact(legend, "file")]
        lo_v, hi_v = model.spec.value_range
        return CheckOutcome(
            check=self.name, measurements=ms, curves=[curve], artefacts=artefacts,
            caveat="The guarantee covers the smoothed segmenter (a per-pixel majority vote under noise that abstains "
                   "where the vote is not clear), not the base model: it holds only if the smoothed segmenter is what "
                   "is deployed.",
            summary={"sigma": p.sigma, "sigma_pixels": p.sigma * (hi_v - lo_v), "n0": p.n0, "n": p.n,
                     "alpha": p.alpha, "correction": p.correction, "radii": grid, "defect_pixels_rule": rule,
                     "images": n, "certified_classifier": "smoothed segmenter g (per pixel, with abstention)"},
            validity=[
                "the guarantee covers the smoothed segmenter g (per pixel, the class of most votes of the model under "
                "Gaussian noise, abstaining where it is not clear), not the base model: it holds only if g is deployed",
                f"noise: Gaussian, sigma = {p.sigma:g} of the value range ({p.sigma * (hi_v - lo_v):g} in pixel "
                "units), added in pixel space before normalisation; radius: L2 norm of the whole input (all pixels "
                "and channels) scaled to [0, 1]",
                f"SegCertify (Fischer et al. 2021): per pixel the class of most votes among n0 = {p.n0} samples, then "
                f"a one-sided binomial test of its probability > Phi(r / sigma) on n = {p.n} further samples; the "
                f"pixels of each image form one family corrected by {p.correction.capitalize()} at alpha = "
                f"{p.alpha:g}: with probability >= {1 - p.alpha:g} per image and radius, every certified pixel keeps "
                "its class under every perturbation of L2 norm below r; the other pixels abstain",
                f"image-level decision (defective if at least {rule} pixel(s) are a defect class) certified at r when "
                f"{rule} pixel(s) are certified defect, or fewer than {rule} could still be; abstaining pixels and "
                "undecided images count as not certified",
                f"tau = Phi(r / sigma) raised by 1e-15 and p-values by {PPF_ERROR:g} (relative) for the rounding of "
                "the normal cdf and the binomial tail",
                f"measured on {n} images of the {p.split} split; {conf:.0%} intervals: the Poisson bootstrap over "
                "images for the pixel shares, Clopper-Pearson for the image shares (sampling of images, on top of "
                "each image's certificate level)",
            ],
            limitations=([f"certified a seeded sample of {n} images of the {p.split} split (max_items = "
                          f"{p.max_items})"] if p.max_items is not None and n >= p.max_items else []),
        )
