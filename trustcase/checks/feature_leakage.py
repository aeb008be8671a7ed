"""The `feature_leakage` check (AMLAS data stage): items of a split that the model cannot tell from a training
item, cosine similarity of their penultimate features at least `threshold` (science in `data.leakage`).

Measurement per compared split: `feature_leakage` (a census: how many of its items have such a training item),
the pairs in the summary. Claims read "feature_leakage <= 0".
"""

from __future__ import annotations

from pydantic import Field

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data.leakage import NearestReference
from trustcase.measurement import census, over_sample
from trustcase.odd.features import FeatureExtractor
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic


class FeatureLeakageParams(Params):
    reference: str = Field("train", description="the split whose items must not reappear")
    splits: list[str] | None = Field(None, description="the splits compared; None: every other split")
    # on ELPV with a pooled CNN (group-aware splits: no test cell is a training cell; bench_data.py) 0.999 flags 1
    # of 388 distinct test cells (0.995: 12, 0.99: 29) but finds only 8% of copies with 2 grey levels of noise
    # (0.995: 77%, 0.99: 98%): feature similarity is the second look, the perceptual hash of data_quality the first
    threshold: float = Field(0.999, gt=0, le=1, description="centred cosine similarity from which two items are one")


class FeatureLeakage(Check):
    name = "feature_leakage"
    Params = FeatureLeakageParams
    stage = Stage.DATA

    @classmethod
    def produces(cls, params, use_case):
        splits = params.splits if params.splits is not None else [s for s in use_case.data.splits
                                                                  if s != params.reference]
        return [Produces("feature_leakage", s) for s in splits]

    def run(self, ctx: Context) -> CheckOutcome:
        p: FeatureLeakageParams = self.params
        extract = FeatureExtractor(ctx.model)
        index = NearestReference()
        for b in ctx.batches(p.reference):
            index.add(b.ids, extract(b.images)[0])
        out, findings, summary = [], [], {}
        splits = p.splits if p.splits is not None else [r for r in ctx.data.roles if r != p.reference]
        for role in splits:
            pairs, n = [], 0
            for b in ctx.batches(role):
                sim, ref = index.nearest(extract(b.images)[0])
                n += len(b)
                pairs += [(float(s), str(i), r) for s, i, r in zip(sim, b.ids, ref) if s >= p.threshold]
            pairs.sort(key=lambda t: (-t[0], t[1]))
            m = census(self.name, "feature_leakage", len(pairs) if n else None, n, scope=Scope(split=role),
                       details={"threshold": p.threshold, "reference": p.reference,
                                **({} if n else {"undefined": f"no item in the {role} split"})})
            m = over_sample(m, ctx.data.sampled(role, p.reference))
            out.append(m)
            summary[role] = [f"{i} ~ {p.reference} {r} (cosine {s:.4f})" for s, i, r in pairs[:50]]
            if pairs:
                findings.append(Finding(topic=Topic.DATA, cites={"k": m}, text=(
                    f"{{k}} of the {n} {role} items look, to the model, like a {p.reference} item (feature cosine "
                    f">= {p.threshold}): leakage to review.")))
        return CheckOutcome(
            check=self.name, measurements=out, findings=findings, summary=summary,
            caveat="Near in the model's feature space is not the same image: a flagged pair is a candidate leak, "
                   "for a reviewer to confirm.",
            validity=[f"cosine similarity of the model's {extract.mode} features ({extract.why}), exact nearest "
                      f"{p.reference} item, threshold {p.threshold}",
                      f"{len(index)} {p.reference} items indexed"])
