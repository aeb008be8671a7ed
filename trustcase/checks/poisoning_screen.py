"""The `poisoning_screen` check (AMLAS data stage; EU AI Act Art. 15(5), data poisoning): spectral signatures and
activation clustering over the training items' penultimate features, one class at a time (science in
`data.poisoning`).

Measurements on the screened split: `poisoning_alarms` (a census: classes whose features split into a small, well
separated cluster) and `poisoning_suspects` (items in those clusters), both undefined unless every class was
screened (a class too small to screen could hold the cluster). The summary ranks each class's items by spectral
score.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data import poisoning as P
from trustcase.errors import Unsupported
from trustcase.measurement import census
from trustcase.odd.features import FeatureExtractor
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic


class PoisoningScreenParams(Params):
    split: str = "train"
    max_share: float = Field(0.15, gt=0, lt=0.5, description="an alarm's cluster holds at most this share of a class")
    min_silhouette: float = Field(0.15, ge=-1, le=1, description="and is at least this well separated")
    top: int = Field(20, ge=0, le=200, description="items listed per class, by spectral score")


class PoisoningScreen(Check):
    name = "poisoning_screen"
    Params = PoisoningScreenParams
    stage = Stage.DATA

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, params.split) for m in ("poisoning_alarms", "poisoning_suspects")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: PoisoningScreenParams = self.params
        names = ctx.use_case.model.class_names
        extract = FeatureExtractor(ctx.model)
        if extract.mode != "penultimate":
            raise Unsupported(f"the screen reads the model's penultimate features: {extract.why}")
        feats, labels, ids = [], [], []
        for b in ctx.batches(p.split):
            feats.append(extract(b.images)[0])
            labels.append(b.labels)
            ids += b.ids
        f = np.concatenate(feats) if feats else np.zeros((0, 0))
        y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        order = np.argsort(np.array(ids, dtype=object), kind="stable") if ids else np.zeros(0, np.int64)
        f, y, ids = f[order], y[order], [ids[i] for i in order]  # the same items in the same order at any batching
        alarms, suspects, screened, summary, limitations = 0, 0, 0, {}, []
        for c, cls in enumerate(names):
            rows = np.flatnonzero(y == c)
            if len(rows) < P.MIN_ITEMS:
                limitations.append(f"class {cls}: {len(rows)} items, the screen needs at least {P.MIN_ITEMS}")
                continue
            r = P.screen(f[rows], ctx.seed, p.max_share, p.min_silhouette)
            screened += 1
            alarms += r.alarm
            suspects += len(r.suspects)
            ranked = np.argsort(-r.spectral, kind="stable")[:p.top]
            summary[cls] = {"items": len(rows), "alarm": r.alarm, "cluster_share": r.cluster_share,
                            "silhouette": r.silhouette, "suspects": [ids[rows[i]] for i in r.suspects][:50],
                            "top_spectral": [ids[rows[i]] for i in ranked]}
        scope = Scope(split=p.split)
        # a class never screened could hold the poisoned cluster: the counts are defined only over every class
        whole = screened == len(names)
        why = {} if whole else {"undefined": f"{len(names) - screened} of {len(names)} classes of the {p.split} "
                                             f"split not screened (fewer than {P.MIN_ITEMS} items): "
                                             + "; ".join(limitations)}
        m_alarm = census(self.name, "poisoning_alarms", alarms if whole else None, screened, scope=scope,
                         details=why)
        m_susp = census(self.name, "poisoning_suspects", suspects if whole else None, len(y), scope=scope,
                        details=why)
        findings = [Finding(topic=Topic.DATA, cites={"a": m_alarm, "s": m_susp}, text=(
            f"The poisoning screen of the {p.split} split raises {{a}} alarm(s) over {screened} classes, "
            f"{{s}} suspect items: " + ", ".join(c for c, v in summary.items() if v["alarm"]) + "."))] if alarms \
            else []
        return CheckOutcome(
            check=self.name, measurements=[m_alarm, m_susp], findings=findings, summary=summary,
            limitations=limitations,
            caveat="A screen, not a proof of clean data: a backdoor whose items the model does not set apart in its "
                   "features is not found.",
            validity=[f"penultimate features ({extract.why}); per class: 2-means on at most 10 principal components "
                      f"(alarm: smaller cluster <= {p.max_share:.0%} of the class, silhouette >= "
                      f"{p.min_silhouette}), spectral signature scores on the top singular vector"])
