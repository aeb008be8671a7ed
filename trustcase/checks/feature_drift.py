"""The `feature_drift` check (AMLAS data stage): does a split differ from the reference split in the model's own
feature space? MMD two-sample test on the penultimate features (the logits for a model whose last Linear layer
cannot be found, e.g. a black box), per split and per subgroup of each categorical ODD descriptor (science in
`data.drift`).

Measurements per compared split (and subgroup): `feature_drift_pvalue` (the permutation p-value, a Monte-Carlo
estimate over B seeded permutations: (1 + k) / (1 + B) with k of them reaching the observed statistic, and the
Clopper-Pearson interval of k of B for the exact permutation p-value) and `feature_drift_mmd` (the shift's size on the
seeded samples: a descriptive estimate without an interval, so no claim passes on it). Claims read e.g.
"feature_drift_pvalue >= 0.01" (PASS only if the interval's lower end is >= 0.01).
"""

from __future__ import annotations

from pydantic import Field

from trustcase.checks import Check, Context, Params, Produces
from trustcase.data import drift as D
from trustcase.measurement import clopper_pearson, estimate
from trustcase.odd.features import FeatureExtractor
from trustcase.schemas import CheckOutcome, Finding, Scope, Stage, Topic


class FeatureDriftParams(Params):
    reference: str = Field("train", description="the split the others are compared with")
    splits: list[str] | None = Field(None, description="the splits compared; None: every other split")
    subgroups: bool = Field(True, description="also per value of each categorical ODD descriptor")
    max_items: int = Field(500, ge=D.MIN_ITEMS, le=5000, description="seeded sample per side (the test is quadratic)")
    permutations: int = Field(200, ge=19, le=10000)


class FeatureDrift(Check):
    name = "feature_drift"
    Params = FeatureDriftParams
    stage = Stage.DATA

    @staticmethod
    def _splits(p: FeatureDriftParams, roles) -> list[str]:
        return list(p.splits) if p.splits is not None else [r for r in roles if r != p.reference]

    @classmethod
    def produces(cls, params, use_case):
        return [Produces(m, s, subgroups=params.subgroups) for s in cls._splits(params, use_case.data.splits)
                for m in ("feature_drift_pvalue", "feature_drift_mmd")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: FeatureDriftParams = self.params
        uc = ctx.use_case
        extract = FeatureExtractor(ctx.model)
        image_like = len(uc.model.input_shape) == 3
        keys = [d.name for d in uc.odd.descriptors if d.categorical] if p.subgroups else []
        samples: dict[tuple, D.Sample] = {}

        def read(role: str) -> None:
            for b in ctx.batches(role):
                f, desc = D.features_and_descriptors(extract, b.images, tuple(uc.model.value_range), image_like)
                ids = [f"{role}/{i}" for i in b.ids]
                samples.setdefault((role, None, None), D.Sample(p.max_items, ctx.seed, self.name)).update(ids, f, desc)
                for k in keys:
                    values = b.meta.get(k, [])
                    for v in sorted(set(values)):
                        rows = [j for j, x in enumerate(values) if x == v]
                        samples.setdefault((role, k, v), D.Sample(p.max_items, ctx.seed, self.name)).update(
                            [ids[j] for j in rows], f[rows], {n: a[rows] for n, a in desc.items()})

        read(p.reference)
        out, findings, summary, limitations = [], [], {}, []
        for role in self._splits(p, ctx.data.roles):
            read(role)
            groups = [(None, None)] + sorted({(k, v) for (r, k, v) in samples if r == role and k is not None})
            for k, v in groups:
                scope = Scope(split=role, subgroup={k: v} if k else {})
                ref, oth = samples.get((p.reference, k, v)), samples.get((role, k, v))
                label = scope.label()
                n_ref, n_oth = len(ref) if ref else 0, len(oth) if oth else 0
                if min(n_ref, n_oth) < D.MIN_ITEMS:
                    why = (f"{n_ref} {p.reference} and {n_oth} {role} items: the test needs at least {D.MIN_ITEMS} "
                           "per side")
                    for metric in ("feature_drift_pvalue", "feature_drift_mmd"):
                        out.append(estimate(self.name, metric, None, n_oth, None, scope=scope,
                                            details={"undefined": why}))
                    limitations.append(f"{label}: {why}")
                    continue
                r = D.compare(ref, oth, p.permutations, ctx.seed, self.name)
                summary[label] = r
                # the exact permutation p-value is a proportion of all permutations: B seeded ones estimate it
                iv = clopper_pearson(r["exceeding"], r["permutations"], uc.plan.confidence).model_copy(
                    update={"method": f"clopper-pearson on {r['exceeding']} of {r['permutations']} permutations "
                                      "reaching the observed MMD"})
                pv = estimate(self.name, "feature_drift_pvalue", r["pvalue"], r["n_other"], iv, scope=scope,
                              details={"reference": p.reference, **r})
                out += [pv, estimate(self.name, "feature_drift_mmd", r["mmd"], r["n_other"], None, scope=scope,
                                     details={"reference": p.reference, "bandwidth": r["bandwidth"],
                                              "no_interval": "MMD of seeded samples, descriptive: no interval "
                                                             "is computed, so no claim passes on it"})]
                if k is None:
                    top = ", ".join(f"{m['descriptor']} (KS {m['ks']:.2f})" for m in r["moved"])
                    # in words at the 5% level, on the p-value's interval (a Monte-Carlo estimate)
                    said = "drift" if iv.upper < 0.05 else "no drift shown" if iv.lower >= 0.05 else "undecided"
                    findings.append(Finding(topic=Topic.DATA, cites={"p": pv}, text=(
                        f"The {role} split against the {p.reference} split in the model's feature space: MMD "
                        f"{r['mmd']:.3f}, p-value {{p}}, {said} at the 5% level" + (
                            f"; the descriptors that moved most: {top}." if top else ".")
                    )))
        return CheckOutcome(
            check=self.name, measurements=out, findings=findings, summary=summary, limitations=limitations,
            caveat="A small p-value says the split is distributed differently from the reference in what the model "
                   "sees, not that the model is wrong on it.",
            validity=[f"maximum mean discrepancy, Gaussian kernel on standardised {extract.mode} features "
                      f"({extract.why}), bandwidth by the median heuristic, p-value over {p.permutations} seeded "
                      "permutations",
                      f"each side a seeded sample of at most {p.max_items} items (the one seeding rule, stream "
                      "'sample'): the same sample at any batch size or order"])
