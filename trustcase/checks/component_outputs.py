"""The `component_outputs` check: a black-box component's own outputs (probabilities, OOD scores,
explanations) judged against the data (science in `models.blackbox`)."""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator

from trustcase import seeding
from trustcase.checks import Check, Context, Params, Produces, Unsupported
from trustcase.measurement import auroc, estimate, proportion
from trustcase.models.blackbox import BlackBox, _meta_rows, deletion_drops
from trustcase.robustness import perturbations as P
from trustcase.schemas import CheckOutcome, Curve, Measurement, PerturbationScope, Scope, Series, Stage


class ComponentParams(Params):
    split: str = "test"
    ood_perturbations: dict[str, float] = Field(
        {}, description="perturbation -> amplitude beyond the ODD, used as out-of-distribution data")
    deletion_fractions: list[float] = [0.05, 0.1, 0.2, 0.3]
    explain_items: int = Field(64, ge=1, description="items scored by the deletion test (it costs predictions)")

    @field_validator("ood_perturbations")
    @classmethod
    def _known(cls, v: dict[str, float]) -> dict[str, float]:
        for name, a in v.items():
            if P.get(name, (0.0, 255.0)).validate(a) == 0:  # unknown names and amplitudes: PerturbationError
                raise ValueError(f"{name}: amplitude 0 is the clean data, not out of distribution")
        return v

    @field_validator("deletion_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < f < 1 for f in v):
            raise ValueError("deletion_fractions must be non-empty, each in (0, 1)")
        return sorted(v)


class ComponentOutputs(Check):
    """Abstentions, the component's own OOD scores as a monitor, and its explanations' faithfulness."""

    name = "component_outputs"
    Params = ComponentParams
    stage = Stage.TESTING

    @classmethod
    def produces(cls, params, use_case):
        """metrics (scope = split; `ood_*` under a perturbation scope for each `ood_perturbations` entry)
            abstention_rate, abstention_rate:<class>   UNKNOWN answers, overall and per true class
            answered_accuracy                          accuracy of the decisions that are not UNKNOWN
            undetected_rate:<critical>                 critical items answered with another class (UNKNOWN
                                                       goes to an operator, so it is not a silent miss)
            ood_alarm_rate                             OOD_scores >= 1 on the (in-ODD) split: false alarms
            ood_detection_rate, ood_auroc              under a perturbation beyond the ODD: alarms raised,
                                                       and how well the score separates clean from perturbed
            explanation_deletion_gain                  probability drop when the map's top pixels are
                                                       deleted, minus the drop for as many random pixels
        summary keys: decisions_differ_from_argmax, answered, n, ood (per perturbation), deletion (curve data)"""
        names = use_case.model.class_names
        clean = ["abstention_rate", "answered_accuracy", f"undetected_rate:{use_case.model.critical_class}",
                 *(f"abstention_rate:{c}" for c in names), "ood_alarm_rate", "explanation_deletion_gain"]
        return [Produces(m, params.split) for m in clean] + [
            Produces(m, params.split, k) for k in params.ood_perturbations for m in ("ood_detection_rate", "ood_auroc")]

    def run(self, ctx: Context) -> CheckOutcome:
        p: ComponentParams = self.params
        model = ctx.model
        if not isinstance(model, BlackBox) or not model.challenge:
            raise Unsupported("component_outputs needs a component in the challenge interface (model.format: "
                              "challenge): only it answers UNKNOWN, OOD scores and explanations")
        uc, conf = ctx.use_case, ctx.use_case.plan.confidence
        names, ci = uc.model.class_names, uc.critical_index
        k = len(names)
        abstain, per_class = 0, np.zeros(k, np.int64)
        class_n = np.zeros(k, np.int64)
        answered = correct = undetected = differ = n = 0
        ood_clean: list[np.ndarray] = []
        ood_pert: dict[str, list[np.ndarray]] = {name: [] for name in p.ood_perturbations}
        top_drops, rnd_drops = [], []
        has_ood = has_maps = True
        for batch in ctx.batches(p.split):
            out = model.outputs(batch.images, _meta_rows(batch.meta, len(batch)), batch.ids)
            d, y = out.decisions, batch.labels
            n += len(y)
            unk = d < 0
            abstain += int(unk.sum())
            per_class += np.bincount(y[unk], minlength=k)
            class_n += np.bincount(y, minlength=k)
            answered += int((~unk).sum())
            correct += int((d[~unk] == y[~unk]).sum())
            undetected += int(((y == ci) & ~unk & (d != ci)).sum())
            differ += int((~unk & (d != out.probabilities.argmax(axis=1))).sum())
            has_ood &= out.ood_scores is not None
            if has_ood:
                ood_clean.append(out.ood_scores)
                for name, a in p.ood_perturbations.items():
                    seeds = seeding.item_seeds(ctx.seed, self.name, batch.ids, name)
                    x = P.get(name, uc.model.value_range).apply(batch.images, a, seeds)
                    s = model.outputs(x, _meta_rows(batch.meta, len(batch)), batch.ids).ood_scores
                    ood_pert[name].append(s if s is not None else np.full(len(batch), np.nan))
            has_maps &= out.explanations is not None
            room = p.explain_items - sum(len(t) for t in top_drops)
            if has_maps and room > 0:
                sel = np.arange(min(room, len(batch)))
                target = np.where(d[sel] >= 0, d[sel], out.probabilities[sel].argmax(axis=1))
                t, r = deletion_drops(model, batch.images[sel], out.explanations[sel], target,
                                      p.deletion_fractions, seeding.item_seeds(ctx.seed, self.name,
                                                                               batch.ids[:len(sel)], "deletion"))
                top_drops.append(t)
                rnd_drops.append(r)
        scope = Scope(split=p.split)

        def prop(metric: str, hits: int, total: int, sc: Scope = scope, amplitude=None) -> Measurement:
            return proportion(self.name, metric, hits, total, conf, sc, amplitude)

        ms = [prop("abstention_rate", abstain, n), prop("answered_accuracy", correct, answered),
              prop(f"undetected_rate:{names[ci]}", undetected, int(class_n[ci]))]
        ms += [prop(f"abstention_rate:{c}", int(per_class[i]), int(class_n[i])) for i, c in enumerate(names)]
        limitations, curves = [], []
        summary = {"n": n, "answered": answered, "decisions_differ_from_argmax": differ, "ood": {}}
        if has_ood and ood_clean:
            clean = np.concatenate(ood_clean)
            ms.append(prop("ood_alarm_rate", int((clean >= 1).sum()), len(clean)))
            for name, a in p.ood_perturbations.items():
                s = np.concatenate(ood_pert[name])
                sc = Scope(split=p.split, perturbation=PerturbationScope(name=name, max_amplitude=a))
                ms.append(prop("ood_detection_rate", int((s >= 1).sum()), len(s), sc, a))
                roc = auroc(clean, s)
                ms.append(estimate(check=self.name, metric="ood_auroc", value=roc, n=len(s), interval=None, scope=sc,
                                      amplitude=a))
                summary["ood"][name] = {"amplitude": a, "detection_rate": float((s >= 1).mean()), "auroc": roc}
        else:
            limitations.append("the component gives no OOD_scores: its monitoring could not be evaluated")
        if has_maps and top_drops:
            t, r = np.concatenate(top_drops), np.concatenate(rnd_drops)
            gain = t.mean(axis=0) - r.mean(axis=0)
            ms.append(estimate(check=self.name, metric="explanation_deletion_gain", value=float(gain.mean()),
                               interval=None, n=len(t), scope=scope,
                               details={"fractions": p.deletion_fractions, "gain": gain.tolist()}))
            curves.append(Curve(
                id="component_outputs/deletion", title="Deleting the pixels the component's maps point at",
                x_label="fraction of pixels deleted (set to the image mean)",
                y_label="drop of the decided class's probability", x=p.deletion_fractions,
                series={"pixels ranked by the map": Series(y=t.mean(axis=0).tolist()),
                        "random pixels": Series(y=r.mean(axis=0).tolist())}))
            summary["deletion"] = {"fractions": p.deletion_fractions, "top": t.mean(axis=0).tolist(),
                                   "random": r.mean(axis=0).tolist()}
        else:
            limitations.append("the component gives no explainability maps: they could not be scored")
        if differ:
            limitations.append(f"{differ} decision(s) differ from the argmax of the component's probabilities: "
                               "checks that read probabilities (performance, sweeps) judge the argmax")
        return CheckOutcome(
            check=self.name, measurements=ms, curves=curves, limitations=limitations, summary=summary,
            validity=[f"{n} items of split {p.split!r}; UNKNOWN counted as an abstention (deferred to an operator)",
                      "OOD alarm when the component's OOD_score >= 1",
                      f"explanations scored on up to {p.explain_items} items by deletion (fill: image mean), "
                      f"seed {ctx.seed}"],
        )

