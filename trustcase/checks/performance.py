"""The `performance` check: accuracy, per-class rates, cost and calibration on one split (science in
`trustcase.performance`)."""

from __future__ import annotations

import numpy as np

from trustcase.checks import Check, Context, Params, Produces
from trustcase.measurement import BOOTSTRAP_REPLICATES
from trustcase.performance import Tally, rate_metrics
from trustcase.schemas import CheckOutcome, ConfusionMatrix, ReliabilityDiagram, Stage


class PerformanceParams(Params):
    split: str = "test"
    calibration_bins: int = 15


class Performance(Check):
    """Accuracy, per-class precision and recall, cost and calibration on one split."""

    name = "performance"
    Params = PerformanceParams
    stage = Stage.LEARNING

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, params.split, subgroups=True) for m in [*rate_metrics(use_case), "ece"]]

    def run(self, ctx: Context) -> CheckOutcome:
        p: PerformanceParams = self.params
        tally = Tally(ctx.use_case, p.calibration_bins, check=self.name, seed=ctx.seed)
        for batch in ctx.batches(p.split):
            tally.update(ctx.model.logits(batch.images, batch.ids), batch.labels, batch.meta, ids=batch.ids)
        ms = tally.compute(self.name, p.split, ctx.use_case.plan.confidence)
        figures = [ConfusionMatrix(title=f"Confusion matrix ({p.split})", classes=ctx.use_case.model.class_names,
                                   counts=tally.cm.tolist(), illustrates=["accuracy", "recall", "precision"])]
        ece = next((m for m in ms if m.metric == "ece" and not m.scope.subgroup), None)
        if ece is not None and ece.value is not None:
            figures.append(ReliabilityDiagram(
                title=f"Reliability (ECE = {ece.value:.3f})", edges=tally.edges.tolist(),
                accuracy=(tally.bin_correct / np.maximum(tally.bin_count, 1)).tolist(),
                count=tally.bin_count.tolist()))
        return CheckOutcome(
            check=self.name, measurements=ms, figures=figures,
            caveat="The figures hold for data like the held-out items measured (see the data-quality evidence).",
            validity=[f"measured on the {p.split} split ({int(tally.cm.sum())} items), "
                      f"{ctx.use_case.plan.confidence:.0%} Clopper-Pearson intervals; ECE and cost: percentile "
                      f"intervals of a Poisson bootstrap over items ({BOOTSTRAP_REPLICATES} replicates, each item's "
                      "weights drawn from its id)"],
        )

