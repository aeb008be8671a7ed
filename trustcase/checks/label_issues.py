"""The `label_issues` check (AMLAS data stage, "correctly labelled"): items whose label the model's
out-of-sample probabilities contradict with confidence, by confident learning (science in `data.labels`).

Out of sample: the assessed model's probabilities on the splits it was not trained on (every split but
`train`). Measurements per split: `suspected_labels` (the suspected share, the estimated noise rate, with its
Clopper-Pearson interval) and `suspected_labels:<class>` (the share of the items labelled that class).
Artefact: `suspected.png` (kind "image"), the least confident suspected items of each split with their label
and the model's class; never for a confidential use case (real inputs).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data import labels as L
from trustcase.measurement import proportion
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic


class LabelIssuesParams(Params):
    splits: list[str] | None = Field(None, description="the splits screened; None: every split but train (the "
                                     "model's probabilities on its own training items are not out of sample)")
    thumbnails: int = Field(8, ge=0, le=64, description="suspected items shown per split (0: none)")


class LabelIssues(Check):
    name = "label_issues"
    Params = LabelIssuesParams
    stage = Stage.DATA

    @staticmethod
    def _splits(params: LabelIssuesParams, roles) -> list[str]:
        return list(params.splits) if params.splits is not None else [r for r in roles if r != "train"]

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, s) for s in cls._splits(params, use_case.data.splits)
                for m in ("suspected_labels", "suspected_labels:*")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: LabelIssuesParams = self.params
        uc = ctx.use_case
        names, conf = uc.model.class_names, uc.plan.confidence
        images = len(uc.model.input_shape) == 3
        shown = p.thumbnails if images and not uc.confidential else 0
        out, findings, summary, limitations, rows = [], [], {}, [], []
        for role in self._splits(p, ctx.data.roles):
            labels, probs, ids = [], [], []
            lowest = L.LowestConfidence(shown)
            for batch in ctx.batches(role):
                pr = L.softmax(ctx.model.logits(batch.images, batch.ids))
                labels.append(batch.labels)
                probs.append(pr)
                ids += batch.ids
                lowest.update(pr[np.arange(len(batch)), batch.labels], batch.ids, batch.images)
            y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
            pr = np.concatenate(probs) if probs else np.zeros((0, len(names)))
            found = L.find(y, pr)
            limitations += [f"{role}: {w}" for w in found.warnings]
            k, n = int(found.suspected.sum()), len(y)
            whole = proportion(self.name, "suspected_labels", k, n, conf, Scope(split=role), suspected=k)
            out.append(whole)
            per_class = {}
            for c, cls in enumerate(names):
                in_c = y == c
                kc = int((found.suspected & in_c).sum())
                per_class[cls] = kc
                out.append(proportion(self.name, f"suspected_labels:{cls}", kc, int(in_c.sum()), conf,
                                      Scope(split=role), suspected=kc,
                                      undefined=f"no item labelled {cls} in the {role} split"))
            order = [j for j in np.argsort(found.quality, kind="stable") if found.suspected[j]]
            summary[role] = {"items": n, "suspected": k, "per_class": per_class,
                             "suspected_items": [f"{ids[j]} (labelled {names[y[j]]}, model: "
                                                 f"{names[found.suggested[j]]})" for j in order[:50]]}
            if n:
                where = ", ".join(f"{v} labelled {c}" for c, v in per_class.items() if v)
                findings.append(Finding(topic=Topic.DATA, cites={"share": whole}, text=(
                    f"{k} of {n} labels of the {role} split look wrong ({{share}})" + (f": {where}." if k else ".")
                )))
            by_id = {i: j for j, i in enumerate(ids)}
            rows += [(role, i, x, names[y[by_id[i]]], names[found.suggested[by_id[i]]])
                     for _, i, x in lowest.items() if found.suspected[by_id[i]]]
        artefacts = self._thumbnails(ctx, rows) if rows else []
        if uc.confidential:
            limitations.append("confidential use case: no thumbnails of the suspected items (real inputs)")
        if "train" in ctx.data.roles and "train" not in self._splits(p, ctx.data.roles):
            limitations.append("the train split's labels are not screened: the model's probabilities on its own "
                               "training items are not out of sample, and no cross-validation was run")
        return CheckOutcome(
            check=self.name, measurements=out, findings=findings, artefacts=artefacts, summary=summary,
            limitations=limitations,
            caveat="A suspected label is one the model contradicts with confidence: a candidate for review by an "
                   "expert, not a proven error.",
            validity=["confident learning (cleanlab 2.9, pruning by the estimated noise rate per class pair) on the "
                      "assessed model's softmax probabilities on splits it was not trained on",
                      f"suspected share: {conf:.0%} Clopper-Pearson interval over the split's items; it estimates "
                      "the noise rate the model can see (errors the model repeats are not found)"])

    def _thumbnails(self, ctx: Context, rows) -> list:
        from trustcase.explain import imaging

        lo_hi = tuple(ctx.use_case.model.value_range)
        tiles = imaging.to_uint8(np.stack([x for _, _, x, _, _ in rows]), lo_hi)
        per_row = 8
        grid = [list(tiles[i:i + per_row]) for i in range(0, len(tiles), per_row)]
        path = ctx.workdir / "suspected.png"
        imaging.save_png(path, imaging.tile(grid, scale=max(1, 96 // tiles.shape[1])))
        (ctx.workdir / "suspected.csv").write_text("split,item,label,model\n" + "".join(
            f"{r},{i},{lab},{m}\n" for r, i, _, lab, m in rows))
        return [ctx.artefact(path, "image"), ctx.artefact(ctx.workdir / "suspected.csv")]
