"""A partner's check, outside trustcase and unregistered, named in a plan as 'partner_checks:CriticalShare': it
declares its findings, figure and caveat in the typed fields of its outcome, as the built-in checks do."""

from __future__ import annotations

import numpy as np

from trustcase.checks import Check, Context, Params, Produces
from trustcase.measurement import proportion
from trustcase.schemas import CheckOutcome, ConfusionMatrix, Finding, Scope, Stage, Topic


class CriticalShareParams(Params):
    split: str = "test"


class CriticalShare(Check):
    """The share of items the model calls the safety-critical class, and its confusion matrix."""

    name = "critical_share"
    Params = CriticalShareParams
    stage = Stage.TESTING

    @classmethod
    def produces(cls, params, use_case):
        return [Produces("critical_share", params.split)]

    def run(self, ctx: Context) -> CheckOutcome:
        uc, split = ctx.use_case, self.params.split
        k = len(uc.model.class_names)
        cm = np.zeros((k, k), np.int64)
        for batch in ctx.batches(split):
            pred = ctx.model.logits(batch.images, batch.ids).argmax(axis=1)
            np.add.at(cm, (batch.labels, pred), 1)
        share = proportion(self.name, "critical_share", int(cm[:, uc.critical_index].sum()), int(cm.sum()),
                           uc.plan.confidence, Scope(split=split))
        return CheckOutcome(
            check=self.name, measurements=[share],
            findings=[Finding(topic=Topic.BREAKS, text="The partner's screening calls {share} of the cells "
                                                       f"{uc.model.critical_class}.", cites={"share": share})],
            figures=[ConfusionMatrix(title="Partner screening: confusion matrix", classes=uc.model.class_names,
                                     counts=cm.tolist(), illustrates=["critical_share"])],
            caveat="Partner evidence: the screening rule of the line, not a property of the model alone.",
            validity=[f"all readable items of the {split} split"])
