"""The `poisoning_screen` check (AMLAS data stage; EU AI Act Art. 15(5), data poisoning): spectral signatures and
activation clustering over the training items' penultimate features, one class at a time (science in
`data.poisoning`).

Measurements on the screened split: `poisoning_alarms` (a census: classes whose features split into a small, well
separated cluster that the class's held-out items fill significantly less often: clean data has such clusters of its
own) and `poisoning_suspects` (items in those clusters), both undefined unless every class was screened (a class too
small to screen, in either split, could hold the cluster). The summary ranks each class's items by spectral
score. Each class is screened on a seeded sample of at most `max_items` items (memory bound: clustering and the
silhouette are quadratic); over a sample the counts are estimates without an interval (`measurement.over_sample`).
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data import poisoning as P
from trustcase.data.drift import Sample
from trustcase.errors import Unsupported
from trustcase.measurement import census, over_sample
from trustcase.odd.features import FeatureExtractor
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic


class PoisoningScreenParams(Params):
    split: str = "train"
    held_out: str = Field("validation", description="a split the model was not trained on, assumed clean: a cluster "
                          "its items fill as often is the data's own, not a backdoor's")
    level: float = Field(0.01, gt=0, lt=0.5, description="level of the one-sided Fisher exact test per class "
                         "(Bonferroni over the classes): the false-alarm rate on clean data if the model treats its "
                         "training items like held-out ones")
    max_share: float = Field(0.15, gt=0, lt=0.5, description="an alarm's cluster holds at most this share of a class")
    min_silhouette: float = Field(0.15, ge=-1, le=1, description="and is at least this well separated")
    top: int = Field(20, ge=0, le=200, description="items listed per class, by spectral score")
    max_items: int = Field(2000, ge=P.MIN_ITEMS, le=20000, description="seeded sample screened per class: memory "
                           "and time bound (the silhouette is quadratic)")


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
        # per class, the same items in the same order at any batching (the one seeding rule, stream "sample")
        samples = {role: [Sample(p.max_items, ctx.seed, self.name) for _ in names]
                   for role in (p.split, p.held_out) if role in ctx.data.roles}
        for role, per_class in samples.items():
            for b in ctx.batches(role):
                f = extract(b.images)[0]
                for c in np.unique(b.labels):
                    rows = np.flatnonzero(b.labels == c)
                    per_class[int(c)].update([b.ids[j] for j in rows], f[rows])
        alarms, suspects, screened, summary, limitations = 0, 0, 0, {}, []
        if p.held_out not in ctx.data.roles:
            limitations.append(f"no {p.held_out} split (held_out) to tell the data's own clusters from a backdoor's")
        held_out = samples.get(p.held_out, [[] for _ in names])
        for cls, sample, clean in zip(names, samples.get(p.split, [[] for _ in names]), held_out, strict=True):
            if min(len(sample), len(clean)) < P.MIN_ITEMS:
                limitations.append(f"class {cls}: {len(sample)} {p.split} and {len(clean)} {p.held_out} items, the "
                                   f"screen needs at least {P.MIN_ITEMS} in each")
                continue
            (f, _), ids = sample.arrays(), sample.ids()
            r = P.screen(f, clean.arrays()[0], ctx.seed, p.max_share, p.min_silhouette, p.level / len(names))
            screened += 1
            alarms += r.alarm
            suspects += len(r.suspects)
            ranked = np.argsort(-r.spectral, kind="stable")[:p.top]
            summary[cls] = {"items": sample.seen, "screened": len(sample), "alarm": r.alarm,
                            "cluster_share": r.cluster_share, "silhouette": r.silhouette, "candidate": r.candidate,
                            f"{p.held_out}_share": r.held_out_share, "pvalue": r.pvalue,
                            "suspects": [ids[i] for i in r.suspects], "top_spectral": [ids[i] for i in ranked]}
        scope = Scope(split=p.split)
        # a class never screened could hold the poisoned cluster: the counts are defined only over every class
        whole = screened == len(names)
        why = {} if whole else {"undefined": f"{len(names) - screened} of {len(names)} classes of the {p.split} "
                                             f"split not screened: " + "; ".join(limitations)}
        cut = [f"{c} {len(s)} of {s.seen}" for c, s in zip(names, samples.get(p.split, []), strict=False)
               if s.seen > len(s)]
        sampled = "; ".join(filter(None, [ctx.data.sampled(p.split), cut and (
            f"screened on a seeded sample of at most {p.max_items} items per class ({', '.join(cut)}): the items "
            "outside it were not screened")]))
        m_alarm = over_sample(census(self.name, "poisoning_alarms", alarms if whole else None, screened, scope=scope,
                                     details=why), sampled)
        m_susp = over_sample(census(self.name, "poisoning_suspects", suspects if whole else None,
                                    sum(len(s) for s in samples.get(p.split, [])), scope=scope, details=why), sampled)
        findings = [Finding(topic=Topic.DATA, cites={"a": m_alarm, "s": m_susp}, text=(
            f"The poisoning screen of the {p.split} split raises {{a}} alarm(s) over {screened} classes, "
            f"{{s}} suspect items: " + ", ".join(c for c, v in summary.items() if v["alarm"]) + "."))] if alarms \
            else []
        if own := [f"{c} ({v['cluster_share']:.0%} of its {p.split} items, {v[f'{p.held_out}_share']:.0%} of its "
                   f"{p.held_out} items)" for c, v in summary.items() if v["candidate"] and not v["alarm"]]:
            findings.append(Finding(topic=Topic.DATA, cites={"a": m_alarm}, text=(
                f"The poisoning screen of the {p.split} split ({{a}} alarms) found small, well separated clusters "
                f"that the {p.held_out} split holds as often, the data's own sub-populations, not a backdoor's: "
                + "; ".join(own) + ".")))
        return CheckOutcome(
            check=self.name, measurements=[m_alarm, m_susp], findings=findings, summary=summary,
            limitations=limitations,
            caveat="A screen, not a proof of clean data: a backdoor whose items the model does not set apart in its "
                   "features is not found.",
            validity=[f"penultimate features ({extract.why}); per class: 2-means on at most 10 principal components "
                      f"(a candidate: smaller cluster <= {p.max_share:.0%} of the class, silhouette >= "
                      f"{p.min_silhouette}; an alarm: a candidate the class's {p.held_out} items fill less often, "
                      f"one-sided Fisher exact p < {p.level:g} / {len(names)} classes), spectral signature scores on "
                      "the top singular vector",
                      f"the {p.held_out} split is assumed clean and not trained on (a backdoor planted in "
                      f"{p.held_out} too would be taken for the data's own cluster); the level {p.level:g} is the "
                      f"screen's false-alarm rate on clean data only if the model's features of its {p.split} items "
                      f"and of the {p.held_out} items are exchangeable: training can set its own items apart, and the "
                      f"cluster is chosen on the {p.split} items (their share of it biased upwards), both towards "
                      "false alarms: an alarm on clean data can be likelier than the level says; a screen without "
                      "alarm does not rest on it",
                      f"each class a seeded sample of at most {p.max_items} items (the one seeding rule), the whole "
                      "class when smaller"])
