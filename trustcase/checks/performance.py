"""The `performance` check: the use case's task's figures on one split (science in `trustcase.tasks`: a
classifier's accuracy, per-class rates, cost and calibration from `trustcase.performance`; a detector's AP, mAP,
recall and false indications from `tasks.detection_metrics`)."""

from __future__ import annotations

import cv2

from trustcase.checks import Check, Context, Params, Produces, artefact_name
from trustcase.schemas import CheckOutcome, Curve, Stage
from trustcase.tasks import task_of


class PerformanceParams(Params):
    split: str = "test"
    calibration_bins: int = 15


class Performance(Check):
    """The task's performance figures on one split: for a classifier accuracy, per-class precision and recall, cost
    and calibration; for a detector AP, mAP, recall and false indications at the operating threshold."""

    name = "performance"
    Params = PerformanceParams
    stage = Stage.LEARNING
    tasks = frozenset({"classification", "detection", "segmentation"})
    whole_images = True  # under fit: tiles: the stitched masks scored on the whole masks

    @classmethod
    def produces(cls, params, use_case):
        task = task_of(use_case)
        return [Produces(m, params.split, subgroups=task.subgroups) for m in task.metrics(use_case)]

    def run(self, ctx: Context) -> CheckOutcome:
        p: PerformanceParams = self.params
        scorer = task_of(ctx.use_case).scorer(ctx.use_case, self.name, ctx.seed, p.calibration_bins)
        for batch in ctx.batches(p.split):
            scorer.update(ctx.model, batch)
        ms = scorer.compute(p.split, ctx.use_case.plan.confidence)
        drawn = scorer.figures(p.split, ms)
        out = CheckOutcome(
            check=self.name, measurements=ms, figures=[f for f in drawn if not isinstance(f, Curve)],
            curves=[f for f in drawn if isinstance(f, Curve)],
            caveat="The figures hold for data like the held-out items measured (see the data-quality evidence).",
            validity=[scorer.validity(p.split, ctx.use_case.plan.confidence)],
        )
        example = None if ctx.use_case.confidential else scorer.example()  # never a confidential case's images
        if example is not None:
            path = ctx.workdir / artefact_name(f"examples_{p.split}", ".png")
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), example)
            out.artefacts.append(ctx.artefact(path, "image"))
        return out
