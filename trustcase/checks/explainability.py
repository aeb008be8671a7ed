"""The `explainability` check: attribution methods run on sampled items and measured by faithfulness,
robustness, complexity, localisation and sanity metrics, each a mean over items with its interval; the
methods are then recommended or warned by `verdicts.rank_methods` on those intervals (science in
`explain.attribution` and `explain.quality`).

Metrics (scope: the params' split), per method <m>: deletion_auc, insertion_auc, faithfulness (insertion -
deletion), mu_fidelity, infidelity, sensitivity_max, average_stability, complexity, sparseness,
sanity_rank_correlation (cascading; the independent-layer variant is a curve), relevance_mass and pointing_game
(with a region); ig_convergence_delta; recommended_methods. A method that cannot run on the model is "not run"
with its reason, and the others go on.

A detector (task detection) is explained box by box (science in `explain.methods.detection`): per sampled image its
best indication, by D-RISE and Grad-CAM of the box's class score (`box_methods`), measured by deletion_auc,
insertion_auc and faithfulness on the box score and by box_energy (the map's positive mass inside the box).

A segmenter (task segmentation) is explained region by region (science in `explain.methods.region`): per sampled
image the score of its predicted defect region (the sum of its class's logits there), by `region_methods`, measured
by deletion_auc, insertion_auc and faithfulness on the region's mean class probability and by region_energy (the
map's positive mass inside the true defect region) and pointing_game.

Findings: which methods can be trusted and why not the others. Summary: `ranking` (one row per method, best
first: status "recommended" / "warned" / "not run", reasons, every metric), `recommended`, `warned`, `not_run`,
`rules`, `random_reference` (a random ordering's deletion / insertion: the chance level), `items`, `target`,
`region`, `layers` (the model's layers as the methods saw them). Curves: deletion, insertion (mean target
probability vs fraction of pixels) and the sanity cascades. Artefacts: `gallery.png` (kind "image"):
attributions for correct and missed items of the critical class, per method; not for a confidential use case.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from trustcase import seeding
from trustcase.checks import Check, CheckError, Context, Params, Produces, Unsupported, seeded_sample
from trustcase.errors import UserError
from trustcase.explain import attribution as A
from trustcase.explain import imaging
from trustcase.explain.methods import detection as D
from trustcase.explain.methods import region as R
from trustcase.explain.network import Network
from trustcase.explain.quality import (
    Region,
    auc,
    cascade,
    complexity,
    deletion_insertion,
    infidelity_of,
    mean_interval,
    mu_fidelity,
    pointing_game,
    relevance_mass,
    sparseness,
    spearman_rows,
    stability,
)
from trustcase.measurement import census, clopper_pearson, estimate
from trustcase.schemas import CheckOutcome, Curve, Finding, Measurement, MethodStanding, Scope, Series, Stage, Topic
from trustcase.verdicts import rank_methods

DEFAULT_METHODS = ["saliency", "integrated_gradients", "smoothgrad", "grad_cam", "occlusion", "rise", "lime",
                   "kernel_shap"]


class ExplainabilityParams(Params):
    methods: list[str] = DEFAULT_METHODS
    options: dict[str, dict] = Field({}, description="per-method options, e.g. {grad_cam: {layer: '8'}}")
    split: str = "test"
    items: int = Field(32, ge=2, description="items explained for the metrics (a seeded sample of the split)")
    baseline: Literal["mean", "black", "white"] = "mean"
    steps: int = Field(20, ge=2, description="deletion / insertion steps")
    infidelity_samples: int = Field(10, ge=1)
    noise: float = Field(0.1, gt=0, description="infidelity noise std, fraction of the input range")
    target: str = Field("predicted", description="the class each map explains: 'predicted' or a class name")
    mufidelity_samples: int = Field(32, ge=2, description="random cell subsets per item for MuFidelity")
    mufidelity_cells: int = Field(8, ge=2, description="MuFidelity grid (cells per side)")
    mufidelity_subset: float = Field(0.2, gt=0, lt=1, description="share of cells replaced by the baseline")
    sensitivity_items: int = Field(8, ge=0, description="items for max-sensitivity and average stability (0: skip; "
                                                        "they re-explain)")
    sensitivity_samples: int = Field(4, ge=1)
    sensitivity_radius: float = Field(0.02, gt=0, description="fraction of the input range")
    sanity_max_correlation: float = Field(0.5, gt=-1, lt=1)
    # insertion - deletion must beat the random ordering by this much (probability of the class), not by noise
    faithfulness_margin: float = Field(0.01, ge=0)
    region: Region | None = None
    gallery: int = Field(4, ge=0, description="items per row kind (correct / missed critical) in the gallery")
    batch_size: int = Field(16, ge=1)
    box_methods: list[Literal["d_rise", "grad_cam"]] = Field(list(D.METHODS), min_length=1,
                                                            description="detection: how a box is explained")
    d_rise_masks: int = Field(500, ge=1, le=100_000, description="detection: D-RISE masks per image")
    d_rise_cells: int = Field(16, ge=2, description="detection: D-RISE mask grid (cells per side)")
    d_rise_keep: float = Field(0.5, gt=0, lt=1, description="detection: D-RISE probability that a cell is kept")
    cam_layer: str | None = Field(None, description="detection: Grad-CAM's layer; default the last convolution "
                                                    "the box score depends on")
    region_methods: list[Literal[R.REGION_METHODS]] = Field(  # type: ignore[valid-type]
        ["saliency", "integrated_gradients", "grad_cam", "occlusion", "rise"], min_length=1,
        description="segmentation: how a predicted region's score is explained (options from `options`)")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one attribution method")
        for m in v:
            A.METHODS.resolve(m)  # a registered name or 'module:Class'; the error lists the known ones
        if len(set(v)) != len(v):
            raise ValueError("a method is named twice")
        return v

    @model_validator(mode="after")
    def _options(self) -> ExplainabilityParams:
        for name, opts in self.options.items():
            if name not in self.methods:
                raise ValueError(f"options for {name!r}, which is not among methods {self.methods}")
            A.options_for(name, opts)
        return self


def _mean_measure(check: str, out: list[Measurement], scope: Scope, conf: float):
    """measure(metric, values, proportion=False, **details): appends the mean of the finite values with its interval
    (Student-t; Clopper-Pearson for a `proportion` of 0/1 values) to `out` and returns the mean (None without a
    finite value)."""
    def measure(metric: str, values: np.ndarray, proportion: bool = False, **details) -> float | None:
        v = np.asarray(values, np.float64)
        v = v[np.isfinite(v)]
        if not len(v):
            return None
        iv = clopper_pearson(int(v.sum()), len(v), conf) if proportion else mean_interval(v, conf)
        out.append(estimate(check=check, metric=metric, value=float(v.mean()), interval=iv, n=len(v), scope=scope,
                            details=details))
        return float(v.mean())
    return measure


def _baseline(ctx: Context, kind: str) -> float | torch.Tensor:
    if kind == "mean":
        return 0.0
    lo, hi = ctx.use_case.model.value_range
    c, h, w = ctx.use_case.model.input_shape
    value = lo if kind == "black" else hi
    return ctx.model.to_input(np.full((1, h, w, c), value, np.float32))


def select(ctx: Context, split: str, items: int, gallery: int) -> tuple[dict, np.ndarray, dict]:
    """One cheap pass: predictions of every item; then the seeded sample and the gallery items, read back."""
    idx, labels, preds = [], [], []
    for batch in ctx.batches(split):
        idx.append(batch.index)
        labels.append(batch.labels)
        preds.append(ctx.model.logits(batch.images, batch.ids).argmax(axis=1))
    if not idx:
        raise Unsupported(f"split {split!r} has no readable items")
    idx, labels, preds = np.concatenate(idx), np.concatenate(labels), np.concatenate(preds)
    rng = np.random.default_rng(ctx.seed)
    sample = np.sort(rng.choice(idx, size=min(items, len(idx)), replace=False))
    crit = ctx.use_case.critical_index
    hit = idx[(labels == crit) & (preds == crit)]
    miss = idx[(labels == crit) & (preds != crit)]
    pick = {"correct": np.sort(rng.permutation(hit)[:gallery]), "missed": np.sort(rng.permutation(miss)[:gallery])}
    wanted = set(sample.tolist()) | {int(i) for v in pick.values() for i in v}
    got: dict[int, tuple] = {}
    for batch in ctx.batches(split):
        for j, i in enumerate(batch.index):
            if int(i) in wanted:
                got[int(i)] = (batch.images[j], int(batch.labels[j]), batch.ids[j],
                               {k: v[j] for k, v in batch.meta.items()})
    pred_of = dict(zip(idx.tolist(), preds.tolist(), strict=True))
    return got, sample, {"pick": pick, "pred": pred_of, "n": len(idx)}


def _trust(ranking: list[dict]) -> list[Finding]:
    """Which explanations can be trusted, in words: the recommended methods, then each other one and why."""
    def name(m: str) -> str:
        return m.replace("_", " ")

    good = [name(r["method"]) for r in ranking if r["status"] == "recommended"]
    said = [f"Can be trusted: {', '.join(good)} (passes the sanity check and beats a random ordering)." if good else
            "No attribution method passes both the sanity check and the comparison with a random ordering: no "
            "explanation map of this model should be trusted."]
    said += [f"Not to be trusted: {name(r['method'])}, because {'; '.join(r.get('reasons') or ['not recommended'])}."
             for r in ranking if r["status"] != "recommended"]
    return [Finding(topic=Topic.EXPLANATIONS, text=s) for s in said] if ranking else []


class Explainability(Check):
    """Attribution methods ranked by their measured quality; recommended vs warned."""

    name = "explainability"
    Params = ExplainabilityParams
    stage = Stage.TESTING

    FAMILIES = ["deletion_auc", "insertion_auc", "faithfulness", "mu_fidelity", "infidelity", "sensitivity_max",
                "average_stability", "complexity", "sparseness", "sanity_rank_correlation"]
    BOX_FAMILIES = ["deletion_auc", "insertion_auc", "faithfulness", "box_energy"]  # a detector's
    REGION_FAMILIES = ["deletion_auc", "insertion_auc", "faithfulness", "region_energy", "pointing_game"]  # segmenter
    tasks = frozenset({"classification", "detection", "segmentation"})
    not_tiled = ("its methods and their quality metrics explain a batch of images of the model's input size, and "
                 "the layer methods would read tiles, not the image explained")

    @classmethod
    def produces(cls, params, use_case):
        if use_case.task == "detection":
            return [Produces("recommended_methods", params.split)] + [
                Produces(f"{f}:{m}", params.split) for f in cls.BOX_FAMILIES for m in params.box_methods]
        if use_case.task == "segmentation":
            return [Produces("recommended_methods", params.split)] + [
                Produces(f"{f}:{m}", params.split) for f in cls.REGION_FAMILIES for m in params.region_methods]
        families = cls.FAMILIES + (["relevance_mass", "pointing_game"] if params.region else [])
        return [Produces("recommended_methods", params.split), Produces("ig_convergence_delta", params.split)] + [
            Produces(f"{f}:{m}", params.split) for f in families for m in params.methods]

    def run(self, ctx: Context) -> CheckOutcome:
        p: ExplainabilityParams = self.params
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        if uc.task == "detection":
            return self._detection(ctx)
        if uc.task == "segmentation":
            return self._segmentation(ctx)
        names = list(uc.model.class_names)
        if p.target != "predicted" and p.target not in names:
            raise CheckError(f"explainability: target {p.target!r} is not a class; classes: {names} or 'predicted'")
        if ctx.model.tabular:
            raise Unsupported("attribution maps and their metrics (deletion, regions, superpixels) need images; "
                              "the model takes feature vectors")
        net = A.Network(ctx.model)
        got, sample, info = select(ctx, p.split, p.items, 0 if uc.confidential else p.gallery)
        sample = np.array([i for i in sample if i in got])
        images = np.stack([got[i][0] for i in sample])
        x = ctx.model.to_input(images)

        def target_of(items) -> torch.Tensor:  # the predicted class (what the decision rests on) or a chosen one
            if p.target != "predicted":
                return torch.full((len(items),), names.index(p.target), dtype=torch.long)
            return torch.tensor([info["pred"][int(i)] for i in items])

        target = target_of(sample)
        baseline = _baseline(ctx, p.baseline)
        masks = None
        if p.region is not None:
            meta = {k: [got[i][3].get(k, "") for i in sample] for k in got[sample[0]][3]}
            masks = p.region.masks(images, [got[i][2] for i in sample], meta)
        scope = Scope(split=p.split)
        out: list[Measurement] = []
        limitations: list[str] = []
        rows: dict[str, dict] = {}
        not_run: list[dict] = []
        curves = {"deletion": {}, "insertion": {}, "sanity": {}, "independent": {}}

        measure = _mean_measure(self.name, out, scope, conf)

        made: dict[str, A.Method | Unsupported] = {}
        for name in p.methods:  # the user's methods and options, refused before any work
            try:
                made[name] = A.make(net, name, p.options.get(name))
            except Unsupported as e:
                made[name] = e
            except UserError as e:  # a layer that does not exist, options that do not fit the input (ExplainError)
                raise CheckError(f"explainability: {name}: {e}") from None

        # chance level: a random ordering of the pixels, each item's from its own seed
        rnd = np.stack([np.random.default_rng(seed).random(images.shape[1:3]) for seed in seeding.item_seeds(
            ctx.seed, self.name, [got[i][2] for i in sample], "chance")]).astype(np.float32)
        d0, i0 = deletion_insertion(net, x, target, rnd, baseline, p.steps, ctx.seed)
        reference = {"deletion_auc": float(auc(d0).mean()), "insertion_auc": float(auc(i0).mean())}
        reference["faithfulness"] = reference["insertion_auc"] - reference["deletion_auc"]
        curves["deletion"]["random"], curves["insertion"]["random"] = d0.mean(0), i0.mean(0)
        gallery_maps: dict[str, np.ndarray] = {}
        pick = np.concatenate([info["pick"]["correct"], info["pick"]["missed"]]).astype(int)

        for name in p.methods:
            try:
                method = made[name]
                if isinstance(method, Unsupported):
                    raise method
                row = self._measure(net, method, name, p, x, target, baseline, masks, ctx.seed, measure, curves)
                if len(pick):
                    gx = ctx.model.to_input(np.stack([got[int(i)][0] for i in pick]))
                    gallery_maps[name] = A.attribute(net, method, gx, target_of(pick), baseline, ctx.seed).heatmap()
            except Unsupported as e:  # the method cannot run on this model: said, and the others go on
                not_run.append({"method": name, "status": "not run", "reasons": [str(e)]})
                limitations.append(f"{name} not run: {e}")
                out[:] = [m for m in out if m.details.get("method") != name]
                for c in curves.values():
                    c.pop(name, None)
                continue
            rows[name] = row

        rules = [("sanity_rank_correlation", "<=", p.sanity_max_correlation,
                  "maps change when the model's weights are randomised (sanity check)"),
                 ("faithfulness", ">", reference["faithfulness"] + p.faithfulness_margin,
                  "more faithful than a random ordering of the pixels (insertion - deletion)")]
        ranking = [{**r, **rows[r["method"]]} for r in rank_methods(list(rows), out, rules)] + not_run
        recommended = [r["method"] for r in ranking if r["status"] == "recommended"]
        out.append(census(check=self.name, metric="recommended_methods", value=len(recommended),
                               n=len(ranking), scope=scope, details={"recommended": recommended}))
        artefacts = []
        if uc.confidential:
            limitations.append("confidential use case: no gallery of attributions (metrics only)")
        elif len(pick) and gallery_maps:
            artefacts += self._gallery(ctx, got, info, pick, gallery_maps)
        if net.note:
            limitations.append(f"model internals: {net.note}")
        x_frac = np.linspace(0, 1, p.steps + 1).tolist()
        explained = "the predicted class" if p.target == "predicted" else f"class {p.target}"
        out_curves = [
            Curve(id=f"{self.name}_{kind}", title=f"{kind.capitalize()} curves (mean over {len(x)} items)",
                  x_label=f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}, most relevant first",
                  y_label=f"probability of {explained}", x=x_frac,
                  series={m: Series(y=np.asarray(v).tolist()) for m, v in curves[kind].items()})
            for kind in ("deletion", "insertion")]
        for kind, how in (("sanity", "cascading, from the output"), ("independent", "one layer at a time")):
            if curves[kind]:
                steps = next(iter(curves[kind].values()))["steps"]
                out_curves.append(Curve(
                    id=f"{self.name}_{kind}", title=f"Model-randomisation sanity check ({how})",
                    x_label="layers randomised" if kind == "sanity" else "layer randomised (from the output)",
                    y_label="Spearman rank correlation with the original maps", x=[float(s) for s in steps],
                    y_marks={"max allowed": p.sanity_max_correlation},
                    series={m: Series(y=[float(np.mean(v)) for v in c["values"]]) for m, c in curves[kind].items()}))
        return CheckOutcome(
            check=self.name, measurements=out, curves=out_curves, artefacts=artefacts, limitations=limitations,
            findings=_trust(ranking),
            methods=[MethodStanding(method=r["method"], status=r["status"], reasons=r.get("reasons", []),
                                    options=p.options.get(r["method"], {})) for r in ranking],
            caveat=f"Measured on a seeded sample of {p.split} items; maps explain {explained}.",
            summary={"ranking": ranking, "recommended": recommended,
                     "warned": [r["method"] for r in ranking if r["status"] == "warned"],
                     "not_run": [r["method"] for r in ranking if r["status"] == "not run"],
                     "rules": [{"metric": f, "comparator": c, "threshold": t, "meaning": w} for f, c, t, w in rules],
                     "random_reference": reference, "items": len(x), "target": p.target,
                     "region": p.region.label() if p.region else None, "layers": net.describe()},
            validity=[
                f"{len(x)} items of the {p.split} split (seeded sample, seed {ctx.seed}); maps explain {explained}; "
                "model in eval mode",
                f"baseline '{p.baseline}' for deletion/insertion, MuFidelity and the methods that take one",
                f"deletion/insertion in {p.steps} steps, ties broken at random; MuFidelity: {p.mufidelity_samples} "
                f"random subsets of a {p.mufidelity_cells}x{p.mufidelity_cells} grid, {p.mufidelity_subset:.0%} of "
                f"cells removed; infidelity: Gaussian noise std {p.noise:g} x input range, {p.infidelity_samples} "
                f"samples, normalised; max-sensitivity and average stability: uniform noise of radius "
                f"{p.sensitivity_radius:g} x input range, {p.sensitivity_samples} samples, first "
                f"{min(p.sensitivity_items, len(x))} items; complexity: normalised entropy, sparseness: Gini index",
                f"sanity: conv/linear weights re-drawn from the output down (cascading) and one layer at a time "
                f"(independent); a method passes when the upper bound of the cascading rank correlation is <= "
                f"{p.sanity_max_correlation}",
                f"ranking by the claim rules on intervals (verdicts.rank_methods): recommended when every rule "
                f"PASSES; {conf:.0%} Student-t intervals of means (pointing game: Clopper-Pearson)",
            ],
        )

    def _detection(self, ctx: Context) -> CheckOutcome:
        """Explanations of each sampled image's best indication, measured on the box score and inside the box."""
        p: ExplainabilityParams = self.params
        conf, threshold = ctx.use_case.plan.confidence, ctx.use_case.model.score_threshold
        boxes: dict[int, np.ndarray] = {}
        for batch in ctx.batches(p.split):  # one pass: each image's explained box, if it indicates anything
            for i, d, g in zip(batch.index, ctx.model.detect(batch.images, batch.ids), batch.labels, strict=True):
                t = D.explained_box(d, g, threshold)
                if t is not None:
                    boxes[int(i)] = t
        if not boxes:
            raise Unsupported(f"no image of the {p.split} split has an indication (score >= {threshold:g}) to explain")
        pool = np.array(sorted(boxes))
        sample = seeded_sample(ctx.seed, pool, p.items)
        images, ids, index = [], [], []
        for batch in ctx.batches(p.split):
            for j, i in enumerate(batch.index):
                if int(i) in sample:
                    images.append(batch.images[j])
                    ids.append(batch.ids[j])
                    index.append(int(i))
        images = np.stack(images)
        x = ctx.model.to_input(images)
        targets = torch.tensor(np.stack([boxes[i] for i in index]), dtype=torch.float32)
        baseline = _baseline(ctx, p.baseline)
        forward = ctx.model.forward
        scope = Scope(split=p.split)
        out: list[Measurement] = []

        measure = _mean_measure(self.name, out, scope, conf)

        rnd = np.stack([np.random.default_rng(s).random(images.shape[1:3]) for s in seeding.item_seeds(
            ctx.seed, self.name, ids, "chance")]).astype(np.float32)
        d0, i0 = D.box_deletion_insertion(forward, x, targets, rnd, baseline, p.steps, ctx.seed)
        reference = {"deletion_auc": float(auc(d0).mean()), "insertion_auc": float(auc(i0).mean())}
        reference["faithfulness"] = reference["insertion_auc"] - reference["deletion_auc"]
        chance = float(D.box_masks(targets.numpy(), *images.shape[1:3]).mean())
        curves = {"deletion": {"random": d0.mean(0)}, "insertion": {"random": i0.mean(0)}}
        rows, not_run, limitations, layers = {}, [], [], {}
        for name in p.box_methods:
            try:
                if name == "d_rise":
                    heat = D.d_rise(forward, x, targets, baseline, p.d_rise_masks, p.d_rise_cells, p.d_rise_keep,
                                    ctx.seed)
                else:
                    heat, layers[name] = D.box_grad_cam(Network(ctx.model), x, targets, p.cam_layer)
            except Unsupported as e:
                not_run.append({"method": name, "status": "not run", "reasons": [str(e)]})
                limitations.append(f"{name} not run: {e}")
                continue
            dc, ic = D.box_deletion_insertion(forward, x, targets, heat, baseline, p.steps, ctx.seed)
            curves["deletion"][name], curves["insertion"][name] = dc.mean(0), ic.mean(0)
            rows[name] = {
                "deletion_auc": measure(f"deletion_auc:{name}", auc(dc), method=name),
                "insertion_auc": measure(f"insertion_auc:{name}", auc(ic), method=name),
                "faithfulness": measure(f"faithfulness:{name}", auc(ic) - auc(dc), method=name),
                "box_energy": measure(f"box_energy:{name}", D.energy_in_box(heat, targets.numpy()), method=name,
                                      chance=chance)}
        rules = [("faithfulness", ">", reference["faithfulness"] + p.faithfulness_margin,
                  "more faithful to the box score than a random ordering of the pixels (insertion - deletion)"),
                 ("box_energy", ">", chance, "more of the map inside the box than its share of the image")]
        ranking, recommended, out_curves = self._ranked(rows, not_run, out, rules, scope, curves, f"boxes (mean over "
                                                        f"{len(x)} images)", "box score (best IoU x score of a "
                                                        "detection of its class)")
        return CheckOutcome(
            check=self.name, measurements=out, curves=out_curves, limitations=limitations, findings=_trust(ranking),
            methods=[MethodStanding(method=r["method"], status=r["status"], reasons=r.get("reasons", []))
                     for r in ranking],
            caveat=f"Measured on a seeded sample of {p.split} images; each map explains the image's best indication.",
            summary={"ranking": ranking, "recommended": recommended, "random_reference": reference,
                     "rules": [{"metric": f, "comparator": c, "threshold": t, "meaning": w} for f, c, t, w in rules],
                     "items": len(x), "box_share": chance, "layers": layers},
            validity=[
                f"{len(x)} images of the {p.split} split with an indication (seeded sample of {len(pool)}, seed "
                f"{ctx.seed}); per image the box explained is its best-scoring indication (score >= {threshold:g}) "
                f"overlapping a true box of its class at IoU >= 0.5, else its best-scoring indication",
                f"D-RISE: {p.d_rise_masks} masks of a {p.d_rise_cells}x{p.d_rise_cells} grid, cells kept with "
                f"probability {p.d_rise_keep:g}, masked pixels set to the baseline '{p.baseline}'; similarity IoU x "
                f"[same class] x score (the detector returns a class, not class probabilities); map = mean similarity "
                f"over the masks keeping a pixel minus the mean over all masks",
                f"Grad-CAM: gradient of the box's class score (best score of its class at IoU >= 0.5) at "
                f"{layers.get('grad_cam') or p.cam_layer or 'the last convolution it depends on'}",
                f"box score for deletion/insertion: the D-RISE similarity; {p.steps} steps, ties broken at random, "
                f"baseline '{p.baseline}'; box_energy: share of the map's positive mass inside the box (chance: the "
                f"box's share of the image, {chance:.3f} on average); {conf:.0%} Student-t intervals of means",
            ],
        )

    def _segmentation(self, ctx: Context) -> CheckOutcome:
        """Explanations of each sampled image's predicted defect region, measured on the region's class probability
        and inside the true defect region."""
        p: ExplainabilityParams = self.params
        conf = ctx.use_case.plan.confidence
        pool = []
        for batch in ctx.batches(p.split):  # one pass: the images with a predicted defect region
            pred = ctx.model.segment(batch.images, batch.ids)
            pool += [int(i) for i, m in zip(batch.index, pred, strict=True) if m.any()]
        if not pool:
            raise Unsupported(f"no image of the {p.split} split has a predicted defect region to explain")
        sample = seeded_sample(ctx.seed, pool, p.items)
        images, truth, ids = [], [], []
        for batch in ctx.batches(p.split):
            for j, i in enumerate(batch.index):
                if int(i) in sample:
                    images.append(batch.images[j])
                    truth.append(batch.labels[j] != 0)
                    ids.append(batch.ids[j])
        images, truth = np.stack(images), np.stack(truth)
        x = ctx.model.to_input(images)
        net = Network(ctx.model)
        with torch.inference_mode():
            regions, classes = R.predicted_regions(net.forward(x).numpy())
        baseline = _baseline(ctx, p.baseline)
        scope = Scope(split=p.split)
        defective = truth.reshape(len(truth), -1).any(1)  # energy and pointing need a true region
        chance = float(truth[defective].mean()) if defective.any() else None
        out: list[Measurement] = []

        measure = _mean_measure(self.name, out, scope, conf)

        rnd = np.stack([np.random.default_rng(s).random(images.shape[1:3]) for s in seeding.item_seeds(
            ctx.seed, self.name, ids, "chance")]).astype(np.float32)
        d0, i0 = R.deletion_insertion(net, x, regions, classes, rnd, baseline, p.steps, ctx.seed)
        reference = {"deletion_auc": float(auc(d0).mean()), "insertion_auc": float(auc(i0).mean())}
        reference["faithfulness"] = reference["insertion_auc"] - reference["deletion_auc"]
        curves = {"deletion": {"random": d0.mean(0)}, "insertion": {"random": i0.mean(0)}}
        rows, not_run, limitations = {}, [], []
        for name in p.region_methods:
            try:
                heat = R.explain_regions(net, name, x, regions, classes, baseline, ctx.seed, p.options.get(name))
            except (Unsupported, UserError) as e:
                not_run.append({"method": name, "status": "not run", "reasons": [str(e)]})
                limitations.append(f"{name} not run: {e}")
                continue
            dc, ic = R.deletion_insertion(net, x, regions, classes, heat, baseline, p.steps, ctx.seed)
            curves["deletion"][name], curves["insertion"][name] = dc.mean(0), ic.mean(0)
            rows[name] = {
                "deletion_auc": measure(f"deletion_auc:{name}", auc(dc), method=name),
                "insertion_auc": measure(f"insertion_auc:{name}", auc(ic), method=name),
                "faithfulness": measure(f"faithfulness:{name}", auc(ic) - auc(dc), method=name),
                "region_energy": measure(f"region_energy:{name}", R.energy_inside(heat[defective], truth[defective]),
                                         method=name, chance=chance),
                "pointing_game": measure(f"pointing_game:{name}", pointing_game(heat[defective], truth[defective]),
                                         proportion=True, method=name, chance=chance)}
        rules = [("faithfulness", ">", reference["faithfulness"] + p.faithfulness_margin,
                  "more faithful to the region's class probability than a random ordering (insertion - deletion)")]
        if chance is not None:
            rules.append(("region_energy", ">", chance, "more of the map inside the true defect than its share of "
                                                        "the image"))
        ranking, recommended, out_curves = self._ranked(rows, not_run, out, rules, scope, curves, f"regions (mean "
                                                        f"over {len(x)} images)", "mean probability of the region's "
                                                        "class over the region")
        return CheckOutcome(
            check=self.name, measurements=out, curves=out_curves, limitations=limitations, findings=_trust(ranking),
            methods=[MethodStanding(method=r["method"], status=r["status"], reasons=r.get("reasons", []))
                     for r in ranking],
            caveat=f"Measured on a seeded sample of {p.split} images; each map explains the image's predicted defect "
                   "region.",
            summary={"ranking": ranking, "recommended": recommended, "random_reference": reference,
                     "rules": [{"metric": f, "comparator": c, "threshold": t, "meaning": w} for f, c, t, w in rules],
                     "items": len(x), "defect_share": chance},
            validity=[
                f"{len(x)} images of the {p.split} split with a predicted defect region (seeded sample of {len(pool)}, "
                f"seed {ctx.seed}); per image the explained output is the region score, the sum of the logits of its "
                "most frequent predicted defect class over the pixels predicted that class (Seg-Grad-CAM's target)",
                f"deletion / insertion: the region's mean probability of that class as the most relevant pixels are "
                f"replaced by (taken from) the baseline '{p.baseline}', {p.steps} steps, ties broken at random; "
                f"region_energy: the share of the map's positive mass inside the true defect region, pointing_game: "
                f"the most relevant pixel inside it, both on the {int(defective.sum())} images with a true defect "
                f"(chance: the region's share of the image, {chance if chance is None else round(chance, 4)}); "
                f"{conf:.0%} Student-t intervals of means",
            ],
        )

    def _ranked(self, rows, not_run, out, rules, scope, curves, explained: str, y_label: str):
        """(ranking, recommended, curves) of methods explaining one target per image (a box, a region): ranked on
        their intervals by `rules`, the count of recommended methods appended to `out`, the deletion / insertion
        curves."""
        ranking = [{**r, **rows[r["method"]]} for r in rank_methods(list(rows), out, rules)] + not_run
        recommended = [r["method"] for r in ranking if r["status"] == "recommended"]
        out.append(census(check=self.name, metric="recommended_methods", value=len(recommended), n=len(ranking),
                          scope=scope, details={"recommended": recommended}))
        x_frac = np.linspace(0, 1, self.params.steps + 1).tolist()
        return ranking, recommended, [
            Curve(id=f"{self.name}_{kind}", title=f"{kind.capitalize()} curves of the explained {explained}",
                  x_label=f"fraction of pixels {'removed' if kind == 'deletion' else 'inserted'}, most relevant first",
                  y_label=y_label, x=x_frac,
                  series={m: Series(y=np.asarray(v).tolist()) for m, v in curves[kind].items()})
            for kind in ("deletion", "insertion")]

    def _measure(self, net, method, name, p, x, target, baseline, masks, seed, measure, curves) -> dict:
        """Every metric of one method: the row of the ranking (point values; the intervals are measurements)."""
        maps, deltas = [], []
        for s in range(0, len(x), p.batch_size):
            a = A.attribute(net, method, x[s:s + p.batch_size], target[s:s + p.batch_size], baseline, seed)
            maps.append(a.maps)
            if a.delta is not None:
                deltas.append(a.delta.abs().numpy())
        maps = torch.cat(maps)
        heat = maps.sum(dim=1).numpy()
        row = {}
        dc, ic = deletion_insertion(net, x, target, heat, baseline, p.steps, seed)
        curves["deletion"][name], curves["insertion"][name] = dc.mean(0), ic.mean(0)
        row["deletion_auc"] = measure(f"deletion_auc:{name}", auc(dc), method=name)
        row["insertion_auc"] = measure(f"insertion_auc:{name}", auc(ic), method=name)
        row["faithfulness"] = measure(f"faithfulness:{name}", auc(ic) - auc(dc), method=name)
        row["mu_fidelity"] = measure(f"mu_fidelity:{name}", mu_fidelity(
            net, x, target, heat, baseline, p.mufidelity_cells, p.mufidelity_subset, p.mufidelity_samples, seed),
            method=name)
        if deltas and name == "integrated_gradients":
            row["convergence_delta"] = measure("ig_convergence_delta", np.concatenate(deltas), method=name)
        row["infidelity"] = measure(f"infidelity:{name}", infidelity_of(
            net, x, target, maps, p.noise * net.input_range, p.infidelity_samples, seed), method=name)
        k = min(p.sensitivity_items, len(x))
        if k:
            explain = lambda inp, tgt: A.attribute(net, method, inp, tgt, baseline, seed).maps  # noqa: E731
            moved = stability(explain, x[:k], target[:k], p.sensitivity_radius * net.input_range,
                              p.sensitivity_samples, seed)
            row["sensitivity_max"] = measure(f"sensitivity_max:{name}", moved.max(axis=1), method=name)
            row["average_stability"] = measure(f"average_stability:{name}", moved.mean(axis=1), method=name)
        row["complexity"] = measure(f"complexity:{name}", complexity(heat), method=name)
        row["sparseness"] = measure(f"sparseness:{name}", sparseness(heat), method=name)
        if masks is not None:
            row["relevance_mass"] = measure(f"relevance_mass:{name}", relevance_mass(heat, masks), method=name,
                                            region=p.region.label(), chance=float(masks.mean()))
            row["pointing_game"] = measure(f"pointing_game:{name}", pointing_game(heat, masks), proportion=True,
                                           method=name, region=p.region.label(), chance=float(masks.mean()))
        if net.differentiable:
            original = np.abs(heat)
            for kind in ("sanity", "independent"):
                curves[kind][name] = self._sanity(net, name, p, x, target, baseline, original, seed,
                                                  independent=kind == "independent")
            corr = curves["sanity"][name]
            row["sanity_rank_correlation"] = measure(f"sanity_rank_correlation:{name}", corr["values"][-1],
                                                     method=name, layers_randomised=corr["steps"][-1],
                                                     threshold=p.sanity_max_correlation)
        return row

    def _sanity(self, net, name, p, x, target, baseline, original, seed, independent=False) -> dict:
        total = net.parametric_layers()
        steps = list(range(1, min(total, 3) + 1)) if independent else cascade(total)
        values = []
        for k in steps:
            rnet = net.randomised(k, seed, independent=independent)
            m = A.make(rnet, name, p.options.get(name))
            maps = torch.cat([A.attribute(rnet, m, x[s:s + p.batch_size], target[s:s + p.batch_size], baseline,
                                          seed).maps for s in range(0, len(x), p.batch_size)])
            values.append(spearman_rows(original, np.abs(maps.sum(dim=1).numpy())))
        return {"steps": steps, "values": values}

    def _gallery(self, ctx, got, info, pick, maps):
        uc = ctx.use_case
        imgs = np.stack([got[int(i)][0] for i in pick])
        first = imaging.to_uint8(imgs, uc.model.value_range)
        cols = [first] + [imaging.overlay(imgs, maps[m], uc.model.value_range) for m in maps]
        rows = [[c[j] for c in cols] for j in range(len(pick))]
        path = ctx.workdir / "gallery.png"
        imaging.save_png(path, imaging.tile(rows, scale=max(2, 128 // imgs.shape[1])))
        n_ok = len(info["pick"]["correct"])
        crit = uc.model.critical_class
        legend = (f"columns: input, {', '.join(maps)}; rows 1-{n_ok}: {crit} items correctly flagged, "
                  f"rows {n_ok + 1}-{len(pick)}: {crit} items missed")
        text = ctx.workdir / "gallery.txt"
        text.write_text(legend + "\n" + "\n".join(got[int(i)][2] for i in pick) + "\n")
        return [ctx.artefact(path, "image"), ctx.artefact(text, "file")]

