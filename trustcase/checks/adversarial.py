"""The `adversarial` check: FGSM, PGD, APGD, Square and the attack engine `auto` in pixel units (science in
`robustness.attacks`).

Summary, per attack: `norm`, `epsilons`, `steps`, `apgd_steps`, `queries`, `step_size`, `restarts`, `n`,
`accuracy`, `success_rate` (per epsilon), `breaking` (as in the sweep), and for PGD, APGD and auto `distance`
(`median`, `q10`, `q90`, `max_distance`, `censored`: items not fooled within it, `search_steps`).
Curves: `adversarial_<attack>`: accuracy and critical recall vs epsilon with bands.

A detector (task detection) is attacked box by box, per objective (vanishing, misclassification: science in
`robustness.detection_attacks`); its figures are the recall under attack, scope `<attack>.<objective>`.

A segmenter (task segmentation) is attacked per goal (`robustness.segmentation_attacks`) and the adversarial images
are scored by the task's own scorer, scope `<attack>.<goal>`: pixels (the whole budget on the per-pixel
cross-entropy, each image's worst iterate for IoU: IoU, Dice, pixel precision and recall) and decision (stopped at
the flip of the image-level rule: image recall and false alarms).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from trustcase import seeding
from trustcase.checks import Check, Context, Params, Produces, Unsupported
from trustcase.measurement import estimate, proportion
from trustcase.performance import Tally
from trustcase.robustness import segmentation_attacks as seg
from trustcase.robustness.attacks import (
    ATTACKS,
    BLACK_BOX,
    DEFAULT_EPS,
    DISTANCE_QUANTILES,
    Budget,
    Norm,
    _predict,
    apgd_runs,
    attack,
    censored_distances,
    minimal_distance,
    quantile_interval,
)
from trustcase.robustness.detection_attacks import OBJECTIVES, attack_boxes, found_boxes, recall_under_attack
from trustcase.robustness.sweep import _series, breaking, curve
from trustcase.schemas import CheckOutcome, Measurement, Scope, Stage

SEARCHED = ("pgd", "apgd", "auto")  # attacks that also search minimal distances (FGSM's one step and Square do not)


class AdversarialParams(Params):
    attacks: list[Literal["fgsm_linf", "fgsm_l2", "pgd_linf", "pgd_l2", "apgd_linf", "apgd_l2", "square_linf",
                          "auto_linf", "auto_l2"]] = ["fgsm_linf", "pgd_linf", "pgd_l2"]
    linf: list[float] | None = Field(None, description="L-inf epsilons in pixel units; default (0.5..8)/255 x range")
    l2: list[float] | None = Field(None, description="L2 epsilons in pixel units; default (0.05..1) x range")
    steps: int = Field(10, ge=1, le=1000, description="PGD iterations")
    apgd_steps: int = Field(100, ge=1, le=1000, description="APGD iterations (apgd_*, auto_*): its step-size "
                            "schedule is made for about 100")
    queries: int = Field(1000, ge=1, le=100_000, description="Square (black box): forward passes per item")
    step_size: float = Field(2.5, gt=0, le=20, description="PGD step = step_size x eps / steps")
    restarts: int = Field(2, ge=1, le=50, description="PGD / APGD runs: the first from the clean input, then "
                          "random")
    split: str = "test"
    max_items: int = Field(128, ge=1, description="items attacked (the first of the split's stream; a detector's: "
                                                  "a seeded sample)")
    distance: bool = Field(True, description="estimate per-item minimal distances (PGD, APGD, auto)")
    search_steps: int = Field(6, ge=1, le=40)
    max_distance: dict[str, float] = Field({}, description="norm -> search limit; default 2 x largest epsilon")
    batch_size: int | None = Field(None, ge=1)
    objectives: list[Literal["vanishing", "misclassification"]] = Field(
        list(OBJECTIVES), min_length=1, description="detection only: hide true boxes, or relabel them")
    goals: list[Literal["pixels", "decision"]] = Field(
        list(seg.GOALS), min_length=1, description="segmentation only: mark the wrong pixels (cross-entropy over the "
        "true defect region), or flip the image-level decision")
    iou_floor: float = Field(0.5, gt=0, le=1, description="segmentation, goal pixels: an image is fooled when its "
                             "defect IoU falls below this")

    @field_validator("attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one attack")
        if len(set(v)) != len(v):
            raise ValueError(f"attacks repeated: {v}")
        return v

    @field_validator("linf", "l2")
    @classmethod
    def _eps(cls, v: list[float] | None) -> list[float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("the epsilon grid is empty")
        bad = [e for e in v if not (math.isfinite(e) and e > 0)]
        if bad:
            raise ValueError(f"epsilons must be finite and > 0 (pixel units), got {bad}")
        return sorted(set(v))

    @model_validator(mode="after")
    def _limits(self) -> AdversarialParams:
        for k, d in self.max_distance.items():
            if k not in ("linf", "l2") or not (math.isfinite(d) and d > 0):
                raise ValueError(f"max_distance: expected linf/l2 -> positive number, got {k}: {d}")
        return self

    def epsilons(self, norm: Norm, value_range: tuple[float, float]) -> list[float]:
        given = self.linf if norm == "linf" else self.l2
        width = value_range[1] - value_range[0]
        return [0.0, *(given if given is not None else [round(f * width, 6) for f in DEFAULT_EPS[norm]])]


class Adversarial(Check):
    name = "adversarial"
    Params = AdversarialParams
    needs_gradients = False  # square_linf needs forward passes only; the gradient attacks are refused on black boxes
    stage = Stage.TESTING
    tasks = frozenset({"classification", "detection", "segmentation"})
    whole_images = True  # under fit: tiles: the whole image attacked through the stitched (differentiable) logits

    @classmethod
    def produces(cls, params, use_case):
        """Measurements, per attack (scope.perturbation = {name: <attack>, max_amplitude: eps}, amplitude = eps,
        eps = 0 is the clean data): every metric of `performance.Tally` (accuracy, recall:<class>, ...),
        `adversarial_accuracy` (= accuracy under attack) and `attack_success_rate` (share of the items
        correct when clean that the attack fools), with Clopper-Pearson intervals. PGD, APGD and auto attacks with
        `distance: true` add, with no perturbation scope, `adversarial_distance_median.<attack>` and
        `adversarial_distance_q10.<attack>` (pixel units; distribution-free order-statistic intervals;
        items not fooled up to `max_distance` count as at `max_distance`)."""
        from trustcase.performance import rate_metrics

        if use_case.task == "segmentation":  # per goal: the task's metrics under attack and the share fooled
            from trustcase.tasks import task_of

            return [Produces(m, params.split, f"{a}.{g}", subgroups=True) for a in params.attacks for g in params.goals
                    for m in _goal_metrics(g, task_of(use_case).metrics(use_case, calibration=False))]
        if use_case.task == "detection":  # per objective: the recall under attack and the share of boxes hidden
            return [Produces(m, params.split, f"{a}.{o}") for a in params.attacks for o in params.objectives
                    for m in ("indication_recall", "recall:*", "attack_success_rate")]
        out = [Produces(m, params.split, a, subgroups=True) for a in params.attacks
               for m in [*rate_metrics(use_case), "adversarial_accuracy", "attack_success_rate"]]
        return out + [Produces(f"adversarial_distance_*.{a}", params.split) for a in params.attacks
                      if params.distance and ATTACKS[a][0] in SEARCHED]

    def shards(self) -> list[Check]:
        p: AdversarialParams = self.params
        return [Adversarial(p.model_copy(update={"attacks": [a]})) for a in p.attacks]

    def run(self, ctx: Context) -> CheckOutcome:
        gradient = [a for a in self.params.attacks if ATTACKS[a][0] not in BLACK_BOX]
        if gradient and not ctx.model.differentiable:
            raise Unsupported(f"adversarial: {', '.join(gradient)} needs gradients and the model is a black box "
                              "(square_linf needs forward passes only)")
        out = CheckOutcome(check=self.name, shard=", ".join(self.params.attacks),
                           caveat="Empirical evidence, not a certificate: a stronger attack may find more errors.")
        for name in self.params.attacks:
            {"detection": self._detection, "segmentation": self._segmentation}.get(ctx.use_case.task, self._attack)(
                ctx, name, out)
        return out

    def _detection(self, ctx: Context, name: str, out: CheckOutcome) -> None:
        """Recall under attack of a detector, per objective and radius (`robustness.detection_attacks`)."""
        p: AdversarialParams = self.params
        uc, conf, threshold = ctx.use_case, ctx.use_case.plan.confidence, ctx.use_case.model.score_threshold
        kind, norm = ATTACKS[name]
        vr = tuple(map(float, uc.model.value_range))
        budget = Budget(p.steps, p.step_size, p.restarts, p.apgd_steps, p.queries)
        grids = {o: sorted({*p.epsilons(norm, vr), *(a for m in ("indication_recall", "attack_success_rate",
                                                                  *(f"recall:{c}" for c in uc.model.class_names))
                                                      for a in ctx.claimed(m, f"{name}.{o}"))}) for o in p.objectives}
        ids, boxes, clean = [], [], []
        found = {(o, e): [] for o in p.objectives for e in grids[o]}
        sample = ctx.sample(p.split, p.max_items, p.batch_size)
        for batch in ctx.batches(p.split, p.batch_size):
            take = np.flatnonzero(np.isin(batch.index, list(sample)))
            if not len(take):
                continue
            images, truth = batch.images[take], [batch.labels[t] for t in take]
            item_ids = [batch.ids[t] for t in take]
            clean += [found_boxes(d, g, threshold) for d, g in zip(ctx.model.detect(images, item_ids), truth,
                                                                    strict=True)]
            for (o, e), kept in found.items():
                kept += attack_boxes(kind, ctx.model, images, truth, item_ids, e, norm, vr, threshold, o, budget,
                                     ctx.seed, self.name, f"{name}.{o}")
            ids += item_ids
            boxes += truth
        unit = f"{'L-inf' if norm == 'linf' else 'L2'} radius, pixel units of [{vr[0]:g}, {vr[1]:g}]" + (
            " (grey levels)" if norm == "linf" and vr == (0.0, 255.0) else "")
        names = list(uc.model.class_names)
        for o in p.objectives:
            key = f"{name}.{o}"
            ms = [m for e in grids[o] for m in recall_under_attack(
                self.name, key, p.split, ids, boxes, found[(o, e)], clean, names, e, threshold, conf, ctx.seed)]
            broken = breaking(uc.requirements, key, ms)
            cv = curve(key, unit, grids[o], ms, uc, broken)
            series = _series([m for m in ms if m.metric == "indication_recall"])
            marks = [(r, broken[r.id]) for r in uc.requirements if r.id in broken and r.metric == "indication_recall"]
            cv = cv.model_copy(update={
                "id": f"adversarial_{key}", "title": f"Recall of indications under {name} ({o}; empirical)",
                "x_label": unit, "series": {**({"indication_recall": series} if series else {}), **cv.series},
                "y_label": f"recall ({conf:.0%} interval: the wider of Clopper-Pearson over boxes and the bootstrap "
                           "over images)",
                "y_marks": {**cv.y_marks, **{f"{r.id}: {r.metric} {r.comparator} {r.threshold:g}": r.threshold
                                             for r, _ in marks}},
                "x_marks": {**cv.x_marks, **{f"{r.id} claimed up to": r.scope.perturbation.max_amplitude
                                             for r, _ in marks},
                            **{f"{r.id} holds up to": b["holds_up_to"] for r, b in marks
                               if b.get("holds_up_to") is not None}}})
            out.measurements.extend(ms)
            out.curves.append(cv)
            out.units[key] = unit
            out.summary[key] = {
                "norm": norm, "objective": o, "epsilons": grids[o], "n": len(ids), "boxes": int(sum(map(len, boxes))),
                "recall": [m.value for m in ms if m.metric == "indication_recall"],
                "success_rate": [m.value for m in ms if m.metric == "attack_success_rate"], "breaking": broken}
        how = {"fgsm": "FGSM, one step", "pgd": f"PGD, {p.steps} steps of {p.step_size:g} x eps / {p.steps}, "
                                                f"{p.restarts} run(s) (the first from the clean image)",
               "apgd": f"APGD, {p.apgd_steps} steps, {p.restarts} run(s)", "square": f"Square attack (black box, "
               f"forward passes only), {p.queries} queries per box",
               "auto": f"the engine: FGSM, then PGD ({p.steps} steps), then APGD ({p.apgd_steps} steps) on the boxes "
                       f"left standing"}[kind]
        out.validity += [
            f"{name}: EMPIRICAL evidence, not a certificate: the recall under attack is an upper bound of the share "
            f"of true boxes no perturbation of the ball hides (a stronger attack may hide more); every success is "
            f"re-checked by a plain forward pass of the witness",
            f"{name}: {how}; each true box found clean (score >= {threshold:g}, IoU >= 0.5, COCO's greedy matching) is "
            f"attacked on its own copy of its image; objectives {', '.join(p.objectives)} (vanishing: minus the "
            f"scores above the threshold of the detections of its class overlapping it; misclassification: the best "
            f"other class's score minus its own class's); radii {sorted({e for g in grids.values() for e in g})} "
            f"({unit}); {len(ids)} images of the {p.split} split (a sample seeded by {ctx.seed}); {conf:.0%} "
            f"intervals: the wider of Clopper-Pearson over boxes and a Poisson bootstrap over images",
        ]
        out.limitations.append(f"{name}: minimal distances are not searched for a detector; gradient attacks are "
                               f"blind to gradient masking (the peak suppression and top-k of a detector's decoding "
                               f"pass no gradient to the boxes they drop)")

    def _segmentation(self, ctx: Context, name: str, out: CheckOutcome) -> None:
        """A segmenter's metrics under attack, per goal and radius (`robustness.segmentation_attacks`)."""
        from trustcase.tasks import task_of

        p: AdversarialParams = self.params
        uc, conf, rule = ctx.use_case, ctx.use_case.plan.confidence, ctx.use_case.model.defect_pixels
        kind, norm = ATTACKS[name]
        vr = tuple(map(float, uc.model.value_range))
        budget = Budget(p.steps, p.step_size, p.restarts, p.apgd_steps, p.queries)
        metrics = [*task_of(uc).metrics(uc, calibration=False), "attack_success_rate"]
        grids = {g: sorted({*p.epsilons(norm, vr), *(a for m in metrics for a in ctx.claimed(m, f"{name}.{g}"))})
                 for g in p.goals}
        scorers = {(g, e): task_of(uc).scorer(uc, self.name, ctx.seed, calibration=False)
                   for g in p.goals for e in grids[g]}
        standing = dict.fromkeys(p.goals, 0)  # items the goal's rule does not fool clean
        fooled_n = {k: 0 for k in scorers}
        seen, passes = 0, {}  # passes: radius -> whole-batch forward passes the worst-IoU search read per image
        # a seeded sample of max_items images (a split ordered by defect type would give its first type only)
        index = np.fromiter(ctx.sample(p.split, p.max_items, p.batch_size), np.int64)
        for batch in ctx.batches(p.split, p.batch_size):
            take = np.flatnonzero(np.isin(batch.index, index))
            if not len(take):
                continue
            x = torch.as_tensor(batch.images[take]).float()
            masks = torch.as_tensor(np.stack([batch.labels[t] for t in take]))
            part = dataclasses.replace(batch, labels=[batch.labels[t] for t in take], ids=[batch.ids[t] for t in take],
                                       index=batch.index[take], meta={k: [v[t] for t in take]
                                                                      for k, v in batch.meta.items()})
            for g in p.goals:
                loss, hit = seg.goal(g, rule, p.iou_floor)
                y = seg.labels(g, masks)
                seeds = seeding.item_seeds(ctx.seed, self.name, part.ids, f"{name}.{g}")
                with torch.inference_mode():
                    clean_ok = ~hit(ctx.model.forward(ctx.model.to_input(x)), y)
                standing[g] += int(clean_ok.sum())
                for e in grids[g]:
                    eps = torch.full((len(x),), e)
                    if g == "pixels":  # the whole budget, each image's worst iterate for IoU (review R1)
                        adv, reads = seg.worst_iou(kind, ctx.model, x, y, eps, norm, vr, budget, seeds)
                        passes[e] = max(passes.get(e, 0), reads)
                        with torch.inference_mode():  # the re-check: a plain forward pass of what is scored
                            fooled = hit(ctx.model.forward(ctx.model.to_input(adv)), y)
                    else:
                        adv, fooled = attack(kind, ctx.model, x, y, eps, norm, vr, budget, seeds, hit=hit, loss=loss)
                    scorers[(g, e)].update(ctx.model, dataclasses.replace(part, images=adv.numpy()))
                    fooled_n[(g, e)] += int((fooled & clean_ok).sum())
            seen += len(x)
        unit = f"{'L-inf' if norm == 'linf' else 'L2'} radius, pixel units of [{vr[0]:g}, {vr[1]:g}]"
        fooled_rule = {"pixels": f"its defect IoU below {p.iou_floor:g}",
                       "decision": f"its image-level decision (defective at >= {rule} defect pixels) wrong"}
        for g in p.goals:
            key = f"{name}.{g}"
            ms: list[Measurement] = []
            for e in grids[g]:
                got = scorers[(g, e)].compute(p.split, conf, perturbation=key, amplitude=e)
                ms += [m for m in got if m.metric in _goal_metrics(g, metrics)]
                ms.append(proportion(self.name, "attack_success_rate", fooled_n[(g, e)], standing[g], conf,
                                     got[0].scope.model_copy(update={"subgroup": {}}), e,
                                     undefined=f"no image that the rule ({fooled_rule[g]}) does not fool clean"))
            broken = breaking(uc.requirements, key, ms)
            cv = curve(key, unit, grids[g], ms, uc, broken)
            series = {m: _series(sorted((x for x in ms if x.metric == m and not x.scope.subgroup),
                                        key=lambda x: x.amplitude))
                      for m in ("attack_success_rate", "image_recall", f"iou:{uc.model.critical_class}")}
            cv = cv.model_copy(update={"id": f"adversarial_{key}", "x_label": unit,
                                       "title": f"Segmentation under {name} ({g}; empirical)",
                                       "series": {k: v for k, v in series.items() if v is not None}})
            out.measurements.extend(ms)
            out.curves.append(cv)
            out.units[key] = unit
            out.summary[key] = {"norm": norm, "goal": g, "epsilons": grids[g], "n": seen, "breaking": broken,
                                "success_rate": [m.value for m in ms if m.metric == "attack_success_rate"]}
        out.validity += [
            f"{name}: EMPIRICAL evidence, not a certificate: IoU, Dice and image recall under attack are upper bounds "
            f"of the robust ones (a stronger attack may do more); every witness is re-checked by a plain forward pass",
            f"{name}: goals {', '.join(p.goals)}; radii {sorted({e for v in grids.values() for e in v})} ({unit}); "
            f"{seen} images of the {p.split} split (a sample seeded by {ctx.seed}); the task's intervals (bootstrap "
            f"over images, Clopper-Pearson)",
        ]
        if "pixels" in p.goals:
            out.validity.append(
                f"{name}, pixels: the attack runs its WHOLE budget on every image (it never stops at a rule) on the "
                f"per-pixel cross-entropy averaged over the true defect region plus averaged over the true background; "
                f"IoU, Dice, pixel precision and recall under attack are those of each image's WORST ITERATE for its "
                f"defect IoU (the lowest; ties: the most wrong pixels) among the points of its ball the attack "
                f"evaluated, its clean input included ({max(passes.values(), default=0)} forward passes read per "
                f"image at most), pooled over the images as on clean data; an image is counted fooled when that "
                f"iterate leaves {fooled_rule['pixels']}")
        if "decision" in p.goals:
            out.validity.append(
                f"{name}, decision: minus the positive defect margins of a defective image, the {rule} largest of a "
                f"defect-free one; the attack stops on an image as soon as it leaves {fooled_rule['decision']}, "
                f"and an image not flipped keeps its clean input, so only the rule's outcome is reported (image "
                f"recall, false alarms, the share flipped), never IoU or Dice")
        out.limitations.append(f"{name}: minimal distances are not searched for a segmenter; gradient attacks are "
                               "blind to gradient masking")

    def _attack(self, ctx: Context, name: str, out: CheckOutcome) -> None:
        p: AdversarialParams = self.params
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        kind, norm = ATTACKS[name]
        vr = tuple(map(float, uc.model.value_range))
        grid = p.epsilons(norm, vr)
        tallies = [Tally(uc, check=self.name, seed=ctx.seed) for _ in grid]
        correct_clean = 0
        fooled_correct = np.zeros(len(grid), np.int64)
        dist: list[np.ndarray] = []
        cap = p.max_distance.get(norm, 2 * grid[-1])
        search = p.distance and kind in SEARCHED
        budget = Budget(p.steps, p.step_size, p.restarts, p.apgd_steps, p.queries)
        seen = 0
        for batch in ctx.batches(p.split, p.batch_size):
            if seen >= p.max_items:
                break
            take = slice(0, p.max_items - seen)
            x = torch.as_tensor(batch.images[take]).float()
            y = torch.as_tensor(batch.labels[take])
            meta = {k: v[take] for k, v in batch.meta.items()}
            seeds = seeding.item_seeds(ctx.seed, self.name, batch.ids[take], name)
            clean_ok = _predict(ctx.model, x) == y
            correct_clean += int(clean_ok.sum())
            for j, e in enumerate(grid):
                adv, fooled = attack(kind, ctx.model, x, y, torch.full((len(x),), e), norm, vr, budget, seeds)
                tallies[j].update(ctx.model.logits(adv.numpy()), y.numpy(), meta, ids=batch.ids[take])
                fooled_correct[j] += int((fooled & clean_ok).sum())
            if search:
                dist.append(minimal_distance(kind, ctx.model, x, y, norm, vr, cap, p.search_steps, budget, seeds))
            seen += len(x)

        ms: list[Measurement] = []
        for j, e in enumerate(grid):
            t = tallies[j].compute(self.name, p.split, conf, perturbation=name, amplitude=e, calibration=False)
            acc = t[0]
            scope = acc.scope
            ms += t
            ms.append(acc.model_copy(update={"metric": "adversarial_accuracy", "details": {}}))
            ms.append(proportion(self.name, "attack_success_rate", int(fooled_correct[j]), correct_clean, conf,
                                 scope, e, undefined="no correctly classified item to attack"))
        broken = breaking(uc.requirements, name, ms)
        unit = f"{'L-inf' if norm == 'linf' else 'L2'} epsilon, pixel units of [{vr[0]:g}, {vr[1]:g}]"
        cv = curve(name, unit, grid, ms, uc, broken)
        cv = cv.model_copy(update={"id": f"adversarial_{name}", "title": f"Accuracy under {name} (empirical)",
                                   "x_label": f"epsilon ({unit})"})
        cv.series.pop("flip_rate", None)
        summary = {
            "norm": norm, "epsilons": grid, "steps": 1 if kind == "fgsm" else p.steps,
            "apgd_steps": p.apgd_steps if kind in ("apgd", "auto") else None,
            "queries": p.queries if kind == "square" else None,
            "step_size": p.step_size if kind in ("pgd", "auto") else None,
            "restarts": None if kind == "fgsm" else p.restarts,
            "n": seen, "accuracy": [m.value for m in ms if m.metric == "adversarial_accuracy"],
            "success_rate": [m.value for m in ms if m.metric == "attack_success_rate"], "breaking": broken,
        }
        if search and dist:
            dc, stats = censored_distances(np.concatenate(dist), cap)  # not fooled within the search: at the cap
            for label in ("median", "q10"):
                v, iv = quantile_interval(dc, DISTANCE_QUANTILES[label], conf)
                ms.append(estimate(check=self.name, metric=f"adversarial_distance_{label}.{name}", value=v,
                                      interval=iv, n=len(dc), scope=Scope(split=p.split), unit=unit,
                                      details={"censored": stats["censored"], "max_distance": cap}))
            summary["distance"] = {**stats, "search_steps": p.search_steps}
        out.measurements.extend(ms)
        out.curves.append(cv)
        out.units[name] = unit
        out.summary[name] = summary
        runs = apgd_runs(len(uc.model.class_names))
        losses = ("the margin to the other class (2 classes: the cross-entropy is a monotone function of it and "
                  "DLR is undefined)" if len(runs) == 1 else
                  f"the cross-entropy, then the targeted DLR loss at each of the {len(runs) - 1} runner-up classes")
        apgd_text = (f"APGD (Croce & Hein 2020), {p.apgd_steps} steps with adaptive step size and momentum on "
                     f"{losses}, {p.restarts} run(s) each: the first from the clean input, the others from seeded "
                     f"random points of the ball")
        how = {
            "pgd": f"PGD, {p.steps} steps of {p.step_size:g} x eps / {p.steps}, {p.restarts} run(s): the first from "
                   f"the clean input, the others from random points of the ball; untargeted, cross-entropy on the "
                   f"true label",
            "fgsm": "FGSM, one step of size eps; untargeted, cross-entropy on the true label",
            "apgd": apgd_text,
            "square": f"Square attack (Andriushchenko et al. 2020; black box, forward passes only), {p.queries} "
                      f"queries per item, margin loss",
            "auto": f"the attack engine: per item the first success of FGSM, then PGD ({p.steps} steps of "
                    f"{p.step_size:g} x eps / {p.steps}, {p.restarts} run(s)), then {apgd_text}",
        }[kind]
        out.validity += [
            f"{name}: EMPIRICAL evidence, not a certificate: attacks are upper bounds of robust accuracy (the "
            f"accuracy under attack bounds it from above) and each distance an upper bound on the item's robust "
            f"radius (a stronger attack may do better); every counterexample is re-checked by a plain forward "
            f"pass (arg max != label)",
            f"{name}: {how}; epsilons {grid} ({unit}); gradients "
            f"through the model's normalisation, model in eval mode; adversarial images clipped to the value "
            f"range, not quantised; {seen} items of the {p.split} split, seed {ctx.seed}, "
            f"{conf:.0%} Clopper-Pearson intervals",
        ]
        if search and dist:
            out.validity.append(f"{name}: minimal distances by {p.search_steps} bisection steps up to {cap:g}; "
                                f"{summary['distance']['censored']} item(s) not fooled within it counted at it")
        out.limitations.append(f"{name}: gradient-based attacks are blind to gradient masking (saturated "
                               f"outputs, non-differentiable pre-processing): a high accuracy under attack "
                               f"is weak evidence of robustness")


def _goal_metrics(goal: str, task_metrics: list[str]) -> list[str]:
    """What a segmentation attack goal honestly measures. The pixels goal runs its whole budget and scores each
    image's worst iterate for IoU: the pixel figures (IoU, Dice, pixel precision and recall, their means). The
    decision goal stops on an image at the flip and an image not flipped keeps its clean input: only the rule's
    own outcome, the image-level rates (its IoU and Dice would be measured on images pushed only as far as the rule,
    above the ball's worst). Both: the share fooled."""
    if goal == "pixels":
        return [m for m in task_metrics if not m.startswith("image_")] + ["attack_success_rate"]
    return [m for m in task_metrics if m.startswith("image_")] + ["attack_success_rate"]
